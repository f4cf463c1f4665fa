"""The device behind a small interface: a TVM RPC session with bounded calls, and the processes that serve it.

Three ways to reach a device, chosen by :class:`DeviceSpec`:

* ``local``: an :class:`EmbeddedServer` (TVM's own ``python -m tvm.exec.rpc_server``) that we start on
  127.0.0.1 and stop again;
* ``host``: ``rpc.connect(host, port)`` to an ``rpc_server`` someone else runs;
* ``tracker``: ask an RPC tracker for a server registered under a key, then ``rpc.connect`` to it.

:func:`open_session` returns a :class:`RemoteSession`. Every remote call goes through
:meth:`RemoteSession.call`, which bounds it in time (TVM itself waits forever for a hung or stopped device)
and turns TVM's exceptions into the pipeline's :mod:`pipeline.errors`. Servers and trackers run in their own
process groups because ``rpc_server`` leaves a ``popen_worker`` child behind when only it is signalled.

An ``rpc_server`` serves one session at a time: a second client waits until the first one is closed. Close
sessions explicitly (context managers).

``tvm`` is imported only where it is needed, so that a server can be started before the (slow) import.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from pipeline.errors import DeviceLost, DeviceTimeout, DeviceUnavailable, RemoteRunError, UsageError

if TYPE_CHECKING:
    import tvm
    from tvm.rpc.client import RPCSession

__all__ = [
    "DeviceSpec",
    "EmbeddedServer",
    "RemoteSession",
    "TrackerProcess",
    "device_triple",
    "open_session",
    "start_tracker",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_POLL_S = 0.1
_PROBE_S = 1.0
_PORT_ATTEMPTS = 3
_KILL_WAIT_S = 5.0
_CLOSE_WAIT_S = 3.0
_LOG_TAIL_LINES = 15
_MESSAGE_LIMIT = 300
# Global functions of a full TVM runtime that report the triple LLVM would build for on that machine.
_TRIPLE_FUNCTIONS = (
    "target.llvm_get_system_triple",
    "tvm.codegen.llvm.GetProcessTriple",
    "tvm.codegen.llvm.GetDefaultTargetTriple",
)


# --------------------------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Where the device is and how long to wait for it.

    Exactly one of three kinds (see :attr:`kind`): nothing set (``local``: a server we start), ``host`` +
    ``port`` (a running ``rpc_server``), or ``tracker`` (``"HOST:PORT"``) + ``key``.

    Attributes:
        host: Address of a running ``rpc_server``.
        port: Its port.
        tracker: ``"HOST:PORT"`` of an RPC tracker.
        key: The device key registered with the tracker.
        connect_timeout: Seconds to open a session directly (or to reach the tracker).
        request_timeout: Seconds to wait for the tracker to hand out a device for ``key``.
        call_timeout: Seconds any single remote call may take (upload, load, set_input, run, ...).
        session_timeout: Passed to TVM: the server ends a session older than this; 0 means never.
    """

    host: str | None = None
    port: int | None = None
    tracker: str | None = None
    key: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    call_timeout: float = 300.0
    session_timeout: float = 0.0

    @property
    def kind(self) -> str:
        """``"tracker"`` if a tracker is set, else ``"host"`` if a host is set, else ``"local"``."""
        if self.tracker is not None:
            return "tracker"
        if self.host is not None:
            return "host"
        return "local"

    @property
    def tracker_address(self) -> tuple[str, int]:
        """``(host, port)`` of :attr:`tracker`.

        Raises:
            UsageError: No tracker is set, or it is not ``HOST:PORT``.
        """
        if self.tracker is None:
            raise UsageError("No tracker given: pass --tracker HOST:PORT together with --key KEY.")
        return _split_host_port(self.tracker)

    def validate(self) -> None:
        """Checks that the spec names one kind of device completely and that its numbers make sense.

        Raises:
            UsageError: Host without port (or port without host), tracker not ``HOST:PORT``, tracker
                without key (or key without tracker), both host and tracker, a port outside 1-65535, a
                timeout that is not a positive finite number (``session_timeout`` may be 0).
        """
        if self.host is not None and self.tracker is not None:
            raise UsageError(
                f"Both --host {self.host} and --tracker {self.tracker} given: use --host/--port for a "
                "server you reach directly, or --tracker/--key to get one from a tracker, not both."
            )
        if self.host is not None:
            if not str(self.host).strip():
                raise UsageError("--host is empty: give the address of the rpc_server, e.g. --host 192.168.1.20.")
            if self.port is None:
                raise UsageError(
                    f"--host {self.host} needs --port: the port its rpc_server listens on (often 9090)."
                )
        elif self.port is not None:
            raise UsageError(f"--port {self.port} needs --host: the address of the rpc_server.")
        if self.port is not None:
            _check_port(self.port, "--port")
        if self.tracker is not None:
            self.tracker_address  # noqa: B018 - raises UsageError if malformed
            if not self.key:
                raise UsageError(
                    f"--tracker {self.tracker} needs --key: the device key the servers registered with "
                    f"(python -m tvm.exec.query_rpc_tracker --host HOST --port PORT lists them)."
                )
        elif self.key is not None:
            raise UsageError(f"--key {self.key} needs --tracker HOST:PORT: keys are looked up at a tracker.")
        for name in ("connect_timeout", "request_timeout", "call_timeout"):
            _check_seconds(name, getattr(self, name), allow_zero=False)
        _check_seconds("session_timeout", self.session_timeout, allow_zero=True)

    def describe(self, server: EmbeddedServer | None = None) -> str:
        """A short name of the device for messages.

        Args:
            server: For kind ``local``, the embedded server, whose address is then included.

        Returns:
            ``"embedded 127.0.0.1:PORT"`` (or ``"embedded rpc_server"`` without a server),
            ``"HOST:PORT"``, or ``"tracker HOST:PORT key=KEY"``.
        """
        if self.kind == "tracker":
            return f"tracker {self.tracker} key={self.key}"
        if self.kind == "host":
            return f"{self.host}:{self.port}"
        if server is None:
            return "embedded rpc_server"
        host, port = server.address
        return f"embedded {host}:{port}"


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = str(text).rpartition(":")
    host = host.strip().removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.strip().isdigit():
        raise UsageError(f"Tracker address {text!r} is not HOST:PORT; give e.g. --tracker 127.0.0.1:9190.")
    port = int(port_text)
    _check_port(port, f"port of tracker {text!r}")
    return host, port


