"""A nightly job's runs judged across builds, on real runs (the issue's "done when"): three runs with the
rule-based schedules, then one with ``--schedules none`` on the same device, with ``--fail-on-regression``.
(The verdicts on records built in code: tests/unit/test_lineage.py; the fleet's JUnit file and device names on
real pairs: tests/integration/test_fleet.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO, make_conv_onnx, run_cli


def history_cli(store_root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.history", *args, "--artifacts", str(store_root)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_lineage__no_schedules_after_three_rule_runs_fails_the_gate_naming_the_change(
        prefect_api, store_root, tmp_path):
    model = make_conv_onnx(tmp_path / "conv.onnx")
    env = {"PREFECT_API_URL": prefect_api}
    common = ("--model", str(model), "--artifacts", str(store_root), "--repeat", "30", "--threads", "1")
    ids = []
    for _ in range(3):
        proc = run_cli(*common, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        first_line = proc.stdout.splitlines()[0]
        assert first_line.startswith("Run        2") and "(python -m flows.history show " in first_line
        ids.append(first_line.split()[1])
        assert "Measured   threads 1 (asked 1); device load " in proc.stdout

    proc = run_cli(*common, "--schedules", "none", "--fail-on-regression", env=env)
    assert proc.returncode == 3, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    trend = next(line for line in proc.stdout.splitlines() if line.startswith("Trend      "))
    assert trend.startswith("Trend      REGRESSION: +") and "changed: schedules rules -> tvm-default" in trend
    assert "against the median of the previous build's last 3 run(s)" in trend or "last 3 run(s) (" in trend
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [errors[-1]] and errors[-1].startswith("Error: latency regression (--fail-on-regression): ")
    assert "Traceback" not in proc.stderr

    listed = json.loads(history_cli(store_root, "--json").stdout)["runs"]
    assert [r["id"] for r in listed[1:]] == ids[::-1] and len({r["lineage"] for r in listed}) == 1
    last = listed[0]
    verdict = last["regression"]
    assert last["status"] == "passed" and last["exit_code"] == 3 and last["schedules"] == "tvm-default"
    assert verdict["decision"] == "regression" and verdict["against"] == "previous build"
    assert verdict["changes"] == [{"field": "schedules", "a": "rules", "b": "tvm-default"}]
    assert verdict["baseline_runs"] == ids and verdict["change"] > 0.5 and verdict["interval"][0] > 0, verdict
    assert len(last["samples_ms"]) == last["samples"] == 30 and last["conditions"]["threads"] == 1
    assert len(last["conditions"]["device"]["loadavg"]) == 3 and last["conditions"]["host"]["cpus"] >= 1
    assert all(r["regression"]["decision"] != "regression" or r["regression"]["against"] == "same build"
               for r in listed[1:])  # the rule runs: the same build (load may move them; never a build change)

    table = history_cli(store_root).stdout.splitlines()
    assert table[1].startswith(last["id"]) and "REGRESSION +" in table[1] and "[schedules]" in table[1]
    assert "tvm-default" in table[1] and all(" rules " in line for line in table[2:])
    proc = history_cli(store_root, "compare", "previous", "latest")
    assert proc.returncode == 0 and f"A          {ids[-1]}" in proc.stdout and f"B          {last['id']}" in proc.stdout
    assert "schedules" in proc.stdout.split("Same")[0] and "slower by " in proc.stdout
