"""The processes that serve a device here: TVM's ``rpc_server`` (:class:`EmbeddedServer`) and ``rpc_tracker``.

Each runs as ``python -m tvm.exec.<tool>`` in a process group of its own, with its output in a log, and is
stopped with :func:`pipeline.processes.stop_process_tree`: ``rpc_server`` leaves its ``popen_worker`` child
behind when only it is signalled. ``import tvm`` in the child takes 2-5 s: start early, wait later.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Self

import psutil

from pipeline.device.calls import secs
from pipeline.device.spec import split_host_port
from pipeline.device.tracker import tracker_summary
from pipeline.errors import DeviceUnavailable, UsageError
from pipeline.processes import stop_process_tree
from pipeline.threads import with_tvm_threads

__all__ = ["EmbeddedServer", "TrackerProcess", "can_connect", "free_port", "start_tracker"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1
_PROBE_S = 1.0
_PORT_ATTEMPTS = 3
_KILL_WAIT_S = 5.0
_LOG_TAIL_LINES = 15
#: The directory an identifying server has first on its PYTHONPATH: ``tvmrp_device.py`` + ``sitecustomize.py``.
DEVICE_SIDE = Path(__file__).resolve().parent / "device_side"
BUNDLE_ENV = "TVMRP_DEVICE_BUNDLE"  # = tvmrp_device.BUNDLE_ENV
LIBRARY_CACHE_ENV = "TVMRP_DEVICE_LIBRARY_CACHE"  # = tvmrp_device.LIBRARY_CACHE_ENV


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
        self._create_time = 0.0
        self._ready = False
        self._started_at = 0.0

    # The subclass's part: extra command line arguments, its environment, and the check that it really serves.
    def _extra_args(self) -> list[str]:
        return []

    def _environment(self) -> dict[str, str]:
        # TVM's pool on every core, unless the user sized it (pipeline/threads.py).
        return with_tvm_threads(dict(os.environ, PYTHONUNBUFFERED="1"))

    def _is_serving(self) -> bool:
        return can_connect(self._host, self._port, _PROBE_S)

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
        self._spawn(self._fixed_port or free_port(self._host))

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
                attempts = self._respawn_or_raise(returncode, text, attempts)
                continue
            # The "bind to" line proves the port is ours, not another program's that took it first.
            if f"bind to {self._host}:{self._port}" in text and self._is_serving():
                self._ready = True
                logger.info(
                    "%s ready on %s:%d after %.1f s",
                    self._name, self._host, self._port, time.monotonic() - self._started_at,
                )  # fmt: skip
                return self.address
            if time.monotonic() >= deadline:
                self._own_log = False
                raise DeviceUnavailable(
                    f"{self._name} on {self._host}:{self._port} was not ready within {secs(timeout)} s. "
                    f"{self._not_ready_hint()} Last lines of its log {self._log_path}:\n{_tail(text)}"
                )
            time.sleep(_POLL_S)

    def stop(self, grace: float = 5.0) -> None:
        """Ends every process of the group and their descendants: SIGTERM, ``grace`` s, SIGKILL; reaps the child.

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

    def _respawn_or_raise(self, returncode: int, text: str, attempts: int) -> int:
        """The child died: on a port someone took meanwhile, try another (bounded); else raise."""
        if self._fixed_port is None and "cannot bind" in text and attempts < _PORT_ATTEMPTS:
            logger.info("%s: port %d was taken, trying another", self._name, self._port)
            self._end_group(grace=0.0)
            self._spawn(free_port(self._host))
            return attempts + 1
        self._own_log = False  # the message names the log: keep it
        raise DeviceUnavailable(
            f"{self._name} on {self._host}:{self._port} exited with code {returncode} before it "
            f"was ready.{self._port_hint(text)} Last lines of its log {self._log_path}:\n{_tail(text)}"
        )

    def _argv(self, port: int) -> list[str]:
        return [
            self._python, "-m", self._module,
            "--host", self._host, "--port", str(port), "--port-end", str(port + 1),
            *self._extra_args(),
        ]  # fmt: skip

    def _spawn(self, port: int) -> None:
        self._port = port
        self._ready = False
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"tvm-{self._name}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        env = self._environment()
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
        # Our child cannot be reaped behind our back: its start time is readable even if it exited already.
        self._create_time = psutil.Process(self._proc.pid).create_time()
        logger.info(
            "%s starting on %s:%d (pgid %d, log %s)", self._name, self._host, port, self._proc.pid, self._log_path
        )

    def _end_group(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is None:
            return
        result = stop_process_tree(proc.pid, self._create_time, grace=grace, kill_wait=_KILL_WAIT_S, popen=proc)
        if result.survivors:
            logger.warning("%s: processes %s still run after SIGKILL", self._name, list(result.survivors))

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
    :meth:`wait_ready` (or :func:`~pipeline.device.open_session`) when the library is ready. As a context
    manager it starts and waits on entry and stops on exit.

    With ``tracker`` and ``key`` it registers with that tracker instead of taking direct connections; start
    the tracker first and wait for it (a server that cannot reach its tracker retries for 60 s, then its
    listening thread dies). It is then ready once the tracker lists it.

    It tells who it is like the devices of ``scripts/device-bundle``: :data:`DEVICE_SIDE` goes first on the
    server's ``PYTHONPATH``, and its ``sitecustomize`` registers ``tvmrp.device_info`` in every Python process
    of the server (the server, its ``popen_worker`` and each session), read by
    :func:`~pipeline.device.probe`. An interpreter that ignores ``PYTHONPATH`` (the emulated aarch64 device's
    wrapper) brings its own copy.

    Args:
        host: Address to listen on.
        port: Port to listen on; a free one if None.
        tracker: ``"HOST:PORT"`` of a tracker to register with.
        key: Device key to register under (required with ``tracker``).
        log_path: File that receives the server's output; a temporary file (removed by :meth:`stop`) if None.
        python: The interpreter to run the server with; it needs apache-tvm, cloudpickle and psutil.
        identify: Register ``tvmrp.device_info`` in the server (False: a stock ``rpc_server``, as someone else
            would run it).
        library_cache: A directory where the server keeps uploaded libraries between sessions and runs (created,
            mode 0700), which it reports in ``tvmrp.device_info`` (``library_cache``): clients with
            ``--device-cache auto`` then keep libraries there (the stack's device). None: it reports none.

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
        identify: bool = True,
        library_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if (tracker is None) != (key is None) or key == "":
            raise UsageError("EmbeddedServer needs both tracker and key, or neither.")
        self.tracker = tracker
        self.key = key
        self.identify = identify
        self.library_cache = None if library_cache is None else Path(library_cache).absolute()
        self._tracker_address = None if tracker is None else split_host_port(tracker)
        if not _is_loopback(host):
            logger.warning(
                "the embedded TVM RPC server listens on %s: anyone who can reach it can upload and run code "
                "on this machine; use 127.0.0.1 unless the network is trusted", host,
            )  # fmt: skip
        super().__init__(host, port, log_path, python)

    def _extra_args(self) -> list[str]:
        if self.tracker is None:
            return []
        return ["--tracker", self.tracker, "--key", str(self.key)]

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        env.pop(BUNDLE_ENV, None)  # inherited from a bundle device that started us: this server is not one
        env.pop(LIBRARY_CACHE_ENV, None)  # nor does it keep that one's libraries
        if self.library_cache is not None:
            self.library_cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            env[LIBRARY_CACHE_ENV] = str(self.library_cache)
        if not self.identify:
            return env
        if not (DEVICE_SIDE / "sitecustomize.py").is_file():
            logger.warning("%s is missing: the embedded server will not tell its TVM version", DEVICE_SIDE)
            return env
        rest = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(DEVICE_SIDE), *([rest] if rest else [])])
        env["TVMRP_DEVICE_WITHOUT_TORCH"] = "1"  # a device never needs it; tvm_ffi would import it (+2.3 s)
        return env

    def _is_serving(self) -> bool:
        if self._tracker_address is None:
            return super()._is_serving()
        try:
            summary = tracker_summary(*self._tracker_address, timeout=_PROBE_S * 3)
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
        """``"HOST:PORT"``, as :class:`~pipeline.device.DeviceSpec` and :class:`EmbeddedServer` take it."""
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


def free_port(host: str) -> int:
    """A port on ``host`` that was free a moment ago (another program may take it before we bind)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def can_connect(host: str, port: int, timeout: float) -> bool:
    """True if something accepts TCP connections at ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tail(text: str) -> str:
    lines = text.rstrip().splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(f"    {line}" for line in lines) if lines else "    (empty)"
