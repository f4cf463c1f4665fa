"""``--build-only`` and CUDA targets through the command line (real compiles, a real Prefect server).

Without a GPU here: a CUDA build compiles to GPU machine code (cubin) and a run against the embedded CPU
device fails with one ``Error:`` line naming the missing GPU. The test marked ``gpu`` runs a CUDA build on a
real GPU device when ``TVMRP_GPU_DEVICE`` names one (``HOST:PORT`` of an rpc_server started from
``scripts/device-bundle --cuda``); it is skipped otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support import run_cli
from pipeline.cuda.builder import find_cuda_packages
from pipeline.errors import BuildError


def _has_cuda_extra() -> bool:
    try:
        find_cuda_packages()
    except BuildError:
        return False
    return True


needs_cuda_extra = pytest.mark.skipif(not _has_cuda_extra(), reason="scripts/setup --cuda installs NVRTC")


def _json(proc) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_build_only__compiles_and_exports_without_a_device(prefect_api, store_root, tiny_onnx):
    summary = _json(run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--build-only", "--json",
                            env={"PREFECT_API_URL": prefect_api}))
    assert summary["build_only"] is True and summary["gpu_code"] is None
    assert Path(summary["artifact"]).read_bytes()[:4] == b"\x7fELF"
    assert summary["stages"] == {"import-model": "ran", "tune": "skipped", "build": "ran", "export-library": "ran"}
    assert len(summary["build_key"]) == 64 and summary["library_key"] in summary["artifact"].replace("/", "")
    assert not (store_root / ".device").exists()  # no device was started
    again = run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--build-only",
                    env={"PREFECT_API_URL": prefect_api})
    assert again.returncode == 0 and "Device     none (--build-only)" in again.stdout
    assert f"build {summary['build_key']}" in again.stdout and "build cached" in again.stdout
    assert summary["schedules"] == "rules" and "schedules rules" in again.stdout


def test_build_only__schedules_none_is_another_build_without_the_rules(prefect_api, store_root, tiny_onnx):
    common = ("--model", str(tiny_onnx), "--artifacts", str(store_root), "--build-only", "--json")
    rules = _json(run_cli(*common, env={"PREFECT_API_URL": prefect_api}))
    none = _json(run_cli(*common, "--schedules", "none", env={"PREFECT_API_URL": prefect_api}))
    assert (rules["schedules"], none["schedules"]) == ("rules", "tvm-default")
    assert none["build_key"] != rules["build_key"] and none["stages"]["import-model"] == "cached"
    bad = run_cli(*common, "--schedules", "fast", env={"PREFECT_API_URL": prefect_api})
    assert bad.returncode == 2 and "--schedules" in bad.stderr and "rules" in bad.stderr


@needs_cuda_extra
def test_build_only__cuda_target_holds_gpu_machine_code(prefect_api, store_root, tiny_onnx):
    summary = _json(run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--target",
                            "cuda -arch=sm_90", "--build-only", "--json", env={"PREFECT_API_URL": prefect_api}))
    assert summary["gpu_code"] == "cubin" and summary["schedules"] == "tvm-default"  # TVM's GPU schedules
    assert json.loads(summary["target"])["arch"] == "sm_90"
    other = _json(run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--target", "nvidia/a100",
                          "--build-only", "--json", env={"PREFECT_API_URL": prefect_api}))
    assert other["build_key"] != summary["build_key"] and json.loads(other["target"])["arch"] == "sm_80"


@needs_cuda_extra
def test_cuda_target__on_a_device_without_a_gpu_fails_with_one_error_line(prefect_api, store_root, tiny_onnx):
    proc = run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--target", "cuda -arch=sm_90",
                   env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "has no CUDA GPU" in errors[0]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]  # nothing after it
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("target", "message"), [
    ("cuda", "needs an arch like sm_90"),
    ("cuda -arch=sm_50", "too old for CUDA 13"),
    ("nvidia/no-such-gpu", "TVM does not know the target tag"),
    ("rtx9090", "TVM cannot use target"),
])
def test_cuda_target__bad_ones_exit_2(store_root, target, message):
    proc = run_cli("--target", target, "--artifacts", str(store_root), "--build-only", timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
@needs_cuda_extra
@pytest.mark.skipif(not os.environ.get("TVMRP_GPU_DEVICE"), reason="set TVMRP_GPU_DEVICE=HOST:PORT of a GPU device")
def test_cuda_run__on_a_real_gpu_matches_the_reference(prefect_api, store_root):
    host, port = os.environ["TVMRP_GPU_DEVICE"].rsplit(":", 1)
    arch = os.environ.get("TVMRP_GPU_ARCH", "sm_90")
    summary = _json(run_cli("--model", "efficientnet_lite0", "--artifacts", str(store_root), "--target",
                            f"cuda -arch={arch}", "--host", host, "--port", port, "--json",
                            env={"PREFECT_API_URL": prefect_api}, timeout=900))
    assert summary["check"]["passed"] and summary["top5"][0]["class"] in range(281, 288)
    assert "cuda" in summary["device_identity"]
