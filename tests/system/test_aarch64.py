"""Cross-compiled models on a real foreign architecture: an aarch64 TVM RPC server under qemu-user.

``scripts/aarch64-device`` provisions the emulated device (Debian's arm64 Python 3.11 and the aarch64 device
bundle: TVM's runtime only, cached in ``.cache/aarch64``; ~40 s cold when the registries are near, instant
warm) and starts it on 127.0.0.1 under a tracker of its own. Runtime only, it has no LLVM triple: it tells
its machine, versions and bundle through ``tvmrp.device_info``, and that is what refuses an x86 library.
The library is built with ``llvm -mtriple=aarch64-linux-gnu -mattr=+neon``, linked by ``aarch64-linux-gnu-gcc``,
uploaded through the tracker, loaded and run by aarch64 code, and its output compared with the host's
reference forward.

The device's processes are recorded in a temporary run directory, so a device a developer started with the
script is never touched; the fixture stops what it started (process groups). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from support import AARCH64, REPO, cli_json, compile_all, make_conv_onnx, make_tiny_onnx
from pipeline.store import ArtifactStore
from pipeline.planning import keys
from pipeline.device import DeviceSpec, device_triple, open_session
from pipeline.device.probe import check_versions, device_arch, local_tvm_version, probe
from pipeline.errors import ArchMismatch
from pipeline.models import ModelSpec, reference_forward, resolve_model
from pipeline.targets import parse_target
from pipeline.errors import RemoteRunError
from pipeline.latency import Timing
from pipeline.profiling import kernel_flops, summarize
from tasks._live import opened, session_of
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload

KEY = "aarch64-qemu"
SCRIPT = REPO / "scripts" / "aarch64_device.py"
PROVISION_TIMEOUT_S = 600  # cold: apt lists + ~130 MB of downloads + one emulated `import tvm`
START_TIMEOUT_S = 300  # the server imports TVM twice under emulation (~20 s here)
# Emulation is slow: generous, bounded waits for the device.
DEVICE_ARGS = ("--connect-timeout", "60", "--request-timeout", "120", "--call-timeout", "600")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.system,
    pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"),
                       reason="scripts/setup --dev installs the aarch64 cross compiler"),
    pytest.mark.skipif(
        not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64") or os.geteuid() == 0),
        reason="qemu-user is missing (scripts/setup --dev installs qemu-user-static)",
    ),
]


def device_script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    command = " ".join(args)
    assert proc.returncode == 0, f"aarch64-device {command}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def aarch64_device(tmp_path_factory):
    """The emulated aarch64 device, registered under :data:`KEY` with a tracker of its own; yields its info."""
    env = {**os.environ, "TVMRP_AARCH64_RUN_DIR": str(tmp_path_factory.mktemp("aarch64-run"))}
    started = time.monotonic()
    device_script("provision", env=env, timeout=PROVISION_TIMEOUT_S)
    provisioned = time.monotonic()
    try:
        out = device_script("start", "--key", KEY, "--json", env=env, timeout=START_TIMEOUT_S).stdout
        info = json.loads(out.strip().splitlines()[-1])
        print(f"aarch64 device: provision {provisioned - started:.1f} s, start {time.monotonic() - provisioned:.1f} s")
        assert info["registered"] and info["key"] == KEY and info["tracker"].startswith("127.0.0.1:")
        status = json.loads(device_script("status", "--json", env=env, timeout=60).stdout)
        assert status["registered"] and status["tracker"] == info["tracker"]
        yield info
    finally:
        device_script("stop", env=env, timeout=120)
    assert json.loads(subprocess.run([sys.executable, str(SCRIPT), "status", "--json"], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=60).stdout)["server_pid"] is None


@pytest.fixture(scope="module")
def spec(aarch64_device) -> DeviceSpec:
    return DeviceSpec(tracker=aarch64_device["tracker"], key=KEY, connect_timeout=60, request_timeout=120,
                      call_timeout=600)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return resolve_model(ModelSpec(str(make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx"))))


def test_aarch64_device__reports_its_architecture(spec):
    with open_session(spec) as session:
        triple = device_triple(session)
        assert KEY in session.description
    assert triple is not None and triple.startswith("aarch64-"), triple


def test_aarch64_device__tells_who_it_is(spec):
    """The bundle's runtime-only TVM has no compiler to ask for a triple: ``tvmrp.device_info`` tells the
    machine (aarch64), the versions and the bundle; the version check passes (the host's own TVM version)."""
    with open_session(spec) as session:
        started = time.monotonic()
        info = probe(session)
        print(f"probe of the emulated device in {time.monotonic() - started:.2f} s: {info}")
        assert check_versions(info, device=session.description) is None
    assert info.machine == "aarch64" and device_arch(info) == "aarch64"
    assert info.llvm_version is None  # runtime only: no compiler library on the device
    assert info.tvm_version == local_tvm_version() and info.bundle == "tvmrp-device-cp311-aarch64"
    assert info.python_version.startswith("3.11.") and info.hostname


def test_flow__cross_compiled_model_runs_on_emulated_aarch64(prefect_api, store_root, aarch64_device, model):
    summary = cli_json(prefect_api, store_root, "--model", str(model.spec.source), "--target", AARCH64,
                       "--tracker", aarch64_device["tracker"], "--key", KEY, *DEVICE_ARGS, "--profile")
    kernels = summary["profile"]["kernels"]  # the bundle's runtime-only TVM profiles too
    assert any(k["flops"] for k in kernels) and summary["device_facts"]["peak_memory_bytes"]
    for stage in ("import-model", "build", "export-library", "upload", "load", "set-input", "run", "postprocess"):
        assert summary["stages"][stage] == "ran", summary["stages"]
    assert '"mtriple":"aarch64-linux-gnu"' in summary["target"]
    assert KEY in summary["device"] and aarch64_device["tracker"] in summary["device"]
    assert len(summary["top5"]) == 5 and summary["upload"]["bytes"] > 0
    if "check" in summary:  # the flow's own comparison with the reference framework, where it has one
        assert summary["check"]["passed"], summary["check"]
    x86_build = keys.key_of(keys.build_inputs(model.digest, parse_target("llvm").canonical, 3))
    assert summary["build_key"] != x86_build  # cached separately from the host build


def test_device_stages__aarch64_output_matches_host_reference(tmp_path, spec, model):
    target, _, built, library = compile_all(model, tmp_path, AARCH64)
    assert target.arch == "aarch64"
    host_built = compile_all(model, tmp_path, "llvm")[2]
    assert host_built.artifact.key != built.artifact.key
    x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    with open_session(spec) as session, opened(session) as ref:
        uploaded = upload(ref, library.artifact, ArtifactStore(tmp_path), target.arch)
        assert uploaded.bytes == library.artifact.size
        result = run(set_input(load(uploaded, ArtifactStore(tmp_path)), x), Timing(repeat=2))
    np.testing.assert_allclose(result.output, reference_forward(model, x), atol=1e-4, rtol=0)
    assert result.latency.repeat == 2 and result.latency.min > 0


def test_profile__aarch64_kernels_and_glue_add_up_to_the_median(tmp_path, spec):
    """The profile (adaptive timing, as a run takes it) adds up, with the glue, to the median latency within 10 %.

    One TVM thread (``--threads 1``): under emulation everything is 10-50x slower, TVM's second worker falls
    asleep while the instrument runs between calls and a two-thread latency on this shared host is bimodal
    (docs/performance.md#where-the-time-goes---profile). A model whose kernels take milliseconds there: the tiny
    one's are so short that the instrument's own cost (~20 us a call under qemu) shows."""
    model = resolve_model(ModelSpec(str(make_conv_onnx(tmp_path / "conv8.onnx", channels=8))))
    target, _, built, library = compile_all(model, tmp_path, AARCH64)
    x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    store = ArtifactStore(tmp_path)
    flops = kernel_flops(store, built.artifact)
    seen = []
    with open_session(spec) as session, opened(session) as ref:
        loaded = load(upload(ref, library.artifact, store, target.arch), store)
        inputs = set_input(loaded, x)
        for _ in range(2):  # a shared host's load may move one of the two medians; not two runs' in a row
            result = run(inputs, Timing(max_seconds=10, threads=1), profile=True)
            profile = summarize(result.calls, flops)
            median = result.latency.median
            seen.append(f"latency median {median:.4f} ms, profile total {profile.total_ms:.4f} ms = kernels "
                        f"{profile.kernels_ms:.4f} + glue {profile.glue_ms:.4f} ({profile.repeat} repeats)")
            if abs(profile.total_ms - median) <= 0.10 * median:
                break
    print(f"aarch64 (qemu), conv8: {'; then '.join(seen)}; load {loaded.load_seconds * 1e3:.1f} ms, first "
          f"inference {result.first_inference_ms:.1f} ms, peak memory {result.peak_memory_bytes}")
    assert abs(profile.total_ms - median) <= 0.10 * median, seen
    assert profile.flops_known and all(k.gflop_per_s for k in profile.kernels if "conv2d" in k.name)
    assert result.peak_memory_bytes and result.first_inference_ms > 0


def test_upload__x86_library_refused_by_aarch64_device_before_upload(tmp_path, spec, model):
    target, _, _, library = compile_all(model, tmp_path, "llvm")
    assert target.arch == "x86_64"
    with open_session(spec) as session, opened(session) as ref:
        started = time.monotonic()
        with pytest.raises(ArchMismatch) as refused:
            upload(ref, library.artifact, ArtifactStore(tmp_path), target.arch)
        with pytest.raises(RemoteRunError):  # nothing was sent: the file it would have been is not there
            session_of(ref).call("download", session_of(ref).remote.download, f"tvmrp-{library.artifact.key[:16]}.so")
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "x86_64" in message and "aarch64" in message and KEY in message


def test_flow__x86_build_on_aarch64_device_is_a_clear_error(prefect_api, store_root, aarch64_device, model):
    proc = cli_json(prefect_api, store_root, "--model", str(model.spec.source), "--target", "llvm",
                    "--tracker", aarch64_device["tracker"], "--key", KEY, *DEVICE_ARGS, expect=1)
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert error and "x86_64" in error[-1] and "aarch64" in error[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
