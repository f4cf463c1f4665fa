"""The local stack's directory, pid files and Prefect server, shared by ``scripts/stack`` and the command lines.

Everything lives in one directory (``$TVMRP_STACK_DIR``; in a checkout ``<repo>/.stack``, for an installed
package ``$XDG_STATE_HOME/tvmrp/stack``): ``prefect/`` is the PREFECT_HOME with the server's SQLite database
``prefect.db``, ``logs/<name>.log`` the output of each process, ``run/<name>.json`` its pid record (pid, start
time, command, and for the server its port), ``lock`` the lock that lets one process at a time start or stop
components.

``scripts/stack`` starts the whole stack (server, worker, tracker, devices). A command line without
``PREFECT_API_URL`` needs only the server: :func:`local_server` uses the running one, or starts that same
server (:func:`start_server`: in a session of its own, so a terminal's Ctrl-C does not reach it; detached
from the command line's lifeline, so it outlives the run) and leaves it running for the next runs, where
``scripts/stack status`` sees it and ``scripts/stack down`` stops it. Concurrent first runs start one server:
the lock is taken before a server is started, and whoever finds a live server (starting or answering) uses
it. A port taken by another program than our server gets the server another free port, recorded in its pid
record (the stack's other components and later runs read it there).

This module does not import Prefect (the server runs in its own process): a command line asks for its
server before its heavy imports, so that the server starts beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil

from pipeline.errors import OrchestrationError
from pipeline.processes import PidRecord, detached, is_alive, read_record, stop_process_tree, write_record

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
PROJECT_LOGGERS = ("flows", "tasks", "pipeline")
SERVER_TIMEOUT_S = 120.0
LOCK_TIMEOUT_S = 300.0  # another process's ``scripts/stack up`` holds the lock while it starts everything
GRACE_S = 10.0
KILL_WAIT_S = 5.0
POLL_S = 0.1
_OTHER_PORTS = 20  # ports tried after a taken one (4201...), before any free port


class StackError(OrchestrationError):
    """A component did not start, or the stack's lock was not free in time; the message says what to do."""


def default_home() -> Path:
    """The stack directory: ``$TVMRP_STACK_DIR``; in a checkout ``<repo>/.stack``; else this user's
    ``$XDG_STATE_HOME/tvmrp/stack`` (by default ``~/.local/state/tvmrp/stack``)."""
    env = os.environ.get("TVMRP_STACK_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO / "scripts" / "stack").is_file() and (REPO / "pyproject.toml").is_file():
        return REPO / ".stack"
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return (base / "tvmrp" / "stack").resolve()


@dataclasses.dataclass(frozen=True)
class Config:
    """Where the stack lives and on which ports (from the environment: ``scripts/stack``'s docstring).

    ``port`` is the configured port (``$TVMRP_STACK_PORT``, 4200) until :meth:`on_server_port` gives the port
    the running server listens on (another one when the configured port was taken).
    """

    home: Path
    port: int
    pool: str
    tracker_port: int
    device_key: str
    artifacts: Path

    @classmethod
    def from_env(cls) -> Config:
        from pipeline.store.artifacts import default_root

        env = os.environ
        return cls(
            home=default_home(),
            port=int(env.get("TVMRP_STACK_PORT") or DEFAULT_PORT),
            pool=env.get("TVMRP_STACK_POOL") or "process",
            tracker_port=int(env.get("TVMRP_STACK_TRACKER_PORT") or 9190),
            device_key=env.get("TVMRP_STACK_DEVICE_KEY") or "local-x86",
            artifacts=default_root(),
        )

    def on_server_port(self) -> Config:
        """This configuration on the port of the running server (its pid record's), else unchanged."""
        record = read_record(Record, self.pidfile("server"))
        if record is None or record.port is None or record.port == self.port or record.process() is None:
            return self
        return dataclasses.replace(self, port=record.port)

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def tracker(self) -> str:
        return f"{HOST}:{self.tracker_port}"

    @property
    def worker_name(self) -> str:
        return f"stack-{socket.gethostname()}"

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.home / "run" / f"{name}.json"

    def env(self) -> dict[str, str]:
        """The environment of every process of the stack, and of the flow runs the worker starts."""
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_UI_API_URL=self.api_url,  # what the browser calls; derived from the port otherwise
            # No network here: no analytics, no telemetry, no promotions.
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false",
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            TVMRP_ARTIFACTS=str(self.artifacts),
            PWD=str(REPO),  # every process runs here; prefect.yaml's {{ $PWD }} reads this variable
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # Prefect's 10 s makes every run wait longer
        # The project logs with the standard library: send those lines (progress, warnings) to the UI too.
        env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(PROJECT_LOGGERS))
        return env


# ------------------------------------------------------------------------------------------ processes


@dataclasses.dataclass(frozen=True)
class Record(PidRecord):
    """What was recorded about a component of the stack: enough to find it again and never to hit another.

    Attributes:
        argv: its command line. port: the server's port (None for other components and older records).
    """

    argv: list[str]
    port: int | None = None


