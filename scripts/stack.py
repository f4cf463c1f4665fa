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
process, ``run/<name>.json`` its pid, process group, start time (and the server's port), ``libraries/<name>/``
the libraries a device keeps between runs (it reports the directory: clients' ``--device-cache auto`` use it).
The server, its directory, pid file and lock are :mod:`pipeline.local_stack`'s, shared with the command lines:
a command line run without ``PREFECT_API_URL`` starts the same server when none runs, and ``status`` and
``down`` see it. When the configured port is taken by another program, the server gets a free port near it
(``up`` says which; the pid file records it). Every process runs in its own process group; ``down`` ends each
group and every process it spawned (the worker's flow runs run in sessions of their own, the embedded
rpc_servers those start too), first with SIGTERM, then, after a grace period, with SIGKILL. A pid is signalled
only while its start time still matches the one recorded at ``up``, so a reused pid is never hit.

Settings (environment):
    TVMRP_STACK_DIR            state directory (default <repo>/.stack)
    TVMRP_STACK_PORT           Prefect server port on 127.0.0.1 (default 4200; taken: the next free one)
    TVMRP_STACK_POOL           work pool name (default ``process``)
    TVMRP_STACK_DEVICE=1       same as ``up --with-device``
    TVMRP_STACK_TRACKER_PORT   TVM RPC tracker port on 127.0.0.1 (default 9190)
    TVMRP_STACK_DEVICE_KEY     key the embedded device registers under (default ``local-x86``)
    TVMRP_ARTIFACTS            artifact store shared with CLI runs (default <repo>/artifacts)
    PREFECT_API_DATABASE_CONNECTION_URL   another database for the server (PostgreSQL for teams)
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pipeline, also without the editable install

from pipeline.local_stack import (  # noqa: E402 - the server, pid files and lock, shared with the command lines
    HOST,
    SERVER_TIMEOUT_S,
    Config,
    StackError,
    api,
    locked,
    port_open,
    prefect_argv,
    prepare,
    record,
    running,
    server_healthy,
    spawn,
    start_server,
    stop,
    wait_ready,
    wait_server,
)

ORDER = ("server", "tracker", "device", "worker")  # start order; ``down`` stops in reverse
WORKER_TIMEOUT_S = 90.0
DEVICE_TIMEOUT_S = 60.0


def worker_online(cfg: Config) -> bool:
    """True when the API lists our worker in the pool with a heartbeat."""
    try:
        workers = api(cfg, "POST", f"/work_pools/{cfg.pool}/workers/filter", {})
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


def up(cfg: Config, with_device: bool, devices: int = 1) -> None:
    """Start whatever of the stack is not running yet, each waited for (bounded)."""
    prepare(cfg)
    cfg.artifacts.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    server = running(cfg, "server")
    if server and not server_healthy(cfg):
        try:  # a command line may have started it a moment ago: give it its start-up time
            wait_server(cfg, lambda: running(cfg, "server") is not None,
                        max(1.0, server.create_time() + SERVER_TIMEOUT_S - time.time()))
        except StackError:  # stopped by the wait
            print("stack: the server ran but did not answer: restarting it")
    if running(cfg, "server"):
        print(f"stack: server already running ({cfg.ui_url})")
    else:
        started = start_server(cfg)
        cfg = started.cfg
        if started.moved_from is not None:
            print(f"stack: port {started.moved_from} on {HOST} is taken by another program: the server listens on "
                  f"{cfg.port} (set TVMRP_STACK_PORT to choose)")
        wait_server(cfg, lambda: started.proc.poll() is None)
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
        proc = spawn(cfg, "worker", prefect_argv(
            "worker", "start", "--pool", cfg.pool, "--type", "process", "--name", cfg.worker_name,
            "--install-policy", "never",
        ))
        wait_ready(cfg, "worker", f"the worker of pool {cfg.pool}", lambda: worker_online(cfg),
                   lambda: proc.poll() is None, WORKER_TIMEOUT_S)
        print(f"stack: worker {cfg.worker_name} polling pool {cfg.pool!r} after {time.monotonic() - t1:.1f} s")

    _write_env_file(cfg)
    print(f"stack: up in {time.monotonic() - t0:.1f} s. UI: {cfg.ui_url}   shell: eval \"$(scripts/stack env)\"")


def _up_tracker(cfg: Config) -> None:
    from pipeline.device import TrackerProcess

    if running(cfg, "tracker"):
        print(f"stack: tracker already running ({cfg.tracker})")
    else:
        if port_open(cfg.tracker_port):
            raise StackError(f"port {cfg.tracker_port} on {HOST} is taken: set TVMRP_STACK_TRACKER_PORT")
        tracker = TrackerProcess(HOST, cfg.tracker_port, log_path=cfg.log("tracker"))
        tracker.start()
        record(cfg, "tracker", tracker.pgid, ["tvm.exec.rpc_tracker", cfg.tracker])
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
    record(cfg, name, device.pgid, ["tvm.exec.rpc_server", "--key", key])
    _ready_or_stop(cfg, name, device.wait_ready)
    print(f"stack: embedded device registered with the tracker under key {key!r}")


def _ready_or_stop(cfg: Config, name: str, ready: Callable[[float], object]) -> None:
    from pipeline.errors import DeviceUnavailable

    try:
        ready(DEVICE_TIMEOUT_S)
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
    return subprocess.run(prefect_argv("--no-prompt", "deploy", "--all"), cwd=REPO, env=cfg.env()).returncode


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
            with locked(cfg):
                cfg = cfg.on_server_port()
                if not 1 <= args.devices <= 8:
                    raise StackError(f"--devices must be 1-8 (got {args.devices})")
                up(cfg, args.with_device or os.environ.get("TVMRP_STACK_DEVICE", "") in ("1", "true", "yes"),
                   args.devices)
        elif args.command == "down":
            with locked(cfg):
                down(cfg.on_server_port())
        elif args.command == "status":
            return status(cfg.on_server_port())
        elif args.command == "deploy":
            return deploy(cfg.on_server_port())
        elif args.command == "env":
            print(_exports(cfg.on_server_port()), end="")
    except StackError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
