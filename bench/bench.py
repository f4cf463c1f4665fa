"""One run, one machine: what the pipeline costs against plain TVM, and how fast the compiled model is.

    .venv/bin/python bench/bench.py [--repeats 5] [--budgets 64,256] [--out bench/RESULTS.md]

The measurements, each a median of ``--repeats`` (>= 5) with min-max, all taken in this one process:

1. warm flow vs plain script: ``resnet_remote`` (all builds cached, a persistent Prefect server that this
   script starts on a free 127.0.0.1 port with its own PREFECT_HOME, and stops at the end) against a plain
   TVM function doing the same device steps (connect, upload, load, set-input, run, fetch) on the same
   rpc_server. Model: efficientnet_lite0 (the demo; real weights shipped offline), target ``llvm``. The flow
   runs as by default (the device keeps the library between runs) and with ``device_cache="off"``.
2. cold ``build`` + ``export-library`` as Prefect tasks inside a flow (fresh store each time) against plain
   ``tvm.compile`` + ``export_library``. Model: resnet18_v2 (random weights), untuned, no schedules (as the plain
   ``tvm.compile``).
3. inference latency of ResNet-18 v2 (random weights, seed 0): TVM default build, TVM tuned with each
   budget (tuned artifacts are reused from the store; the tuning time is the one recorded in the tuning
   artifact), onnxruntime on the same ONNX graph and weights, torch (the same architecture written in torch,
   random weights), as ratios to onnxruntime. TVM runs in this process on ``tvm.cpu()``, one thread per
   physical core (``pipeline.threads``), as onnxruntime and torch.
3p. where tuned TVM loses to onnxruntime: both engines with one thread and with every core, and the largest
   budget's per-kernel profile against onnxruntime's own (``bench/profile_compare.py``, also run alone).
3d. shared tuning records: a second model, ResNet-34 v2 (random weights, the same convolution shapes as ResNet-18),
   built untuned after ResNet-18's tunings for ``llvm -mcpu=native``: with the store's tuning records shared
   (``--shared-tunings on``, the default) and without (the rules alone); latency, onnxruntime on the same graph,
   one cold build + export each (a fresh store holding the imported module and the shared tunings), and how many
   kernels came from which tuning.
4. the untuned default: the demo (efficientnet_lite0) and resnet18_v2 @ ``llvm`` built with the rule-based
   schedules (``schedules="rules"``, the default) and without (``"none"``, TVM's default pipeline, the default
   before): build + export seconds (fresh store each, the imported module given) and ms per image in this
   process.
5. upload: the tuned library uploaded to the rpc_server (MB/s) against a plain loopback socket copy of the
   same bytes, the same bytes sent as one tensor (what "weights out of the library" would pay), and a new
   session's upload + load against finding the copy the device kept + load.

Nothing here asserts timings. The machine has other users: only ratios from one run mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.threads import default_threads_here  # noqa: E402

default_threads_here()  # TVM's pool on every physical core, as onnxruntime and torch: before TVM's runtime starts

from baselines import mxnet_onnx, resnet34_export, resnet_onnx, torch_resnet18_v2  # noqa: E402 - bench/ is sys.path[0]
from report import FLOW_MODEL, FLOW_TARGET, RESNET, TUNED_TARGET, render  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

SERVER_START_S = 120.0
log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------- stats


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min and max of ``samples`` (seconds or any unit)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def machine_line() -> str:
    """CPU model, cores and the SIMD flags that matter, LLVM's CPU name, versions."""
    model, flags = platform.processor() or "unknown CPU", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "unknown CPU", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
    from importlib import metadata

    import psutil
    import tvm

    versions = ", ".join(
        f"{d} {metadata.version(d)}" for d in ("apache-tvm", "apache-tvm-ffi", "onnxruntime", "torch", "prefect")
    )
    return (
        f"{model}; {psutil.cpu_count(logical=False)} cores / {psutil.cpu_count()} threads; "
        f"LLVM cpu {tvm.target.codegen.llvm_get_system_cpu()}; flags: {' '.join(f for f in wanted if f in flags)}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; {versions}"
    )


