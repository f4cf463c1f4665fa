"""flows/history.py and pipeline/history.py: the run ledger read back (list, filters, renderings, show, compare).

Unit tests build records in code (``RunRecord``) and write them with ``Ledger.write``; the CLI runs
in-process (``main``). One integration test makes three real runs of a tiny model, then reads them back with
``python -m flows.history`` in a fresh process.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import subprocess
import sys
import time

import pytest

from support import REPO, run_cli
from flows.history import main
from pipeline.latency import judge
from pipeline.ledger import Ledger, RunRecord, new_run_id, series_of

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'
AARCH64 = '{"kind":"llvm","tag":"","keys":["arm_cpu","cpu"],"mtriple":"aarch64-linux-gnu","mattr":["+neon"]}'
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
VERSIONS = {"apache-tvm": "0.27.0.post1", "prefect": "3.9.1", "python": "3.11.7"}


def latency(median: float, spread: float = 0.03) -> dict[str, float]:
    """A record's ``latency_ms`` with this median and p90 ``spread`` above it."""
    return {"mean": median * 1.01, "median": median, "p90": median * (1 + spread), "p99": median * (1 + 2 * spread),
            "min": median * 0.98, "max": median * 1.2, "std": median * 0.02, "cv": 0.0198}


def record(started: dt.datetime = NOW, **changes) -> RunRecord:
    """A passed run of efficientnet_lite0 on the embedded device, started at ``started``."""
    build_key = changes.pop("build_key", "ab" * 32)
    base = RunRecord(
        id=new_run_id(started), series=series_of(build_key, "embedded", "x86_64-conda-linux-gnu", [1, 3, 224, 224]),
        started=started.isoformat(timespec="seconds"), finished=(started + dt.timedelta(seconds=20)).isoformat(),
        status="passed", exit_code=0, error=None, model="efficientnet_lite0", model_digest="1f" * 32, target=TARGET,
        opt_level=3, tune_trials=0, tuning_key=None, build_key=build_key, library_key="ef" * 32, device="embedded",
        device_identity="x86_64-conda-linux-gnu", image="data/cat.png", input_shape=[1, 3, 224, 224],
        stages={"build": "cached", "run": "ran"}, latency_ms=latency(117.4), samples=30,
        check={"passed": True, "max_abs_diff": 3.8e-06, "max_rel_diff": 2.2e-4, "reason": "max abs diff 3.81e-06"},
        regression={"regression": False, "change": None, "baseline_ms": None, "threshold": None, "runs": 0,
                    "message": "first run of this series"},
        versions=dict(VERSIONS), flow_run_id="e79c2236-7d04-4552-84f5-cc5e7ec773c3",
    )
    return dataclasses.replace(base, **changes)


def failed_record(started: dt.datetime = NOW, **changes) -> RunRecord:
    """A run that failed before it had a summary (no series, latency, check or verdict)."""
    return record(started, series=None, status="failed", exit_code=1, error="device 10.0.0.7:9090 refused the "
                  "connection", device="10.0.0.7:9090", device_identity=None, stages={}, latency_ms=None,
                  samples=None, check=None, regression=None, **changes)


@pytest.fixture
def ledger(store_root) -> Ledger:
    return Ledger(store_root)


def write(ledger: Ledger, *records: RunRecord) -> list[RunRecord]:
    for r in records:
        ledger.write(r)
    return list(records)


def history(capsys, store_root, *args: str) -> tuple[int, str, str]:
    """``python -m flows.history ARGS --artifacts STORE``, in this process: exit code, stdout, stderr."""
    code = main([*args, "--artifacts", str(store_root)])
    out, err = capsys.readouterr()
    return code, out, err


# -- selecting runs -------------------------------------------------------------------------------------


# -- lists of runs --------------------------------------------------------------------------------------


# -- one run, and run ids -------------------------------------------------------------------------------


# -- two runs -------------------------------------------------------------------------------------------


# -- the regression rule, end to end on records ---------------------------------------------------------


def judge_and_record(ledger: Ledger, run: RunRecord) -> RunRecord:
    """What tasks/report.py does with a run: judge it against its series in the ledger, then record it."""
    earlier = ledger.series_history(run.series, run.id, 10)
    lat = run.latency_ms
    noisy = (lat["p90"] - lat["median"]) / lat["median"] > 0.1
    verdict = judge(lat["median"], [r.median_ms for r in earlier], noisy=noisy)
    judged = dataclasses.replace(run, regression=verdict.as_dict())
    ledger.write(judged)
    return judged


# -- integration: real runs, read back by a fresh process -----------------------------------------------


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
    assert proc.returncode == 0 and "opt_level    3 -> 2" in proc.stdout and "Change     median" in proc.stdout

    heavy = "{'prefect', 'tvm', 'numpy', 'torch'}"
    proc = subprocess.run([sys.executable, "-c", "import sys, flows.history; "
                           f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
