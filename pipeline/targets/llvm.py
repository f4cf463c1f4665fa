"""Turn what users type as a target into a TVM 0.27 ``Target`` and its canonical string.

TVM 0.27 only accepts a bare kind (``"llvm"``) or the JSON/dict form. Users type the
old CLI form, so we translate it (:mod:`pipeline.targets.grammar`, the grammar CUDA targets share):

    llvm                                         -> {"kind": "llvm"}
    llvm -mtriple=aarch64-linux-gnu -mattr=+neon -> {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    llvm -target=x86_64-pc-linux-gnu             -> {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}  (old alias)
    {"kind": "llvm", "mcpu": "znver4"}           -> as is

``-mcpu=native`` is replaced by the host CPU that LLVM detects (TVM does not resolve ``native`` itself).
The canonical form is TVM's own JSON rendering of the parsed target: it is what the build cache key hashes.

The triple, ``-mcpu`` and every ``-mattr`` entry are checked against LLVM's own tables before TVM sees the
target (:func:`check_llvm_target`, milliseconds): LLVM itself only warns about an unknown feature, and the
build then fails after seconds with pages of output. Messages echo at most ~200 characters of the input.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from functools import lru_cache
from typing import Any, Iterator

from pipeline.errors import TargetError, clip
from pipeline.targets import grammar
from pipeline.targets.info import TargetInfo, host_arch, normalise_arch

OPT_LEVELS = (0, 1, 2, 3)

_EXAMPLES = (
    '"llvm", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", '
    '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}\''
)


def target_dict(text: str) -> dict[str, Any]:
    """Parse a user's target text (CLI form or JSON) into TVM's dict form, without TVM (the grammar:
    :mod:`pipeline.targets.grammar`).

    Raises:
        TargetError: empty text, bad JSON, unbalanced quotes, or a flag that is not ``-key=value``.
    """
    return grammar.target_dict(text, _EXAMPLES)


@lru_cache(maxsize=64)
def parse_target(text: str) -> TargetInfo:
    """Parse and validate a target with TVM and LLVM; return its canonical form.

    Memoised: the answer depends on the text alone (and this machine, for ``-mcpu=native`` and the default
    triple), and a command line parses its target several times (early check, request, plan). Errors are not
    remembered.

    Raises:
        TargetError: TVM cannot parse it, or LLVM does not know its triple, CPU or a feature (with the
            closest names LLVM knows), or an ``-mattr`` entry has no ``+``/``-``.
    """
    from pipeline.targets.cuda import is_cuda_target, parse_cuda_target

    if is_cuda_target(text):
        return parse_cuda_target(text).target_info()
    from pipeline.lean_import import import_tvm

    tvm = import_tvm()  # the first import of a run: without torch (3.3 s -> 1.0 s)

    config = target_dict(text)
    if config.get("kind") == "llvm":
        check_llvm_target(config)
    try:
        target = tvm.target.Target(config)
    except Exception as exc:  # TVM raises ValueError / TypeError / its own errors here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"TVM cannot use target {clip(text)!r}: {clip(first)}. Examples: {_EXAMPLES}") from None
    kind = target.kind.name
    if kind != "llvm":
        raise TargetError(
            f"target kind {clip(kind)!r} is not supported by this pipeline: use an llvm target (a CPU) or a "
            f'CUDA target (an NVIDIA GPU: "cuda -arch=sm_90", "nvidia/h100"). Examples: {_EXAMPLES}'
        )
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    return TargetInfo(canonical=str(target), kind=kind, triple=triple, arch=normalise_arch(triple.split("-")[0]))


# --- checking an llvm target against LLVM's tables -------------------------------------------------------
#
# TVM 0.27 exposes LLVM's CPU list (llvm_get_cpu_archlist), the features a CPU enables
# (llvm_get_cpu_features) and whether a target has a feature (llvm_cpu_has_feature), but not LLVM's list of
# all feature names. So a feature is known if some CPU of the triple enables it, or if LLVM sets it when
# asked with ``+name`` (LLVM ignores a name it does not know, with a warning). The first set also gives the
# suggestions. LLVM segfaults on the CPU and feature tables of a triple it has no backend for: the triple is
# checked first, with llvm_is_valid_cpu, which does not.

_MAX_UNKNOWN = 5  # stop probing -mattr after this many unknown names (a junk target can have thousands)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null around a probe: LLVM and TVM print their own lines about names
    they do not know, and we report the problem ourselves, in one line. Probes take milliseconds; other
    threads' stderr is lost during them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _llvm_target(triple: str, **attrs: Any) -> Any:
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": triple, **attrs})


@lru_cache(maxsize=64)
def _llvm_knows_triple(triple: str) -> bool:
    from tvm.target import codegen

    # "generic" is a CPU of every LLVM backend that generates code for CPUs.
    with _quiet_stderr():
        return bool(codegen.llvm_is_valid_cpu("generic", triple))


@lru_cache(maxsize=256)
def _llvm_knows_cpu(cpu: str, triple: str) -> bool:
    from tvm.target import codegen

    with _quiet_stderr():
        return bool(codegen.llvm_is_valid_cpu(cpu, triple))


@lru_cache(maxsize=64)
def _llvm_cpus(triple: str) -> tuple[str, ...]:
    """LLVM's CPU names for ``triple`` (a triple LLVM knows)."""
    from tvm.target import codegen

    with _quiet_stderr():
        return tuple(sorted({str(cpu) for cpu in codegen.llvm_get_cpu_archlist(_llvm_target(triple))}))


