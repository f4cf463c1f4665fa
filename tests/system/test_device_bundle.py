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
import json
import os
import platform
import signal
import socket
import sysconfig
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from support import REPO, make_tiny_onnx
from support import free_port as _free_port

SCRIPT = REPO / "scripts" / "device-bundle"
START_TIMEOUT_S = 90.0


def _base_python() -> Path:
    """This interpreter outside the repository's venv: the clean device venv is made from it."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (Path(sys.base_prefix) / "bin" / version, Path(sys.base_prefix) / "bin" / "python3"):
        if candidate.is_file():
            return candidate
    pytest.skip(f"no base interpreter {version} under {sys.base_prefix}")


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


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("bundle")
    info = _build(work / "out")
    root = _unpack(info, work / "device")
    _setup(root)
    return info, root


def test_bundle_content(cpu_bundle):
    info, root = cpu_bundle
    names = {name.split("==")[0].replace("_", "-").lower() for name in info["requirements"]}
    assert names == {"apache-tvm-ffi", "cloudpickle", "psutil", "typing-extensions", "numpy"}
    assert not info["cuda"] and info["archive_bytes"] < 40e6
    lib = root / "runtime" / "tvm" / "lib"
    assert (lib / "libtvm_runtime.so").is_file()
    assert not (lib / "libtvm_compiler.so").exists() and not (lib / "libtvm_runtime_cuda.so").exists()
    for gone in ("3rdparty", "include", "src", "web"):
        assert not (root / "runtime" / "tvm" / gone).exists()
    assert "--load-library" not in (root / "start-device.sh").read_text().split("if [ \"$cuda\" = 1 ]")[0]
    # The device tells who it is: its module, the sitecustomize that activates it, and where bundle.json is.
    for name in ("tvmrp_device.py", "sitecustomize.py"):
        source = REPO / "pipeline" / "device" / "device_side" / name
        assert (root / "runtime" / name).read_bytes() == source.read_bytes()
    assert 'export TVMRP_DEVICE_BUNDLE="$here"' in (root / "start-device.sh").read_text()
    from importlib import metadata

    assert json.loads((root / "bundle.json").read_text())["tvm"] == metadata.version("apache-tvm")
    print(f"CPU bundle: {info['archive_bytes'] / 1e6:.1f} MB (xz -1), runtime {info['runtime_bytes'] / 1e6:.1f} MB, "
          f"unpacked {info['unpacked_bytes'] / 1e6:.1f} MB, built in {info['seconds']} s")


def test_clean_venv_has_no_tvm(cpu_bundle):
    _, root = cpu_bundle
    python = root / "venv" / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "apache-tvm" not in installed and "apache-tvm-ffi" in installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([str(python), "-c", "import tvm"], capture_output=True, env=env, timeout=60).returncode != 0


def _tiny_library(tmp_path: Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny model compiled here for llvm: its library, an input, and the output of a local run."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx"))), keep_params_in_input=False)
    library = tmp_path / "tiny.so"
    tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})).export_library(str(library))
    data = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype("float32")
    expected = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())["main"](
        tvm.runtime.tensor(data)).numpy()
    return library, data, expected


def _run_remote(session, library: Path, data: np.ndarray) -> np.ndarray:
    """Upload, load, set the input, run and fetch the output with bare session calls (as the stages do)."""
    import tvm

    name = session.upload(library)
    remote_library = session.call("load", session.remote.load_module, name)
    device = session.device()
    vm = session.call("vm", tvm.runtime.vm.VirtualMachine, remote_library, device)
    session.call("set_input", vm.set_input, "main", tvm.runtime.tensor(data, device))
    session.call("run", vm.invoke_stateful, "main")
    return session.call("get_outputs", lambda: vm.get_outputs("main").numpy())


def test_device_from_bundle_runs_a_model(cpu_bundle, tmp_path):
    """A tiny model compiled here runs on the bundle's device over RPC, with the output of a local run."""
    from pipeline.device import DeviceSpec, open_session

    _, root = cpu_bundle
    library, data, expected = _tiny_library(tmp_path, seed=3)
    port = _free_port()
    with _device(root, port, tmp_path / "device.log"):
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            got = _run_remote(session, library, data)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    log = (tmp_path / "device.log").read_text()
    assert "load_module" in log


