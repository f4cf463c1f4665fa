"""TVM's CPU thread pool in the processes this project starts: one thread per physical core.

TVM sizes its pool from ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the logical CPUs, halved on x86-64
on the assumption that every core runs two hardware threads (``MaxConcurrency`` in TVM's threading backend).
Where each core runs one thread, as on most cloud VMs (2 vCPUs reported as 2 cores of 1 thread), the halving
leaves half the cores idle: TVM ran on one thread of a 2-core machine while onnxruntime and torch used both,
and a tuning measured its candidates on one thread for schedules made for two cores.

The processes this project starts therefore get ``TVM_NUM_THREADS`` = the physical cores unless the user set
``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS``: the embedded and emulated devices (:mod:`pipeline.device.servers`),
the local runner's measuring workers of a tuning (:mod:`pipeline.tuning.search`), and the device bundle's
``start-device.sh`` (which counts the cores itself, from sysfs). With hyperthreading the physical cores are
what TVM takes anyway; on ARM, TVM takes every CPU, which is the same count. ``--threads N`` still sets the pool
for one run, up to that size (docs/performance.md#stable-numbers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_ENV = "TVM_NUM_THREADS"
"""The variable TVM reads first; ``OMP_NUM_THREADS`` is its fallback."""


def physical_cores() -> int:
    """The physical cores of this machine (logical CPUs when they cannot be told apart)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a locked dependency
        return os.cpu_count() or 1


def user_threads(env: Mapping[str, str]) -> bool:
    """Whether ``env`` sets TVM's pool itself (``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS``)."""
    return bool(env.get(THREADS_ENV) or env.get("OMP_NUM_THREADS"))


def with_tvm_threads(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process that runs TVM's CPU runtime: ``TVM_NUM_THREADS`` = the physical cores unless ``env``
    sets the pool itself."""
    out = dict(env)
    if not user_threads(out):
        out[THREADS_ENV] = str(physical_cores())
    return out


def default_threads_here() -> None:
    """Give this process's environment (so every process it starts later, e.g. a tuning's measuring workers)
    ``TVM_NUM_THREADS`` = the physical cores, unless it sets the pool itself. The pool of this process's own TVM
    runtime is not changed when it already exists."""
    if not user_threads(os.environ):
        os.environ[THREADS_ENV] = str(physical_cores())