def read(cfg: Config, name: str) -> Record | None:
    return read_record(Record, cfg.pidfile(name))


def record(cfg: Config, name: str, pid: int, argv: list[str], port: int | None = None) -> Record:
    """Write the pid record of component ``name``."""
    written = Record(name, pid, psutil.Process(pid).create_time(), argv, port)
    write_record(cfg.pidfile(name), written)
    return written


def running(cfg: Config, name: str) -> psutil.Process | None:
    """The live process of component ``name``, or None (a stale pid file is removed)."""
    found = read(cfg, name)
    if found is None:
        return None
    proc = found.process()
    if proc is None:
        cfg.pidfile(name).unlink(missing_ok=True)
    return proc


def spawn(cfg: Config, name: str, argv: list[str], env: dict[str, str] | None = None,
          port: int | None = None) -> subprocess.Popen[bytes]:
    """Start component ``name`` in a session of its own, its output appended to its log; record its pid."""
    log = cfg.log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env if env is not None else cfg.env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    record(cfg, name, proc.pid, argv, port)
    return proc


def stop(cfg: Config, name: str) -> bool:
    """Stop component ``name``, its process group and everything it spawned; True if something was running."""
    found = read(cfg, name)
    if found is None or found.process() is None:
        cfg.pidfile(name).unlink(missing_ok=True)
        return False
    # The worker's flow runs run in sessions of their own: the tree reaches them, a group signal would not.
    result = stop_process_tree(found.pid, found.create_time, grace=GRACE_S, kill_wait=KILL_WAIT_S)
    if result.killed:
        print(f"stack: {name}: {result.killed} process(es) still running after {GRACE_S:.0f} s were killed")
    if result.survivors:
        raise StackError(f"{name}: processes {list(result.survivors)} survived SIGKILL")
    cfg.pidfile(name).unlink(missing_ok=True)
    return True


def wait_ready(cfg: Config, name: str, what: str, ready: Callable[[], bool], alive: Callable[[], bool],
               timeout: float) -> None:
    """Wait until ``ready()``; if the process dies or the time is up, stop it and raise :class:`StackError`."""
    deadline = time.monotonic() + timeout
    log = cfg.log(name)
    while not ready():
        problem = None
        if not alive():
            problem = f"{what} exited"
        elif time.monotonic() > deadline:
            problem = f"{what} was not ready within {timeout:.0f} s"
        if problem:
            stop(cfg, name)
            raise StackError(f"{problem} (its log: {log}); the log's last lines:\n{tail(log)}")
        time.sleep(POLL_S)


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def port_open(port: int) -> bool:
    """True if something listens on ``port`` of 127.0.0.1."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _port_free(port: int) -> bool:
    """True if a server could listen on ``port`` of 127.0.0.1 now. As servers do (uvicorn among them), with
    ``SO_REUSEADDR``: the closed connections of a server stopped a moment ago (TIME_WAIT) do not take it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_from(port: int) -> int:
    """``port`` if it is free, else the first free one of the next few, else any free port."""
    for candidate in range(port, port + 1 + _OTHER_PORTS):
        if candidate <= 65535 and _port_free(candidate):
            return candidate
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def locked(cfg: Config, timeout: float | None = None) -> Iterator[None]:
    """One process at a time starts or stops components of the stack in ``cfg.home`` (``timeout``: at most
    that many seconds waited for the lock, then :class:`StackError`; None waits as long as it takes)."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    with open(cfg.home / "lock", "a") as f:
        if timeout is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise StackError(f"the local stack in {cfg.home} stayed locked for {timeout:.0f} s (a "
                                         "`scripts/stack up` or `down` running?): try again") from exc
                    time.sleep(POLL_S)
        yield


# ------------------------------------------------------------------------------------------ the server


def api(cfg: Config, method: str, path: str, body: object | None = None, timeout: float = 5.0) -> object:
    """One request to the stack's API; its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{cfg.api_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def server_healthy(cfg: Config, timeout: float = 2.0) -> bool:
    """True when the server on ``cfg.port`` answers its health endpoint."""
    try:
        return api(cfg, "GET", "/health", timeout=timeout) is True
    except (OSError, ValueError, urllib.error.URLError):
        return False


def prefect_argv(*args: str) -> list[str]:
    """The command line of Prefect's CLI with this interpreter."""
    return [sys.executable, "-m", "prefect", *args]


def write_logging_config(cfg: Config) -> None:
    """``$PREFECT_HOME/logging.yml``: Prefect's own, plus the project's loggers at INFO.

    Prefect attaches its API handler to PREFECT_LOGGING_EXTRA_LOGGERS but leaves their level to the root
    logger (WARNING), which would keep the stages' INFO lines (top-5, latency, sessions) out of the UI.
    """
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    default = Path(next(iter(spec.submodule_search_locations or []))) / "logging" / "logging.yml" if spec else None
    if default is None or not default.is_file():
        return
    text = default.read_text()
    if "\nloggers:\n" not in text:
        return  # another layout than Prefect 3.9's: keep Prefect's default
    ours = "".join(f"  {name}:\n    level: INFO\n\n" for name in PROJECT_LOGGERS)
    target = cfg.home / "prefect" / "logging.yml"
    target.write_text(text.replace("\nloggers:\n", "\nloggers:\n" + ours, 1))