def _check_port(port: Any, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{what} must be a whole number from 1 to 65535, not {port!r}.")


def _check_seconds(name: str, value: Any, *, allow_zero: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = "0 or more" if allow_zero else "more than 0"
        raise UsageError(f"{name} must be a number of seconds, {bound}, not {value!r}.")


# -------------------------------------------------------------------------------- child processes


class _ProcessGroup:
    """``python -m <module>`` of TVM's RPC tools, run in its own process group with its output in a log.

    The contract shared by :class:`EmbeddedServer` and :class:`TrackerProcess`: :meth:`start` does not
    block; :meth:`wait_ready` does, for a bounded time; :meth:`stop` ends every process of the group.
    With no port given, a free one is picked and, if another process takes it first (the child then dies
    with "cannot bind"), a new one is tried (bounded). :attr:`address` is final once :meth:`wait_ready`
    has returned.
    """

    _module: ClassVar[str]
    _name: ClassVar[str]

    def __init__(
        self,
        host: str,
        port: int | None,
        log_path: str | os.PathLike[str] | None,
        python: str | os.PathLike[str],
    ) -> None:
        self._host = host
        self._fixed_port = port
        self._port = port or 0
        self._python = os.fspath(python)
        self._own_log = log_path is None
        self._log_path: Path | None = None if log_path is None else Path(log_path)
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._started_at = 0.0

    # The subclass's part: extra command line arguments, and the check that it really serves.
    def _extra_args(self) -> list[str]:
        return []

    def _is_serving(self) -> bool:
        return _can_connect(self._host, self._port, _PROBE_S)

    def _not_ready_hint(self) -> str:
        return "The machine may be overloaded; raise the timeout, or look at the log."

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` it listens on (final after :meth:`wait_ready`)."""
        return self._host, self._port

    @property
    def log_path(self) -> Path | None:
        """The file that receives the child's output.

        Without a ``log_path`` it is a temporary file, which :meth:`stop` removes unless :meth:`wait_ready`
        failed (its message names the file).
        """
        return self._log_path

    @property
    def pgid(self) -> int | None:
        """The process group id of the running child, or None when not started."""
        return None if self._proc is None else self._proc.pid

    def alive(self) -> bool:
        """True while the main process of the child runs."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Starts the child without waiting for it; does nothing if it was started and not stopped.

        Raises:
            DeviceUnavailable: The interpreter cannot be run.
        """
        if self._proc is not None:
            return
        self._spawn(self._fixed_port or _free_port(self._host))

    def wait_ready(self, timeout: float = 60.0) -> tuple[str, int]:
        """Blocks until the child serves, for at most ``timeout`` seconds; starts it first if needed.

        Returns:
            ``(host, port)`` it serves on.

        Raises:
            DeviceUnavailable: The child died (the message holds the tail of its log), or it did not
                serve in time. The child is left running in the second case: call :meth:`stop`.
        """
        self.start()
        assert self._proc is not None
        if self._ready and self.alive():
            return self.address
        deadline = time.monotonic() + timeout
        attempts = 1
        while True:
            returncode = self._proc.poll()
            text = self._read_log()
            if returncode is not None:
                if self._fixed_port is None and "cannot bind" in text and attempts < _PORT_ATTEMPTS:
                    attempts += 1
                    logger.info("%s: port %d was taken, trying another", self._name, self._port)
                    self._end_group(grace=0.0)
                    self._spawn(_free_port(self._host))
                    continue
                self._own_log = False  # the message names the log: keep it
                raise DeviceUnavailable(
                    f"{self._name} on {self._host}:{self._port} exited with code {returncode} before it "
                    f"was ready.{self._port_hint(text)} Last lines of its log {self._log_path}:\n"
                    f"{_tail(text)}"
                )
            # The "bind to" line proves the port is ours, not another program's that took it first.
            if f"bind to {self._host}:{self._port}" in text and self._is_serving():
                self._ready = True
                logger.info(
                    "%s ready on %s:%d after %.1f s",
                    self._name,
                    self._host,
                    self._port,
                    time.monotonic() - self._started_at,
                )
                return self.address
            if time.monotonic() >= deadline:
                self._own_log = False
                raise DeviceUnavailable(
                    f"{self._name} on {self._host}:{self._port} was not ready within {_secs(timeout)} s. "
                    f"{self._not_ready_hint()} Last lines of its log {self._log_path}:\n{_tail(text)}"
                )
            time.sleep(_POLL_S)

    def stop(self, grace: float = 5.0) -> None:
        """Ends every process of the group: SIGTERM, up to ``grace`` seconds, then SIGKILL; reaps the child.

        Idempotent, never raises for processes that are already gone; a stopped (SIGSTOP) group is
        continued so that it can terminate. Removes the log if it was a temporary one.
        """
        self._end_group(grace)
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _argv(self, port: int) -> list[str]:
        return [
            self._python,
            "-m",
            self._module,
            "--host",
            self._host,
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
            *self._extra_args(),
        ]

    def _spawn(self, port: int) -> None:
        self._port = port
        self._ready = False
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"tvm-{self._name}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._started_at = time.monotonic()
        try:
            with open(self._log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    self._argv(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise DeviceUnavailable(
                f"Cannot start {self._name} with {self._python}: {exc}. Check that this Python exists and has "
                "apache-tvm installed."
            ) from exc
        logger.info(
            "%s starting on %s:%d (pgid %d, log %s)", self._name, self._host, port, self._proc.pid, self._log_path
        )

    def _end_group(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is None:
            return
        pgid = proc.pid
        _signal_group(pgid, signal.SIGTERM)
        _signal_group(pgid, signal.SIGCONT)
        if _wait_group(proc, pgid, time.monotonic() + grace):
            return
        _signal_group(pgid, signal.SIGKILL)
        if not _wait_group(proc, pgid, time.monotonic() + _KILL_WAIT_S):
            logger.warning("%s: process group %d still has processes after SIGKILL", self._name, pgid)

    def _read_log(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _port_hint(self, text: str) -> str:
        if "cannot bind" in text:
            if self._fixed_port is not None:
                return f" Port {self._port} is taken: choose another port or leave it unset."
            return f" No free port was found in {_PORT_ATTEMPTS} attempts."
        return ""


class EmbeddedServer(_ProcessGroup):
    """TVM's own ``python -m tvm.exec.rpc_server`` on 127.0.0.1 (a free port), in its own process group.

    ``import tvm`` in the server takes about 2-5 s: call :meth:`start` early, compile meanwhile, and call
    :meth:`wait_ready` (or :func:`open_session`) when the library is ready. As a context manager it starts
    and waits on entry and stops on exit.

    With ``tracker`` and ``key`` it registers with that tracker instead of taking direct connections; start
    the tracker first and wait for it (a server that cannot reach its tracker retries for 60 s, then its
    listening thread dies). It is then ready once the tracker lists it.

    Args:
        host: Address to listen on.
        port: Port to listen on; a free one if None.
        tracker: ``"HOST:PORT"`` of a tracker to register with.
        key: Device key to register under (required with ``tracker``).
        log_path: File that receives the server's output; a temporary file (removed by :meth:`stop`) if None.
        python: The interpreter to run the server with; it needs apache-tvm, cloudpickle and psutil.

    Raises:
        UsageError: ``tracker`` without ``key`` or the reverse, or ``tracker`` not ``HOST:PORT``.
    """

    _module = "tvm.exec.rpc_server"
    _name = "rpc_server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        tracker: str | None = None,
        key: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        python: str | os.PathLike[str] = sys.executable,
    ) -> None:
        if (tracker is None) != (key is None) or key == "":
            raise UsageError("EmbeddedServer needs both tracker and key, or neither.")
        self.tracker = tracker
        self.key = key
        self._tracker_address = None if tracker is None else _split_host_port(tracker)
        if not _is_loopback(host):
            logger.warning(
                "the embedded TVM RPC server listens on %s: anyone who can reach it can upload and run code "
                "on this machine; use 127.0.0.1 unless the network is trusted", host,
            )
        super().__init__(host, port, log_path, python)

    def _extra_args(self) -> list[str]:
        if self.tracker is None:
            return []
        return ["--tracker", self.tracker, "--key", str(self.key)]

    def _is_serving(self) -> bool:
        if self._tracker_address is None:
            return super()._is_serving()
        try:
            summary = _tracker_summary(*self._tracker_address, timeout=_PROBE_S * 3)
        except DeviceUnavailable:
            return False
        return any(
            info.get("key") == f"server:{self.key}" and list(info.get("addr", []))[1:] == [self._port]
            for info in summary.get("server_info", [])
        )

    def _not_ready_hint(self) -> str:
        if self.tracker is None:
            return super()._not_ready_hint()
        return (
            f"It did not register with tracker {self.tracker} under key {self.key!r}: start the tracker "
            "first (python -m tvm.exec.rpc_tracker) and check its address."
        )


class TrackerProcess(_ProcessGroup):
    """TVM's ``python -m tvm.exec.rpc_tracker`` in its own process group; same contract as :class:`EmbeddedServer`."""

    _module = "tvm.exec.rpc_tracker"
    _name = "rpc_tracker"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        python: str | os.PathLike[str] = sys.executable,
    ) -> None:
        """Prepares the tracker; :meth:`start` runs it.

        Args:
            host: Address to listen on.
            port: Port to listen on; a free one if None.
            log_path: File that receives its output; a temporary file (removed by :meth:`stop`) if None.
            python: The interpreter to run it with; it needs apache-tvm and tornado.
        """
        super().__init__(host, port, log_path, python)

    @property
    def spec_address(self) -> str:
        """``"HOST:PORT"``, as :class:`DeviceSpec` and :class:`EmbeddedServer` take it."""
        return f"{self._host}:{self._port}"


def start_tracker(
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
    *,
    python: str | os.PathLike[str] = sys.executable,
) -> TrackerProcess:
    """Starts an RPC tracker without waiting for it (about 2-5 s; call ``wait_ready()`` or use ``with``).

    Wait for it before starting servers that register with it.

    Args:
        host: Address to listen on.
        port: Port to listen on; a free one if None.
        log_path: File that receives its output; a temporary file if None.
        python: The interpreter to run it with; it needs apache-tvm and tornado.
    """
    tracker = TrackerProcess(host, port, log_path=log_path, python=python)
    tracker.start()
    return tracker


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _free_port(host: str) -> int:
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _can_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _wait_group(proc: subprocess.Popen[bytes], pgid: int, deadline: float) -> bool:
    """Reaps ``proc`` and waits until its group is empty; False if that did not happen by ``deadline``."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    while _group_has_live_process(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _group_has_live_process(pgid: int) -> bool:
    """True while a process of the group is alive; zombies do not count.

    Children orphaned by the group's leader (``popen_worker``) become zombies that only init reaps, which
    takes a second or two on some systems; waiting for that would only slow :meth:`_ProcessGroup.stop`.
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # After "pid (comm)": state, ppid, pgrp.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _tail(text: str) -> str:
    lines = text.rstrip().splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(f"    {line}" for line in lines) if lines else "    (empty)"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 or seconds == int(seconds) else f"{seconds:.1f}"


# ---------------------------------------------------------------------------------- bounded calls


class _Abandoned(Exception):
    """The bounded function did not return in time; its thread was left behind."""


def _run_bounded(fn: Callable[[], T], timeout: float, name: str) -> T:
    """Runs ``fn`` in a daemon thread and waits at most ``timeout`` seconds for it.

    A call blocked inside TVM cannot be interrupted; TVM releases the GIL while it waits on its socket,
    so this thread's wait ends on time and the blocked thread is abandoned.

    Raises:
        _Abandoned: ``fn`` had not returned in time.
        BaseException: Whatever ``fn`` raised.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed over to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _Abandoned(name)
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]


def _is_tvm_error(exc: BaseException) -> bool:
    # tvm_ffi marks every error that crossed the FFI, whatever Python class it was mapped to.
    return hasattr(exc, "__tvm_ffi_error__") or isinstance(exc, RuntimeError | OSError)


def _tvm_message(exc: BaseException) -> str:
    """The first informative line of a TVM error (RPC errors start with a generic header line)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.endswith("Error caught from RPC call:"):
            continue
        if len(line) > _MESSAGE_LIMIT:
            line = line[: _MESSAGE_LIMIT - 3] + "..."
        return line
    return type(exc).__name__


# What TVM says when the other end of the session went away mid-call.
_LOST_SIGNS = ("kShutdown", "Broken pipe", "Connection reset", "connection reset", "Connection closed", "EOF")


def _is_session_expiry(exc: BaseException) -> bool:
    return any(cls.__name__ == "RPCSessionTimeoutError" for cls in type(exc).__mro__)


# ------------------------------------------------------------------------------------- sessions


class RemoteSession:
    """An open TVM RPC session whose remote calls are bounded in time.

    Closing it also shuts down its TCP connection (when it could be identified at connect time), because
    TVM keeps a session alive while anything from it lives, and some objects leak in TVM itself: in
    apache-tvm 0.27 a tensor returned by ``VirtualMachine.get_outputs`` keeps the session open until the
    process exits, which would leave a one-session ``rpc_server`` busy for everyone else.

    Not thread-safe: use one session from one thread at a time.

    Attributes:
        description: The device as messages name it (see :meth:`DeviceSpec.describe`).
        call_timeout: Default timeout of :meth:`call`, seconds.
    """

    def __init__(
        self,
        remote: RPCSession,
        description: str,
        call_timeout: float = 300.0,
        connection: socket.socket | None = None,
    ) -> None:
        """Wraps an open session.

        Args:
            remote: The TVM session.
            description: The device, for messages.
            call_timeout: Default timeout of :meth:`call`, seconds.
            connection: A duplicate of the session's socket, shut down by :meth:`close`; owned by this object.
        """
        self._remote: RPCSession | None = remote
        self._connection = connection
        self.description = description
        self.call_timeout = call_timeout
        self._broken_by: str | None = None

    @property
    def remote(self) -> RPCSession:
        """The ``tvm.rpc.RPCSession``; call it through :meth:`call`.

        Raises:
            DeviceUnavailable: The session was closed.
        """
        if self._remote is None:
            raise DeviceUnavailable(f"The session to {self.description} is closed; open a new one.")
        return self._remote

    @property
    def broken(self) -> bool:
        """True after a call timed out; no further calls are made on a broken session."""
        return self._broken_by is not None

    def call(self, what: str, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Runs ``fn(*args, **kwargs)``, a call that talks to the device, bounded in time.

        Args:
            what: What the call does, for messages (``"upload"``, ``"load"``, ``"run"``, ...).
            fn: The callable, e.g. ``session.remote.load_module`` or ``vm.invoke_stateful``.
            timeout: Seconds to wait; the session's ``call_timeout`` if None.

        Returns:
            What ``fn`` returned.

        Raises:
            DeviceTimeout: No answer within the timeout, or TVM's ``session_timeout`` expired. The session
                is then broken: its connection is shut down, which ends the blocked call (it cannot be
                interrupted otherwise) as soon as the device notices.
            DeviceUnavailable: The session is closed or broken by an earlier timeout.
            RemoteRunError: TVM raised an error (the device answered with one, or the connection failed).
            Exception: Errors that did not come from TVM (e.g. a TypeError in ``fn``) pass unchanged.
        """
        if self._broken_by is not None:
            raise DeviceUnavailable(
                f"{what} on {self.description} was not tried: an earlier call ({self._broken_by}) timed out "
                "and the session was given up. Open a new session; restart the device's rpc_server if it "
                "does not answer."
            )
        self.remote  # noqa: B018 - raises DeviceUnavailable if closed
        seconds = self.call_timeout if timeout is None else timeout
        try:
            return _run_bounded(functools.partial(fn, *args, **kwargs), seconds, f"tvm-rpc {what}")
        except _Abandoned:
            self._give_up(what)
            raise DeviceTimeout(
                f"{what} on {self.description} did not answer within {_secs(seconds)} s. The device may be "
                "hung, overloaded or cut off: check it (restart its rpc_server if needed) and retry, or "
                "allow more time with a larger call timeout if the call is just slow."
            ) from None
        except Exception as exc:
            if _is_session_expiry(exc):
                self._give_up(what)
                raise DeviceTimeout(
                    f"{what} on {self.description}: the server ended the session because its session "
                    f"timeout expired ({_tvm_message(exc)}). Raise the session timeout, or set it to 0."
                ) from exc
            if _is_tvm_error(exc):
                message = _tvm_message(exc)
                if any(sign in message for sign in _LOST_SIGNS):
                    raise DeviceLost(
                        f"{what} on {self.description} failed: the connection was lost ({message})"
                    ) from exc
                raise RemoteRunError(f"{what} on {self.description} failed: {message}") from exc
            raise

    def device(self) -> tvm.runtime.Device:
        """The remote CPU, ``remote.cpu(0)`` (a local handle: no remote call)."""
        return self.remote.cpu(0)

    def upload(self, path: str | os.PathLike[str], target_name: str | None = None) -> str:
        """Copies a local file into the session's working directory on the device.

        Args:
            path: The local file.
            target_name: Its name on the device (a plain file name); the local base name if None.

        Returns:
            The remote file name, for ``remote.load_module``.

        Raises:
            OSError: The local file cannot be read.
            UsageError: ``target_name`` is not a plain file name.
            DeviceTimeout, DeviceUnavailable, RemoteRunError: As for :meth:`call`.
        """
        name = target_name if target_name is not None else os.path.basename(os.fspath(path))
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UsageError(f"Remote file name {name!r} must be a plain file name, without directories.")
        # Read here so that a missing local file is not reported as a device error.
        data = bytearray(Path(path).read_bytes())
        self.call("upload", self.remote.upload, data, name)
        return name

    def close(self) -> None:
        """Ends the session: drops this object's reference to it and shuts its connection down.

        Idempotent; waits at most a few seconds. Modules, VMs and tensors obtained from the session are
        unusable afterwards.
        """
        remote, self._remote = self._remote, None
        if remote is not None:
            holder = [remote]
            del remote
            # The last reference runs TVM's destructor, which says goodbye to the server: not in this thread.
            releaser = threading.Thread(target=holder.clear, name="tvm-rpc close", daemon=True)
            releaser.start()
            releaser.join(_CLOSE_WAIT_S)
        self._shut_connection()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._remote is None else ("broken" if self.broken else "open")
        return f"RemoteSession({self.description!r}, {state})"

    def _give_up(self, what: str) -> None:
        self._broken_by = what
        self._shut_connection()

    def _shut_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()


def open_session(spec: DeviceSpec, server: EmbeddedServer | None = None) -> RemoteSession:
    """Opens a session to the device ``spec`` names; every step is bounded in time.

    Args:
        spec: The device. Validated here.
        server: For kind ``local``, the embedded server to connect to (started here if it was not, then
            waited for). Ignored for the other kinds.

    Returns:
        An open session; close it (``with open_session(...) as session:``).

    Raises:
        UsageError: Invalid spec, or kind ``local`` without a server (or with one registered at a tracker).
        DeviceUnavailable: Nothing listens at host:port, no handshake within ``connect_timeout`` (server
            busy with another session, hung, or not an rpc_server), the tracker is not reachable, or it
            handed out no device for the key within ``request_timeout`` (the message lists the keys it knows).
    """
    spec.validate()
    if spec.kind == "tracker":
        return _open_via_tracker(spec)
    if spec.kind == "host":
        assert spec.host is not None and spec.port is not None
        return _open_direct(spec.host, spec.port, spec, spec.describe())
    if server is None:
        raise UsageError(
            "No device given: pass --host/--port of an rpc_server or --tracker/--key, or start an "
            "embedded server (EmbeddedServer) and pass it to open_session."
        )
    if server.tracker is not None:
        raise UsageError(
            f"The embedded server registers with tracker {server.tracker}: open the session with "
            f"DeviceSpec(tracker={server.tracker!r}, key={server.key!r})."
        )
    host, port = server.wait_ready()
    return _open_direct(host, port, spec, spec.describe(server))


def _open_direct(
    host: str, port: int, spec: DeviceSpec, description: str, matchkey: str = ""
) -> RemoteSession:
    """``rpc.connect`` bounded by ``spec.connect_timeout``; ``matchkey`` is the one a tracker handed out."""
    from tvm import rpc

    before = _open_fds()

    def connect() -> RPCSession:
        return rpc.connect(host, port, matchkey, session_timeout=spec.session_timeout)

    try:
        remote = _run_bounded(connect, spec.connect_timeout, f"tvm-rpc connect {host}:{port}")
    except _Abandoned:
        raise DeviceUnavailable(
            f"{host}:{port} accepted the connection but gave no RPC handshake within "
            f"{_secs(spec.connect_timeout)} s: its rpc_server is busy with another session, hung, or it is "
            "not a TVM rpc_server. Close other sessions or restart the server there."
        ) from None
    except Exception as exc:
        if not _is_tvm_error(exc):
            raise
        message = _tvm_message(exc)
        if "Connect to" in message and "failed" in message:
            raise DeviceUnavailable(
                f"Nothing accepts connections at {host}:{port}. Start an rpc_server there "
                f"(python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}) or fix --host/--port."
            ) from exc
        raise DeviceUnavailable(
            f"Cannot open a session to the rpc_server at {host}:{port}: {message}. If that server registers "
            "with a tracker, connect through --tracker/--key instead."
        ) from exc
    connection = _new_connection(before, host, port)
    if connection is None:
        logger.info("session to %s: its socket was not identified; close() relies on TVM alone", description)
    logger.info("session opened to %s", description)
    return RemoteSession(remote, description, spec.call_timeout, connection)


def _open_fds() -> set[int]:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = {int(name) for name in os.listdir(directory)}
        except (OSError, ValueError):
            continue
        # Drop the descriptor listdir itself used: it is closed now, and the next socket may get its number.
        return {fd for fd in listed if _is_open(fd)}
    return set()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _new_connection(before: set[int], host: str, port: int) -> socket.socket | None:
    """A duplicate of the one TCP socket opened since ``before`` that is connected to host:port.

    None if there is not exactly one (another thread connecting to the same server at the same moment):
    a socket that might not be ours is never touched.
    """
    try:
        peers = {info[4][:2] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    found: list[socket.socket] = []
    for fd in _open_fds() - before:
        try:
            duplicate = os.dup(fd)
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] in peers:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    if len(found) == 1:
        return found[0]
    for sock in found:
        sock.close()
    return None


def _open_via_tracker(spec: DeviceSpec) -> RemoteSession:
    """Asks the tracker for a device of ``spec.key``, then connects to it.

    The tracker protocol is spoken here with TVM's own helpers rather than through
    ``TrackerSession.request``, which waits forever for an unknown key, retries a refused tracker for 60 s
    and does not tell which server it handed out.
    """
    host, port = spec.tracker_address
    key = str(spec.key)
    from tvm.rpc import base

    try:
        answer = _tracker_exchange(
            host, port, [base.TrackerCode.REQUEST, key, "", 1], spec.connect_timeout, spec.request_timeout
        )
    except TimeoutError:
        raise DeviceUnavailable(
            f"Tracker {host}:{port} handed out no device for key {key!r} within "
            f"{_secs(spec.request_timeout)} s. {_known_keys(host, port, key, spec.connect_timeout)}"
        ) from None
    if not (isinstance(answer, list) and len(answer) == 2 and answer[0] == base.TrackerCode.SUCCESS):
        raise DeviceUnavailable(f"Tracker {host}:{port} answered the request for key {key!r} with {answer!r}.")
    server_host, server_port, matchkey = answer[1]
    try:
        return _open_direct(server_host, int(server_port), spec, spec.describe(), matchkey)
    except DeviceUnavailable as exc:
        raise DeviceUnavailable(
            f"Tracker {host}:{port} handed out {server_host}:{server_port} for key {key!r}, but: {exc} "
            "(a server behind NAT must register with rpc_server --custom-addr)."
        ) from exc


def _tracker_exchange(
    host: str, port: int, message: list[Any], connect_timeout: float, answer_timeout: float
) -> Any:
    """Sends one message to a TVM RPC tracker and returns its answer.

    Raises:
        DeviceUnavailable: The tracker is not reachable or does not complete the handshake within
            ``connect_timeout``, is not a tracker, or drops the connection.
        TimeoutError: It gave no answer within ``answer_timeout``.
    """
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise DeviceUnavailable(
            f"RPC tracker {host}:{port} is not reachable ({exc}); start it "
            f"(python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}) or fix --tracker."
        ) from exc
    with sock:
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        except OSError as exc:
            raise DeviceUnavailable(
                f"{host}:{port} accepted the connection but did not complete the RPC tracker handshake "
                f"({exc}); check that it is a TVM rpc_tracker, or fix --tracker."
            ) from exc
        if magic != base.RPC_TRACKER_MAGIC:
            raise DeviceUnavailable(f"{host}:{port} is not a TVM RPC tracker; fix --tracker.")
        try:
            base.sendjson(sock, message)
            sock.settimeout(answer_timeout)
            return base.recvjson(sock)
        except TimeoutError:
            raise
        except (OSError, ValueError) as exc:
            raise DeviceUnavailable(f"RPC tracker {host}:{port} dropped the connection ({exc}); check it.") from exc


def _tracker_summary(host: str, port: int, timeout: float) -> dict[str, Any]:
    """The tracker's summary: ``queue_info`` {key: {free, pending}} and ``server_info`` [{key, addr}].

    Raises:
        DeviceUnavailable: The tracker is not reachable or gave no summary within ``timeout``.
    """
    from tvm.rpc import base

    try:
        answer = _tracker_exchange(host, port, [base.TrackerCode.SUMMARY], timeout, timeout)
    except TimeoutError:
        raise DeviceUnavailable(f"RPC tracker {host}:{port} gave no summary within {_secs(timeout)} s.") from None
    if not (isinstance(answer, list) and len(answer) == 2 and answer[0] == base.TrackerCode.SUCCESS):
        raise DeviceUnavailable(f"RPC tracker {host}:{port} answered a summary request with {answer!r}.")
    return dict(answer[1])


def _known_keys(host: str, port: int, key: str, timeout: float) -> str:
    """A sentence on the keys the tracker knows, to explain why ``key`` got no device."""
    try:
        summary = _tracker_summary(host, port, min(timeout, 5.0))
    except DeviceUnavailable as exc:
        return f"Its keys could not be listed ({exc})."
    servers = collections.Counter(
        str(info.get("key", "")).removeprefix("server:") for info in summary.get("server_info", [])
    )
    free = {name: int(info.get("free", 0)) for name, info in summary.get("queue_info", {}).items()}
    known = sorted(set(servers) | {name for name, count in free.items() if count})
    listing = ", ".join(f"{name} ({servers.get(name, 0)} server(s), {free.get(name, 0)} free)" for name in known)
    register = f"python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
    if key in known:
        return (
            f"Key {key!r} has {servers.get(key, 0)} server(s), all busy; retry later or allow a longer request "
            f"timeout. Keys it knows: {listing}."
        )
    if not known:
        return f"No device is registered with it. Register one ({register}) or fix --tracker."
    return f"Keys it knows: {listing}. Fix --key, or register a device under {key!r} ({register})."


def device_triple(session: RemoteSession) -> str | None:
    """The LLVM target triple of the device, e.g. ``"x86_64-conda-linux-gnu"``, if its server can tell.

    A server running the full ``tvm`` package answers (``target.llvm_get_system_triple`` and two
    ``tvm.codegen.llvm`` fallbacks); a runtime-only server has none of these functions.

    Returns:
        The triple, or None if the server registers none of the functions.

    Raises:
        DeviceTimeout, DeviceUnavailable, RemoteRunError: As for :meth:`RemoteSession.call`.
    """

    def lookup(remote: RPCSession) -> str | None:
        for name in _TRIPLE_FUNCTIONS:
            try:
                function = remote.get_function(name)
            except AttributeError:
                continue
            triple = str(function()).strip()
            if triple:
                return triple
        return None

    return session.call("device_triple", lookup, session.remote)


class Device:
    """The device of one run: opens sessions to it and, for the embedded device, owns its server.

    For kind ``local`` the embedded server is started on entry (so its start-up overlaps compilation) and
    stopped on exit, also on failure; :meth:`recover` replaces it with a fresh one after it died or its
    listener broke (TVM leaves the port bound with a dead listener when a session is killed). For the other
    kinds :meth:`recover` does nothing: the next session simply reconnects.
    """

    def __init__(self, spec: DeviceSpec) -> None:
        spec.validate()
        self.spec = spec
        self.server: EmbeddedServer | None = None

    def __enter__(self) -> Device:
        if self.spec.kind == "local":
            self.server = EmbeddedServer()
            self.server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.stop()

    def session(self) -> RemoteSession:
        """A new session (see :func:`open_session`)."""
        return open_session(self.spec, self.server)

    def recover(self) -> None:
        """Get ready for a fresh session after the device was lost: restart the embedded server."""
        if self.server is not None:
            logger.warning("restarting the embedded rpc_server (%s)", self.spec.describe(self.server))
            self.server.stop()
            self.server = EmbeddedServer()
            self.server.start()
