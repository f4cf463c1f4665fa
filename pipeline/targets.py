"""Turn what users type as a target into a TVM 0.27 ``Target`` and its canonical string.

TVM 0.27 only accepts a bare kind (``"llvm"``) or the JSON/dict form. Users (and the seed script) type the
old CLI form, so we translate it:

    llvm                                         -> {"kind": "llvm"}
    llvm -mtriple=aarch64-linux-gnu -mattr=+neon -> {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    llvm -target=x86_64-pc-linux-gnu             -> {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}  (old alias)
    {"kind": "llvm", "mcpu": "znver4"}           -> as is

``-mcpu=native`` is replaced by the host CPU that LLVM detects (TVM does not resolve ``native`` itself).
The canonical form is TVM's own JSON rendering of the parsed target: it is what the build cache key hashes.
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline.errors import ExportError, TargetError

OPT_LEVELS = (0, 1, 2, 3)

# Old CLI spellings -> TVM 0.27 attribute names.
_ALIASES = {"target": "mtriple"}
# Attributes that TVM 0.27 stores as arrays.
_LIST_ATTRS = {"mattr", "keys", "libs"}
_EXAMPLES = (
    '"llvm", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", '
    '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}\''
)

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
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class TargetInfo:
    """A parsed target.

    Attributes:
        canonical: TVM's JSON rendering of the target; stable, hashed into build keys.
        kind: target kind, e.g. ``"llvm"``.
        triple: the LLVM triple the code is generated for (TVM's default when the user gave none).
        arch: the triple's architecture, normalised (``x86_64``, ``aarch64``, ...).
    """

    canonical: str
    kind: str
    triple: str
    arch: str

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


def _parse_value(key: str, value: str) -> Any:
    if key in _LIST_ATTRS:
        return [v for v in value.split(",") if v]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        return value


def target_dict(text: str) -> dict[str, Any]:
    """Parse a user's target text (CLI form or JSON) into TVM's dict form, without TVM.

    Raises:
        TargetError: empty text, bad JSON, or a flag that is not ``-key=value``.
    """
    text = (text or "").strip()
    if not text:
        raise TargetError(f"the target is empty. Examples: {_EXAMPLES}")
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TargetError(f"target JSON is invalid ({exc}). Examples: {_EXAMPLES}") from None
        if not isinstance(config, dict) or "kind" not in config:
            raise TargetError(f'target JSON needs a "kind" key. Examples: {_EXAMPLES}')
        return config
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise TargetError(f"cannot split target {text!r}: {exc}") from None
    config: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        if not word.startswith("-") or "=" not in word:
            raise TargetError(
                f"cannot parse {word!r} in target {text!r}: options are -key=value. Examples: {_EXAMPLES}"
            )
        key, value = word.lstrip("-").split("=", 1)
        key = _ALIASES.get(key, key)
        config[key] = _parse_value(key, value)
    return config


def parse_target(text: str) -> TargetInfo:
    """Parse and validate a target with TVM; return its canonical form.

    Raises:
        TargetError: TVM cannot parse it, or the CPU name is unknown to LLVM, with the valid forms.
    """
    import tvm

    config = target_dict(text)
    if config.get("kind") == "llvm" and config.get("mcpu") == "native":
        config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    try:
        target = tvm.target.Target(config)
    except Exception as exc:  # TVM raises ValueError / TypeError / its own errors here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"TVM cannot use target {text!r}: {first}. Examples: {_EXAMPLES}") from None
    kind = target.kind.name
    if kind != "llvm":
        raise TargetError(
            f"target kind {kind!r} is not supported by this pipeline (it runs on CPU devices over RPC): "
            f"use an llvm target. Examples: {_EXAMPLES}"
        )
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    mcpu = target.attrs.get("mcpu")
    if mcpu and not tvm.target.codegen.llvm_is_valid_cpu(str(mcpu), triple):
        raise TargetError(
            f"LLVM does not know the CPU {str(mcpu)!r} for {triple}; leave -mcpu out, "
            f"use -mcpu=native for this host, or one of LLVM's names (e.g. cortex-a72, znver4, skylake-avx512)"
        )
    return TargetInfo(canonical=str(target), kind=kind, triple=triple, arch=normalise_arch(triple.split("-")[0]))


def check_opt_level(opt_level: int) -> int:
    """Return ``opt_level`` if it is 0-3.

    Raises:
        TargetError: anything else, listing the valid levels.
    """
    if isinstance(opt_level, bool) or opt_level not in OPT_LEVELS:
        raise TargetError(f"opt_level must be one of 0, 1, 2, 3 (got {opt_level!r})")
    return int(opt_level)


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


@lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    path = shutil.which(compiler) or compiler
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
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
            f"the target {target.triple} is not this machine's architecture ({host_arch()}), so the library must be "
            f"linked with the cross compiler {compiler}, which is not installed. On Debian/Ubuntu: "
            f"apt-get install {package}"
        )
    return Toolchain(compiler, _compiler_identity(compiler), cross=True)
