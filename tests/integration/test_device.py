"""Tests of pipeline.device on real rpc_server / rpc_tracker processes on 127.0.0.1 (spec validation and the
version rule: tests/unit/test_device_spec.py).

Every server runs in its own process group; tests check that stopping one leaves no process of it. An
rpc_server serves one session at a time, so every test closes its sessions before the next one opens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import free_port as unused_port
from support import read_line as _read_line

from pipeline.device import (
    DeviceInfo,
    DeviceSpec,
    EmbeddedServer,
    RemoteSession,
    TrackerProcess,
    device_triple,
    open_session,
    probe,
    start_tracker,
    tracker_summary,
)
from pipeline.device import servers as device_processes
from pipeline.device.probe import check_versions, device_arch, local_tvm_version
from pipeline.errors import DeviceTimeout, DeviceUnavailable, RemoteRunError, UsageError
from pipeline.targets import host_arch

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


@dataclasses.dataclass
class Stack:
    """This module's rpc_servers and tracker (not tests/stack_harness.py's Prefect stack, whose fixture is also
    named ``stack``: this module's own fixture overrides it here)."""

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
    """The stack's server for direct connections (here in place of tests/integration/conftest.py's ``server``)."""
    stack.server.wait_ready()
    return stack.server


@pytest.fixture()
def tracked(stack: Stack) -> tuple[TrackerProcess, EmbeddedServer]:
    """A tracker and a server registered with it under KEY."""
    stack.registered.wait_ready()
    return stack.tracker, stack.registered


# ------------------------------------------------------------------------------- server processes


def test_embedded_server__dead_child_reports_log(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'boom: no tvm here' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    dead = EmbeddedServer(python=fake)
    with pytest.raises(DeviceUnavailable, match=r"(?s)exited with code 3.*boom: no tvm here"):
        dead.wait_ready(timeout=10)
    log_path = dead.log_path
    dead.stop()
    assert log_path is not None and "boom" in log_path.read_text()  # kept: the message names it
    log_path.unlink()


def test_embedded_server__lifecycle_retries_taken_port(
    monkeypatch: pytest.MonkeyPatch, tiny_lib: tuple[Path, list[np.ndarray], np.ndarray]
) -> None:
    """A taken port is retried; a session works; stop() ends the whole group, twice without harm."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        ports = iter([taken.getsockname()[1]])
        real_free_port = device_processes.free_port
        monkeypatch.setattr(device_processes, "free_port", lambda host: next(ports, None) or real_free_port(host))
        embedded = EmbeddedServer()
        try:
            started = time.monotonic()
            embedded.start()
            host, port = embedded.wait_ready(timeout=60)
            print(f"rpc_server ready after {time.monotonic() - started:.1f} s (with one port retry)")
            assert port != taken.getsockname()[1]
            assert embedded.alive()
            lib, inputs, expected = tiny_lib
            with open_session(DeviceSpec(), embedded) as session:
                assert session.description == f"embedded {host}:{port}"
                np.testing.assert_allclose(run_remote(session, lib, inputs), expected, rtol=1e-5, atol=1e-6)
            pgid = embedded.pgid
            assert pgid is not None
        finally:
            embedded.stop()
    assert_group_gone(pgid)
    assert not embedded.alive()
    embedded.stop()


# --------------------------------------------------------------------------------------- sessions


def test_open_session__host_runs_and_reports_triple(
    server: EmbeddedServer, tiny_lib: tuple[Path, list[np.ndarray], np.ndarray]
) -> None:
    host, port = server.address
    lib, inputs, expected = tiny_lib
    with open_session(DeviceSpec(host=host, port=port)) as session:
        assert session.description == f"{host}:{port}"
        assert device_triple(session) == tvm.get_global_func("target.llvm_get_system_triple")()
        np.testing.assert_allclose(run_remote(session, lib, inputs), expected, rtol=1e-5, atol=1e-6)


def test_call__remote_error_is_remote_run_error(server: EmbeddedServer) -> None:
    host, port = server.address
    with open_session(DeviceSpec(host=host, port=port)) as session:
        with pytest.raises(RemoteRunError, match=rf"load on {host}:{port} failed: cannot find file .*missing\.so"):
            session.call("load", session.remote.load_module, "missing.so")
        with pytest.raises(UsageError):
            session.upload(__file__, "../escape.so")
    with pytest.raises(DeviceUnavailable, match="closed"):
        session.call("load", lambda: None)


def test_close__frees_the_server_when_the_sessions_socket_reuses_a_closed_descriptor(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A descriptor closed while ``rpc.connect`` runs (a garbage-collected socket) hands its number to the
    session's socket. close() must still find and shut it: a caller that keeps a remote object would otherwise
    keep the one-session server busy, and the next session would get no handshake (seen in the test suite)."""
    import tvm.rpc

    host, port = server.address
    spare = socket.socket()  # the lowest free descriptor number
    real_connect = tvm.rpc.connect

    def connect_after_a_close(*args, **kwargs):
        spare.close()  # its number is free again: the session's socket takes it
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(tvm.rpc, "connect", connect_after_a_close)
    first = open_session(DeviceSpec(host=host, port=port))
    monkeypatch.undo()
    kept = first.remote.get_function("tvmrp.device_info")  # holds TVM's session open
    first.close()
    with open_session(DeviceSpec(host=host, port=port, connect_timeout=5)) as second:
        assert json.loads(second.remote.get_function("tvmrp.device_info")())["schema"] >= 1
    del kept


def test_open_session__nothing_listening() -> None:
    port = unused_port()
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable, match=f"127.0.0.1:{port}"):
        open_session(DeviceSpec(host="127.0.0.1", port=port))
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", (0xFF271).to_bytes(4, "little") + b"\xfb" * 64,
                                    (0xFF271).to_bytes(4, "little") + bytes(4) + os.urandom(64)])
