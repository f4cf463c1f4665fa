"""A whole fleet run with one device of it the emulated aarch64 one (scripts/aarch64-device) beside an x86 one.
(The fleet file: tests/unit/test_fleet_spec.py; fleets of local devices: tests/integration/test_fleet.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from support import AARCH64, REPO, last_json, make_tiny_onnx, run_fleet


@pytest.fixture(scope="module")
def aarch64_device(tmp_path_factory):
    """The emulated aarch64 device (scripts/aarch64-device), under a tracker of its own; yields its tracker."""
    script = REPO / "scripts" / "aarch64_device.py"
    env = {**os.environ, "TVMRP_AARCH64_RUN_DIR": str(tmp_path_factory.mktemp("aarch64-run"))}

    def call(*args: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"aarch64-device {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc

    call("provision", timeout=600)
    try:
        info = json.loads(call("start", "--key", "aarch64-qemu", "--json", timeout=300).stdout.strip().splitlines()[-1])
        yield info["tracker"]
    finally:
        call("stop", timeout=120)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="scripts/setup --dev installs the aarch64 cross compiler")
@pytest.mark.skipif(not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")),
                    reason="qemu-user is missing (scripts/setup --dev installs qemu-user-static)")
def test_fleet__an_emulated_aarch64_device_beside_an_x86_one(prefect_api, store_root, tmp_path, aarch64_device):
    from pipeline.device import EmbeddedServer

    model = make_tiny_onnx(tmp_path / "tiny.onnx", seed=2)
    fleet_file = tmp_path / "mixed.yaml"
    fleet_file.write_text(textwrap.dedent(f"""\
        tracker: {aarch64_device}
        repeat: 3
        connect_timeout: 60
        request_timeout: 120
        call_timeout: 600
        devices:
          - {{key: aarch64-qemu, target: "{AARCH64}", name: qemu}}
          - {{key: x86-beside, target: llvm}}
        models: [{model}]
    """))
    with EmbeddedServer(tracker=aarch64_device, key="x86-beside"):
        proc = run_fleet(fleet_file, store_root, prefect_api, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    summary = last_json(proc)
    by_device = {r["device"]: r for r in summary["results"]}
    assert by_device["qemu"]["status"] == by_device["x86-beside"]["status"] == "passed"
    assert by_device["qemu"]["check"]["passed"] and '"mtriple":"aarch64-linux-gnu"' in by_device["qemu"]["target_canonical"]
    assert by_device["qemu"]["build_key"] != by_device["x86-beside"]["build_key"]
    assert summary["builds"] == {"ran": 2, "cached": 0, "failed": 0}
