"""flows/history.py on real runs: three runs of a tiny model (two with ``--profile``), read back with
``python -m flows.history`` in a fresh process (list, CSV, show, compare, compare --kernels) without importing
Prefect or TVM. (The ledger and its renderings on records built in code: tests/unit/test_history.py,
test_profiling.py.)
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time

from support import REPO, run_cli


def history_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.history", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_history__three_real_runs_listed_compared_and_exported(prefect_api, store_root, tiny_onnx):
    env = {"PREFECT_API_URL": prefect_api}
    common = ("--model", str(tiny_onnx), "--artifacts", str(store_root), "--repeat", "5")
    for extra in (("--profile",), ("--opt-level", "2"), ("--tune-trials", "4", "--profile")):
        proc = run_cli(*common, *extra, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("\nProfile    " in proc.stdout) == ("--profile" in extra), proc.stdout
        assert "\nOn device  load " in proc.stdout and "peak memory" in proc.stdout

    started = time.perf_counter()
    proc = history_cli("--json", "--artifacts", str(store_root))
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)["runs"]
    assert len(runs) == 3 and len({r["series"] for r in runs}) == 3
    assert [(r["opt_level"], r["tune_trials"]) for r in runs] == [(3, 4), (2, 0), (3, 0)]  # newest first
    for r in runs:
        assert r["status"] == "passed" and r["check"]["passed"] and r["samples"] == 5
        assert 0 < r["latency_ms"]["median"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert r["latency_ms"]["cv"] >= 0
    assert seconds < 5, seconds  # no Prefect, no TVM: well under a second here, with slack for a busy machine
    for r in runs:
        facts = r["device_facts"]
        assert facts["load_ms"] > 0 and facts["first_inference_ms"] > 0 and facts["peak_memory_bytes"] > 50 << 20
        assert facts["library_bytes"] == r["upload"]["bytes"]
    assert runs[1]["profile"] is None
    for r in (runs[0], runs[2]):
        profile = r["profile"]
        assert profile["kernels"] and profile["total_ms"] == profile["kernels_ms"] + profile["glue_ms"]
        assert {"name", "calls", "ms", "share", "shapes", "flops", "gflop_per_s"} <= profile["kernels"][0].keys()

    proc = history_cli("--csv", "--artifacts", str(store_root))
    rows = list(csv.DictReader(io.StringIO(proc.stdout, newline="")))
    assert proc.returncode == 0 and [row["id"] for row in rows] == [r["id"] for r in runs]
    assert all(float(row["latency_p90_ms"]) > 0 and row["check_passed"] == "true" for row in rows)

    first, second = runs[2]["id"], runs[1]["id"]
    proc = history_cli("compare", first[:17], second[:17], "--json", "--artifacts", str(store_root))
    assert proc.returncode == 0, proc.stderr
    changed = {d["field"] for d in json.loads(proc.stdout)["differences"]}
    assert {"opt_level", "build_key"} <= changed and "model_digest" not in changed and "tune_trials" not in changed
    proc = history_cli("compare", first, second, "--artifacts", str(store_root))
    assert proc.returncode == 0 and re.search(r"\n(Differs    | {11})opt_level +3 -> 2\n", proc.stdout), proc.stdout
    assert re.search(r"\nChange     (median|p10) ", proc.stdout), proc.stdout

    proc = history_cli("show", first, "--artifacts", str(store_root))
    assert proc.returncode == 0 and "\nOn device  load " in proc.stdout and "\nProfile    " in proc.stdout
    assert re.search(r"\n {13}kernel +calls +ms +share +GFLOP/s +shapes\n", proc.stdout), proc.stdout
    tuned = runs[0]["id"]
    proc = history_cli("compare", first, tuned, "--kernels", "--artifacts", str(store_root))
    assert proc.returncode == 0 and "\nKernels    total " in proc.stdout, proc.stdout + proc.stderr
    proc = history_cli("compare", first, second, "--kernels", "--artifacts", str(store_root))
    assert proc.returncode == 2 and "has none: record one with" in proc.stderr, proc.stderr

    heavy = "{'prefect', 'tvm', 'numpy', 'torch'}"
    proc = subprocess.run([sys.executable, "-c", "import sys, flows.history; "
                           f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