def test_open_session__a_server_answering_garbage_is_not_a_tvm_rpc_server(answer: bytes) -> None:
    """Another program on the port answers the handshake with garbage (an HTTP reply; TVM's magic, then a
    negative key length that made TVM say ``basic_string::_M_replace_aux``): one line naming the address."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(answer)
                connection.recv(4096)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(DeviceUnavailable) as failed:
            open_session(DeviceSpec(host="127.0.0.1", port=port, connect_timeout=5))
        thread.join(10)
    message = str(failed.value)
    assert f"127.0.0.1:{port}" in message and "is not a TVM RPC server" in message and "\n" not in message


def test_open_session__tracker_hands_out_registered_server(
    tracked: tuple[TrackerProcess, EmbeddedServer], tiny_lib: tuple[Path, list[np.ndarray], np.ndarray]
) -> None:
    tracker, _ = tracked
    lib, inputs, expected = tiny_lib
    spec = DeviceSpec(tracker=tracker.spec_address, key=KEY, request_timeout=10)
    assert tracker_summary(*tracker.address, timeout=5)["server_info"][0]["key"] == f"server:{KEY}"
    with open_session(spec) as session:
        assert session.description == f"tracker {tracker.spec_address} key={KEY}"
        np.testing.assert_allclose(run_remote(session, lib, inputs), expected, rtol=1e-5, atol=1e-6)
    # close() must free the one-session server although TVM leaks the get_outputs tensor (and its session).
    with open_session(spec) as session:
        assert device_triple(session)


def test_open_session__tracker_unknown_key_lists_keys(tracked: tuple[TrackerProcess, EmbeddedServer]) -> None:
    tracker, _ = tracked
    spec = DeviceSpec(tracker=tracker.spec_address, key="no-such-device", request_timeout=3)
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable) as caught:
        open_session(spec)
    elapsed = time.monotonic() - started
    print(f"unknown key refused after {elapsed:.1f} s: {caught.value}")
    assert 3 <= elapsed < 8
    assert "'no-such-device'" in str(caught.value)
    assert KEY in str(caught.value)


def test_open_session__tracker_not_listening() -> None:
    port = unused_port()
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable, match=f"tracker 127.0.0.1:{port} is not reachable"):
        open_session(DeviceSpec(tracker=f"127.0.0.1:{port}", key=KEY))
    assert time.monotonic() - started < 10


def test_call__stopped_server_times_out(stack: Stack) -> None:
    """A call blocked inside TVM against a SIGSTOPped server ends at its timeout (TVM releases the GIL)."""
    stopped = stack.victim
    host, port = stopped.wait_ready()
    pgid = stopped.pgid
    assert pgid is not None
    try:
        session = open_session(DeviceSpec(call_timeout=3, connect_timeout=1), stopped)
        os.killpg(pgid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            expected = rf"device_triple on embedded {host}:{port} did not answer within 3 s"
            with pytest.raises(DeviceTimeout, match=expected):
                device_triple(session)
            elapsed = time.monotonic() - started
            print(f"DeviceTimeout after {elapsed:.2f} s")
            assert 3 <= elapsed < 4.5
            assert session.broken
            with pytest.raises(DeviceUnavailable, match="was not tried"):
                device_triple(session)
            started = time.monotonic()
            with pytest.raises(DeviceUnavailable, match="no RPC handshake within 1 s"):
                open_session(DeviceSpec(host=host, port=port, connect_timeout=1))
            assert time.monotonic() - started < 2.5
        finally:
            os.killpg(pgid, signal.SIGCONT)
        started = time.monotonic()
        session.close()
        assert time.monotonic() - started < 4
    finally:
        stopped.stop()
    assert_group_gone(pgid)


# ------------------------------------------------------------------------------------------ probe


def test_probe__full_server(stack: Stack) -> None:
    """A stock server with the full tvm package tells its triple and LLVM version; CUDA as this machine has it."""
    host, port = stack.stock.wait_ready()
    with open_session(DeviceSpec(host=host, port=port)) as session:
        started = time.monotonic()
        info = probe(session)
        print(f"probe of a full server in {time.monotonic() - started:.3f} s: {info}")
    assert info.triple == tvm.get_global_func("target.llvm_get_system_triple")()
    assert info.llvm_version == tvm.get_global_func("target.llvm_version_major")()
    assert info.has_cuda is tvm.cuda(0).exist
    assert (info.compute_version is None) is (not info.has_cuda)
    assert info.tvm_version is None  # apache-tvm 0.27 registers no function that tells its version
    assert info.address == f"{host}:{port}"


def test_probe__runtime_only_server(stack: Stack) -> None:
    """A runtime-only server answers what the runtime knows (CUDA) and None for the compiler's questions."""
    host, port = stack.runtime_only.wait_ready()
    with open_session(DeviceSpec(host=host, port=port)) as session:
        info = probe(session)
        print(f"probe of a runtime-only server: {info}")
        assert device_triple(session) is None
    assert info == DeviceInfo(has_cuda=tvm.cuda(0).exist, compute_version=info.compute_version,
                              address=f"{host}:{port}")
    assert info.triple is None and info.llvm_version is None and info.tvm_version is None


