"""Section 3p: where tuned TVM loses to onnxruntime on ResNet-18 v2, kernel by kernel, and what threads do.

    .venv/bin/python bench/profile_compare.py [--budgets 256,1024] [--repeats 7] [--artifacts STORE] \
        [--out bench/RESULTS-profile.md] [--json .cache/profile.json]

In this one process, on ``tvm.cpu()`` and onnxruntime's CPU provider, the same ONNX graph and weights (random, seed
0) as section 3 of ``bench/bench.py``:

1. latency (ms per image, medians of ``--repeats`` measurements) of onnxruntime and of ResNet-18 tuned for
   ``llvm -mcpu=native`` with each budget (tunings continue each other; reused from the store), each with one
   thread and with one per physical core. TVM's pool is sized before TVM starts (``TVM_NUM_THREADS`` = the
   physical cores, :mod:`pipeline.threads`) and shrunk with ``runtime.config_threadpool`` for the one-thread rows;
   onnxruntime's with ``intra_op_num_threads``.
2. per-kernel profiles of the largest budget and of onnxruntime, both with every core: TVM's from
   :func:`pipeline.profiling.profile_vm` (``--profile``'s code: every kernel call timed through the VM's
   instrument, glue = measured median - kernels), onnxruntime's from its own profiler (``enable_profiling``:
   each node's ``kernel_time`` events, the median over runs), grouped into the same categories (convolutions,
   pooling, dense, elementwise, layout), and the convolutions side by side by input shape and output channels.

Nothing here asserts timings; only ratios from one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.threads import default_threads_here, physical_cores  # noqa: E402

default_threads_here()  # before TVM's runtime starts: its pool never grows later

from report import RESNET, TUNED_TARGET, fmt  # noqa: E402

log = logging.getLogger("bench.profile")

CATEGORIES = ("convolutions", "pooling", "dense", "elementwise", "layout")


def tvm_category(name: str) -> str:
    """The category of a TVM kernel, by the operators in its fused name."""
    if "conv" in name:
        return "convolutions"
    if "pool" in name:
        return "pooling"
    if "matmul" in name or "dense" in name:
        return "dense"
    if any(op in name for op in ("layout_transform", "transpose", "reshape", "flatten", "squeeze")):
        return "layout"
    return "elementwise"


def ort_category(node: dict[str, Any]) -> str:
    """The category of an onnxruntime node, by its operator (a batch norm it runs as a per-channel 1x1 convolution,
    which TVM fuses into a convolution's epilogue, is elementwise)."""
    op = node["op"]
    data, weight = (node["inputs"] + [[], []])[:2]
    if "Conv" in op and len(data) == 4 and len(weight) == 4 and weight[1] == 1 and data[1] > 1:
        return "elementwise"
    if "Conv" in op:
        return "convolutions"
    if "Pool" in op:
        return "pooling"
    if op in ("Gemm", "MatMul", "FusedGemm"):
        return "dense"
    if op in ("Reorder", "ReorderInput", "ReorderOutput", "Flatten", "Reshape", "Transpose", "Squeeze"):
        return "layout"
    return "elementwise"


def set_tvm_threads(n: int) -> int:
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)
    return int(tvm.get_global_func("runtime.NumThreads")())


def ort_session(onnx_path: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_profile(onnx_path: Path, x: Any, runs: int, work: Path) -> dict[str, Any]:
    """onnxruntime's own per-node profile: each node's median ``kernel_time`` over ``runs`` runs (after warm-ups)."""
    session = ort_session(onnx_path, physical_cores(), str(work / "ort"))
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, {name: x})
    wall_ms = (time.perf_counter() - started) / runs * 1e3
    events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        durations[node].append(event["dur"] / 1e3)
        args = event.get("args", {})
        meta[node] = {"op": args.get("op_name", "?"),
                      "inputs": [list(s.values())[0] for s in args.get("input_type_shape", [])],
                      "outputs": [list(s.values())[0] for s in args.get("output_type_shape", [])]}
    # The last ``runs`` occurrences of each node are the timed runs (the warm-ups come first).
    nodes = [{"name": n, **meta[n], "ms": statistics.median(d[-runs:])} for n, d in durations.items()]
    nodes.sort(key=lambda n: -n["ms"])
    return {"nodes": nodes, "kernels_ms": sum(n["ms"] for n in nodes), "wall_ms": wall_ms}


def conv_key_ort(node: dict[str, Any]) -> str:
    data, weight = (node["inputs"] + [[], []])[:2]
    if len(data) == 4 and len(weight) == 4:
        return f"{data[1]}x{data[2]}x{data[3]} -> {weight[0]}, {weight[2]}x{weight[3]}"
    return "?"


