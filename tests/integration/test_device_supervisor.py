"""start-device.sh of a device bundle supervises its rpc_server: started again when it exits, also when its
session process died (TVM's listening thread dies with it and the server would stay up, unreachable, out of its
tracker).

The bundle here is its scripts and ``runtime/`` (tvmrp_device) around this machine's TVM (``site/`` marked
installed, ``--python`` this interpreter): what the supervisor does needs no wheels (tests/system/
test_device_bundle.py runs a real bundle).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import REPO
from support import free_port as unused_port

from pipeline.device import DeviceSpec, open_session
from pipeline.processes import live_group_members

sys.path.insert(0, str(REPO / "scripts"))
from _bundle_templates import START_SH, render  # noqa: E402
from device_bundle import copy_device_side  # noqa: E402

WAIT_S = 60.0


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    (root / "runtime").mkdir(parents=True)
    (root / "site").mkdir()
    (root / "site" / ".tvmrp-installed").touch()
    copy_device_side(root / "runtime")
    values = {"PYVER": "3", "TVM": "test", "PLATFORM": "this machine", "CUDA": "0", "CUDA_NOTE": ""}
    (root / "start-device.sh").write_text(render(START_SH, values))
    (root / "start-device.sh").chmod(0o755)
    return root


class Supervised:
    """start-device.sh in a process group of its own, its output in a log."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port, self.log = unused_port(), log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(root / "start-device.sh"), "--host", "127.0.0.1", "--port", str(self.port), "--python",
                 sys.executable], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.text().count(text) < count:
            assert self.proc.poll() is None, f"start-device.sh exited ({self.proc.returncode}):\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"never saw {text!r} x{count}:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def server(self) -> psutil.Process:
        """The rpc_server now running (the leader of its own process group)."""
        [server] = [p for p in psutil.Process(self.proc.pid).children() if "tvm.exec.rpc_server" in " ".join(p.cmdline())]
        return server

    def serves(self) -> bool:
        with open_session(DeviceSpec(host="127.0.0.1", port=self.port, connect_timeout=10, call_timeout=30)) as s:
            return s.call("probe", lambda: s.remote.cpu(0).exist)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def test_start_device__starts_the_server_again_when_it_dies(bundle, tmp_path):
    device = Supervised(bundle, tmp_path / "device.log")
    try:
        device.wait_for("bind to 127.0.0.1")
        assert device.serves()
        first = device.server()
        group = os.getpgid(first.pid)
        assert group == first.pid != os.getpgid(device.proc.pid)  # a group of its own, ended with it
        # 1. The server killed outright: its popen_worker (holding the port) goes with its group; a new one binds.
        first.kill()
        device.wait_for("starting it again in 1 s")
        device.wait_for("bind to 127.0.0.1", 2)
        assert device.serves()
        # 2. A session process killed: TVM's listening thread dies with it, and the process would stay up with
        #    its port bound. tvmrp_device ends it instead (exit 70), and the supervisor starts another.
        second = device.server()
        with open_session(DeviceSpec(host="127.0.0.1", port=device.port, connect_timeout=10)):
            session_processes = [p for p in second.children(recursive=True) if p.ppid() != second.pid]
            assert session_processes, "the session runs in a process forked by the popen_worker"
            session_processes[-1].kill()
            device.wait_for("starting it again", 2)
        assert "Exception in thread Thread-1 (_listen_loop)" in device.text().split("starting it again")[-2]
        device.wait_for("bind to 127.0.0.1", 3)
        assert device.serves()
        # 3. SIGTERM to the script: it ends the server's group and exits, nothing left.
        third = device.server()
        device.stop()
        assert device.proc.returncode == 0
        psutil.wait_procs([third], timeout=10)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in (first, second, third))
        assert not live_group_members(third.pid)  # its popen_worker and sessions too
    finally:
        if device.proc.poll() is None:
            device.stop()