def test_probe__embedded_server_tells_who_it_is(server: EmbeddedServer) -> None:
    """The embedded server registers ``tvmrp.device_info`` in its session process (forked from the
    popen_worker, a fresh interpreter): machine, versions and host name, with the compiler's triple kept."""
    from importlib import metadata

    host, port = server.address
    # The shared server may still be ending a session an earlier test broke on purpose: wait for it longer.
    with open_session(DeviceSpec(host=host, port=port, connect_timeout=60)) as session:
        started = time.monotonic()
        info = probe(session)
        print(f"probe of the embedded server in {time.monotonic() - started:.3f} s: {info}")
    assert info.machine == platform.machine() and info.hostname == socket.gethostname()
    assert info.tvm_version == local_tvm_version() == metadata.version("apache-tvm")
    assert info.tvm_ffi_version == metadata.version("apache-tvm-ffi")
    assert info.python_version == platform.python_version() and info.bundle is None
    assert info.triple == tvm.get_global_func("target.llvm_get_system_triple")()  # the compiler's, when present
    assert device_arch(info) == host_arch()
    assert check_versions(info) is None


def test_threads_and_load__set_over_rpc_on_any_server_load_told_by_ours(stack: Stack, server: EmbeddedServer) -> None:
    """``runtime.config_threadpool``/``runtime.NumThreads`` work on a stock server too; the pool never grows past
    what its process started with. Only a device we start tells its load (``tvmrp.device_load``)."""
    from pipeline.device.probe import device_load, device_threads, set_threads

    host, port = stack.stock.wait_ready()
    with open_session(DeviceSpec(host=host, port=port)) as session:
        started = device_threads(session)
        assert isinstance(started, int) and started >= 1
        assert set_threads(session, 1) == 1
        assert set_threads(session, started + 8) == started  # TVM_NUM_THREADS / half the CPUs: the most it has
        assert device_load(session) is None
    host, port = server.address
    with open_session(DeviceSpec(host=host, port=port, connect_timeout=60)) as session:
        load = device_load(session)
    assert load is not None and len(load.loadavg) == 3 and load.cpus == os.cpu_count()
    assert load.affinity and set(load.affinity) <= set(range(os.cpu_count()))


