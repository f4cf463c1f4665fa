"""Compile for NVIDIA GPUs on a machine without a GPU, with the GPU machine code (cubin) in the library.

TVM 0.27's CUDA codegen hands the kernels' CUDA C source to the CUDA module factory of
``libtvm_runtime_cuda.so``, which compiles it with NVRTC at *build* time. That library links against the
CUDA driver (``libcuda.so.1``) and the CUDA runtime (``libcudart.so.13``); when it cannot load (no driver on
a build machine), TVM silently keeps the source and every device load pays a JIT compile (7.3 s for
EfficientNet-Lite0 on an H200, and the device needs NVRTC, CUDA headers and TVM's compiler-side Python).

This module makes the build machine produce the cubin:

* :func:`cuda_toolchain` finds pip's NVRTC, CUDA headers (with CCCL) and ``libcudart.so.13`` (the optional
  ``cuda`` extra: ``scripts/setup --cuda``), builds once a stub ``libcuda.so.1`` from ``stub.c`` whose
  functions all fail with CUDA_ERROR_NO_DEVICE, and lays out a ``CUDA_PATH`` tree of symlinks where TVM's
  ``tvm.support.nvcc`` looks for headers. Cached under ``<cache>/cuda/<digest>/`` (``$TVMRP_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/tvmrp``, else ``~/.cache/tvmrp``).
* :func:`compile_cuda` runs the compile and export in a subprocess (``python -m pipeline.cuda.child``):
  the runtime and the stub must be loaded *before* ``import tvm``, and the stub must never be seen by a
  process that drives a real GPU. The stub is loaded only when no real ``libcuda.so.1`` can be.
* :func:`library_gpu_code` tells from a library's bytes what GPU code it holds.
* CUDA targets are parsed by :mod:`pipeline.targets.cuda`.

Nothing here imports TVM at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.targets.cuda import _ARCH_RE, MIN_SM, CudaTarget, parse_cuda_target  # noqa: F401 - re-exported
from pipeline.errors import BuildError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STUB_SOURCE = Path(__file__).with_name("stub.c")

#: The pip packages of the ``cuda`` extra (requirements-cuda.txt): NVRTC 13.0 to match TVM 0.27's
#: ``libtvm_runtime_cuda.so`` (``libcudart.so.13``) and drivers from 580 (CUDA 13.0) on.
CUDA_PACKAGES = {
    "cuda-bindings": "13.0.3",
    "cuda-pathfinder": "1.9.1",
    "nvidia-cuda-nvrtc": "13.0.88",
    "nvidia-cuda-cccl": "13.0.85",
    "nvidia-cuda-runtime": "13.0.96",
}
_TIMEOUT_S = 3600.0
_KILL_WAIT_S = 5.0
INSTALL_HINT = "run scripts/setup --cuda (pip install -r requirements-cuda.txt)"




class CudaToolchainMissing(BuildError):
    """The optional NVRTC packages (or gcc, for the driver stub) are not installed."""


# ------------------------------------------------------------------------------------------- toolchain


@dataclass(frozen=True)
class CudaToolchain:
    """What the CUDA build subprocess needs.

    Attributes:
        cudart: pip's ``libcudart.so.13``.
        nvrtc: pip's ``libnvrtc.so.13`` (cuda-bindings finds it by itself; kept for messages).
        include: the CUDA headers directory (``cuda_runtime.h``, ``cccl/``).
        cuda_path: a directory of symlinks laid out as TVM's ``find_cuda_path()`` expects; becomes ``CUDA_PATH``.
        stub: the stub ``libcuda.so.1`` (loaded only when no real driver library loads).
        versions: the installed versions of :data:`CUDA_PACKAGES`.
        identity: what of the toolchain changes the compiled code (NVRTC, headers, bindings versions):
            put it into the build key of a CUDA build.
    """

    cudart: Path
    nvrtc: Path
    include: Path
    cuda_path: Path
    stub: Path
    versions: dict[str, str] = field(hash=False)
    identity: str

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> CudaToolchain:
        data = json.loads(text)
        return cls(**{k: Path(v) if k in ("cudart", "nvrtc", "include", "cuda_path", "stub") else v
                      for k, v in data.items()})


def default_cache_dir() -> Path:
    """``$TVMRP_CACHE_DIR``, else ``$XDG_CACHE_HOME/tvmrp``, else ``~/.cache/tvmrp``."""
    if os.environ.get("TVMRP_CACHE_DIR"):
        return Path(os.environ["TVMRP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvmrp"


def _package_file(dist: str, relative: str) -> Path | None:
    try:
        distribution = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(relative)))
    return path if path.exists() else None


def find_cuda_packages() -> dict[str, Any]:
    """Locate the pip CUDA pieces, without loading any of them.

    Returns:
        ``{"cudart": Path, "nvrtc": Path, "include": Path, "versions": {dist: version}}``.

    Raises:
        CudaToolchainMissing: one line naming what is missing and what to run.
    """
    versions: dict[str, str] = {}
    for dist in CUDA_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    found = {
        "cudart": _package_file("nvidia-cuda-runtime", "nvidia/cu13/lib/libcudart.so.13"),
        "nvrtc": _package_file("nvidia-cuda-nvrtc", "nvidia/cu13/lib/libnvrtc.so.13"),
        "include": _package_file("nvidia-cuda-runtime", "nvidia/cu13/include"),
    }
    missing = [d for d in CUDA_PACKAGES if d not in versions]
    if found["include"] is not None and not (found["include"] / "cuda_runtime.h").is_file():
        missing.append("nvidia-cuda-runtime (headers)")
    if found["include"] is not None and not (found["include"] / "cccl" / "cuda" / "std" / "cstdint").is_file():
        if "nvidia-cuda-cccl" not in missing:
            missing.append("nvidia-cuda-cccl (headers)")
    for name, dist in (("cudart", "nvidia-cuda-runtime"), ("nvrtc", "nvidia-cuda-nvrtc"),
                       ("include", "nvidia-cuda-runtime")):
        if found[name] is None and dist not in missing:
            missing.append(f"{dist} ({name})")
    if missing:
        raise CudaToolchainMissing(
            f"compiling for CUDA needs NVIDIA's NVRTC and CUDA headers from pip, missing here: "
            f"{', '.join(missing)}; {INSTALL_HINT}"
        )
    wrong = [f"{d}=={v} (want {CUDA_PACKAGES[d]})" for d, v in versions.items()
             if d != "cuda-pathfinder" and v.split(".")[:2] != CUDA_PACKAGES[d].split(".")[:2]]
    if wrong:
        raise CudaToolchainMissing(
            f"the CUDA packages installed do not match the CUDA 13.0 that TVM 0.27 is built for: "
            f"{', '.join(wrong)}; {INSTALL_HINT}"
        )
    return {**found, "versions": versions}


def _tvm_runtime_cuda() -> Path | None:
    """``tvm/lib/libtvm_runtime_cuda.so`` of the installed TVM (found without importing TVM)."""
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "lib" / "libtvm_runtime_cuda.so"
        if path.is_file():
            return path
    return None


def _driver_symbols(library: Path | None) -> list[str]:
    """The ``cu*`` driver functions ``library`` imports (``nm -D --undefined-only``); [] if unknown."""
    if library is None or not shutil.which("nm"):
        return []
    try:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
    return sorted(n for n in names if re.fullmatch(r"cu[A-Z]\w*", n))


def stub_source(symbols: list[str] | None = None) -> str:
    """``stub.c`` plus a failing stub for each of ``symbols`` it does not define yet."""
    source = STUB_SOURCE.read_text()
    defined = set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", source)) | set(re.findall(r"TVMRP_NO_DEVICE\((\w+)\)", source))
    extra = [s for s in (symbols or []) if s not in defined]
    if extra:
        source += "\n/* Added by pipeline/cuda/builder.py for this libtvm_runtime_cuda.so. */\n"
        source += "".join(f"TVMRP_NO_DEVICE({s})\n" for s in extra)
    return source


@lru_cache(maxsize=None)
def _gcc_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0] if out else "unknown"


def _cuda_triple_dir() -> str:
    """The ``targets/<machine>-linux`` name TVM's nvcc.py probes on this machine."""
    return f"{platform.machine()}-{platform.system().lower()}"


