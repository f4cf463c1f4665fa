"""The C compiler that links a library for a target on this machine (the host's g++, or a cross compiler)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

from pipeline.errors import ExportError, clip
from pipeline.targets.info import TargetInfo, host_arch

# Debian cross compilers by target architecture (the first component of the LLVM triple).
_CROSS = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "arm64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "armv7": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "armv7a": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "riscv64": ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu"),
}


@dataclass(frozen=True)
class Toolchain:
    """The C compiler that links a library for a target.

    Attributes:
        compiler: executable name, e.g. ``"g++"`` (TVM's default) or ``"aarch64-linux-gnu-gcc"``.
        identity: compiler path and first line of ``--version``: part of the export key.
        cross: True when the target architecture is not the host's.
    """

    compiler: str
    identity: str
    cross: bool


@cache
def _compiler_identity(compiler: str) -> str:
    path = shutil.which(compiler) or compiler
    try:
        out = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{path} {out.splitlines()[0] if out else 'unknown version'}"


def toolchain_for(target: TargetInfo) -> Toolchain:
    """The compiler that links libraries for ``target`` on this machine.

    Raises:
        ExportError: the target is foreign and its cross compiler is not installed (names the Debian package).
    """
    if target.arch == host_arch():
        compiler = "g++"
        if not shutil.which(compiler):
            raise ExportError("no C++ compiler found to link the library: install g++ (Debian: apt-get install g++)")
        return Toolchain(compiler, _compiler_identity(compiler), cross=False)
    compiler, package = _CROSS.get(target.arch, (f"{target.arch}-linux-gnu-gcc", f"gcc-{target.arch}-linux-gnu"))
    if not shutil.which(compiler):
        raise ExportError(
            f"the target {clip(target.triple)} is not this machine's architecture ({host_arch()}), so the library "
            f"must be linked with the cross compiler {clip(compiler)}, which is not installed. On Debian/Ubuntu: "
            f"apt-get install {clip(package)}"
        )
    return Toolchain(compiler, _compiler_identity(compiler), cross=True)