def test_cuda_bundle_loads_a_cubin_without_a_compiler(tmp_path_factory, tmp_path):
    """The CUDA bundle's device (runtime only: no NVRTC, no TVM compiler) loads a cubin library.

    There is no GPU here: the device sees the build stub as its driver (LD_LIBRARY_PATH), enough for
    ``--load-library libtvm_runtime_cuda.so`` to register the CUDA loader. A library with CUDA source
    instead would need NVRTC on the device and fails; running needs a real GPU.
    """
    from pipeline.cuda import builder as cuda

    try:
        toolchain = cuda.cuda_toolchain(tmp_path_factory.mktemp("cuda-cache"))
    except cuda.CudaToolchainMissing as exc:
        pytest.skip(f"the optional CUDA packages are not installed ({exc})")
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.device import DeviceSpec, open_session
    from pipeline.errors import RemoteRunError

    mod = from_onnx(onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx"))), keep_params_in_input=False)
    (tmp_path / "module.json").write_text(tvm.ir.save_json(mod))
    out = tmp_path / "build"
    out.mkdir()
    build = cuda.compile_cuda(tmp_path / "module.json", cuda.parse_cuda_target("h100").canonical, 3, out,
                              link="g++", toolchain=toolchain)
    assert build.gpu_code == "cubin"

    work = tmp_path_factory.mktemp("cuda-bundle")
    info = _build(work / "out", "--cuda")
    root = _unpack(info, work / "device")
    assert (root / "runtime" / "tvm" / "lib" / "libtvm_runtime_cuda.so").is_file()
    _setup(root)
    port = _free_port()
    with _device(root, port, tmp_path / "device.log", env={"LD_LIBRARY_PATH": str(toolchain.stub.parent)}):
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            name = session.upload(out / "model.so")
            session.call("load", session.remote.load_module, name)
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            source = tmp_path / "source.so"
            from tvm.base import _LOADED_LIBS

            if "tvm_runtime_cuda" not in _LOADED_LIBS:  # this process keeps CUDA source (no driver)
                target = cuda.parse_cuda_target("h100").tvm_target()
                with target, tvm.transform.PassContext(opt_level=3):
                    tvm.compile(mod, target=target).export_library(str(source))
                name = session.upload(source)
                with pytest.raises(RemoteRunError, match="NVRTC|cuda-bindings|compile"):
                    session.call("load", session.remote.load_module, name)
    log = (tmp_path / "device.log").read_text()
    assert "libtvm_runtime_cuda.so" in log


# --------------------------------------------------------------------------------- who the device is


def _probe_device(root: Path, port: int, log: Path, server_args: tuple[str, ...] = ()):
    from pipeline.device import DeviceSpec, open_session
    from pipeline.device.probe import probe

    with _device(root, port, log, server_args=server_args):
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            return probe(session), session.description


def test_device_from_bundle_tells_who_it_is(cpu_bundle, tmp_path):
    """Runtime only, the device has no compiler triple; it tells machine, versions, host name and bundle
    through ``tvmrp.device_info``, in ``--no-fork`` sessions too (each a freshly spawned interpreter)."""
    from importlib import metadata

    from pipeline.device.probe import check_versions, device_arch
    from pipeline.targets import host_arch

    info, root = cpu_bundle
    for server_args in ((), ("--no-fork",)):
        device, _ = _probe_device(root, _free_port(), tmp_path / f"device{len(server_args)}.log", server_args)
        print(f"bundle device {server_args}: {device}")
        assert device.machine == platform.machine() and device.hostname == socket.gethostname()
        assert device.tvm_version == metadata.version("apache-tvm") == info["tvm"]
        assert device.tvm_ffi_version == metadata.version("apache-tvm-ffi")
        assert device.python_version == platform.python_version() and device.bundle == info["name"]
        assert device.llvm_version is None  # no compiler: the triple is the one its Python was built for
        assert device.triple == sysconfig.get_config_var("HOST_GNU_TYPE")
        assert device_arch(device) == host_arch()
        assert check_versions(device) is None


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


def test_skewed_device__another_minor_version_is_refused(skewed_bundles, tmp_path):
    """A real TVM 0.26.0 rpc_server: refused at session start, naming both versions and the way out; with
    ``allow_skew`` a warning, and a library built here by 0.27 then really runs on it."""
    from pipeline.device import DeviceSpec, open_session
    from pipeline.device.probe import check_versions, probe
    from pipeline.errors import VersionSkew

    library, data, expected = _tiny_library(tmp_path, seed=5)
    port = _free_port()
    with _device(skewed_bundles["0.26.0"], port, tmp_path / "device.log"):
        with open_session(DeviceSpec(host="127.0.0.1", port=port, call_timeout=120)) as session:
            info = probe(session)
            assert info.tvm_version == "0.26.0" and info.bundle.endswith("-tvm0.26.0")
            with pytest.raises(VersionSkew) as refused:
                check_versions(info, device=session.description)
            message = str(refused.value)
            assert "0.26.0" in message and "0.27.0.post1" in message and "--allow-version-skew" in message
            assert f"127.0.0.1:{port}" in message
            warning = check_versions(info, allow_skew=True, device=session.description)
            assert warning is not None and "0.26.0" in warning
            print(f"refused: {message}\nallowed: {warning}")
            got = _run_remote(session, library, data)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_skewed_device__another_patch_version_warns(skewed_bundles, tmp_path):
    """A real TVM 0.27.0 rpc_server against this machine's 0.27.0.post1: a warning, not a refusal."""
    from pipeline.device.probe import check_versions

    info, description = _probe_device(skewed_bundles["0.27.0"], _free_port(), tmp_path / "device.log")
    assert info.tvm_version == "0.27.0"
    warning = check_versions(info, device=description)
    print(f"warning: {warning}")
    assert warning is not None and "TVM 0.27.0," in warning and "0.27.0.post1" in warning and "patch" in warning


def test_skewed_device__the_command_line_refuses_it_unless_allowed(skewed_bundles, tmp_path, prefect_api):
    """The whole run against a real TVM 0.26.0 device: exit 1 with one Error: line naming both versions and the
    option, nothing uploaded; with --allow-version-skew a warning, and the run passes its check."""
    from support import run_cli

    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    port = _free_port()
    args = ("--model", str(model), "--artifacts", str(tmp_path / "store"), "--host", "127.0.0.1", "--port",
            str(port), "--repeat", "2")
    with _device(skewed_bundles["0.26.0"], port, tmp_path / "device.log"):
        refused = run_cli(*args, env={"PREFECT_API_URL": prefect_api})
        allowed = run_cli(*args, "--allow-version-skew", "--json", env={"PREFECT_API_URL": prefect_api})
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-3000:]
    assert "0.26.0" in errors[0] and "0.27.0.post1" in errors[0] and "--allow-version-skew" in errors[0]
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    summary = json.loads(allowed.stdout.strip().splitlines()[-1])
    assert summary["check"]["passed"] and "tvm 0.26.0" in summary["device_identity"]
    assert "0.26.0" in allowed.stderr and "WARNING" in allowed.stderr