def prepare(cfg: Config) -> None:
    """The stack's directories and Prefect's logging configuration in its PREFECT_HOME."""
    for sub in ("logs", "run", "prefect"):
        (cfg.home / sub).mkdir(parents=True, exist_ok=True)
    write_logging_config(cfg)


@dataclasses.dataclass(frozen=True)
class Started:
    """A server :func:`start_server` started: its configuration (on the port it got) and why not the one asked."""

    cfg: Config
    proc: subprocess.Popen[bytes]
    moved_from: int | None = None
    """The configured port, when another program listened there and the server got another."""


def start_server(cfg: Config, outlive: bool = False) -> Started:
    """Start the stack's Prefect server (the caller holds :func:`locked` and found none running); do not wait.

    The configured port, or when another program listens there a free one near it (recorded in the pid
    record, so that the stack and later runs find the server there).

    Args:
        outlive: the caller is a command line whose lifeline must leave the server running after it ends
            (:func:`pipeline.processes.detached`).
    """
    prepare(cfg)
    moved_from = None
    if not _port_free(cfg.port):
        port = free_port_from(cfg.port + 1)
        moved_from, cfg = cfg.port, dataclasses.replace(cfg, port=port)
    env = cfg.env()
    proc = spawn(cfg, "server", prefect_argv("server", "start", "--host", HOST, "--port", str(cfg.port)),
                 env=detached(env) if outlive else env, port=cfg.port)
    return Started(cfg, proc, moved_from)


def wait_server(cfg: Config, alive: Callable[[], bool], timeout: float = SERVER_TIMEOUT_S) -> None:
    """Wait until the server of ``cfg`` answers (at most ``timeout`` s); if it dies or does not answer in time,
    stop it and raise :class:`StackError` with the end of its log."""
    wait_ready(cfg, "server", "the Prefect server", lambda: server_healthy(cfg, timeout=1.0), alive, timeout)


@dataclasses.dataclass(frozen=True)
class LocalServer:
    """The local server a command line uses (:func:`local_server`).

    Attributes:
        cfg: the stack's configuration, on the server's port. pid: the server's process. started: this process
            started it. moved_from: the configured port, when another program had it and the server got another.
    """

    cfg: Config
    pid: int
    started: bool
    moved_from: int | None = None
    pending: Callable[[], None] | None = None
    """What is left to do before it answers (wait for a server that is starting); None once it answers."""

    @property
    def api_url(self) -> str:
        return self.cfg.api_url

    def ready(self) -> LocalServer:
        """Wait (bounded) until it answers; raises :class:`StackError` if it does not."""
        if self.pending is not None:
            self.pending()
        return dataclasses.replace(self, pending=None)


def local_server(cfg: Config | None = None, timeout: float = SERVER_TIMEOUT_S) -> LocalServer:
    """The stack's server for a command line: the running one (started by ``scripts/stack up`` or an earlier
    run), else one started now that outlives this process. Returns at once; :meth:`LocalServer.ready` waits.

    Concurrent callers start one server: the first takes the stack's lock and starts it; the others find its
    pid record (a live process) and wait for it to answer. A recorded server that is alive but has not
    answered for ``timeout`` seconds since it started is restarted.

    Raises:
        StackError: the stack's lock stayed taken for :data:`LOCK_TIMEOUT_S`.
    """
    cfg = (cfg or Config.from_env()).on_server_port()
    found = read(cfg, "server")  # read only: outside the lock, a stale record is not ours to remove
    proc = found.process() if found is not None else None
    if proc is not None and server_healthy(cfg, timeout=0.5):
        return LocalServer(cfg, proc.pid, started=False)
    with locked(cfg, LOCK_TIMEOUT_S):
        cfg = cfg.on_server_port()
        proc = running(cfg, "server")
        if proc is not None:
            if server_healthy(cfg, timeout=0.5):
                return LocalServer(cfg, proc.pid, started=False)
            if time.time() - proc.create_time() < timeout:  # starting (another run, or `scripts/stack up`)
                return LocalServer(cfg, proc.pid, started=False,
                                   pending=_waiter(cfg, proc, proc.create_time() + timeout))
            stop(cfg, "server")  # alive but silent for too long: a hung server
        started = start_server(cfg, outlive=True)
    return LocalServer(started.cfg, started.proc.pid, started=True, moved_from=started.moved_from,
                       pending=_waiter(started.cfg, started.proc, time.time() + timeout))


def _waiter(cfg: Config, proc: psutil.Process | subprocess.Popen[bytes], deadline: float) -> Callable[[], None]:
    def alive() -> bool:
        return proc.poll() is None if isinstance(proc, subprocess.Popen) else is_alive(proc)

    return lambda: wait_server(cfg, alive, max(1.0, deadline - time.time()))
