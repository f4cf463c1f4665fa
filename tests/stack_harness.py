"""The real local Prefect stack for tests (a pytest plugin: ``pytest_plugins = ["stack_harness"]``).

``stack``: ``scripts/stack up --with-device`` once per session, in a temporary directory, on free ports (never
a user's 4200/9190), torn down with ``scripts/stack down``. ``nightly_runs``: the project deployed with
``scripts/stack deploy`` and ``resnet-remote/nightly`` run twice through ``prefect deployment run --watch``
with a tiny model and a temporary artifact store, as a user would. Both are shared by test_stack.py and
test_ui.py; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import REPO, free_port, make_tiny_onnx

STACK = REPO / "scripts" / "stack"
UP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240
DEVICE_KEY = "test-x86"


@dataclass
class Stack:
    """A stack under test: its directory, ports and environment, and how to drive it."""

    home: Path
    port: int
    tracker_port: int
    artifacts: Path
    env: dict[str, str]
    device_key: str = DEVICE_KEY
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def cli(self, *args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess:
        """``scripts/stack ARGS`` with this stack's settings."""
        return subprocess.run([str(STACK), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def prefect(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        """The ``prefect`` CLI pointed at this stack (what ``eval "$(scripts/stack env)"`` gives a shell)."""
        env = {**self.env, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home / "client")}
        return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def up(self, *args: str) -> subprocess.CompletedProcess:
        start = time.monotonic()
        proc = self.cli("up", *args)
        assert proc.returncode == 0, f"scripts/stack up failed:\n{proc.stdout}\n{proc.stderr}"
        self.timings.setdefault("up_s", time.monotonic() - start)
        return proc

    def ensure_up(self) -> None:
        """Up again if a test took it down (its database, so its history, stays)."""
        if self.cli("status", timeout=60).returncode != 0:
            self.up()

    def records(self) -> dict[str, dict[str, Any]]:
        """The pid files of the running components."""
        return {p.stem: json.loads(p.read_text()) for p in sorted((self.home / "run").glob("*.json"))}

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A synchronous Prefect client of this stack's API."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client


@dataclass(frozen=True)
class NightlyRuns:
    """The two runs of the nightly deployment: their flow-run ids and what the test passed."""

    deployment_id: str
    first: str
    second: str
    parameters: dict[str, Any]
    deploy_output: str
    watched: str = ""
    """What ``prefect deployment run ... --watch`` printed for the second run."""


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    artifacts = home / "artifacts"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TVMRP_"))}
    stack = Stack(home=home, port=free_port(), tracker_port=free_port(), artifacts=artifacts, env={
        **env,
        "TVMRP_STACK_DIR": str(home),
        "TVMRP_STACK_DEVICE_KEY": DEVICE_KEY,
        "TVMRP_ARTIFACTS": str(artifacts),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick flow runs up at once
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    })
    stack.env["TVMRP_STACK_PORT"] = str(stack.port)
    stack.env["TVMRP_STACK_TRACKER_PORT"] = str(stack.tracker_port)
    try:
        stack.up("--with-device")
        yield stack
    finally:
        stack.cli("down", timeout=120)


_UUID = re.compile(r"UUID: ([0-9a-f-]{36})")


@pytest.fixture(scope="session")
def nightly_runs(stack: Stack, tmp_path_factory) -> NightlyRuns:
    start = time.monotonic()
    deployed = stack.cli("deploy", timeout=180)
    assert deployed.returncode == 0, f"deploy failed:\n{deployed.stdout}\n{deployed.stderr}"
    stack.timings["deploy_s"] = time.monotonic() - start
    with stack.client() as client:
        deployment = client.read_deployment_by_name("resnet-remote/nightly")

    model = make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx", seed=11)
    parameters = {"model": str(model), "artifacts": str(stack.artifacts), "tracker": stack.tracker,
                  "key": stack.device_key, "repeat": 2}
    ids = []
    for n in (1, 2):
        start = time.monotonic()
        proc = stack.prefect("deployment", "run", "resnet-remote/nightly", "--params", json.dumps(parameters),
                             "--watch", "--watch-interval", "1", "--watch-timeout", str(RUN_TIMEOUT_S - 20))
        stack.timings[f"run{n}_s"] = time.monotonic() - start
        match = _UUID.search(proc.stdout)
        assert proc.returncode == 0 and match, (
            f"prefect deployment run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n"
            f"worker log:\n{(stack.home / 'logs' / 'worker.log').read_text()[-4000:]}"
        )
        ids.append(match.group(1))
    return NightlyRuns(str(deployment.id), ids[0], ids[1], parameters, deployed.stdout, proc.stdout)
