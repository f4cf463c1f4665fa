"""A local Prefect stack in one command: server (SQLite), ``process`` work pool + worker, optional TVM device.

    scripts/stack up [--with-device [--devices N]]
                                       start what is not running (idempotent); prints where the UI is; with N
                                       devices (for a fleet) they register under KEY, KEY-2 ... KEY-N; devices
                                       beyond N that an earlier ``up`` started are stopped
    scripts/stack status               what runs, with pids; exit 0 when server and worker are up, else 3
    scripts/stack down                 stop the worker, then the device, the tracker, the server
    scripts/stack deploy               ``prefect --no-prompt deploy --all`` against this stack
    scripts/stack env                  ``export`` lines for a shell: ``eval "$(scripts/stack env)"``

Everything lives in one directory (``$TVMRP_STACK_DIR``, default ``<repo>/.stack``): ``prefect/`` is the
PREFECT_HOME (with the server's SQLite database ``prefect.db``), ``logs/<name>.log`` the output of each
process, ``run/<name>.json`` its pid, process group and start time, ``libraries/<name>/`` the libraries a
device keeps between runs (it reports the directory: clients' ``--device-cache auto`` use it). Every process
runs in its own process group; ``down`` ends each group and every process it spawned (the worker's flow runs
run in sessions of their own, the embedded rpc_servers those start too), first with SIGTERM, then, after a
grace period, with SIGKILL. A pid is signalled only while its start time still matches the one recorded at
``up``, so a reused pid is never hit.

Settings (environment):
    TVMRP_STACK_DIR            state directory (default <repo>/.stack)
    TVMRP_STACK_PORT           Prefect server port on 127.0.0.1 (default 4200)
    TVMRP_STACK_POOL           work pool name (default ``process``)
    TVMRP_STACK_DEVICE=1       same as ``up --with-device``
    TVMRP_STACK_TRACKER_PORT   TVM RPC tracker port on 127.0.0.1 (default 9190)
    TVMRP_STACK_DEVICE_KEY     key the embedded device registers under (default ``local-x86``)
    TVMRP_ARTIFACTS            artifact store shared with CLI runs (default <repo>/artifacts)
    PREFECT_API_DATABASE_CONNECTION_URL   another database for the server (PostgreSQL for teams)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pipeline, also without the editable install

import psutil  # noqa: E402
from _pidfile import PidRecord, read_record, write_record  # noqa: E402 - this directory is sys.path[0]

from pipeline.processes import stop_process_tree  # noqa: E402
HOST = "127.0.0.1"
PROJECT_LOGGERS = ("flows", "tasks", "pipeline")
ORDER = ("server", "tracker", "device", "worker")  # start order; ``down`` stops in reverse
SERVER_TIMEOUT_S = 120.0
WORKER_TIMEOUT_S = 90.0
DEVICE_TIMEOUT_S = 60.0
GRACE_S = 10.0
KILL_WAIT_S = 5.0
POLL_S = 0.25


class StackError(Exception):
    """A component did not start, or its port is taken; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Where the stack lives and on which ports (from the environment, see the module docstring)."""

    home: Path
    port: int
    pool: str
    tracker_port: int
    device_key: str
    artifacts: Path

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        return cls(
            home=Path(env.get("TVMRP_STACK_DIR") or REPO / ".stack").resolve(),
            port=int(env.get("TVMRP_STACK_PORT") or 4200),
            pool=env.get("TVMRP_STACK_POOL") or "process",
            tracker_port=int(env.get("TVMRP_STACK_TRACKER_PORT") or 9190),
            device_key=env.get("TVMRP_STACK_DEVICE_KEY") or "local-x86",
            artifacts=Path(env.get("TVMRP_ARTIFACTS") or REPO / "artifacts").expanduser().resolve(),
        )

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
    """What ``up`` wrote about a process it started: enough to find it again and to never hit another."""

    argv: list[str]


def _read_record(cfg: Config, name: str) -> Record | None:
    return read_record(Record, cfg.pidfile(name))


def _write_record(cfg: Config, name: str, pid: int, argv: list[str]) -> Record:
    record = Record(name, pid, psutil.Process(pid).create_time(), argv)
    write_record(cfg.pidfile(name), record)
    return record


def running(cfg: Config, name: str) -> psutil.Process | None:
    """The live process of component ``name``, or None (a stale pid file is removed)."""
    record = _read_record(cfg, name)
    if record is None:
        return None
    proc = record.process()
    if proc is None:
        cfg.pidfile(name).unlink(missing_ok=True)
    return proc


def _spawn(cfg: Config, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = cfg.log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=cfg.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _write_record(cfg, name, proc.pid, argv)
    return proc


def stop(cfg: Config, name: str) -> bool:
    """Stop component ``name``, its process group and everything it spawned; True if something was running."""
    record = _read_record(cfg, name)
    if record is None or record.process() is None:
        cfg.pidfile(name).unlink(missing_ok=True)
        return False
    # The worker's flow runs run in sessions of their own: the tree reaches them, a group signal would not.
    result = stop_process_tree(record.pid, record.create_time, grace=GRACE_S, kill_wait=KILL_WAIT_S)
    if result.killed:
        print(f"stack: {name}: {result.killed} process(es) still running after {GRACE_S:.0f} s were killed")
    if result.survivors:
        raise StackError(f"{name}: processes {list(result.survivors)} survived SIGKILL")
    cfg.pidfile(name).unlink(missing_ok=True)
    return True


def _wait(cfg: Config, name: str, what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes],
          timeout: float) -> None:
    """Wait until ``ready()``; if the process dies or the time is up, stop it and raise :class:`StackError`."""
    deadline = time.monotonic() + timeout
    log = cfg.log(name)
    while not ready():
        problem = None
        if proc.poll() is not None:
            problem = f"{what} exited with code {proc.returncode}"
        elif time.monotonic() > deadline:
            problem = f"{what} was not ready within {timeout:.0f} s"
        if problem:
            stop(cfg, name)
            raise StackError(f"{problem}; last lines of {log}:\n{_tail(log)}")
        time.sleep(POLL_S)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# ------------------------------------------------------------------------------------------ the API


def _api(cfg: Config, method: str, path: str, body: object | None = None, timeout: float = 5.0) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{cfg.api_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def server_healthy(cfg: Config) -> bool:
    try:
        return _api(cfg, "GET", "/health", timeout=2.0) is True
    except (OSError, ValueError, urllib.error.URLError):
        return False


def worker_online(cfg: Config) -> bool:
    """True when the API lists our worker in the pool with a heartbeat."""
    try:
        workers = _api(cfg, "POST", f"/work_pools/{cfg.pool}/workers/filter", {})
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return any(w.get("name") == cfg.worker_name and w.get("status") == "ONLINE" for w in workers or [])


def device_names(cfg: Config) -> list[str]:
    """The device components that have a pid file: ``device``, ``device-2``... (``up --devices N``)."""
    found = sorted(p.stem for p in (cfg.home / "run").glob("device*.json"))
    return sorted(set(found) | {"device"}, key=lambda name: (len(name), name))


def device_key(cfg: Config, name: str) -> str:
    """The tracker key of device component ``name``: ``local-x86`` for ``device``, ``local-x86-2`` for ``device-2``."""
    return cfg.device_key + name.removeprefix("device")


def _device_registered(cfg: Config, name: str = "device") -> bool:
    from pipeline.device import tracker_summary  # the tracker's own summary request, bounded
    from pipeline.errors import DeviceUnavailable

    try:
        summary = tracker_summary(HOST, cfg.tracker_port, timeout=3.0)
    except DeviceUnavailable:
        return False
    key = device_key(cfg, name)
    return any(info.get("key") == f"server:{key}" for info in summary.get("server_info", []))


# ------------------------------------------------------------------------------------------ commands


def _write_logging_config(cfg: Config) -> None:
    """``$PREFECT_HOME/logging.yml``: Prefect's own, plus the project's loggers at INFO.

    Prefect attaches its API handler to PREFECT_LOGGING_EXTRA_LOGGERS but leaves their level to the root
    logger (WARNING), which would keep the stages' INFO lines (top-5, latency, sessions) out of the UI.
    """
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    default = Path(next(iter(spec.submodule_search_locations or []))) / "logging" / "logging.yml"
    text = default.read_text()
    if "\nloggers:\n" not in text:
        return  # another layout than Prefect 3.9's: keep Prefect's default
    ours = "".join(f"  {name}:\n    level: INFO\n\n" for name in PROJECT_LOGGERS)
    target = cfg.home / "prefect" / "logging.yml"
    target.write_text(text.replace("\nloggers:\n", "\nloggers:\n" + ours, 1))


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def up(cfg: Config, with_device: bool, devices: int = 1) -> None:
    """Start whatever of the stack is not running yet, each waited for (bounded)."""
    for sub in ("logs", "run", "prefect"):
        (cfg.home / sub).mkdir(parents=True, exist_ok=True)
    cfg.artifacts.mkdir(parents=True, exist_ok=True)
    _write_logging_config(cfg)
    t0 = time.monotonic()

    if running(cfg, "server") and not server_healthy(cfg):
        print("stack: the server runs but does not answer: restarting it")
        stop(cfg, "server")
    if running(cfg, "server"):
        print(f"stack: server already running ({cfg.ui_url})")
    else:
        if _port_open(cfg.port):
            raise StackError(f"port {cfg.port} on {HOST} is taken by another program: set TVMRP_STACK_PORT")
        proc = _spawn(cfg, "server", _prefect("server", "start", "--host", HOST, "--port", str(cfg.port)))
        _wait(cfg, "server", "Prefect server", lambda: server_healthy(cfg), proc, SERVER_TIMEOUT_S)
        print(f"stack: server up at {cfg.ui_url} after {time.monotonic() - t0:.1f} s")

    if with_device:
        _up_tracker(cfg)
        wanted = ["device" if i == 1 else f"device-{i}" for i in range(1, devices + 1)]
        for name in wanted:
            _up_device(cfg, name)
        for name in set(device_names(cfg)) - set(wanted):  # up --devices N leaves exactly N
            if stop(cfg, name):
                print(f"stack: stopped {name} (key {device_key(cfg, name)!r}): --devices {devices}")

    if running(cfg, "worker"):
        print(f"stack: worker already running (pool {cfg.pool})")
    else:
        t1 = time.monotonic()
        proc = _spawn(cfg, "worker", _prefect(
            "worker", "start", "--pool", cfg.pool, "--type", "process", "--name", cfg.worker_name,
            "--install-policy", "never",
        ))
        _wait(cfg, "worker", f"worker of pool {cfg.pool}", lambda: worker_online(cfg), proc, WORKER_TIMEOUT_S)
        print(f"stack: worker {cfg.worker_name} polling pool {cfg.pool!r} after {time.monotonic() - t1:.1f} s")

    _write_env_file(cfg)
    print(f"stack: up in {time.monotonic() - t0:.1f} s. UI: {cfg.ui_url}   shell: eval \"$(scripts/stack env)\"")


def _up_tracker(cfg: Config) -> None:
    from pipeline.device import TrackerProcess

    if running(cfg, "tracker"):
        print(f"stack: tracker already running ({cfg.tracker})")
    else:
        if _port_open(cfg.tracker_port):
            raise StackError(f"port {cfg.tracker_port} on {HOST} is taken: set TVMRP_STACK_TRACKER_PORT")
        tracker = TrackerProcess(HOST, cfg.tracker_port, log_path=cfg.log("tracker"))
        tracker.start()
        _write_record(cfg, "tracker", tracker.pgid, ["tvm.exec.rpc_tracker", cfg.tracker])
        _ready_or_stop(cfg, "tracker", tracker.wait_ready)
        print(f"stack: TVM RPC tracker on {cfg.tracker}")


def _up_device(cfg: Config, name: str) -> None:
    from pipeline.device import EmbeddedServer

    key = device_key(cfg, name)
    if running(cfg, name) and _device_registered(cfg, name):
        print(f"stack: device already registered under key {key!r}")
        return
    stop(cfg, name)  # one that lost its tracker never registers again
    device = EmbeddedServer(HOST, tracker=cfg.tracker, key=key, log_path=cfg.log(name),
                            library_cache=cfg.home / "libraries" / name)
    device.start()
    _write_record(cfg, name, device.pgid, ["tvm.exec.rpc_server", "--key", key])
    _ready_or_stop(cfg, name, device.wait_ready)
    print(f"stack: embedded device registered with the tracker under key {key!r}")


def _ready_or_stop(cfg: Config, name: str, wait_ready: Callable[[float], object]) -> None:
    from pipeline.errors import DeviceUnavailable

    try:
        wait_ready(DEVICE_TIMEOUT_S)
    except DeviceUnavailable as exc:
        stop(cfg, name)
        raise StackError(str(exc)) from None


def _components(cfg: Config) -> list[str]:
    """Every component, in start order, the devices of ``--devices N`` where the single device stands."""
    return [n for name in ORDER for n in (device_names(cfg) if name == "device" else [name])]


def down(cfg: Config) -> None:
    """Stop the worker first (no new flow runs), then the devices, the tracker and the server."""
    stopped = [name for name in reversed(_components(cfg)) if stop(cfg, name)]
    print(f"stack: stopped {', '.join(stopped)}" if stopped else "stack: nothing was running")


def status(cfg: Config) -> int:
    lines, up_ = [], {}
    for name in _components(cfg):
        proc = running(cfg, name)
        up_[name] = proc is not None
        detail = ""
        if name == "server" and proc:
            detail = f"{cfg.ui_url} " + ("healthy" if server_healthy(cfg) else "NOT ANSWERING")
            up_[name] = "healthy" in detail
        elif name == "worker" and proc:
            detail = f"pool {cfg.pool} " + ("online" if worker_online(cfg) else "not online")
        elif name == "tracker" and proc:
            detail = cfg.tracker
        elif name.startswith("device") and proc:
            registered = _device_registered(cfg, name)
            detail = f"key {device_key(cfg, name)} " + ("registered" if registered else "NOT REGISTERED")
        state = f"running  pid {proc.pid:<7}" if proc else "stopped"
        lines.append(f"{name:<8} {state:<20} {detail}".rstrip())
    print(f"stack in {cfg.home}")
    print("\n".join(lines))
    return 0 if up_["server"] and up_["worker"] else 3


def deploy(cfg: Config) -> int:
    if not server_healthy(cfg):
        print("Error: the stack is not up: run scripts/stack up", file=sys.stderr)
        return 3
    return subprocess.run(_prefect("--no-prompt", "deploy", "--all"), cwd=REPO, env=cfg.env()).returncode


def _exports(cfg: Config) -> str:
    """What a shell needs to use the stack: its API, the store, the project's log lines in the UI, and the
    venv's ``prefect`` and ``python`` on PATH (the deploy hint says ``prefect deployment run ...``)."""
    names = ("PREFECT_API_URL", "TVMRP_ARTIFACTS", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
             "PREFECT_LOGGING_EXTRA_LOGGERS")
    env = cfg.env()
    lines = [f"export {name}={shlex.quote(env[name])}\n" for name in names]
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"\n')
    return "".join(lines)