def conv_key_tvm(kernel: dict[str, Any]) -> str:
    """The same key from a TVM kernel: its data (first argument) and output (last), NHWC as the tuned build lays
    them out, and the kernel size from its FLOPs per call (2 x output elements x input channels x kh x kw, the
    epilogue's few operations per output element rounded away): its weights are prepacked into a blocked layout."""
    dims = [[int(d) for d in re.findall(r"\d+", s.split(":")[0])] for s in kernel.get("shapes") or ()]
    calls, flops = kernel.get("calls") or 0, kernel.get("flops")
    if len(dims) < 2 or len(dims[0]) != 4 or len(dims[-1]) != 4 or not flops or not calls:
        return "?"
    data, out = dims[0], dims[-1]
    taps = flops / calls / (2 * out[1] * out[2] * out[3] * data[3])
    size = round(math.sqrt(max(taps, 1.0)))
    return f"{data[3]}x{data[1]}x{data[2]} -> {out[3]}, {size}x{size}"


def measure(store_root: str, budgets: list[int], repeats: int, command: str) -> dict[str, Any]:
    """The section's numbers (tunings continued or reused from ``store_root``)."""
    import numpy as np
    from baselines import resnet_onnx
    from bench import compile_model, machine_line, number_for, timed
    import tvm
    from tvm import relax

    from pipeline.models import ModelSpec, resolve_model
    from pipeline.profiling import kernel_flops, profile_vm
    from pipeline.store import ArtifactStore

    cores = physical_cores()
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_line(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "command": command, "cores": cores, "repeats": repeats, "rows": []}
    model = resolve_model(ModelSpec(RESNET, weights="random"))
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        onnx_path = resnet_onnx(model, work / "r.onnx")
        expected = None
        for threads in (1, cores):
            session = ort_session(onnx_path, threads)
            name = session.get_inputs()[0].name
            expected = session.run(None, {name: x})[0]
            run = lambda s=session, n=name: s.run(None, {n: x})  # noqa: E731
            results["rows"].append({"engine": "onnxruntime", "threads": threads,
                                    "latency": timed(run, repeats, number_for(run))})
            log.info("onnxruntime, %d thread(s): %.2f ms", threads, results["rows"][-1]["latency"]["median"] * 1e3)

        vm, compiled = None, None
        for budget in budgets:
            compiled = compile_model(model, TUNED_TARGET, store_root, budget)
            report = compiled["report"] or {}
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled["library"])), tvm.cpu())
            tx = tvm.runtime.tensor(x)
            out = vm["main"](tx)
            out = (out[0] if isinstance(out, (list, tuple)) else out).numpy()
            for threads in (1, cores):
                got = set_tvm_threads(threads)
                run = lambda v=vm, t=tx: v["main"](t)  # noqa: E731
                row = {"engine": f"TVM tuned, {budget} trials", "threads": got,
                       "latency": timed(run, repeats, number_for(run)),
                       "diff": float(np.abs(out - expected).max()), "tuning_s": report.get("seconds"),
                       "trials_new": report.get("trials_new")}
                results["rows"].append(row)
                log.info("%s, %d thread(s): %.2f ms", row["engine"], got, row["latency"]["median"] * 1e3)
        assert vm is not None and compiled is not None, "no budget"
        set_tvm_threads(cores)
        vm.set_input("main", tvm.runtime.tensor(x))
        flops = kernel_flops(ArtifactStore(store_root), compiled["build"])
        results["tvm_profile"] = profile_vm(vm, repeat=30, flops=flops).as_dict()
        results["ort_profile"] = ort_profile(onnx_path, x, 30, work)
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="256,1024")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("prefect", "httpx", "tvm", "pipeline", "tasks"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("tasks.tune").setLevel(logging.INFO)
    from pipeline.store import default_root

    store_root = str(Path(args.artifacts).resolve() if args.artifacts else default_root())
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    command = "bench/profile_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = measure(store_root, budgets, args.repeats, command)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    text = render(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def render(r: dict[str, Any], standalone: bool = True) -> str:
    """The section as markdown; ``standalone``: with its own command line and machine (run alone)."""
    cores = r["cores"]
    ort = {row["threads"]: row["latency"]["median"] for row in r["rows"] if row["engine"] == "onnxruntime"}
    lines = [
        "## 3p. Where tuned TVM loses to onnxruntime, and threads",
        "",
        *([f"Generated by `{r['command'].strip()}` on {r['date']} ({r['seconds']:.0f} s).", "",
           f"**Machine**: {r['machine']}", ""] if standalone else []),
        f"ResNet-18 v2 (random weights, seed 0), batch 1, both engines in one process on the same ONNX graph and "
        f"weights; medians of {r['repeats']} measurements (min–max), ms per image. Ratios are to onnxruntime with the "
        "same threads.",
        "",
        "| engine | threads | ms per image | ratio to onnxruntime (same threads) | max abs diff | tuning |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lat = row["latency"]
        ratio = lat["median"] / ort[row["threads"]] if row["threads"] in ort else float("nan")
        tuning = f"{row['trials_new']} new trials, {row['tuning_s']:.0f} s" if row.get("tuning_s") else ""
        diff = f"{row['diff']:.1e}" if "diff" in row else "0"
        lines.append(f"| {row['engine']} | {row['threads']} | {fmt(lat, 1e3, 2)} | {ratio:.2f}x | {diff} | {tuning} |")

    tp, op = r["tvm_profile"], r["ort_profile"]
    cat_t: dict[str, float] = defaultdict(float)
    cat_o: dict[str, float] = defaultdict(float)
    for k in tp["kernels"]:
        cat_t[tvm_category(k["name"])] += k["ms"]
    for n in op["nodes"]:
        cat_o[ort_category(n)] += n["ms"]
    lines += [
        "",
        f"Per-kernel profiles with {cores} threads each: TVM's from `--profile`'s code "
        "(`pipeline.profiling.profile_vm`, every kernel call timed through the VM's instrument; the glue is the "
        "measured median minus the kernels), onnxruntime's from its own profiler (each node's `kernel_time`, the "
        "median over 30 runs; the rest of its run time is its own glue).",
        "",
        "| category | TVM, ms | onnxruntime, ms | TVM - onnxruntime, ms |",
        "|---|---|---|---|",
    ]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | {cat_t[cat]:.2f} | {cat_o[cat]:.2f} | {cat_t[cat] - cat_o[cat]:+.2f} |")
    ort_glue = max(0.0, op["wall_ms"] - op["kernels_ms"])
    lines += [
        f"| glue (outside kernels) | {tp['glue_ms']:.2f} | {ort_glue:.2f} | {tp['glue_ms'] - ort_glue:+.2f} |",
        f"| **total** | {tp['total_ms']:.2f} (median {tp['measured_ms']:.2f}) | {op['wall_ms']:.2f} | "
        f"{tp['total_ms'] - op['wall_ms']:+.2f} |",
        "",
        "Convolutions side by side (input C x H x W -> output channels, kernel), ms per inference summed over the "
        "calls with that shape:",
        "",
        "| convolution | TVM calls | TVM, ms | TVM GFLOP/s | onnxruntime nodes | onnxruntime, ms | TVM / onnxruntime "
        "|",
        "|---|---|---|---|---|---|---|",
    ]
    conv_t: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for k in tp["kernels"]:
        if tvm_category(k["name"]) == "convolutions":
            entry = conv_t[conv_key_tvm(k)]
            entry[0] += k["calls"]
            entry[1] += k["ms"]
            entry[2] += k.get("flops") or 0.0
    conv_o: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for n in op["nodes"]:
        if ort_category(n) == "convolutions":
            entry = conv_o[conv_key_ort(n)]
            entry[0] += 1
            entry[1] += n["ms"]
    gaps = sorted(((conv_t[k][1] - conv_o[k][1], k) for k in set(conv_t) & set(conv_o)), reverse=True)[:3]
    worst = "; ".join(f"{k} {conv_t[k][1] / conv_o[k][1]:.2f}x (+{gap:.2f} ms)" for gap, k in gaps if conv_o[k][1])
    lines[-4:-4] = [f"Where TVM loses most (TVM - onnxruntime, by convolution shape): {worst}.", ""] if worst else []
    for key in sorted(set(conv_t) | set(conv_o), key=lambda k: -(conv_t[k][1] if k in conv_t else 0)):
        t, o = conv_t.get(key, [0, 0.0, 0.0]), conv_o.get(key, [0, 0.0])
        gflops = f"{t[2] / (t[1] * 1e6):.1f}" if t[1] and t[2] else "—"
        ratio = f"{t[1] / o[1]:.2f}x" if o[1] and t[1] else "—"
        lines.append(f"| {key} | {t[0]} | {t[1]:.2f} | {gflops} | {o[0]} | {o[1]:.2f} | {ratio} |")
    lines += ["", "TVM's ten slowest kernels:", "", "| kernel | calls | ms | share | GFLOP/s | shapes |",
              "|---|---|---|---|---|---|"]
    for k in tp["kernels"][:10]:
        g = f"{k['gflop_per_s']:.1f}" if k.get("gflop_per_s") else "—"
        lines.append(f"| `{k['name']}` | {k['calls']} | {k['ms']:.3f} | {k['share'] * 100:.1f} % | {g} | "
                     f"{', '.join(k.get('shapes') or [])} |")
    lines += ["", "onnxruntime's ten slowest nodes:", "", "| node | op | ms | input shapes |", "|---|---|---|---|"]
    for n in op["nodes"][:10]:
        shapes = ", ".join("x".join(str(d) for d in s) for s in n["inputs"])
        lines.append(f"| `{n['name']}` | {n['op']} | {n['ms']:.3f} | {shapes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
