"""What a parsed target is (:class:`TargetInfo`) and the machine architectures it names, shared by the CPU
(:mod:`pipeline.targets`) and CUDA (:mod:`pipeline.targets.cuda`) target parsers."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from typing import Any

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class TargetInfo:
    """A parsed target.

    Attributes:
        canonical: TVM's JSON rendering of the target; stable, hashed into build keys.
        kind: target kind, ``"llvm"`` or ``"cuda"``.
        triple: the LLVM triple of the (host) code (TVM's default when the user gave none).
        arch: the triple's architecture, normalised (``x86_64``, ``aarch64``, ...): picks the linker.
        device: where the model runs on the device: ``"cpu"`` or ``"cuda"`` (a GPU).
        gpu_arch: the GPU architecture of a CUDA target (``"sm_90"``), else None.
    """

    canonical: str
    kind: str
    triple: str
    arch: str
    device: str = "cpu"
    gpu_arch: str | None = None

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` for :attr:`canonical`."""
        import tvm

        return tvm.target.Target(json.loads(self.canonical))


def normalise_arch(arch: str) -> str:
    """``amd64`` -> ``x86_64``, ``arm64`` -> ``aarch64``, others unchanged (lower case)."""
    arch = arch.lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    """The architecture of this machine (``x86_64``, ``aarch64``...)."""
    return normalise_arch(platform.machine())
