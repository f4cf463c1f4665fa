"""Devices started from a device bundle keep the libraries they were sent, between sessions and runs, and say
where (``tvmrp.device_info``'s ``library_cache``): with ``--device-cache auto`` a fleet's second run, every build
cached, uploads nothing. (The cache's protocol and its attacks: test_device_cache.py.)

The bundle here is its scripts and ``runtime/`` (tvmrp_device) around this machine's TVM, as in
test_device_supervisor.py: start-device.sh is the bundle's own; tests/system/test_device_bundle.py runs a real
bundle in a clean venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from support import REPO, free_port, last_json, make_tiny_onnx, run_fleet

from pipeline.device import DeviceSpec, open_session
from pipeline.device.probe import probe

sys.path.insert(0, str(REPO / "scripts"))
from _bundle_templates import START_SH, render
from device_bundle import copy_device_side


def _bundle(root: Path) -> Path:
    (root / "runtime").mkdir(parents=True)
    (root / "site").mkdir()
    (root / "site" / ".tvmrp-installed").touch()
    copy_device_side(root / "runtime")
    values = {"PYVER": "3", "TVM": "test", "PLATFORM": "this machine", "CUDA": "0", "CUDA_NOTE": ""}
    (root / "start-device.sh").write_text(render(START_SH, values))
    (root / "start-device.sh").chmod(0o755)
    return root


@contextlib.contextmanager
def bundle_device(root: Path, *args: str):
    """start-device.sh of a bundle at ``root`` on a free port of 127.0.0.1; yields the port once it serves."""
    port = free_port()
    log = root.parent / f"{root.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(root / "start-device.sh"), "--host", "127.0.0.1", "--port", str(port),
                                 "--python", sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with open_session(DeviceSpec(host="127.0.0.1", port=port, connect_timeout=2, call_timeout=30)):
                    break
            except Exception:  # noqa: BLE001 - not serving yet
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_bundle_device__reports_its_private_library_directory_and_none_without_one(tmp_path):
    root = _bundle(tmp_path / "bundle")
    with bundle_device(root) as port, open_session(DeviceSpec(host="127.0.0.1", port=port)) as session:
        info = probe(session)
    assert info.library_cache == str((root / "libraries").resolve())
    assert (root / "libraries").stat().st_mode & 0o777 == 0o700
    with bundle_device(root, "--no-libraries") as port, open_session(DeviceSpec(host="127.0.0.1", port=port)) as s:
        assert probe(s).library_cache is None


def test_embedded_server__with_a_library_cache_reports_it_as_the_stacks_device_does(tmp_path):
    from pipeline.device import EmbeddedServer

    with EmbeddedServer(library_cache=tmp_path / "libraries") as server:
        host, port = server.address
        with open_session(DeviceSpec(host=host, port=port)) as session:
            assert probe(session).library_cache == str(tmp_path / "libraries")
    assert (tmp_path / "libraries").stat().st_mode & 0o777 == 0o700


def test_fleet__a_second_run_on_two_bundle_devices_uploads_nothing(prefect_api, store_root, tmp_path):
    model = make_tiny_onnx(tmp_path / "kept.onnx", seed=4)
    with bundle_device(_bundle(tmp_path / "device-a")) as port_a, \
            bundle_device(_bundle(tmp_path / "device-b")) as port_b:
        fleet_file = tmp_path / "two.yaml"
        fleet_file.write_text(textwrap.dedent(f"""\
            repeat: 2
            devices:
              - {{host: 127.0.0.1, port: {port_a}, name: device-a}}
              - {{host: 127.0.0.1, port: {port_b}, name: device-b}}
            models: [{model}]
        """))
        runs = []
        for _ in range(2):
            proc = run_fleet(fleet_file, store_root, prefect_api)
            assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            runs.append(last_json(proc))
    first, second = runs
    assert second["builds"] == {"ran": 0, "cached": 1, "failed": 0}
    uploads = {}
    for run in runs:
        records = [json.loads(p.read_text()) for p in (store_root / ".runs").glob("*.json")]
        uploads[run["fleet_run"]] = sorted((r["device"], r["upload"]["reused"], r["upload"]["bytes"])
                                           for r in records if r["fleet_run"] == run["fleet_run"])
    assert [reused for _, reused, _ in uploads[first["fleet_run"]]] == [False, False]
    assert [reused for _, reused, _ in uploads[second["fleet_run"]]] == [True, True]
    for name in ("device-a", "device-b"):  # each kept it in its own bundle's directory
        assert any(p.name.startswith("tvmrp-slot-") for p in (tmp_path / name / "libraries").iterdir())
