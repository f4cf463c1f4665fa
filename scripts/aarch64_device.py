"""An emulated aarch64 TVM RPC device: Debian's arm64 Python 3.11 and the aarch64 device bundle under qemu-user.

    scripts/aarch64-device provision [--refresh]   build the sysroot from registries (idempotent, cached)
    scripts/aarch64-device start [--tracker HOST:PORT] [--key aarch64-qemu] [--json]
                                                   an rpc_server under emulation, registered with a tracker
                                                   (one is started on 127.0.0.1 when none is given)
    scripts/aarch64-device status [--json]         what runs; exit 0 when the device is registered, else 3
    scripts/aarch64-device stop                    stop the server (and the tracker that start started)
    scripts/aarch64-device python ARGS...          run the emulated aarch64 Python (e.g. -c 'import tvm')

It lets the flow be tried on a foreign architecture without a board: build with
``--target "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"``, then ``--tracker ... --key aarch64-qemu``.

Provisioning uses registries only: a private apt configuration (the host's dpkg and its architectures are
left untouched) downloads the arm64 ``.deb`` files of ``python3.11-minimal``, ``libpython3.11-stdlib`` and
``libstdc++6`` with their dependencies from Debian bookworm, ``dpkg-deb -x`` unpacks them into a sysroot;
the aarch64 device bundle (``scripts/device_bundle.py``: the runtime of the host's exact apache-tvm version
from its aarch64 wheel, the aarch64 wheels of the host's apache-tvm-ffi / numpy / cloudpickle / psutil /
typing_extensions, and ``tvmrp_device``, which makes the device tell its machine and versions) goes to the
sysroot's ``/opt/tvmrp-device``, its wheels unpacked into its ``site/``. ``bin/python3`` runs that
interpreter with ``qemu-aarch64-static -L SYSROOT`` in the environment the bundle's start-device.sh sets
(``PYTHONPATH``, ``TVMRP_DEVICE_BUNDLE``, ``TVM_USE_RUNTIME_LIB=1``). Without binfmt_misc the host cannot
execute aarch64 binaries, so a ``sitecustomize`` in the sysroot (run after the bundle's) points
``sys.executable`` at that wrapper: TVM's rpc_server starts its ``popen_worker`` with ``sys.executable``.
Runtime only, the device has no LLVM triple to tell: it reports ``machine`` ``aarch64`` and its Python's
triple (``tvmrp.device_info``), and the client refuses an x86_64 library before upload from that.

Everything lives in ``$TVMRP_AARCH64_DIR`` (default ``<repo>/.cache/aarch64``, gitignored): ``apt/``,
``debs/``, ``wheels/`` (downloads, kept), ``sysroot/``, ``bin/python3``, ``provisioned.json`` (the stamp:
what was installed and the sizes). A build goes to a temporary directory and is renamed into place, under
a lock, so concurrent or interrupted provisioning never leaves a half sysroot. Running processes are
recorded in ``$TVMRP_AARCH64_RUN_DIR`` (default ``<dir>/run``): ``<name>.json`` (pid, start time) and
``<name>.log``. Each process leads its own process group; ``stop`` signals a group only while its leader's
start time still matches the record, so a reused pid is never hit.

qemu-user comes from Debian's ``qemu-user-static`` (installed here with apt-get when run as root).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pipeline, also without the editable install

import psutil  # noqa: E402
from _aarch64_provision import Config, DeviceScriptError, locked, provision, read_stamp  # noqa: E402

from pipeline.device import EmbeddedServer, TrackerProcess, split_host_port, tracker_summary  # noqa: E402
from pipeline.errors import DeviceUnavailable, PipelineError  # noqa: E402
from pipeline.processes import PidRecord, read_record, stop_process_tree, write_record  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_KEY = "aarch64-qemu"
# Under emulation the runtime-only `import tvm` takes ~11 s, and rpc_server imports it twice (server and
# popen_worker); a loaded host makes that several times longer.
START_TIMEOUT_S = 300.0
TRACKER_TIMEOUT_S = 60.0
GRACE_S = 10.0
KILL_WAIT_S = 5.0


# -------------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Record(PidRecord):
    """A process ``start`` started: enough to find it again and never to hit another."""

    address: str
    key: str | None = None


def _read_record(cfg: Config, name: str) -> Record | None:
    return read_record(Record, cfg.pidfile(name))


def _write_record(cfg: Config, record: Record) -> None:
    write_record(cfg.pidfile(record.name), record)


def _running(cfg: Config, name: str) -> Record | None:
    record = _read_record(cfg, name)
    if record is not None and record.process() is None:
        cfg.pidfile(name).unlink(missing_ok=True)
        return None
    return record


def _registered(tracker: str, key: str) -> bool:
    try:
        summary = tracker_summary(*split_host_port(tracker), timeout=3.0)  # the tracker's own request, bounded
    except DeviceUnavailable:
        return False
    return any(info.get("key") == f"server:{key}" for info in summary.get("server_info", []))


def start(cfg: Config, tracker: str | None, key: str, timeout: float, log=print) -> dict:
    """Provision if needed, then start the emulated rpc_server registered under ``key``; idempotent.

    Returns:
        ``{"tracker": "HOST:PORT", "key": ..., "server_pid": ..., "tracker_pid": ... | None, "log": ...}``.

    Raises:
        DeviceScriptError: Provisioning failed, or the tracker or the server did not come up in time
            (what was started is stopped again).
    """
    provision(cfg, log=log)
    with locked(cfg.run_dir / "lock"):
        server = _running(cfg, "server")
        if server is not None:
            same = (tracker is None or tracker == server.address) and key == server.key
            if same and _registered(server.address, key):
                log(f"aarch64: device already running (key {key}, tracker {server.address})")
                return _info(cfg)
            raise DeviceScriptError(
                f"an emulated device is already running (key {server.key}, tracker {server.address}): "
                "scripts/aarch64-device stop first"
            )
        tracker, started_tracker = _ensure_tracker(cfg, tracker, log)
        _start_server(cfg, tracker, key, timeout, started_tracker, log)
        info = _info(cfg)
        log(f"aarch64: device registered under key {key!r} with tracker {tracker} (log {cfg.log('server')})")
        return info


def _ensure_tracker(cfg: Config, tracker: str | None, log) -> tuple[str, Record | None]:
    """The tracker to register with: the given one (checked now), ours if it runs, or a new one of ours.

    Returns:
        Its ``HOST:PORT``, and its record if it was started here.
    """
    if tracker is not None:
        tracker_summary(*split_host_port(tracker), timeout=5.0)  # DeviceUnavailable now, not in minutes
        return tracker, None
    own = _running(cfg, "tracker")
    if own is not None:
        return own.address, None
    process = TrackerProcess(HOST, log_path=cfg.log("tracker"))
    process.start()
    try:
        process.wait_ready(TRACKER_TIMEOUT_S)
    except PipelineError as exc:
        process.stop()
        raise DeviceScriptError(str(exc)) from None
    address = process.spec_address
    record = _record(cfg, "tracker", process.pgid, address)
    log(f"aarch64: TVM RPC tracker on {address}")
    return address, record


def _start_server(cfg: Config, tracker: str, key: str, timeout: float, started_tracker: Record | None,
                  log) -> None:
    """Starts the emulated rpc_server and waits until it is registered; stops what was started on failure."""
    log(f"aarch64: starting the emulated rpc_server (key {key}, tracker {tracker}); "
        f"under emulation this takes 20-60 s")
    # identify=False: the wrapper sets the bundle's PYTHONPATH, whose own tvmrp_device tells who the device is.
    device = EmbeddedServer(HOST, tracker=tracker, key=key, log_path=cfg.log("server"), python=cfg.python,
                            identify=False)
    device.start()
    _record(cfg, "server", device.pgid, tracker, key)
    try:
        device.wait_ready(timeout)
    except PipelineError as exc:
        _stop_one(cfg, "server")
        if started_tracker is not None:
            _stop_one(cfg, "tracker")
        raise DeviceScriptError(str(exc)) from None
    _record(cfg, "server", device.pgid, tracker, key)  # final now: a taken port restarts it in a new group


def _record(cfg: Config, name: str, pid: int | None, address: str, key: str | None = None) -> Record:
    assert pid is not None
    record = Record(name, pid, psutil.Process(pid).create_time(), address, key)
    _write_record(cfg, record)
    return record


def _info(cfg: Config) -> dict:
    server, tracker = _running(cfg, "server"), _running(cfg, "tracker")
    return {
        "tracker": server.address if server else (tracker.address if tracker else None),
        "key": server.key if server else None,
        "server_pid": server.pid if server else None,
        "tracker_pid": tracker.pid if tracker else None,
        "registered": bool(server and _registered(server.address, str(server.key))),
        "python": str(cfg.python),
        "log": str(cfg.log("server")),
    }


def _stop_one(cfg: Config, name: str) -> bool:
    """Ends the process group of ``name`` and everything it spawned; True if it was running."""
    record = _read_record(cfg, name)
    if record is None or record.process() is None:
        cfg.pidfile(name).unlink(missing_ok=True)
        return False
    result = stop_process_tree(record.pid, record.create_time, grace=GRACE_S, kill_wait=KILL_WAIT_S)
    if result.survivors:
        raise DeviceScriptError(f"{name}: processes {list(result.survivors)} survived SIGKILL")
    cfg.pidfile(name).unlink(missing_ok=True)
    return True


def stop(cfg: Config, log=print) -> list[str]:
    """Stops the server, then the tracker if ``start`` started it; returns the names of what was running."""
    with locked(cfg.run_dir / "lock"):
        stopped = [name for name in ("server", "tracker") if _stop_one(cfg, name)]
    log(f"aarch64: stopped {' and '.join(stopped)}" if stopped else "aarch64: nothing was running")
    return stopped


def status(cfg: Config) -> tuple[int, dict]:
    """0 when the server runs and is registered with its tracker, else 3; and the details."""
    stamp = read_stamp(cfg)
    info = _info(cfg)
    info["provisioned"] = stamp is not None
    if stamp is not None:
        info["tvm_version"], info["triple"], info["bundle"] = stamp.tvm_version, stamp.triple, stamp.bundle
    return (0 if info["registered"] else 3), info


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/aarch64-device", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_prov = sub.add_parser("provision", help="build the aarch64 sysroot from registries (idempotent)")
    p_prov.add_argument("--refresh", action="store_true", help="rebuild even if it is up to date")
    p_start = sub.add_parser("start", help="start the emulated rpc_server under a tracker (provisions first)")
    p_start.add_argument("--tracker", metavar="HOST:PORT", help="register with this tracker (default: start one)")
    p_start.add_argument("--key", default=DEFAULT_KEY, help="device key (default: %(default)s)")
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT_S,
                         help="seconds to wait for the server to register (default: %(default)s)")
    p_start.add_argument("--json", action="store_true", help="last line of stdout: the device as JSON")
    p_status = sub.add_parser("status", help="what runs; exit 0 when the device is registered, else 3")
    p_status.add_argument("--json", action="store_true", help="print the state as JSON")
    sub.add_parser("stop", help="stop the server and the tracker that start started")
    sub.add_parser("python", help="run the emulated aarch64 Python with the arguments that follow")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = Config.from_env()
    if argv[:1] == ["python"]:  # everything after it belongs to the emulated Python (argparse would eat -c)
        if read_stamp(cfg) is None:
            print("Error: not provisioned: run scripts/aarch64-device provision first", file=sys.stderr)
            return 1
        os.execv(str(cfg.python), [str(cfg.python), *argv[1:]])
    args = parser.parse_args(argv)
    try:
        return _command(cfg, args)
    except DeviceScriptError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except PipelineError as exc:  # UsageError / DeviceUnavailable from pipeline.device
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code


def _command(cfg: Config, args: argparse.Namespace) -> int:
    err = lambda *parts: print(*parts, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    if args.command == "provision":
        record, built = provision(cfg, refresh=args.refresh, log=err)
        print(record.summary() if built else f"aarch64 sysroot is up to date ({cfg.home})\n" + record.summary())
        return 0
    if args.command == "start":
        if args.tracker is not None:
            split_host_port(args.tracker)  # UsageError if malformed
        info = start(cfg, args.tracker, args.key, args.timeout, log=err)
        print(f"tracker {info['tracker']}  key {info['key']}")
        print(f"run:  .venv/bin/python -m flows.resnet_remote --target \"llvm -mtriple=aarch64-linux-gnu "
              f"-mattr=+neon\" --tracker {info['tracker']} --key {info['key']} --call-timeout 1800")
        if args.json:
            print(json.dumps(info))
        return 0
    if args.command == "status":
        code, info = status(cfg)
        print(json.dumps(info) if args.json else _status_text(cfg, info))
        return code
    if args.command == "stop":
        stop(cfg, log=print)
        return 0
    return 2


def _status_text(cfg: Config, info: dict) -> str:
    state = "registered" if info["registered"] else ("running, NOT registered" if info["server_pid"] else "stopped")
    where = f" (key {info['key']}, tracker {info['tracker']}, pid {info['server_pid']})" if info["server_pid"] else ""
    provisioned = f"yes, TVM {info['tvm_version']} runtime only ({info['bundle']})" if info["provisioned"] else "no"
    return f"aarch64 device: {state}{where}\nprovisioned: {provisioned} ({cfg.home})"


if __name__ == "__main__":
    sys.exit(main())
