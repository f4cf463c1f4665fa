"""The real local stack: Prefect server + process worker + TVM tracker/device (scripts/stack), the nightly
deployment run twice through the worker, its states and artifacts read back through the Prefect API, and
``down`` leaving no process behind. Fixtures: tests/stack_harness.py."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from support import REPO

pytest_plugins = ["stack_harness"]

STAGES = ["import-model", "build", "export-library", "upload", "load", "set-input", "run", "postprocess"]
COMPILE = STAGES[:3]
DEVICE = STAGES[3:]
KEY = re.compile(r"^[a-z0-9-]+$")


def _task_states(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = {r.name: r.state.name for r in runs}
    assert len(states) == len(runs), "one task run per stage"
    return states


def _artifacts(client, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = client.read_artifacts(artifact_filter=by_run)
    # "summary-tiny-onnx-<device>-<lineage>" -> "summary-tiny-onnx-<device>"
    return {a.key.rsplit("-", 1)[0]: a for a in found}


def test_stack__up_is_idempotent_and_status_reports_everything(stack):
    before = stack.records()
    assert set(before) == {"server", "worker", "tracker", "device"}
    again = stack.cli("up", "--with-device")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and "already registered" in again.stdout
    assert stack.records() == before  # nothing restarted

    status = stack.cli("status", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout and "online" in status.stdout and "registered" in status.stdout

    worker_env = psutil.Process(before["worker"]["pid"]).environ()
    assert worker_env["PREFECT_API_URL"] == stack.api_url
    assert worker_env["TVMRP_ARTIFACTS"] == str(stack.artifacts)
    assert worker_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and worker_env["DO_NOT_TRACK"] == "1"
    assert psutil.Process(before["worker"]["pid"]).cwd() == str(REPO)


def test_stack__more_devices_for_a_fleet_and_a_shell_env(stack):
    more = stack.cli("up", "--with-device", "--devices", "2", timeout=180)
    assert more.returncode == 0, more.stdout + more.stderr
    assert f"under key '{stack.device_key}-2'" in more.stdout and "already registered" in more.stdout
    assert {"device", "device-2"} <= set(stack.records())
    status = stack.cli("status", timeout=60)
    assert f"key {stack.device_key}-2 registered" in status.stdout, status.stdout
    env = stack.cli("env").stdout
    assert f"export PREFECT_API_URL={stack.api_url}" in env
    assert "export PREFECT_LOGGING_EXTRA_LOGGERS=flows,tasks,pipeline" in env
    assert "/.venv/bin" in env.split("export PATH=", 1)[1] or sys.executable.rsplit("/", 1)[0] in env
    fewer = stack.cli("up", "--with-device", "--devices", "1", timeout=180)  # back to the fixture's one device
    assert fewer.returncode == 0 and "stopped device-2" in fewer.stdout, fewer.stdout + fewer.stderr
    assert "device-2" not in stack.records()


def test_stack__nightly_deployment_is_scheduled_on_the_process_pool(stack, nightly_runs):
    with stack.client() as client:
        deployment = client.read_deployment(nightly_runs.deployment_id)
    assert deployment.entrypoint == "flows/resnet_remote.py:resnet_remote"
    assert deployment.work_pool_name == "process"
    (schedule,) = deployment.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert deployment.parameters["tracker"] == "127.0.0.1:9190" and deployment.parameters["key"] == "local-x86"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]


def test_stack__nightly_runs_on_the_worker_and_second_run_is_cached(stack, nightly_runs):
    with stack.client() as client:
        first, second = (client.read_flow_run(i) for i in (nightly_runs.first, nightly_runs.second))
        for run in (first, second):
            assert run.state.is_completed(), run.state
            assert str(run.deployment_id) == nightly_runs.deployment_id
            assert run.work_pool_name == "process"
            assert run.name.startswith(f"{Path(nightly_runs.parameters['model']).name}@llvm on ") and stack.device_key in run.name
        first_states, second_states = _task_states(client, first.id), _task_states(client, second.id)

    # The result in one line: the final state's message, and in `--watch` the event named by it (rich wraps lines).
    assert second.state.message.startswith("median ") and "check passed, top-1 " in second.state.message
    watched = " ".join(nightly_runs.watched.split())
    assert f"tvmrp.run.completed * {second.state.message}" in watched, nightly_runs.watched[-2000:]
    assert set(STAGES) <= set(first_states) and set(first_states) == set(second_states)
    assert set(first_states.values()) == {"Completed"}, first_states  # everything built
    assert all(second_states[s] == "Cached" for s in COMPILE), second_states  # skipped
    assert all(second_states[s] == "Completed" for s in DEVICE), second_states  # the device always runs


def test_stack__run_artifacts_are_readable_through_the_api(stack, nightly_runs):
    with stack.client() as client:
        first, second = _artifacts(client, nightly_runs.first), _artifacts(client, nightly_runs.second)
    lineage = f"tiny-onnx-{stack.device_key}"  # the lineage's key: model and device (a tracker device by its key)
    ours = {f"{kind}-{lineage}" for kind in ("summary", "runs", "top5", "latency", "latency-trend")}
    assert ours <= set(second) and ours <= set(first)
    assert all(KEY.match(second[name].key) for name in ours)

    summary = second[f"summary-{lineage}"]
    assert summary.type == "markdown"
    text = summary.data
    assert "tiny.onnx" in text and f"key={stack.device_key}" in text and "opt_level | 3" in text
    assert "Cached (not rebuilt): import-model, build, export-library" in text
    assert "Cached (not rebuilt): none." in first[f"summary-{lineage}"].data
    assert all(f"| {stage} | **cached** |" in text for stage in COMPILE)
    assert "previous 1 run(s) of this build" in text and "## Last runs of this lineage" in text
    assert "](data:image/png;base64," in text  # the chart, rendered inside the markdown
    runs = json.loads(second[f"runs-{lineage}"].data)
    assert [row["run"] for row in runs][:1] and set(runs[0]) == {"date", "run", "build change", "median ms", "p90 ms",
                                                                 "verdict"}

    top5 = json.loads(second[f"top5-{lineage}"].data)
    assert second[f"top5-{lineage}"].type == "table" and [row["rank"] for row in top5] == [1, 2, 3, 4, 5]
    latency = {row["statistic"]: row["ms"] for row in json.loads(second[f"latency-{lineage}"].data)}
    assert set(latency) == {"mean", "median", "p90", "p99", "min", "max", "std", "cv"} and latency["median"] > 0

    trend = second[f"latency-trend-{lineage}"]
    assert trend.type == "image" and "last 2 runs" in trend.description
    url = json.loads(trend.data) if trend.data.startswith('"') else trend.data
    assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_stack__fleet_nightly_runs_on_the_worker_and_shows_its_table(stack, nightly_runs, tmp_path):
    fleet_file = tmp_path / "stack-fleet.yaml"
    fleet_file.write_text(
        f"tracker: {stack.tracker}\ndevices:\n  - key: {stack.device_key}\n    target: llvm\n"
        f"models:\n  - {nightly_runs.parameters['model']}\nrepeat: 2\n"
    )
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    params = {"fleet_file": str(fleet_file), "artifacts": str(stack.artifacts)}
    proc = stack.prefect("deployment", "run", "fleet/fleet-nightly", "--params", json.dumps(params),
                         "--watch", "--watch-interval", "1", "--watch-timeout", "400")
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert proc.returncode == 0 and match, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with stack.client() as client:
        assert client.read_flow_run(match.group(1)).state.is_completed()
        found = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[match.group(1)])))}
    table = json.loads(found["fleet-stack-fleet"].data)
    assert [(row["device"], row["status"]) for row in table] == [(stack.device_key, "passed")]
    assert "| device |" in found["fleet-summary-stack-fleet"].data


def test_stack__a_cli_run_without_an_api_uses_the_running_stack(stack, nightly_runs):
    """No PREFECT_API_URL: the command line finds the stack's server and uses it (no temporary server, no other
    server started)."""
    env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}  # the stack's settings, no API
    proc = subprocess.run(
        [sys.executable, "-m", "flows.resnet_remote", "--model", nightly_runs.parameters["model"], "--artifacts",
         str(stack.artifacts), "--repeat", "2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"View at {stack.ui_url}/runs/flow-run/" in proc.stderr  # Prefect's own line: the stack's UI
    assert "Starting temporary server" not in proc.stderr and "started the local Prefect server" not in proc.stderr
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    with stack.client() as client:
        assert any(run.state_name == "Completed" for run in client.read_flow_runs(limit=20))
    assert (stack.artifacts / ".runs" / f"{run_id}.json").is_file()


def test_stack__down_leaves_no_process_and_up_keeps_the_history(stack, nightly_runs):
    records = stack.records()
    procs = []
    for record in records.values():
        proc = psutil.Process(record["pid"])
        procs += [proc, *proc.children(recursive=True)]
    down = stack.cli("down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped worker, device, tracker, server" in down.stdout  # the worker first, the server last
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    for port in (stack.port, stack.tracker_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert not list((stack.home / "run").glob("*.json"))
    assert stack.cli("status", timeout=60).returncode == 3
    assert "nothing was running" in stack.cli("down").stdout  # idempotent

    stack.ensure_up()  # the same database: the runs are still there
    with stack.client() as client:
        assert client.read_flow_run(nightly_runs.second).state.is_completed()
