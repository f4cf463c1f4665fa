"""Shared fixtures (a Prefect test server, a temporary artifact store, tiny real models) and the tiers.

Tests live in ``unit/`` (pure functions and in-process TVM: no server, no subprocess, no browser; ``pytest -m
unit`` runs in under a minute), ``integration/`` (real rpc_servers, trackers, Prefect servers, CLI
subprocesses on 127.0.0.1) and ``system/`` (the product as users run it: the stack and its worker, the UI in
Chromium, the emulated aarch64 device, the device bundle in a clean venv, the demo models). Each test gets
the marker of its directory; ``gpu`` and ``slow`` are set per test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures_models import SOURCES
from support import REPO, free_port, make_tiny_onnx, run_cli  # noqa: F401 - re-exported for older imports

# No network here: keep Prefect from phoning home, for this process and every server it starts.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# TVM's pool with one thread in every process the tests start: the devices this project starts default to one
# per physical core (pipeline/threads.py), which on a busy 2-core CI machine makes latencies noisier for nothing
# the tests check. test_device.py's test_threads__* removes it to check that default.
os.environ.setdefault("TVM_NUM_THREADS", "1")
# A command line without PREFECT_API_URL uses the local Prefect server and leaves it running for the next runs
# (pipeline/local_stack.py). The tests opt out (a temporary server per run, as before) unless they mean that
# path: then they use a stack of their own (``local_stack``, ``fresh_local_stack`` in integration/conftest.py),
# which they stop. Should one forget, it finds no user's stack: the stack directory and port point at a
# directory of this session (checked and emptied at its end, ``_no_local_server_left``), never .stack/ or 4200.
os.environ["TVMRP_PREFECT_SERVER"] = "temporary"
_GUARD_STACK = Path(tempfile.mkdtemp(prefix="tvmrp-test-stack-"))
os.environ["TVMRP_STACK_DIR"] = str(_GUARD_STACK)
os.environ["TVMRP_STACK_PORT"] = str(free_port())


@pytest.fixture(scope="session", autouse=True)
def _no_local_server_left():
    """No test leaves the local server running where a test that forgot its own stack would have started it."""
    yield
    record = _GUARD_STACK / "run" / "server.json"
    left = json.loads(record.read_text()) if record.is_file() else None
    if left is not None:
        from pipeline import local_stack

        local_stack.stop(local_stack.Config.from_env(), "server")
    shutil.rmtree(_GUARD_STACK, ignore_errors=True)
    if left is not None:
        pytest.fail(f"a test started the local Prefect server without a stack of its own: {left}")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server (SQLite, temporary) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture
def store_root(tmp_path) -> Path:
    """An empty artifact store."""
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, ``tests/s3_server.py``) on 127.0.0.1 for the session, stopped
    (its process group) at the end."""
    from s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class S3Store:
    """A store in a fresh bucket of the test server: its URL and the environment of the machine using it (the
    server's endpoint and credentials, a team key, a local cache directory of its own)."""

    url: str
    bucket: str
    env: dict[str, str]

    def machine(self, cache: Path) -> dict[str, str]:
        """The environment of another machine: same bucket and team key, another local cache directory."""
        return {**self.env, "XDG_CACHE_HOME": str(cache)}


@pytest.fixture
def s3_store(s3_server, tmp_path, monkeypatch) -> S3Store:
    """A store on the S3 server in a bucket of its own, this process's environment pointing at it (endpoint,
    credentials, a team key in ``TVMRP_STORE_KEY``, ``XDG_CACHE_HOME`` under the test's directory)."""
    bucket = s3_server.bucket(f"tvmrp-{uuid.uuid4().hex[:12]}")
    env = {**s3_server.env, "TVMRP_STORE_KEY": "team-key-" + uuid.uuid4().hex + uuid.uuid4().hex,
           "XDG_CACHE_HOME": str(tmp_path / "cache-here")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TVMRP_STORE_KEY_FILE", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3Store(f"s3://{bucket}/team", bucket, env)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    """A tiny ONNX classifier file (see :func:`make_tiny_onnx`)."""
    return make_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def model(tiny_onnx):
    """The tiny ONNX classifier, resolved (``pipeline.models.ResolvedModel``)."""
    from pipeline.models import ModelSpec, resolve_model

    return resolve_model(ModelSpec(str(tiny_onnx)))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny model of each kind (seed 0), written once for the module."""
    folder = tmp_path_factory.mktemp("tiny")
    return {kind: write(folder, 0) for kind, write in SOURCES.items()}


_TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, the directory it lives in."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


_TIER_SECONDS: dict[str, list[float]] = {}


def _tier_of(nodeid: str) -> str:
    return next((tier for tier in _TIERS if f"{tier}/" in nodeid), "other")


def pytest_runtest_logreport(report):
    """Add each phase's time (setup, call, teardown: fixtures' servers included) to its tier."""
    seconds = _TIER_SECONDS.setdefault(_tier_of(report.nodeid), [0.0, 0])
    seconds[0] += report.duration
    seconds[1] += report.when == "call" or (report.when == "setup" and report.skipped)


def pytest_terminal_summary(terminalreporter):
    """One line: the time each tier took (the suite's time per tier, as docs/testing.md quotes it)."""
    if _TIER_SECONDS:
        parts = [f"{tier} {s:.0f} s ({int(n)} tests)" for tier, (s, n) in sorted(_TIER_SECONDS.items())]
        terminalreporter.write_line("time per tier: " + ", ".join(parts))
