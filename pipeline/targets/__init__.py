"""Targets: what users type, parsed into TVM 0.27 targets and their canonical strings.

:mod:`~pipeline.targets.grammar` is the one grammar of the CLI form (``kind -key=value ...``) and of the JSON
form; :mod:`~pipeline.targets.llvm` checks CPU targets against LLVM, :mod:`~pipeline.targets.cuda` resolves
CUDA targets, :mod:`~pipeline.targets.info` holds :class:`TargetInfo` (no TVM), and
:mod:`~pipeline.targets.toolchain` the linker of a target's libraries.
"""

from pipeline.targets.info import TargetInfo, host_arch, normalise_arch
from pipeline.targets.llvm import OPT_LEVELS, check_llvm_target, check_opt_level, parse_target, target_dict
from pipeline.targets.toolchain import Toolchain, toolchain_for

__all__ = [
    "OPT_LEVELS", "TargetInfo", "Toolchain", "check_llvm_target", "check_opt_level", "host_arch", "normalise_arch",
    "parse_target", "target_dict", "toolchain_for",
]