def test_threads__a_device_we_start_runs_tvm_on_every_physical_core() -> None:
    """TVM's own default halves the logical CPUs on x86-64 (1 thread on a 2-core VM); a device this project starts
    gets one thread per physical core unless TVM_NUM_THREADS (or OMP_NUM_THREADS) says otherwise."""
    from pipeline.device.probe import device_threads
    from pipeline.threads import physical_cores

    for env, expected in (({}, physical_cores()), ({"TVM_NUM_THREADS": "1"}, 1), ({"OMP_NUM_THREADS": "1"}, 1)):
        with pytest.MonkeyPatch.context() as patch:
            for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            with EmbeddedServer() as device:
                host, port = device.wait_ready()
                with open_session(DeviceSpec(host=host, port=port, connect_timeout=60)) as session:
                    assert device_threads(session) == expected, env


def test_embedded_server__identity_reaches_every_interpreter(tmp_path: Path) -> None:
    """``identify=True`` puts the device side first on PYTHONPATH and keeps the caller's entries after it;
    ``identify=False`` leaves the environment as it is (and neither passes on a bundle's directory)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(tmp_path))
        env.setenv("TVMRP_DEVICE_BUNDLE", str(tmp_path))
        identified = EmbeddedServer()._environment()
        stock = EmbeddedServer(identify=False)._environment()
    assert identified["PYTHONPATH"].split(os.pathsep) == [str(device_processes.DEVICE_SIDE), str(tmp_path)]
    assert stock["PYTHONPATH"] == str(tmp_path)
    assert "TVMRP_DEVICE_BUNDLE" not in identified and "TVMRP_DEVICE_BUNDLE" not in stock
    code = "import tvm_ffi; print(tvm_ffi.get_global_func('tvmrp.device_info')())"
    proc = subprocess.run([sys.executable, "-c", code], env=identified, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["machine"] == platform.machine()


# -------------------------------------------------------------------------------- session timeout

_VANISHING_CLIENT = """
import sys, time
from pipeline.device import DeviceSpec, open_session
spec = DeviceSpec(host=sys.argv[1], port=int(sys.argv[2]), session_timeout=float(sys.argv[3]))
session = open_session(spec)
print("connected", flush=True)
time.sleep(120)
"""


def test_session_timeout__frees_the_server_of_a_vanished_client(stack: Stack) -> None:
    """A client that stops answering (SIGSTOP: its connection stays open, like a network cut) holds the
    one-session server only until the session timeout it asked for; then a new session opens."""
    host, port = stack.expiring.wait_ready()
    session_timeout = 3.0
    client = subprocess.Popen(
        [sys.executable, "-c", _VANISHING_CLIENT, host, str(port), str(session_timeout)],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert _read_line(client, timeout=60) == "connected"
        connected = time.monotonic()
        os.kill(client.pid, signal.SIGSTOP)
        with pytest.raises(DeviceUnavailable, match="no RPC handshake"):
            open_session(DeviceSpec(host=host, port=port, connect_timeout=1))
        session = _open_within(DeviceSpec(host=host, port=port, connect_timeout=2), deadline=connected + 30)
        elapsed = time.monotonic() - connected
        with session:
            assert device_triple(session)
        print(f"a new session opened {elapsed:.1f} s after the vanished client's session began")
        assert session_timeout <= elapsed < session_timeout + 10
    finally:
        client.kill()
        client.wait(timeout=10)


def test_session_timeout__expired_session_is_a_device_timeout(stack: Stack) -> None:
    """The server ends a session older than its session timeout; the next call says so, and what to do."""
    host, port = stack.expiring.wait_ready()
    with open_session(DeviceSpec(host=host, port=port, session_timeout=1.5)) as session:
        assert device_triple(session)
        time.sleep(2.5)
        with pytest.raises(DeviceTimeout, match="session timeout expired.*raise the session timeout"):
            device_triple(session)
        assert session.broken
    with open_session(DeviceSpec(host=host, port=port, connect_timeout=5)) as session:
        assert device_triple(session)


def _open_within(spec: DeviceSpec, deadline: float) -> RemoteSession:
    for _ in range(100):  # bounded; each try waits at most connect_timeout
        try:
            return open_session(spec)
        except DeviceUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    pytest.fail("no session within 100 tries")


def test_profile_and_memory__told_by_ours_not_by_a_stock_server(stack: Stack, server: EmbeddedServer, tiny_lib) -> None:
    """``tvmrp.profile`` takes the remote VM as an RPC argument and times each of its calls where it lives, then
    leaves the VM as it was; a stock server registers neither it nor ``tvmrp.device_memory``."""
    from pipeline.device.probe import device_memory
    from pipeline.profiling import profile_remote, summarize
    from tasks import run as run_stage

    lib, inputs, expected = tiny_lib

    def loaded(session: RemoteSession):
        rlib = session.call("load", session.remote.load_module, session.upload(lib))
        dev = session.device()
        vm = session.call("load", relax.VirtualMachine, rlib, dev)
        tensors = [session.call("set_input", tvm.runtime.tensor, a, dev) for a in inputs]
        session.call("set_input", vm.set_input, "main", *tensors)
        return vm

    host, port = stack.stock.wait_ready()
    with open_session(DeviceSpec(host=host, port=port)) as session:
        assert profile_remote(session, loaded(session), "cpu", 5) is None
        assert device_memory(session) is None
    host, port = server.address
    with open_session(DeviceSpec(host=host, port=port, connect_timeout=60)) as session:
        vm = loaded(session)
        times = profile_remote(session, vm, "cpu", 50)
        assert times is not None and times.repeat == 50 and times.plain_ms > 0
        names = [call.name for call in times.calls]
        assert any(name.startswith("vm.builtin.alloc") for name in names)
        kernels = [call for call in times.calls if not call.name.startswith("vm.")]
        assert kernels and ("2x3", "3x4", "2x4") in {call.shapes for call in kernels}  # the matmul, by its shapes
        profile = summarize(times)
        assert {k.name for k in profile.kernels} == {call.name for call in kernels}
        assert profile.total_ms == pytest.approx(profile.kernels_ms + profile.glue_ms)
        session.call("run", vm.invoke_stateful, "main")  # the instrument is gone: the VM runs as before
        np.testing.assert_allclose(session.call("get", lambda: vm.get_outputs("main").numpy()), expected, rtol=1e-5)
        assert device_memory(session) > 50 << 20  # a Python process with TVM's runtime loaded
        # Not a VM: the device answers why, and a run takes that as a note, not as its failure.
        not_a_vm = types.SimpleNamespace(module=session.call("load", session.remote.load_module, lib.name))
        with pytest.raises(RemoteRunError, match="could not profile the model: .*invoke_stateful"):
            profile_remote(session, not_a_vm, "cpu", 3)
        calls, notes = run_stage._profile(session, not_a_vm, "cpu", 3)
        assert calls is None and len(notes) == 1 and notes[0].startswith("no profile: ")
