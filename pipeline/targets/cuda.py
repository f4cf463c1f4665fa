"""CUDA targets: ``cuda -arch=sm_90``, TVM's JSON form, a TVM tag or a GPU name -> a canonical TVM target.

The canonical target (arch and host included) is what a CUDA build's key hashes. The host is this machine's
LLVM target unless the user names another (``-host=aarch64-linux-gnu``; Jetson names imply an aarch64 host).
Nothing here imports TVM at module level.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TargetError, clip
from pipeline.targets import grammar

#: CUDA 13's NVRTC compiles for Turing (sm_75) and newer only.
MIN_SM = 75
_ARCH_RE = re.compile(r"^sm_(\d+)([af]?)$")
_GPU_DEFAULTS = {
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": 49152,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}
_JETSON_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"]}
#: Names users type -> a TVM 0.27 tag (``tvm.target.list_tags()``) or our own config.
GPU_NAMES: dict[str, str | dict[str, Any]] = {
    "h100": "nvidia/nvidia-h100",
    "h200": {"arch": "sm_90a", "l2_cache_size_bytes": 52428800},
    "gh200": {"arch": "sm_90a", "l2_cache_size_bytes": 52428800},
    "a100": "nvidia/nvidia-a100",
    "a10": "nvidia/nvidia-a10",
    "a10g": "nvidia/nvidia-a10g",
    "l4": {"arch": "sm_89"},
    "l40s": {"arch": "sm_89"},
    "rtx4090": "nvidia/geforce-rtx-4090",
    "rtx40xx": {"arch": "sm_89"},
    "rtx30xx": {"arch": "sm_86"},
    "rtx3090": {"arch": "sm_86"},
    "t4": "nvidia/nvidia-t4",
    "jetson-orin": {"arch": "sm_87", "host": _JETSON_HOST},
    "jetson-orin-nano": {"arch": "sm_87", "host": _JETSON_HOST},
    "jetson-agx-orin": "nvidia/jetson-agx-orin-32gb",
}
_EXAMPLES = '"cuda -arch=sm_90", "nvidia/h100", "jetson-orin", \'{"kind": "cuda", "arch": "sm_89"}\''


@dataclass(frozen=True)
class CudaTarget:
    """A parsed CUDA target.

    Attributes:
        canonical: TVM's JSON rendering of the target, host included: hash it into the build key.
        arch: the GPU architecture, e.g. ``"sm_90"``.
        host_triple: the LLVM triple of the host code (the device machine's CPU).
        host_arch: that triple's architecture (``x86_64``, ``aarch64``): picks the linker.
    """

    canonical: str
    arch: str
    host_triple: str
    host_arch: str

    def tvm_target(self) -> Any:
        import tvm

        return tvm.target.Target(json.loads(self.canonical))

    def target_info(self) -> Any:
        """The pipeline's :class:`pipeline.targets.TargetInfo` (``kind="cuda"``, the host's triple and arch),
        for :func:`pipeline.targets.toolchain_for`."""
        from pipeline.targets.info import TargetInfo

        return TargetInfo(canonical=self.canonical, kind="cuda", triple=self.host_triple, arch=self.host_arch,
                          device="cuda", gpu_arch=self.arch)

    def __iter__(self):  # ``canonical, arch = parse_cuda_target(text)``
        return iter((self.canonical, self.arch))


def _normalise_name(text: str) -> str:
    name = text.strip().lower().removeprefix("nvidia/").removeprefix("nvidia-").replace("_", "-")
    return name.replace("geforce-", "").replace("rtx-", "rtx")


def cuda_target_dict(text: str) -> dict[str, Any]:
    """The user's CUDA target as TVM's dict form (no TVM needed), before defaults and validation.

    Accepts ``cuda -arch=sm_90 [-max_threads_per_block=1024 ...] [-host=aarch64-linux-gnu]``, TVM's JSON
    (``{"kind": "cuda", "arch": ..., "host": {...}}``), a TVM tag (``nvidia/nvidia-a100``), or a GPU name
    (:data:`GPU_NAMES`: ``h100``, ``nvidia/h100``, ``a100``, ``l4``, ``rtx40xx``, ``t4``, ``jetson-orin``...).
    The CLI and JSON forms are those of every target (:mod:`pipeline.targets.grammar`); ``-host=`` names the
    host's LLVM triple.

    Raises:
        TargetError: the text is none of these, or not well formed (its message echoes the text clipped).
    """
    text = (text or "").strip()
    if not text:
        raise TargetError(f"the CUDA target is empty. Examples: {_EXAMPLES}")
    if text.startswith("{"):
        config = grammar.parse_json(text, _EXAMPLES)
        if config.get("kind") != "cuda":
            raise TargetError(f'a CUDA target JSON needs "kind": "cuda". Examples: {_EXAMPLES}')
        return config
    words = grammar.split_words(text, _EXAMPLES)
    if words[0] == "cuda":
        config: dict[str, Any] = {"kind": "cuda", **grammar.parse_options(words[1:], text, _EXAMPLES)}
        host = config.get("host")
        if isinstance(host, str):  # -host=TRIPLE (or llvm): the host code's LLVM target
            config["host"] = {"kind": "llvm", "mtriple": host} if host != "llvm" else {"kind": "llvm"}
        return config
    if len(words) == 1:
        name = _normalise_name(words[0])
        known = GPU_NAMES.get(name)
        if known is None and words[0].startswith("nvidia/"):
            known = words[0]
        if isinstance(known, dict):
            return {"kind": "cuda", "keys": ["cuda", "gpu"], **_GPU_DEFAULTS, **known}
        if isinstance(known, str):
            return {"tag": known}
    raise TargetError(
        f"{clip(text)!r} is not a CUDA target this pipeline knows. Examples: {_EXAMPLES}; GPU names: "
        f"{', '.join(sorted(GPU_NAMES))}, or a TVM tag (python -c 'import tvm; print(tvm.target.list_tags())')"
    )


def parse_cuda_target(text: str) -> CudaTarget:
    """Parse a CUDA target (see :func:`cuda_target_dict`) into its canonical TVM form.

    Missing limits get the values of TVM's NVIDIA tags (1024 threads, 48 KiB shared memory, warp 32); a
    missing host becomes ``{"kind": "llvm"}`` (this machine's CPU architecture; Jetson names use aarch64).
    Iterating gives ``(canonical, arch)``.

    Raises:
        TargetError: unknown name, no ``arch``, an arch CUDA 13 cannot compile for (before sm_75), or a
            target TVM rejects.
    """
    from pipeline.lean_import import import_tvm

    tvm = import_tvm()  # the first import of a run: without torch (3.3 s -> 1.0 s)

    config = cuda_target_dict(text)
    try:
        if "tag" in config:
            if config["tag"] not in tvm.target.list_tags():
                raise TargetError(f"TVM does not know the target tag {clip(config['tag'])!r}. Examples: {_EXAMPLES}")
            tagged = tvm.target.Target(config["tag"])
            config = json.loads(str(tagged))
            config.pop("tag", None)
            if tagged.host is not None:
                config["host"] = json.loads(str(tagged.host))
        arch = str(config.get("arch", ""))
        match = _ARCH_RE.match(arch)
        if not match:
            raise TargetError(
                f"the CUDA target {clip(text)!r} needs an arch like sm_90 (got {clip(arch, 60) or 'none'}): TVM "
                f"would otherwise guess sm_50. Examples: {_EXAMPLES}"
            )
        if int(match.group(1)) < MIN_SM:
            raise TargetError(
                f"{clip(arch, 60)} is too old for CUDA 13 (the NVRTC this pipeline uses compiles for sm_{MIN_SM} "
                "and newer)"
            )
        for key, value in _GPU_DEFAULTS.items():
            config.setdefault(key, value)
        host = config.pop("host", None) or {"kind": "llvm"}
        if isinstance(host, str):
            host = {"kind": "llvm", "mtriple": host} if host != "llvm" else {"kind": "llvm"}
        target = tvm.target.Target(config, host=host)
    except TargetError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(
            f"TVM cannot use the CUDA target {clip(text)!r}: {clip(first)}. Examples: {_EXAMPLES}"
        ) from None
    triple = str(target.host.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    host_arch = triple.split("-")[0].lower()
    host_arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(host_arch, host_arch)
    return CudaTarget(canonical=str(target), arch=arch, host_triple=triple, host_arch=host_arch)


def is_cuda_target(text: str) -> bool:
    """Whether ``text`` names a CUDA target (it may still be invalid: :func:`parse_cuda_target` says why)."""
    try:
        cuda_target_dict(text)
    except TargetError:
        return (text or "").strip().startswith(("cuda", '{"kind": "cuda"', '{"kind":"cuda"'))
    return True
