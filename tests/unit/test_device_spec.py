"""Tests of pipeline.device: spec validation (unit) and real rpc_server / rpc_tracker processes on 127.0.0.1.

Every server runs in its own process group; tests check that stopping one leaves no process of it. An
rpc_server serves one session at a time, so every test closes its sessions before the next one opens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.device import (
    DeviceInfo,
    DeviceSpec,
    EmbeddedServer,
    RemoteSession,
    TrackerProcess,
    open_session,
    start_tracker,
)
from pipeline.device.probe import check_versions, device_arch, parse_device_info
from pipeline.errors import DeviceUnavailable, UsageError, VersionSkew

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

KEY = "test-device"


# ------------------------------------------------------------------------------------------ helpers


@I.ir_module
class TinyModule:
    @R.function
    def main(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32")) -> R.Tensor((2, 4), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.relu(y)
            R.output(z)
        return z


@pytest.fixture(scope="module")
def tiny_lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """The tiny module built for llvm and exported as a .so, its inputs, and its output run locally."""
    executable = tvm.compile(TinyModule, tvm.target.Target({"kind": "llvm"}))
    path = tmp_path_factory.mktemp("lib") / "tiny.so"
    executable.export_library(str(path))
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, 3)).astype("float32"), rng.standard_normal((3, 4)).astype("float32")]
    vm = relax.VirtualMachine(executable, tvm.cpu())
    expected = vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in inputs)).numpy()
    return path, inputs, expected


def run_remote(session: RemoteSession, lib: Path, inputs: list[np.ndarray]) -> np.ndarray:
    """Uploads, loads and runs the library on the session's device; every remote object dies on return."""
    name = session.upload(lib)
    rlib = session.call("load", session.remote.load_module, name)
    dev = session.device()
    vm = session.call("load", relax.VirtualMachine, rlib, dev)
    tensors = [session.call("set_input", tvm.runtime.tensor, a, dev) for a in inputs]
    session.call("set_input", vm.set_input, "main", *tensors)
    session.call("run", vm.invoke_stateful, "main")
    return session.call("get_outputs", lambda: vm.get_outputs("main").numpy())