# ------------------------------------------------------------------------------------ prefect server


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A persistent Prefect server on a free 127.0.0.1 port, in its own process group; yields the API URL."""
    import psutil

    from pipeline.processes import stop_process_tree

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    logf = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
    )
    created = psutil.Process(proc.pid).create_time()
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}); see {home / 'server.log'}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {SERVER_START_S:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_tree(proc.pid, created, grace=15.0, kill_wait=15.0, popen=proc)
        logf.close()


# ----------------------------------------------------------------------------------- pipeline pieces


def compile_model(model: Any, target_text: str, store_root: str, trials: int = 0,
                  schedules: str = "rules") -> dict[str, Any]:
    """import -> (tune) -> build -> export with the plain stage functions; everything cached in the store."""
    from pipeline.planning.plan import plan_build
    from pipeline.store import ArtifactStore
    from pipeline.targets import parse_target
    from tasks.chains import compile_chain, run_plain
    from pipeline.store.layout import LIBRARY_FILE
    from tasks.tune import read_report

    target = parse_target(target_text)
    plan = plan_build(model, target, 3, trials, schedules=schedules)
    store = ArtifactStore(store_root)
    compiled = compile_chain(plan, store, False, run=run_plain)
    report = read_report(compiled.tuning, store) if compiled.tuning else None
    return {
        "target": target, "imported": compiled.module, "build_key": plan.build.key, "report": report,
        "plan": plan, "library": store.file(compiled.library, LIBRARY_FILE), "build": compiled.build,
    }


def timed(fn: Callable[[], Any], repeats: int, number: int = 1, warmup: int = 1) -> dict[str, float]:
    """Seconds per call: ``repeats`` measurements of the mean of ``number`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return summary(samples)


def number_for(fn: Callable[[], Any], target_s: float = 0.2) -> int:
    """Calls per measurement so that one measurement lasts about ``target_s``."""
    start = time.perf_counter()
    fn()
    return max(1, min(50, round(target_s / max(time.perf_counter() - start, 1e-6))))


# --------------------------------------------------------------------------------------- the sections


def bench_latency(store_root: str, budgets: list[int], repeats: int) -> dict[str, Any]:
    """Section 3: ResNet-18 v2 inference latency of each engine, in this process, 2 threads each."""
    import onnxruntime as ort
    import torch

    from pipeline.models import ModelSpec, resolve_model

    model = resolve_model(ModelSpec(RESNET, weights="random"))
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    rows: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp:
        session = ort.InferenceSession(str(resnet_onnx(model, Path(tmp) / "r.onnx")), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        expected = session.run(None, {name: x})[0]
        run_ort = lambda: session.run(None, {name: x})  # noqa: E731
        rows["onnxruntime"] = {"latency": timed(run_ort, repeats, number_for(run_ort)), "diff": 0.0}

    net = torch_resnet18_v2()
    tx = torch.from_numpy(x)

    def run_torch() -> Any:
        with torch.inference_mode():
            return net(tx)

    rows["torch"] = {"latency": timed(run_torch, repeats, number_for(run_torch)), "note": f"{torch.get_num_threads()} threads"}

    variants = [
        ("TVM default, no schedules (untuned)", 0, "llvm", "none"),
        ("TVM rule-based schedules, no search (untuned)", 0, "llvm", "rules"),
        ("TVM default, no schedules, -mcpu=native", 0, TUNED_TARGET, "none"),
        ("TVM rule-based schedules, -mcpu=native", 0, TUNED_TARGET, "rules"),
    ]
    variants += [(f"TVM tuned, {b} trials", b, TUNED_TARGET, "rules") for b in budgets]
    for label, trials, target_text, schedules in variants:
        compiled = compile_model(model, target_text, store_root, trials, schedules)
        run_tvm, out = library_runner(compiled["library"], x)
        row = {"latency": timed(run_tvm, repeats, number_for(run_tvm), warmup=0),
               "diff": float(np.abs(out - expected).max()), "target": target_text}
        if compiled["report"]:
            report = compiled["report"]
            row["tuning_s"] = report["seconds"]  # this increment's tuning
            row["trials"] = trials
            row["trials_reused"] = int(report.get("trials_reused", 0))
            row["trials_new"] = int(report.get("trials_new", trials))
            row["tuning_total_s"] = sum(float(h.get("seconds") or 0) for h in report.get("history", []))
            row["estimated_ms"] = report.get("estimated_ms")
        rows[label] = row
        log.info("latency %s: %.2f ms", label, row["latency"]["median"] * 1e3)
    return rows


def _socket_copy(data: bytes) -> float:
    """Seconds to send ``data`` over a loopback TCP socket to a thread that receives all of it and acks."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while len(received) < len(data):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                received.extend(chunk)
            conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(listener.getsockname(), timeout=60) as client:
        client.sendall(data)
        client.recv(1)
    seconds = time.perf_counter() - start
    thread.join(timeout=60)
    listener.close()
    assert len(received) == len(data)
    return seconds


def _one_session_transfers(host: str, port: int, library: Path, repeats: int, rows: dict[str, Any]) -> None:
    """Uploads and tensor copies in one session.

    A function of its own so that the session is closed on return: a remote Device (``dev._rpc_sess``), a
    closure or a tensor that still refers to the session keeps it open, and the rpc_server serves one session
    at a time.
    """
    import tvm
    from tvm import rpc

    remote = rpc.connect(host, port, session_timeout=600)

    def upload() -> None:
        remote.upload(str(library), f"bench-{time.perf_counter_ns()}.so")

    rows["rpc upload (file)"] = timed(upload, repeats)
    weights = np.frombuffer(library.read_bytes(), dtype=np.uint8)
    dev = remote.cpu()
    rows["rpc tensor copy"] = timed(lambda: tvm.runtime.tensor(weights, dev), repeats)


def bench_upload(library: Path, repeats: int) -> dict[str, Any]:
    """Section 4: rpc upload of the library vs a socket copy of the same bytes (and the bytes as a tensor),
    and what a new session pays: upload + load against finding the copy the device kept, checking it + load."""
    import hashlib

    from pipeline.device import DeviceSpec, EmbeddedServer, open_session
    from pipeline.device.cache import DeviceCache

    data = library.read_bytes()
    sha256, size = hashlib.sha256(data).hexdigest(), len(data)
    rows: dict[str, Any] = {"bytes": size}
    with EmbeddedServer() as server, tempfile.TemporaryDirectory(prefix="bench-device-cache-") as directory:
        host, port = server.address
        spec = DeviceSpec(host=host, port=port)
        _one_session_transfers(host, port, library, repeats, rows)
        cache = DeviceCache(directory, b"bench-secret-32-bytes-long......")
        with open_session(spec) as session:
            cache.settle(session, cache.put(session, data))

        def session_upload_load() -> None:
            with open_session(spec) as session:
                name = f"bench-{time.perf_counter_ns()}.so"
                session.upload(str(library), name)
                session.remote.load_module(name)

        def session_find_load() -> None:
            with open_session(spec) as session:
                copy = cache.find(session, sha256, size)
                assert copy is not None and cache.check(session, copy) is None  # its size and SHA-256, on the device
                session.remote.load_module(cache.path(copy.file))

        rows["new session: upload + load"] = timed(session_upload_load, repeats)
        rows["new session: find the copy kept on the device + load"] = timed(session_find_load, repeats)
    rows["socket copy"] = summary([_socket_copy(data) for _ in range(repeats)])
    return rows


def plain_device_steps(host: str, port: int, library: Path, x: np.ndarray) -> np.ndarray:
    """What a plain TVM script does with a compiled library: connect, upload, load, set-input, run, fetch."""
    import tvm
    from tvm import relax, rpc

    remote = rpc.connect(host, port, session_timeout=600)
    remote.upload(str(library), "plain.so")
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module("plain.so"), dev)
    vm.set_input("main", tvm.runtime.tensor(x, dev))
    vm.invoke_stateful("main")
    vm.time_evaluator("invoke_stateful", dev, number=1, repeat=5)("main")  # what the flow measures
    out = vm.get_outputs("main")
    out = (out[0] if isinstance(out, (list, tuple)) else out).numpy()
    del vm, remote
    return out


def bench_flow(store_root: str, repeats: int) -> dict[str, Any]:
    """Section 1: the warm flow (persistent Prefect server) vs the plain device steps, alternating.

    The flow runs three times per repeat, under the command line's Prefect settings (no flow-run heartbeats:
    ``cli_prefect_settings``) as by default (the device keeps the library, nothing is uploaded) and with
    ``device_cache="off"`` (uploads every run, like the plain script); and under Prefect's default settings.
    """
    from flows._cli import cli_prefect_settings
    from flows.resnet_remote import resnet_remote
    from pipeline.device import EmbeddedServer
    from pipeline.planning.request import RunRequest, resolve

    # 1 x 5 samples, as the plain function times (by default the flow takes at least 30 samples and 1 s)
    common = dict(model=FLOW_MODEL, target=FLOW_TARGET, artifacts=store_root, number=1, repeat=5)
    with EmbeddedServer() as server, tempfile.TemporaryDirectory(prefix="bench-device-cache-") as directory:
        host, port = server.address
        first = time.perf_counter()
        summary0 = resnet_remote(**common, host=host, port=port, device_cache=directory).as_json()  # builds or finds all
        first_s = time.perf_counter() - first
        library = Path(summary0["artifact"])
        x = resolve(RunRequest(**common)).input
        samples: dict[str, list[float]] = {"flow": [], "flow_off": [], "flow_heartbeats": [], "plain": []}

        def flow(name: str, device_cache: str, cli: bool) -> dict[str, Any]:
            start = time.perf_counter()
            with cli_prefect_settings() if cli else contextlib.nullcontext():
                result = resnet_remote(**common, host=host, port=port, device_cache=device_cache).as_json()
            samples[name].append(time.perf_counter() - start)
            assert all(result["stages"][s] == "cached" for s in ("import-model", "build", "export-library"))
            return result

        for _ in range(repeats):
            assert flow("flow", directory, cli=True)["upload"]["reused"]
            assert not flow("flow_off", "off", cli=True)["upload"]["reused"]
            assert flow("flow_heartbeats", directory, cli=False)["upload"]["reused"]
            start = time.perf_counter()
            plain_device_steps(host, port, library, x)
            samples["plain"].append(time.perf_counter() - start)
    return {**{name: summary(values) for name, values in samples.items()},
            "first_s": first_s, "stages": summary0["stages"], "library_bytes": library.stat().st_size}


def library_runner(library: Path, x: np.ndarray) -> tuple[Callable[[], Any], np.ndarray]:
    """A call that runs the compiled ``library`` on ``x`` in this process, and its output."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    tx_tvm = tvm.runtime.tensor(x)
    out = vm["main"](tx_tvm)
    return (lambda: vm["main"](tx_tvm)), (out[0] if isinstance(out, (list, tuple)) else out).numpy()


def bench_untuned(store_root: str, repeats: int) -> dict[str, Any]:
    """Section 5: the untuned default build, rule-based schedules vs none: build time and latency."""
    from pipeline.models import ModelSpec, resolve_model
    from pipeline.store import ArtifactStore
    from pipeline.targets import parse_target
    from tasks.build import build
    from tasks.export_library import export_library

    target = parse_target(FLOW_TARGET)
    rows: dict[str, Any] = {}
    for spec in (ModelSpec(FLOW_MODEL), ModelSpec(RESNET, weights="random")):
        model = resolve_model(spec)
        x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
        outputs = {}
        for schedules in ("none", "rules"):
            compiled = compile_model(model, FLOW_TARGET, store_root, 0, schedules)
            imported, plan = compiled["imported"], compiled["plan"]
            seconds = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(prefix="bench-untuned-") as tmp:
                    root = Path(tmp) / "artifacts"
                    shutil.copytree(ArtifactStore(store_root).path(imported.key), ArtifactStore(root).path(imported.key))
                    start = time.perf_counter()
                    built = build(imported, target, 3, plan.build, ArtifactStore(root))
                    export_library(built.artifact, target, plan.toolchain, plan.library, ArtifactStore(root))
                    seconds.append(time.perf_counter() - start)
            run_tvm, outputs[schedules] = library_runner(compiled["library"], x)
            row = rows[f"{model.name} {schedules}"] = {
                "model": model.name, "schedules": schedules, "build": summary(seconds),
                "latency": timed(run_tvm, repeats, number_for(run_tvm), warmup=1),
            }
            log.info("untuned %s %s: build %.1f s, %.2f ms", model.name, schedules, row["build"]["median"],
                     row["latency"]["median"] * 1e3)
        rows[f"{model.name} rules"]["diff"] = float(np.abs(outputs["rules"] - outputs["none"]).max())
    return rows


def bench_shared(store_root: str, repeats: int) -> dict[str, Any]:
    """Section 3d: a second model, ResNet-34 v2, built after ResNet-18's tuning: with the store's tuning records
    shared (``--shared-tunings on``, the default) and without (``off``: the rules alone), untuned both."""
    import onnxruntime as ort

    from pipeline.models import ModelSpec, resolve_model
    from pipeline.planning.plan import plan_build
    from pipeline.store import ArtifactStore
    from pipeline.store.layout import LIBRARY_FILE
    from pipeline.targets import parse_target
    from pipeline.tuning.shared import shared_tunings
    from tasks.chains import compile_chain, run_plain, tuning_sources

    target, store = parse_target(TUNED_TARGET), ArtifactStore(store_root)
    tunings = shared_tunings(store, target)
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        symbol = resnet34_export(Path(tmp))
        model = resolve_model(ModelSpec(str(symbol)))
        x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
        onnx_path = mxnet_onnx(symbol, Path(tmp) / "resnet34_v2-0000.params", Path(tmp) / "r34.onnx")
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        expected = session.run(None, {name: x})[0]
        run_ort = lambda: session.run(None, {name: x})  # noqa: E731
        rows: dict[str, Any] = {"onnxruntime": {"latency": timed(run_ort, repeats, number_for(run_ort)), "diff": 0.0}}
        for label, shared in (("rules, no shared records (--shared-tunings off)", ()),
                              ("rules + the store's shared records (--shared-tunings on)", tunings)):
            plan = plan_build(model, target, 3, shared=shared)
            compiled = compile_chain(plan, store, False, run=run_plain)
            # The build's cost, once: a fresh store holding the imported module and the shared tunings.
            with tempfile.TemporaryDirectory(prefix="bench-shared-build-") as fresh:
                for key in [compiled.module.key, *(t.key for t in plan.shared)]:
                    shutil.copytree(store.path(key), ArtifactStore(fresh).path(key))
                start = time.perf_counter()
                compile_chain(plan, ArtifactStore(fresh), False, run=run_plain)
                build_s = time.perf_counter() - start
            run_tvm, out = library_runner(store.file(compiled.library, LIBRARY_FILE), x)
            sources = tuning_sources(plan, compiled.build, store)
            rows[label] = {"latency": timed(run_tvm, repeats, number_for(run_tvm), warmup=1),
                           "diff": float(np.abs(out - expected).max()), "build_s": build_s,
                           "build_key": plan.build.key, "sources": sources.as_dict() if sources else None}
            log.info("shared %s: %.2f ms, build %.0f s", label, rows[label]["latency"]["median"] * 1e3, build_s)
    return {"model": model.name, "target": TUNED_TARGET, "rows": rows,
            "tunings": [{"tuning": t.key, "model": t.model, "trials": t.trials} for t in tunings]}


def bench_cold_build(store_root: str, repeats: int) -> dict[str, Any]:
    """Section 2: build + export-library as Prefect tasks in a flow, in a fresh store, vs plain TVM."""
    import tvm
    from prefect import flow

    from flows._cli import cli_prefect_settings
    from pipeline.models import ModelSpec, resolve_model
    from pipeline.store import ArtifactStore
    from pipeline.targets import parse_target
    from tasks._cache import run_cached
    from tasks.build import build_task
    from tasks.export_library import export_library_task
    from pipeline.store.layout import MODULE_FILE

    model = resolve_model(ModelSpec(RESNET, weights="random"))
    target = parse_target(FLOW_TARGET)
    compiled = compile_model(model, FLOW_TARGET, store_root, schedules="none")  # like the plain tvm.compile
    imported, plan = compiled["imported"], compiled["plan"]
    source = ArtifactStore(store_root)
    mod_text = source.file(imported, MODULE_FILE).read_text()

    @flow(name="bench-cold-build", persist_result=False)
    def cold_build(root: str) -> float:
        store = ArtifactStore(root)
        start = time.perf_counter()
        built, _ = run_cached(build_task, store, plan.build, True, module=imported, target=target, opt_level=3)
        run_cached(export_library_task, store, plan.library, True, build=built, target=target, toolchain=plan.toolchain)
        return time.perf_counter() - start

    def plain(work: Path) -> None:
        mod = tvm.ir.load_json(mod_text)
        with tvm.transform.PassContext(opt_level=3):
            ex = tvm.compile(mod, target=target.tvm_target())
        ex.export_library(str(work / "model.so"))

    inside, whole, plain_s = [], [], []
    for i in range(repeats + 1):  # the first pair warms both paths up (imports, Prefect's flow registration)
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
            root = Path(tmp) / "artifacts"
            shutil.copytree(source.path(imported.key), ArtifactStore(root).path(imported.key))
            start = time.perf_counter()
            with cli_prefect_settings():
                seconds = cold_build(str(root))
            total = time.perf_counter() - start
            start = time.perf_counter()
            plain(Path(tmp))
            plain_seconds = time.perf_counter() - start
        if i:
            inside.append(seconds)
            whole.append(total)
            plain_s.append(plain_seconds)
    return {"inside": summary(inside), "whole": summary(whole), "plain": summary(plain_s)}


# ------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measurements per number (>= 5; default 5)")
    parser.add_argument("--budgets", default="64,256", help="tuning budgets (trials) of ResNet-18 (default 64,256)")
    parser.add_argument("--artifacts", default=None, help="artifact store (default: $TVMRP_ARTIFACTS or artifacts/)")
    parser.add_argument("--out", default=None, help="write the markdown report here (e.g. bench/RESULTS.md)")
    parser.add_argument("--json", default=None, help="also write the raw numbers as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be 5 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipeline.processes import start_lifeline

    lifeline = start_lifeline()  # while open, every server this run starts ends with it, even after kill -9
    for noisy in ("prefect", "httpx", "tvm", "RPCServer", "pipeline", "tasks", "flows"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("tasks.tune").setLevel(logging.INFO)
    from pipeline.store import default_root

    store_root = str(Path(args.artifacts).resolve() if args.artifacts else default_root())
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    command = "scripts/setup && .venv/bin/python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_line(), "repeats": args.repeats, "command": command.strip(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log.info("machine: %s", results["machine"])
    results["latency"] = bench_latency(store_root, budgets, args.repeats)
    sys.modules.setdefault("bench", sys.modules[__name__])  # profile_compare imports this module's helpers
    import profile_compare  # bench/ is sys.path[0] when run as a script

    results["profile"] = profile_compare.measure(store_root, budgets, args.repeats, command.strip())
    log.info("profiles done")
    results["shared"] = bench_shared(store_root, args.repeats)
    log.info("shared tuning records done")
    results["untuned"] = bench_untuned(store_root, args.repeats)
    log.info("untuned builds done")
    from pipeline.models import ModelSpec, resolve_model

    best = compile_model(resolve_model(ModelSpec(RESNET, weights="random")), TUNED_TARGET, store_root, max(budgets))
    results["upload"] = bench_upload(best["library"], args.repeats)
    log.info("upload done")
    with tempfile.TemporaryDirectory(prefix="bench-prefect-") as home:
        with prefect_server(Path(home)) as api:
            from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_LEVEL, temporary_settings

            log.info("prefect server at %s", api)
            with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_LOGGING_LEVEL: "WARNING"}):
                results["flow"] = bench_flow(store_root, args.repeats)
                log.info("flow done")
                from processes import bench_processes  # bench/ is sys.path[0] when run as a script

                results["processes"] = bench_processes(store_root, FLOW_MODEL, FLOW_TARGET, args.repeats)
                log.info("whole processes done")
                results["cold"] = bench_cold_build(store_root, args.repeats)
                log.info("cold build done")
    results["seconds"] = time.perf_counter() - started
    if args.json:  # first: the numbers survive a report that fails to render (bench/report.py renders them again)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    text = render(results, command.strip())
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    lifeline.close()  # nothing of ours is left for it to end
    return 0


import numpy as np  # noqa: E402  (after sys.path is set up; used throughout)

if __name__ == "__main__":
    sys.exit(main())
