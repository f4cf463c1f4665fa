"""The CUDA build subprocess: load the CUDA runtime (and, without a driver, the stub) BEFORE ``import tvm``.

    python -m pipeline.cuda.child --module module.json --target CANONICAL_JSON --opt-level 3 --out DIR \\
        --result result.json [--toolchain TOOLCHAIN_JSON] [--link g++]

Started by :func:`pipeline.cuda.builder.compile_cuda` (use that); it can be run by hand to debug a CUDA build. It
preloads pip's ``libcudart.so.13`` and then either the real ``libcuda.so.1`` (a machine with a driver) or
the stub from ``pipeline/cuda/stub.c`` (``RTLD_GLOBAL``, by absolute path: nothing goes on
``LD_LIBRARY_PATH``, so the compilers and linkers it starts never see the stub), imports TVM, checks that
``libtvm_runtime_cuda.so`` loaded (else TVM would silently keep CUDA source), compiles under
``with target, PassContext(opt_level)``, writes ``DIR/build.tar`` (objects, uncompressed) and optionally
links ``DIR/model.so``, and checks that the objects hold a cubin. It writes ``--result``: ``{"files",
"gpu_code", "stub", "seconds"}`` or ``{"error", "kind"}`` and exits 0 or 1.

Keep the imports above :func:`preload` free of TVM (``pipeline.cuda.builder`` imports none).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.store.layout import LIBRARY_FILE, OBJECTS_FILE
from pipeline.cuda.builder import (
    CudaToolchain,
    CudaToolchainMissing,
    cuda_toolchain,
    library_gpu_code,
)


class _ToolchainError(Exception):
    pass


def preload(toolchain: CudaToolchain) -> bool:
    """Load ``libcudart.so.13``, then the real driver or else the stub, into this process (``RTLD_GLOBAL``).

    Returns:
        True when the stub was loaded.
    """
    try:
        ctypes.CDLL(str(toolchain.cudart), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise _ToolchainError(f"cannot load {toolchain.cudart}: {exc}") from None
    if os.environ.get("TVMRP_CUDA_FORCE_STUB") != "1":
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
            return False
        except OSError:
            pass
    try:
        ctypes.CDLL(str(toolchain.stub), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise _ToolchainError(f"cannot load the driver stub {toolchain.stub}: {exc}") from None
    return True


def write_tar(output: str, files: list[str], **_: object) -> None:
    """``fcompile`` for ``export_library``: the object files, uncompressed (as ``tasks.build.write_tar``)."""
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            tar.add(name, arcname=os.path.basename(name), recursive=False)


write_tar.output_format = "tar"  # type: ignore[attr-defined]


def build(module: Path, canonical: str, opt_level: int, out: Path, link: str | None, stub: bool) -> dict:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    import tvm
    from tvm.base import _LOADED_LIBS

    seconds["import_tvm"] = time.perf_counter() - start
    if "tvm_runtime_cuda" not in _LOADED_LIBS or tvm.get_global_func("ffi.Module.create.cuda", True) is None:
        raise _ToolchainError(
            "TVM's libtvm_runtime_cuda.so did not load, so TVM would keep CUDA source instead of a cubin "
            f"(loaded: {sorted(_LOADED_LIBS)}); try: python -c 'import ctypes; "
            "ctypes.CDLL(\"<site-packages>/tvm/lib/libtvm_runtime_cuda.so\")'"
        )
    start = time.perf_counter()
    mod = tvm.ir.load_json(module.read_text())
    target = tvm.target.Target(json.loads(canonical))
    if target.kind.name != "cuda":
        raise ValueError(f"not a CUDA target: {canonical}")
    with target, tvm.transform.PassContext(opt_level=opt_level):
        executable = tvm.compile(mod, target=target)
    seconds["compile"] = time.perf_counter() - start
    start = time.perf_counter()
    files = [OBJECTS_FILE]
    with tempfile.TemporaryDirectory(prefix="cuda-export-") as work:
        executable.export_library(str(out / OBJECTS_FILE), fcompile=write_tar, workspace_dir=work)
        seconds["export"] = time.perf_counter() - start
        gpu_code = library_gpu_code(out / OBJECTS_FILE)
        if gpu_code != "cubin":
            raise RuntimeError(f"the compiled objects hold {gpu_code}, not a cubin")
        if link:
            start = time.perf_counter()
            from tvm.support import cc

            objects = sorted(str(p) for p in Path(work).iterdir() if p.suffix == ".o")
            cc.create_shared(str(out / LIBRARY_FILE), objects, cc=link)
            files.append(LIBRARY_FILE)
            seconds["link"] = time.perf_counter() - start
    return {"files": files, "gpu_code": gpu_code, "stub": stub, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cuda.child", description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True, type=Path, help="module.json (tvm.ir.save_json)")
    parser.add_argument("--target", required=True, help="canonical CUDA target JSON (pipeline.cuda.builder.parse_cuda_target)")
    parser.add_argument("--opt-level", type=int, default=3)
    parser.add_argument("--out", required=True, type=Path, help="existing directory for build.tar [and model.so]")
    parser.add_argument("--result", type=Path, help="where to write the result JSON (default: stdout)")
    parser.add_argument("--toolchain", help="CudaToolchain JSON (default: pipeline.cuda.builder.cuda_toolchain())")
    parser.add_argument("--link", help="also link model.so with this compiler (e.g. g++)")
    args = parser.parse_args(argv)

    try:
        toolchain = CudaToolchain.from_json(args.toolchain) if args.toolchain else cuda_toolchain()
        os.environ.setdefault("CUDA_PATH", str(toolchain.cuda_path))
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvrtc")
        stub = preload(toolchain)
        result = build(args.module, args.target, args.opt_level, args.out, args.link, stub)
        status = 0
    except (_ToolchainError, CudaToolchainMissing) as exc:
        result, status = {"error": str(exc), "kind": "toolchain"}, 1
    except Exception as exc:  # TVM raises many types; report one line, the traceback goes to the log
        traceback.print_exc()
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        result = {"error": lines[-1][:500] if lines else type(exc).__name__, "kind": "build"}
        status = 1
    text = json.dumps(result)
    if args.result:
        args.result.write_text(text)
    else:
        print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
