"""flows/history.py on real runs: three runs of a tiny model, read back with ``python -m flows.history`` in a
fresh process (list, CSV, compare) without importing Prefect or TVM. (The ledger and its renderings on records
built in code: tests/unit/test_history.py.)
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
    for extra in ((), ("--opt-level", "2"), ("--tune-trials", "4")):
        proc = run_cli(*common, *extra, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

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

    heavy = "{'prefect', 'tvm', 'numpy', 'torch'}"
    proc = subprocess.run([sys.executable, "-c", "import sys, flows.history; "
                           f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