@lru_cache(maxsize=64)
def _llvm_cpu_features(triple: str) -> frozenset[str]:
    """Every feature that some CPU of ``triple`` enables: LLVM is asked about each of its CPUs, once per triple
    (cached; cost: docs/performance.md#command-line-start-up)."""
    from tvm.target import codegen

    features: set[str] = set()
    with _quiet_stderr():
        for cpu in _llvm_cpus(triple):
            features |= {str(f) for f in codegen.llvm_get_cpu_features(_llvm_target(triple, mcpu=cpu))}
    return frozenset(features)


@lru_cache(maxsize=1024)
def _llvm_knows_feature(triple: str, name: str) -> bool:
    from tvm.target import codegen

    if name in _llvm_cpu_features(triple):
        return True
    if not name or name in ("help", "cpu-help"):  # LLVM prints its help for these instead of a feature
        return False
    try:
        with _quiet_stderr():
            return bool(codegen.llvm_cpu_has_features(name, _llvm_target(triple, mattr=[f"+{name}"])))
    except Exception:  # a name TVM cannot even put in a target is no feature either
        return False


def _closest(word: str, choices: Any, prefix: str = "") -> str:
    """The three names of ``choices`` closest to ``word`` (difflib), comma-separated."""
    matches = difflib.get_close_matches(word[:64], sorted(str(c) for c in choices), n=3, cutoff=0.0)
    return ", ".join(prefix + m for m in matches)


def _triple_arch(triple: str) -> str:
    return normalise_arch(triple.split("-")[0])


def check_llvm_target(config: dict[str, Any]) -> None:
    """Check an llvm target's triple, ``mcpu`` and ``mattr`` against LLVM before TVM builds anything.

    ``mcpu=native`` is replaced (in ``config``) by the host CPU. Attributes of other types than TVM's (a
    non-string triple, a string ``mattr``...) are left to TVM's own check, which follows.

    Raises:
        TargetError: one line naming the unknown triple, CPU or features with LLVM's closest names, or an
            ``mattr`` entry without ``+``/``-``.
    """
    from tvm.target import codegen

    triple = config.get("mtriple")
    if triple is not None and not isinstance(triple, str):
        return
    if not triple:
        triple = str(codegen.llvm_get_system_triple())
    mcpu = config.get("mcpu")
    if mcpu == "native":
        mcpu = config["mcpu"] = str(codegen.llvm_get_system_cpu())
        if _triple_arch(triple) != host_arch():
            raise TargetError(
                f"-mcpu=native means this host's CPU ({mcpu}, {host_arch()}), which cannot run code for "
                f"{clip(triple)!r}: give the device's CPU name (e.g. -mcpu=cortex-a72), or leave -mcpu out"
            )
    if not _llvm_knows_triple(triple) and not (isinstance(mcpu, str) and mcpu and _llvm_knows_cpu(mcpu, triple)):
        arch = triple.split("-")[0]
        raise TargetError(
            f"LLVM cannot generate code for the triple {clip(triple)!r}: it has no backend for the architecture "
            f"{clip(arch, 60)!r} (closest: {_closest(arch, codegen.llvm_get_targets())}). "
            "Give a triple such as x86_64-linux-gnu or aarch64-linux-gnu"
        )
    if isinstance(mcpu, str) and mcpu and not _llvm_knows_cpu(mcpu, triple):
        raise TargetError(
            f"LLVM does not know the CPU {clip(mcpu)!r} for {clip(triple)} (closest: "
            f"{_closest(mcpu, _llvm_cpus(triple))}); leave -mcpu out, use -mcpu=native for this host, "
            "or one of LLVM's names"
        )
    mattr = config.get("mattr")
    if isinstance(mattr, list) and all(isinstance(entry, str) for entry in mattr):
        _check_mattr(mattr, triple)


def _check_mattr(mattr: list[str], triple: str) -> None:
    """Every ``-mattr`` entry is ``+feature`` or ``-feature`` with a feature LLVM knows for ``triple``."""
    unknown: list[str] = []
    unsigned: list[str] = []
    for entry in mattr:
        name = entry[1:] if entry[:1] in ("+", "-") else entry
        if not name:
            raise TargetError(
                f"-mattr has an entry {entry!r} that names no feature: each entry is +feature (enable) or "
                "-feature (disable), separated by commas, e.g. -mattr=+avx2,+fma"
            )
        if not _llvm_knows_feature(triple, name):
            unknown.append(name)
            if len(unknown) >= _MAX_UNKNOWN:
                break
        elif entry[:1] not in ("+", "-"):
            unsigned.append(name)
    if unknown:
        shown = "; ".join(
            f"{clip(name, 60)!r} (closest: {_closest(name, _llvm_cpu_features(triple), '+')})" for name in unknown[:3]
        )
        more = " and others" if len(unknown) > 3 else ""
        raise TargetError(
            f"LLVM does not know the -mattr feature{'s' if len(unknown) > 1 else ''} {shown}{more} for "
            f"{clip(triple)}. Each -mattr entry is +feature (enable) or -feature (disable), e.g. "
            "-mattr=+avx2,+fma or -mattr=+neon"
        )
    if unsigned:
        name = unsigned[0]
        raise TargetError(
            f"-mattr entry {clip(name, 60)!r} needs a sign: +{clip(name, 60)} enables the feature, "
            f"-{clip(name, 60)} disables it"
        )


def check_opt_level(opt_level: int) -> int:
    """Return ``opt_level`` if it is 0-3.

    Raises:
        TargetError: anything else, listing the valid levels.
    """
    if isinstance(opt_level, bool) or opt_level not in OPT_LEVELS:
        raise TargetError(f"opt_level must be one of 0, 1, 2, 3 (got {opt_level!r})")
    return int(opt_level)
