"""CUDA builds on a machine without a GPU: the library holds a cubin, not CUDA source (pipeline/cuda/builder.py).

The compile tests need the optional ``cuda`` extra (``scripts/setup --cuda``: pip's NVRTC, CUDA headers,
cuda-bindings) and gcc; without them they skip, saying so. (Target parsing and byte inspection, which need
neither: tests/unit/test_cuda_target.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.cuda import builder as cuda
from pipeline.errors import BuildError

from support import make_tiny_onnx


def _toolchain_or_skip(cache_dir: Path) -> cuda.CudaToolchain:
    try:
        return cuda.cuda_toolchain(cache_dir)
    except cuda.CudaToolchainMissing as exc:
        pytest.skip(f"the optional CUDA packages are not installed ({exc})")


@pytest.fixture(scope="module")
def toolchain(tmp_path_factory) -> cuda.CudaToolchain:
    return _toolchain_or_skip(tmp_path_factory.mktemp("cuda-cache"))


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    """The tiny ONNX classifier of conftest as a saved Relax module (what the import stage writes)."""
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    directory = tmp_path_factory.mktemp("tiny-module")
    mod = from_onnx(onnx.load(str(make_tiny_onnx(directory / "tiny.onnx"))), keep_params_in_input=False)
    path = directory / "module.json"
    path.write_text(tvm.ir.save_json(mod))
    return path


@pytest.fixture(scope="module")
def cubin_build(toolchain, tiny_module, tmp_path_factory) -> cuda.CudaBuild:
    out = tmp_path_factory.mktemp("cuda-build")
    target = cuda.parse_cuda_target("cuda -arch=sm_90")
    return cuda.compile_cuda(tiny_module, target.canonical, 3, out, link="g++", toolchain=toolchain)


# ----------------------------------------------------------------------------------------- toolchain


def test_toolchain_is_prepared_once(toolchain, tmp_path_factory):
    assert toolchain.stub.is_file() and toolchain.cudart.is_file()
    assert (toolchain.cuda_path / "include" / "cuda_runtime.h").is_file()
    assert (toolchain.cuda_path / "include" / "cccl" / "cuda" / "std" / "cstdint").is_file()
    again = cuda.cuda_toolchain(toolchain.stub.parents[3])
    assert again == toolchain
    assert "nvidia-cuda-nvrtc==13.0" in toolchain.identity
    # The stub defines every driver function that TVM's CUDA runtime imports.
    needed = set(cuda._driver_symbols(cuda._tvm_runtime_cuda()))
    out = subprocess.run(["nm", "-D", "--defined-only", str(toolchain.stub)], capture_output=True, text=True).stdout
    assert needed and needed <= {line.split()[-1] for line in out.splitlines() if line.strip()}


# ------------------------------------------------------------------------------------------- compile


def test_compile_cuda_writes_a_cubin(cubin_build):
    assert cubin_build.gpu_code == "cubin"
    assert [f.name for f in cubin_build.files] == ["build.tar", "model.so"]
    for path in cubin_build.files:
        assert cuda.library_gpu_code(path) == "cubin"
        assert b"__global__" not in path.read_bytes()
    with tarfile.open(cubin_build.files[0]) as tar:
        assert sorted(tar.getnames()) == ["devc.o", "lib0.o"]
    assert cubin_build.seconds["compile"] > 0 and cubin_build.seconds["total"] >= cubin_build.seconds["compile"]
    assert "nvidia-cuda-nvrtc" in cubin_build.toolchain


def test_cubin_library_loads_without_a_jit(cubin_build, toolchain, tmp_path):
    """A runtime-only TVM (as on a device) loads the library without calling the CUDA compiler.

    The runtime's CUDA loader is registered by loading libtvm_runtime_cuda.so (with the stub driver: no GPU
    here); any call of ``tvm_callback_cuda_compile`` (the device-side JIT) fails the test.
    """
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os
        ctypes.CDLL({str(toolchain.cudart)!r}, ctypes.RTLD_GLOBAL)
        ctypes.CDLL({str(toolchain.stub)!r}, ctypes.RTLD_GLOBAL)
        import tvm, tvm_ffi
        ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)

        @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
        def jit(code):
            raise SystemExit("the library needed a JIT compile")

        module = tvm.runtime.load_module({str(cubin_build.files[1])!r})
        print("loaded", len(module.imports))
    """))
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded" in proc.stdout


def test_without_the_cuda_runtime_tvm_keeps_source(tiny_module, tmp_path):
    """The contrast: in a process where libtvm_runtime_cuda.so did not load, the library holds CUDA source."""
    import tvm
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        pytest.skip("this machine has a CUDA driver: TVM compiles cubins in-process")
    target = cuda.parse_cuda_target("cuda -arch=sm_90").tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(tvm.ir.load_json(tiny_module.read_text()), target=target)
    executable.export_library(str(tmp_path / "source.so"))
    assert cuda.library_gpu_code(tmp_path / "source.so") == "source"


def test_failed_build_is_one_line(toolchain, tiny_module, tmp_path):
    with pytest.raises(BuildError) as info:
        cuda.compile_cuda(tiny_module, json.dumps({"kind": "llvm"}), 3, tmp_path, toolchain=toolchain)
    assert "not a CUDA target" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_out_dir(toolchain, tiny_module, tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        cuda.compile_cuda(tiny_module, cuda.parse_cuda_target("t4").canonical, 3, tmp_path / "nope", toolchain=toolchain)
