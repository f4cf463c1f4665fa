"""The fleet: its file's validation (unit), and whole fleet runs against a real tracker, real rpc_servers, a real
Prefect server and real compiled libraries (integration), one device of them the emulated aarch64 one (system)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import REPO, make_tiny_onnx
from pipeline.errors import UsageError
from pipeline.fleet import PairResult
from pipeline.fleet_spec import parse_fleet

AARCH64 = "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"

EXAMPLE = """\
tracker: 127.0.0.1:9190          # optional default for devices
devices:
  - key: local-x86               # tracker key (or host/port)
    target: llvm
  - key: rpi4
    target: "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"
    tracker: 10.0.0.5:9190        # per-device override
models:
  - efficientnet_lite0
  - {model: resnet18_v2, weights: random}
  - {model: path/to/net.onnx, image: data/dog.jpg}
"""


def parse(text: str, base: Path | None = None):
    return parse_fleet(textwrap.dedent(text), "fleet.yaml", base=base)


def error_of(text: str) -> str:
    with pytest.raises(UsageError) as caught:
        parse(text)
    return str(caught.value)


# -- the fleet file (unit) ------------------------------------------------------------------------------


def _result(device: str, model: str, status: str = "passed", **extra) -> PairResult:
    fields = dict(target="llvm", target_canonical="{}", latency_ms={"median": 1.25, "p90": 1.5}, check={"passed": True},
                  regression={"regression": False, "change": 0.031}, error=None, error_type=None, build_key="b" * 64,
                  run_id="20260101T000000Z-abcdef", device_address=device)
    return PairResult(device=device, model=model, status=status, **{**fields, **extra})


# -- whole fleets (integration) -------------------------------------------------------------------------


def run_fleet(fleet_file: Path, store_root: Path, prefect_api: str | None, *args: str,
              timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return subprocess.run([sys.executable, "-m", "flows.fleet", str(fleet_file), "--artifacts", str(store_root), "--json",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ledger(store_root: Path, fleet_run: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (store_root / ".runs").glob("*.json")]
    return [r for r in records if r.get("fleet_run") == fleet_run]


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


@pytest.fixture(scope="module")
def two_live_keys():
    """A real tracker with an rpc_server under ``fleet-a`` and one under ``fleet-b``; yields its address."""
    from pipeline.device import EmbeddedServer, start_tracker

    with start_tracker() as tracker:
        address = tracker.spec_address
        with EmbeddedServer(tracker=address, key="fleet-a"), EmbeddedServer(tracker=address, key="fleet-b"):
            yield address


@pytest.fixture(scope="module")
def pool_worker(prefect_api, tmp_path_factory):
    """A process work pool with two deployments, a ``build_only`` one of resnet_remote and one of the fleet, and
    one worker polling it (here, the build machine and the device machine in one); yields the deployments' ids.
    The worker's process group is ended after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = "fleet-test-pool"
    common = {"work_pool_name": pool, "path": str(REPO),
              "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        ids = {
            "resnet-remote/fleet-build": client.create_deployment(
                flow_id=client.create_flow_from_name("resnet-remote"), name="fleet-build",
                entrypoint="flows/resnet_remote.py:resnet_remote", parameters={"build_only": True}, **common),
            "fleet/fleet-test": client.create_deployment(
                flow_id=client.create_flow_from_name("fleet"), name="fleet-test", entrypoint="flows/fleet.py:fleet",
                **common),
        }
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "3"],
            cwd=REPO, env={**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield ids, log_path
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(worker.pid, sig)
            except ProcessLookupError:
                break
            try:
                worker.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


# -- with the emulated aarch64 device (system) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def aarch64_device(tmp_path_factory):
    """The emulated aarch64 device (scripts/aarch64-device), under a tracker of its own; yields its tracker."""
    script = REPO / "scripts" / "aarch64_device.py"
    env = {**os.environ, "TVMRP_AARCH64_RUN_DIR": str(tmp_path_factory.mktemp("aarch64-run"))}

    def call(*args: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"aarch64-device {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc

    call("provision", timeout=600)
    try:
        info = json.loads(call("start", "--key", "aarch64-qemu", "--json", timeout=300).stdout.strip().splitlines()[-1])
        yield info["tracker"]
    finally:
        call("stop", timeout=120)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="scripts/setup --dev installs the aarch64 cross compiler")
@pytest.mark.skipif(not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")),
                    reason="qemu-user is missing (scripts/setup --dev installs qemu-user-static)")
def test_fleet__an_emulated_aarch64_device_beside_an_x86_one(prefect_api, store_root, tmp_path, aarch64_device):
    from pipeline.device import EmbeddedServer

    model = make_tiny_onnx(tmp_path / "tiny.onnx", seed=2)
    fleet_file = tmp_path / "mixed.yaml"
    fleet_file.write_text(textwrap.dedent(f"""\
        tracker: {aarch64_device}
        repeat: 3
        connect_timeout: 60
        request_timeout: 120
        call_timeout: 600
        devices:
          - {{key: aarch64-qemu, target: "{AARCH64}", name: qemu}}
          - {{key: x86-beside, target: llvm}}
        models: [{model}]
    """))
    with EmbeddedServer(tracker=aarch64_device, key="x86-beside"):
        proc = run_fleet(fleet_file, store_root, prefect_api, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    summary = last_json(proc)
    by_device = {r["device"]: r for r in summary["results"]}
    assert by_device["qemu"]["status"] == by_device["x86-beside"]["status"] == "passed"
    assert by_device["qemu"]["check"]["passed"] and '"mtriple":"aarch64-linux-gnu"' in by_device["qemu"]["target_canonical"]
    assert by_device["qemu"]["build_key"] != by_device["x86-beside"]["build_key"]
    assert summary["builds"] == {"ran": 2, "cached": 0, "failed": 0}