def _write_env_file(cfg: Config) -> None:
    (cfg.home / "env").write_text(_exports(cfg))


@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    """One ``up``/``down`` at a time per stack directory."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    with open(cfg.home / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the server, the work pool's worker (and the device); idempotent")
    p_up.add_argument("--with-device", action="store_true",
                      help="also a TVM RPC tracker and an embedded device under $TVMRP_STACK_DEVICE_KEY")
    p_up.add_argument("--devices", type=int, default=1, metavar="N",
                      help="with --with-device: N embedded devices, under KEY, KEY-2 ... KEY-N (default: 1)")
    sub.add_parser("down", help="stop everything the stack started")
    sub.add_parser("status", help="what runs; exit 0 when server and worker are up")
    sub.add_parser("deploy", help="prefect --no-prompt deploy --all against the stack")
    sub.add_parser("env", help="print export lines for PREFECT_API_URL etc.")
    args = parser.parse_args(argv)
    cfg = Config.from_env()
    try:
        if args.command == "up":
            with _locked(cfg):
                if not 1 <= args.devices <= 8:
                    raise StackError(f"--devices must be 1-8 (got {args.devices})")
                up(cfg, args.with_device or os.environ.get("TVMRP_STACK_DEVICE", "") in ("1", "true", "yes"),
                   args.devices)
        elif args.command == "down":
            with _locked(cfg):
                down(cfg)
        elif args.command == "status":
            return status(cfg)
        elif args.command == "deploy":
            return deploy(cfg)
        elif args.command == "env":
            print(_exports(cfg), end="")
    except StackError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