def cuda_toolchain(cache_dir: str | os.PathLike[str] | None = None, compiler: str = "gcc") -> CudaToolchain:
    """Find the pip CUDA pieces and prepare (once, cached) the driver stub and the ``CUDA_PATH`` tree.

    Safe to call from several processes at once: each prepares in a temporary directory and renames it
    into place; a loser of the race uses the winner's.

    Raises:
        CudaToolchainMissing: the pip packages or gcc are missing (one line: what to install).
    """
    packages = find_cuda_packages()
    gcc = shutil.which(compiler)
    if gcc is None:
        raise CudaToolchainMissing(
            f"compiling for CUDA on this machine needs a C compiler ({compiler}) to build the driver stub: "
            f"apt-get install gcc"
        )
    source = stub_source(_driver_symbols(_tvm_runtime_cuda()))
    include = Path(packages["include"]).resolve()
    identity_of_dir = {
        "stub": hashlib.sha256(source.encode()).hexdigest(),
        "gcc": _gcc_identity(gcc),
        "machine": platform.machine(),
        "include": str(include),
        "layout": "1",
    }
    digest = hashlib.sha256(json.dumps(identity_of_dir, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "cuda" / digest
    if not (final / "ready").is_file():
        _prepare(final, source, gcc, include)
    versions = dict(packages["versions"])
    return CudaToolchain(
        cudart=Path(packages["cudart"]),
        nvrtc=Path(packages["nvrtc"]),
        include=include,
        cuda_path=final / "cuda_path",
        stub=final / "stub" / "libcuda.so.1",
        versions=versions,
        identity=";".join(f"{d}=={versions[d]}" for d in sorted(versions) if d != "cuda-pathfinder"),
    )


def _prepare(final: Path, source: str, gcc: str, include: Path) -> None:
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=parent))
        work.chmod(0o755)
    except OSError as exc:
        raise BuildError(f"cannot write the CUDA toolchain cache {parent}: {exc.strerror or exc}") from None
    try:
        (work / "stub").mkdir()
        (work / "stub" / "cuda_stub.c").write_text(source)
        cmd = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wl,-soname,libcuda.so.1",
               "-o", str(work / "stub" / "libcuda.so.1"), str(work / "stub" / "cuda_stub.c")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BuildError(f"building the CUDA driver stub failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        tree = work / "cuda_path"
        (tree / "targets" / _cuda_triple_dir()).mkdir(parents=True)
        (tree / "include").symlink_to(include)
        (tree / "targets" / _cuda_triple_dir() / "include").symlink_to(include)
        (work / "ready").write_text(json.dumps({"include": str(include), "gcc": gcc}) + "\n")
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "ready").is_file():  # not another process's finished copy: a stale one
                shutil.rmtree(final, ignore_errors=True)
                os.rename(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------- inspection

_EM_CUDA = 190
_MODULE_KEY = struct.pack("<Q", 4) + b"cuda"
_FORMATS = {"cubin": "cubin", "ptx": "ptx", "fatbin": "fatbin", "cu": "source", "cuda": "source"}


def gpu_code_of_bytes(data: bytes) -> str:
    """See :func:`library_gpu_code`; for bytes already read."""
    kinds = []
    start = 0
    while (at := data.find(_MODULE_KEY, start)) >= 0:
        start = at + len(_MODULE_KEY)
        # A serialized CUDA module: u64 length + "cuda" (type key), u64 blob size, u64 length + format, ...
        header = data[start:start + 16]
        if len(header) < 16:
            continue
        size, fmt_len = struct.unpack("<QQ", header)
        if not 0 < fmt_len <= 16 or size > len(data):
            continue
        fmt = data[start + 16:start + 16 + fmt_len].decode("ascii", "replace")
        kind = _FORMATS.get(fmt)
        if kind is None:
            continue
        if kind == "cubin":
            blob = data[start + 8:start + 8 + size]
            if not _has_cuda_elf(blob):
                continue
        kinds.append(kind)
    for kind in ("source", "ptx", "fatbin", "cubin"):  # the worst one found wins
        if kind in kinds:
            return kind
    if b"__global__" in data:
        return "source"
    if b".target sm_" in data and b".version" in data:
        return "ptx"
    return "none"


def _has_cuda_elf(blob: bytes) -> bool:
    start = 0
    while (at := blob.find(b"\x7fELF", start)) >= 0:
        start = at + 4
        if len(blob) >= at + 20 and struct.unpack("<H", blob[at + 18:at + 20])[0] == _EM_CUDA:
            return True
    return False


def library_gpu_code(path: str | os.PathLike[str]) -> str:
    """What GPU code a TVM library (``.so``, or a ``.tar`` of objects) holds, from its bytes.

    TVM serializes the CUDA module into the library as ``"cuda"`` + a format: ``cubin`` (NVRTC, machine
    code for one architecture), ``fatbin`` (nvcc), ``ptx``, or ``cuda`` (the fallback that keeps CUDA C
    source for the device to JIT-compile).

    Returns:
        ``"cubin"`` (an ELF for ``EM_CUDA`` is there), ``"fatbin"``, ``"ptx"``, ``"source"`` (CUDA C source,
        compiled on every load), or ``"none"`` (no CUDA module). With several CUDA modules, the worst.
    """
    path = Path(path)
    if tarfile.is_tarfile(path):
        kinds = []
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    stream = tar.extractfile(member)
                    if stream is not None:
                        kinds.append(gpu_code_of_bytes(stream.read()))
        for kind in ("source", "ptx", "fatbin", "cubin"):
            if kind in kinds:
                return kind
        return "none"
    return gpu_code_of_bytes(path.read_bytes())


# --------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class CudaBuild:
    """The result of :func:`compile_cuda`.

    Attributes:
        files: the files written into ``out_dir`` (``build.tar``, and ``model.so`` when linked).
        gpu_code: what the objects hold (:func:`library_gpu_code`): always ``"cubin"`` on success.
        stub: True when the stub driver was loaded (no real ``libcuda.so.1`` on this machine).
        seconds: ``{"import_tvm", "compile", "export", "link", "total"}`` (``total`` includes the subprocess start).
        toolchain: :attr:`CudaToolchain.identity`.
    """

    files: list[Path]
    gpu_code: str
    stub: bool
    seconds: dict[str, float]
    toolchain: str


def child_environment(toolchain: CudaToolchain, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the build subprocess: ``CUDA_PATH``, NVRTC mode, no knob that changes the code."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.startswith(("TVM_CUDA_", "TVM_KERNEL_")):
            del env[name]
    env["CUDA_PATH"] = str(toolchain.cuda_path)
    env["TVM_CUDA_COMPILE_MODE"] = "nvrtc"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def compile_cuda(
    module_json: str | os.PathLike[str],
    target_canonical: str,
    opt_level: int,
    out_dir: str | os.PathLike[str],
    *,
    link: str | None = None,
    toolchain: CudaToolchain | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    python: str | os.PathLike[str] | None = None,
    timeout: float = _TIMEOUT_S,
) -> CudaBuild:
    """Compile a saved Relax module (``tvm.ir.save_json``) for a CUDA target, in a subprocess.

    Writes ``out_dir/build.tar``: the target's object files, uncompressed, as ``tasks/build.py`` writes them
    (the export stage links it into ``model.so`` with the host's linker). With ``link`` (a compiler, e.g.
    ``"g++"``) also ``out_dir/model.so``. The GPU code inside is a cubin for the target's arch.

    Args:
        module_json: the imported module (``module.json`` of the import stage).
        target_canonical: :attr:`CudaTarget.canonical` (from :func:`parse_cuda_target`).
        opt_level: TVM's ``PassContext(opt_level=...)``.
        out_dir: an existing directory; only the files named above are written into it.
        link: link ``model.so`` too, with this compiler (needs the host code's architecture).
        toolchain: from :func:`cuda_toolchain` (found when not given).
        python: the interpreter to run (this one by default; it must have TVM and the ``cuda`` extra).
        timeout: seconds before the subprocess (its whole process group) is killed.

    Raises:
        CudaToolchainMissing: the ``cuda`` extra is not installed (``scripts/setup --cuda``).
        BuildError: TVM failed, the subprocess died or timed out, or the library did not get a cubin.
    """
    started = time.perf_counter()
    toolchain = toolchain or cuda_toolchain(cache_dir)
    out = Path(out_dir)
    if not out.is_dir():
        raise BuildError(f"the output directory {out} does not exist")
    with tempfile.TemporaryDirectory(prefix="tvmrp-cuda-") as work:
        argv = [
            os.fspath(python or sys.executable), "-m", "pipeline.cuda.child",
            "--module", os.fspath(module_json), "--target", target_canonical, "--opt-level", str(int(opt_level)),
            "--out", str(out), "--result", str(Path(work) / "result.json"), "--toolchain", toolchain.to_json(),
            *(["--link", link] if link else []),
        ]
        result = _run_build(argv, Path(work), toolchain, target_canonical, opt_level, timeout)
    seconds = {k: float(v) for k, v in result["seconds"].items()}
    seconds["total"] = time.perf_counter() - started
    return CudaBuild(
        files=[out / name for name in result["files"]],
        gpu_code=result["gpu_code"],
        stub=bool(result["stub"]),
        seconds=seconds,
        toolchain=toolchain.identity,
    )


def _run_build(argv: list[str], work: Path, toolchain: CudaToolchain, target_canonical: str, opt_level: int,
               timeout: float) -> dict[str, Any]:
    """Run the build subprocess (its own process group, killed on timeout or interrupt); its result record."""
    log_path = work / "build.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=child_environment(toolchain), cwd=str(REPO), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise BuildError(
                f"the CUDA build for {_arch_of(target_canonical)} took longer than {timeout:.0f} s and was stopped"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
    text = log_path.read_text(errors="replace")
    result = _read_result(work / "result.json")
    if proc.returncode != 0 or result is None or "error" in result:
        message = (result or {}).get("error") or _last_line(text) or f"exit status {proc.returncode}"
        if text.strip():
            log.warning("CUDA build subprocess output:\n%s", text[-4000:])
        cls = CudaToolchainMissing if (result or {}).get("kind") == "toolchain" else BuildError
        raise cls(f"TVM failed to compile for CUDA {_arch_of(target_canonical)} at opt_level {opt_level}: {message}")
    return result


def _arch_of(canonical: str) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(canonical).get("arch", "?"))
    return "?"


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the subprocess's group (it leads its own session) and reap the leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_WAIT_S)
