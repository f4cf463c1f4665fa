"""The command lines' default path: no ``PREFECT_API_URL``, so the local Prefect server (the stack's, started by
the first run that needs it and kept for the next ones), in a stack directory and on a port of the tests' own.

Twenty runs at once on one store, none running a server beforehand, start one server and are all recorded,
in the ledger and in the API (where ``scripts/stack up`` finds them); a port taken by another program moves the
server to another; a run killed with SIGKILL leaves only the server behind. (Twenty failing runs at once:
test_concurrent_failures.py.) With the opt-out
(``TVMRP_PREFECT_SERVER=temporary``), a temporary server that does not start ends the run with one ``Error:``
line and a ledger record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from pipeline.store import ArtifactStore
from support import REPO, LocalStack, compile_all, make_tiny_onnx, start_local_stack, wait_until

RUNS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack of this module, with nothing running at first."""
    local = start_local_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return {"onnx": str(make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx"))}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_models):
    """One store with the tiny ONNX model's builds in it (the runs below all find them cached)."""
    from pipeline.models import ModelSpec, resolve_model

    root = tmp_path_factory.mktemp("store")
    compile_all(resolve_model(ModelSpec(tiny_models["onnx"])), root)
    return root


def _flow_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(limit=200)


def test_default_path__twenty_concurrent_first_runs_start_one_server_and_all_are_recorded(stack, tiny_store,
                                                                                           tiny_models):
    argv = [sys.executable, "-m", "flows.resnet_remote", "--model", tiny_models["onnx"], "--artifacts",
            str(tiny_store), "--repeat", "2", "--no-check", "--json"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(RUNS)]
    outputs = [p.communicate(timeout=900) for p in procs]  # reads both pipes while waiting: no deadlock
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    run_ids = {json.loads(out.strip().splitlines()[-1])["run_id"] for out, _ in outputs}
    records = {r.id: r for r in ArtifactStore(tiny_store).ledger.records()}
    assert len(run_ids) == RUNS and run_ids <= set(records) and all(records[i].status == "passed" for i in run_ids)

    # One server: one start in its log, one run that says it started it (and where the UI is, how to stop it).
    starts = [line for line in (stack.home / "logs" / "server.log").read_text().splitlines() if line.startswith("====")]
    assert len(starts) == 1, starts
    notes = [err for _, err in outputs if "started the local Prefect server" in err]
    assert len(notes) == 1 and f"http://127.0.0.1:{stack.port}" in notes[0] and "scripts/stack down" in notes[0]
    server = psutil.Process(stack.server_record()["pid"])
    assert os.getsid(server.pid) == server.pid  # its own session: a terminal's Ctrl-C does not reach it

    # Every run is in the API, its result in its final state's message; `scripts/stack up` adopts the server.
    up = stack.stack("up")
    assert up.returncode == 0 and "server already running" in up.stdout, up.stdout + up.stderr
    assert stack.stack("status").returncode == 0
    runs = [run for run in _flow_runs(stack.api_url) if run.name.startswith("tiny.onnx@llvm")]
    assert len(runs) == RUNS and all(run.state_name == "Completed" for run in runs)
    assert all(run.state.message.startswith("median ") and "check skipped" in run.state.message for run in runs)


def test_default_path__a_taken_port_moves_the_server_and_a_killed_run_leaves_only_it(fresh_local_stack: LocalStack,
                                                                                       tiny_store, tiny_models):
    stack = fresh_local_stack
    with socket.socket() as taken:  # another program on the stack's port
        taken.bind(("127.0.0.1", stack.port))
        taken.listen()
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.resnet_remote", "--model", tiny_models["onnx"], "--artifacts",
             str(tiny_store), "--no-check", "--number", "2000000", "--repeat", "1"],  # ~40 s in one remote call
            cwd=REPO, env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        lines: list[str] = []
        try:
            for line in proc.stderr:  # bounded: the run ends (or the assertion below fails) when it does
                lines.append(line)
                if "Task run 'set-input' - Finished" in line:
                    break
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert wait_until(lambda: len(psutil.Process(proc.pid).children(recursive=True)) > 1, 10)
            record = stack.server_record()
            server = psutil.Process(record["pid"])
            kept = {server.pid, *(p.pid for p in server.children(recursive=True))}
            tree = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid not in kept]
            proc.send_signal(signal.SIGKILL)  # the OOM killer, a CI timeout
            proc.wait(timeout=10)
            _, alive = psutil.wait_procs(tree, timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = "".join(lines)
    assert not alive, [(p.pid, " ".join(p.cmdline())[:120]) for p in alive if p.is_running()]
    assert record["port"] != stack.port and f"port {stack.port} is taken by another program" in text, text[-3000:]
    assert f"UI http://127.0.0.1:{record['port']}" in text
    assert server.is_running()  # the server outlives the run: the next one uses it
    status = stack.stack("status")
    assert f"http://127.0.0.1:{record['port']} healthy" in status.stdout, status.stdout + status.stderr
    again = stack.cli("--model", tiny_models["onnx"], "--artifacts", str(tiny_store), "--no-check", "--repeat", "2")
    assert again.returncode == 0 and "started the local Prefect server" not in again.stderr, again.stderr[-3000:]
    assert any(run.state_name == "Completed" for run in _flow_runs(stack.api_url))


def test_opt_out__a_temporary_server_that_does_not_start_ends_with_one_error_line_and_a_record(tmp_path, tiny_store,
                                                                                                tiny_models):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(TVMRP_PREFECT_SERVER="temporary", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    before = {r.id for r in ArtifactStore(tiny_store).ledger.records()}
    proc = subprocess.run([sys.executable, "-m", "flows.resnet_remote", "--model", tiny_models["onnx"], "--artifacts",
                           str(tiny_store), "--no-check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.rstrip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("Error: Prefect's temporary server for this run did not start"), lines[-1]
    new = [r for r in ArtifactStore(tiny_store).ledger.records() if r.id not in before]
    assert len(new) == 1 and new[0].status == "failed" and "temporary server" in new[0].error
    assert new[0].build_key is not None  # planned by the command line: the record names the build


def test_default_path__a_local_server_that_does_not_start_ends_with_one_error_line_and_a_record(
        fresh_local_stack: LocalStack, tiny_store, tiny_models):
    env = {**fresh_local_stack.env, "PREFECT_API_DATABASE_CONNECTION_URL": "nosuchdriver://nowhere"}  # it exits
    before = {r.id for r in ArtifactStore(tiny_store).ledger.records()}
    proc = subprocess.run([sys.executable, "-m", "flows.resnet_remote", "--model", tiny_models["onnx"], "--artifacts",
                           str(tiny_store), "--no-check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.rstrip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("Error: the local Prefect server did not start: the Prefect server exited"), lines[-1]
    assert str(fresh_local_stack.home / "logs" / "server.log") in lines[-1]
    new = [r for r in ArtifactStore(tiny_store).ledger.records() if r.id not in before]
    assert len(new) == 1 and new[0].status == "failed" and "did not start" in new[0].error
    assert fresh_local_stack.server_record() is None  # the server that exited left no record behind