def assert_group_gone(pgid: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {pgid} still has processes {within} s after stop()")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Stack:
    server: EmbeddedServer
    tracker: TrackerProcess
    registered: EmbeddedServer
    victim: EmbeddedServer
    runtime_only: EmbeddedServer
    expiring: EmbeddedServer
    stock: EmbeddedServer


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The servers of this module, started together so that their start-ups (~4 s each) overlap.

    ``server`` takes direct connections; ``registered`` is registered with ``tracker`` under KEY (started
    once the tracker is ready: a server that cannot reach its tracker gives up after 60 s); ``victim`` is
    for the SIGSTOP test; ``runtime_only`` loads only ``libtvm_runtime`` (``TVM_USE_RUNTIME_LIB=1``), as a
    device without the compiler; ``expiring`` is for the session-timeout test. ``runtime_only`` and
    ``stock`` are stock rpc_servers (``identify=False``: no ``tvmrp.device_info``), as someone else would run
    them; the others tell who they are, as the pipeline's embedded server does. Tests wait for what they
    use. Stopping them must leave no process of their groups.
    """
    tracker = start_tracker()
    server = EmbeddedServer()
    victim = EmbeddedServer()
    runtime_only = EmbeddedServer(identify=False)
    expiring = EmbeddedServer()
    stock = EmbeddedServer(identify=False)
    registered = None
    try:
        server.start()
        victim.start()
        expiring.start()
        stock.start()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TVM_USE_RUNTIME_LIB", "1")
            runtime_only.start()
        tracker.wait_ready()
        registered = EmbeddedServer(tracker=tracker.spec_address, key=KEY)
        registered.start()
        yield Stack(server, tracker, registered, victim, runtime_only, expiring, stock)
    finally:
        processes = [
            process
            for process in (stock, expiring, runtime_only, victim, registered, server, tracker)
            if process is not None
        ]
        groups = [process.pgid for process in processes if process.pgid is not None]
        for process in processes:
            process.stop()
        for pgid in groups:
            assert_group_gone(pgid)


@pytest.fixture()
def server(stack: Stack) -> EmbeddedServer:
    stack.server.wait_ready()
    return stack.server


@pytest.fixture()
def tracked(stack: Stack) -> tuple[TrackerProcess, EmbeddedServer]:
    """A tracker and a server registered with it under KEY."""
    stack.registered.wait_ready()
    return stack.tracker, stack.registered


# ------------------------------------------------------------------------------------ DeviceSpec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (DeviceSpec(host="10.0.0.2"), "needs --port"),
        (DeviceSpec(host=" ", port=9090), "--host is empty"),
        (DeviceSpec(port=9090), "needs --host"),
        (DeviceSpec(host="10.0.0.2", port=70000), "1 to 65535"),
        (DeviceSpec(tracker="10.0.0.2", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker="10.0.0.2:port", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker=":9190", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker="10.0.0.2:9190"), "needs --key"),
        (DeviceSpec(key="k"), "needs --tracker"),
        (DeviceSpec(host="10.0.0.2", port=9090, tracker="10.0.0.2:9190", key="k"), "not both"),
        (DeviceSpec(call_timeout=0), "call_timeout"),
        (DeviceSpec(connect_timeout=-1), "connect_timeout"),
        (DeviceSpec(request_timeout=math.nan), "request_timeout"),
        (DeviceSpec(call_timeout=math.inf), "call_timeout"),
        (DeviceSpec(session_timeout=-1), "session_timeout"),
        (DeviceSpec(connect_timeout="10"), "connect_timeout"),  # type: ignore[arg-type]
    ],
)
def test_validate__bad_spec(spec: DeviceSpec, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        spec.validate()


@pytest.mark.parametrize(
    ("spec", "kind", "description"),
    [
        (DeviceSpec(), "local", "embedded rpc_server"),
        (DeviceSpec(host="127.0.0.1", port=9090), "host", "127.0.0.1:9090"),
        (DeviceSpec(tracker="127.0.0.1:9190", key="xyz"), "tracker", "tracker 127.0.0.1:9190 key=xyz"),
        (DeviceSpec(tracker="[::1]:9190", key="xyz", session_timeout=0), "tracker", "tracker [::1]:9190 key=xyz"),
    ],
)
def test_validate__good_spec(spec: DeviceSpec, kind: str, description: str) -> None:
    spec.validate()
    assert spec.kind == kind
    assert spec.describe() == description


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        (DeviceSpec(), 360.0),
        (DeviceSpec(call_timeout=10), 70.0),
        (DeviceSpec(call_timeout=10, session_timeout=5), 5.0),
        (DeviceSpec(session_timeout=0), 0.0),
    ],
)
def test_session_seconds__derived_from_call_timeout(spec: DeviceSpec, seconds: float) -> None:
    spec.validate()
    assert spec.session_seconds == seconds


def test_tracker_address__ipv6_brackets() -> None:
    assert DeviceSpec(tracker="[::1]:9190", key="k").tracker_address == ("::1", 9190)


def test_embedded_server__tracker_needs_key() -> None:
    with pytest.raises(UsageError):
        EmbeddedServer(tracker="127.0.0.1:9190")


def test_open_session__local_without_server() -> None:
    with pytest.raises(UsageError, match="No device given"):
        open_session(DeviceSpec())


# ------------------------------------------------------------------------------- server processes


# --------------------------------------------------------------------------------------- sessions


# ------------------------------------------------------------------------------------------ probe


# ------------------------------------------------------------------------------ version rule (unit)


def _info(tvm_version: str | None, ffi: str | None = None) -> DeviceInfo:
    return DeviceInfo(tvm_version=tvm_version, tvm_ffi_version=ffi, address="10.0.0.7:9090")


def test_check_versions__equal() -> None:
    assert check_versions(_info("0.27.0.post1"), "0.27.0.post1") is None


@pytest.mark.parametrize(("theirs", "ours"), [("0.27.1", "0.27.0"), ("0.27.0", "0.27.0.post1"),
                                              ("0.27.0.post2", "0.27.0.post1"), ("0.27.0rc1", "0.27.0")])
def test_check_versions__patch_warns(theirs: str, ours: str) -> None:
    warning = check_versions(_info(theirs), ours)
    assert warning is not None and theirs in warning and ours in warning and "patch" in warning
    assert "10.0.0.7:9090" in warning


@pytest.mark.parametrize(("theirs", "ours"), [("0.26.0", "0.27.0.post1"), ("1.27.0", "0.27.0"), ("0.28", "0.27.0")])
def test_check_versions__minor_refused(theirs: str, ours: str) -> None:
    with pytest.raises(VersionSkew) as refused:
        check_versions(_info(theirs), ours, device="tracker 10.0.0.1:9190 key=rpi4")
    message = str(refused.value)
    assert theirs in message and ours in message and "--allow-version-skew" in message
    assert "tracker 10.0.0.1:9190 key=rpi4" in message
    assert (refused.value.device_version, refused.value.local_version) == (theirs, ours)
    assert refused.value.exit_code == 1


def test_check_versions__allow_skew_warns() -> None:
    warning = check_versions(_info("0.26.0"), "0.27.0.post1", allow_skew=True)
    assert warning is not None and "0.26.0" in warning and "0.27.0.post1" in warning
    assert "--allow-version-skew" in warning


def test_check_versions__unknown_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    """A stock rpc_server tells no version: nothing to check, no warning, a debug line only."""
    with caplog.at_level(logging.DEBUG, logger="pipeline.device.probe"):
        assert check_versions(_info(None), "0.27.0.post1") is None
        assert check_versions(_info(None), "0.27.0.post1", allow_skew=True) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


def test_check_versions__unparsable_and_ffi_warn() -> None:
    assert "cannot be compared" in check_versions(_info("git 1a2b3c"), "0.27.0.post1")
    from importlib import metadata

    ours_ffi = metadata.version("apache-tvm-ffi")
    warning = check_versions(_info("0.27.0.post1", ffi="0.1.9"), "0.27.0.post1")
    assert warning is not None and "0.1.9" in warning and ours_ffi in warning
    assert check_versions(_info("0.27.0.post1", ffi=ours_ffi), "0.27.0.post1") is None


def test_check_versions__default_is_our_installed_tvm() -> None:
    from importlib import metadata

    assert check_versions(_info(metadata.version("apache-tvm"))) is None


def test_device_arch__triple_first_then_machine() -> None:
    assert device_arch(DeviceInfo(triple="aarch64-unknown-linux-gnu", machine="aarch64")) == "aarch64"
    assert device_arch(DeviceInfo(machine="arm64")) == "aarch64"
    assert device_arch(DeviceInfo(machine="AMD64")) == "x86_64"
    assert device_arch(DeviceInfo(triple="arm-linux-gnueabihf", machine="aarch64")) == "arm"
    assert device_arch(DeviceInfo()) is None


def test_parse_device_info__untrusted_answer_stays_data() -> None:
    good = {"machine": "aarch64", "tvm": "0.27.0.post1", "hostname": "pi\x1b[31m" + "x" * 500, "cuda": "yes",
            "runtime_only": True, "bundle": ["not", "a", "string"], "extra": {"ignored": 1}}
    fields = parse_device_info(json.dumps(good))
    assert fields["machine"] == "aarch64" and fields["tvm"] == "0.27.0.post1"
    assert fields["hostname"].startswith("pi[31m") and len(fields["hostname"]) == 100
    assert fields["cuda"] is None and fields["runtime_only"] is True and fields["bundle"] is None
    assert parse_device_info("[1, 2]") is None and parse_device_info("not json") is None
    assert parse_device_info(json.dumps({"machine": "x" * (1 << 17)})) is None


# -------------------------------------------------------------------------------- session timeout

_VANISHING_CLIENT = """
import sys, time
from pipeline.device import DeviceSpec, open_session
spec = DeviceSpec(host=sys.argv[1], port=int(sys.argv[2]), session_timeout=float(sys.argv[3]))
session = open_session(spec)
print("connected", flush=True)
time.sleep(120)
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, f"no line from process {proc.pid} within {timeout} s"
    return proc.stdout.readline().strip()


def _open_within(spec: DeviceSpec, deadline: float) -> RemoteSession:
    for _ in range(100):  # bounded; each try waits at most connect_timeout
        try:
            return open_session(spec)
        except DeviceUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    pytest.fail("no session within 100 tries")
