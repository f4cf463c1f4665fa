"""scripts/device-bundle: a device that runs TVM's runtime only, from a .tar.xz, in a clean venv.

The bundle is built for this machine (this Python, this CPU), unpacked into a temporary directory, its
setup-device.sh makes a clean venv with the base interpreter (no apache-tvm: only the bundle's wheels,
``--no-index``), its start-device.sh serves on 127.0.0.1, and a tiny model compiled here runs on it over
RPC with the same output as a local run. Building the bundle downloads wheels with pip (its cache makes
that fast). The CUDA variant (skipped without the ``cuda`` extra) checks the CUDA plumbing without a GPU:
with the stub driver the device loads a cubin library that needs no compiler, and refuses CUDA source.

The device tells who it is (``tvmrp.device_info``: machine, versions, host name, its bundle), also with
``--no-fork`` sessions (each a fresh interpreter). Real skewed devices are bundles of other apache-tvm
releases from the registry (``--tvm-version 0.26.0``: refused, ``0.27.0``: a warning); skipped when pip cannot
download them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from support import REPO

SCRIPT = REPO / "scripts" / "device-bundle"
START_TIMEOUT_S = 90.0


def _load_script():
    spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


device_bundle = _load_script()


def _base_python() -> Path:
    """This interpreter outside the repository's venv: the clean device venv is made from it."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (Path(sys.base_prefix) / "bin" / version, Path(sys.base_prefix) / "bin" / "python3"):
        if candidate.is_file():
            return candidate
    pytest.skip(f"no base interpreter {version} under {sys.base_prefix}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(out: Path, *args: str) -> dict:
    proc = subprocess.run([str(SCRIPT), "--out", str(out), "--xz-level", "1", "--json", *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _build_or_skip(out: Path, *args: str) -> dict:
    """:func:`_build`, skipping the test when pip cannot get a release from the registry (offline)."""
    proc = subprocess.run([str(SCRIPT), "--out", str(out), "--xz-level", "1", "--json", *args],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and ("no apache-tvm==" in proc.stderr or "pip download" in proc.stderr):
        pytest.skip(f"cannot build a bundle with {' '.join(args)}: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _unpack(info: dict, where: Path) -> Path:
    with tarfile.open(info["archive"]) as tar:
        tar.extractall(where)
    return where / info["name"]


@contextlib.contextmanager
def _device(root: Path, port: int, log: Path, env: dict[str, str] | None = None, server_args: tuple[str, ...] = ()):
    """start-device.sh in its own process group (``server_args`` go to rpc_server); stopped (the whole group)
    on exit."""
    extra = ["--", *server_args] if server_args else []
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(root / "start-device.sh"), "--host", "127.0.0.1", "--port", str(port), *extra],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the device exited ({proc.returncode}): {log.read_text()[-2000:]}"
            if "bind to 127.0.0.1" in log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the device did not start in {START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the popen_worker child too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _setup(root: Path) -> None:
    proc = subprocess.run([str(root / "setup-device.sh"), str(_base_python())], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------- helpers


def test_platform_helpers():
    assert device_bundle.compatible_platforms("manylinux_2_28_aarch64")[:3] == [
        "manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_26_aarch64"]
    assert "manylinux2014_x86_64" in device_bundle.compatible_platforms("manylinux_2_28_x86_64")
    assert device_bundle.bundle_name("3.12", "manylinux_2_28_x86_64", True) == "tvmrp-device-cp312-x86_64-cuda"
    with pytest.raises(device_bundle.BundleError, match="not a Linux wheel platform"):
        device_bundle.platform_arch("win_amd64")
    with pytest.raises(device_bundle.BundleError, match="3.11 or 3.12"):
        device_bundle.python_tag("3")


def test_tvm_version_option():
    assert device_bundle.check_tvm_version("0.26.0") == "0.26.0"
    assert device_bundle.check_tvm_version("0.27.0.post1") == "0.27.0.post1"
    with pytest.raises(device_bundle.BundleError, match="apache-tvm release"):
        device_bundle.check_tvm_version("0.27; rm -rf /")
    from importlib import metadata

    host = metadata.version("apache-tvm")
    assert device_bundle.bundle_name("3.11", "manylinux_2_28_x86_64", False, host) == "tvmrp-device-cp311-x86_64"
    assert device_bundle.bundle_name("3.11", "manylinux_2_28_aarch64", False, "0.26.0") == \
        "tvmrp-device-cp311-aarch64-tvm0.26.0"


def test_runtime_filter():
    keep = device_bundle._keep
    assert keep("lib/libtvm_runtime.so", cuda=False) and keep("runtime/vm.py", cuda=False)
    assert not keep("lib/libtvm_compiler.so", cuda=True)
    assert not keep("3rdparty/x.h", cuda=True) and not keep("include/tvm/x.h", cuda=True)
    assert not keep("relax/__pycache__/a.cpython-311.pyc", cuda=True)
    assert not keep("lib/libtvm_runtime_cuda.so", cuda=False) and keep("lib/libtvm_runtime_cuda.so", cuda=True)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("bundle")
    info = _build(work / "out")
    root = _unpack(info, work / "device")
    _setup(root)
    return info, root


# --------------------------------------------------------------------------------- who the device is


def _probe_device(root: Path, port: int, log: Path, server_args: tuple[str, ...] = ()):
    from pipeline.device import DeviceSpec, open_session
    from pipeline.device.probe import probe

    with _device(root, port, log, server_args=server_args):
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            return probe(session), session.description


@pytest.fixture(scope="module")
def skewed_bundles(tmp_path_factory) -> dict[str, Path]:
    """Bundles of two other apache-tvm releases from the registry, set up: 0.26.0 (another minor version)
    and 0.27.0 (this machine runs 0.27.0.post1: another patch version). Real TVM, not a doctored version."""
    from importlib import metadata

    if metadata.version("apache-tvm") != "0.27.0.post1":
        pytest.skip("the skewed releases are chosen against apache-tvm 0.27.0.post1")
    work = tmp_path_factory.mktemp("skewed")
    roots = {}
    for version in ("0.26.0", "0.27.0"):
        info = _build_or_skip(work / "out", "--tvm-version", version)
        assert info["tvm"] == version and info["name"].endswith(f"-tvm{version}")
        assert info["tvm_source"].startswith(f"apache_tvm-{version}-")
        roots[version] = _unpack(info, work / "device")
        _setup(roots[version])
    return roots
