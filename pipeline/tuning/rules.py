"""Schedules without search: MetaSchedule's schedule rules applied to every kernel, nothing measured.

TVM 0.27's default CPU pipeline applies no schedules at all: every kernel runs as written, on one core,
without vectors. The untuned default build (``schedules="rules"``) instead gives each kernel one schedule from
MetaSchedule's CPU schedule rules (multi-level tiling, parallel loops, vectorisation, unrolling, the weights'
layout rewrite) with the rules' own random choices drawn from a fixed seed, in the schedule space tunings
search (:data:`~pipeline.tuning.space.DEFAULT_SPACE`, NHWC). Nothing is built or measured to choose it, so it
costs no search; a tuning (``--tune-trials``) measures candidates and replaces it.

The drawn schedules make an untuned model several times faster than TVM's unscheduled build, with the same
outputs up to rounding, for a longer first build (the NHWC weights are folded and prepacked, and the scheduled
kernels take longer to compile), once per build key. NHWC rather than NCHW: in NCHW the rules gave a slower
model (though a shorter preparation), and one kernel rejected its task's schedule. The other cheap option, a
first tuning of one trial per task, gave a model no faster and took far longer than a default may cost. GPU
targets are not scheduled here (their build applies TVM's GPU schedules).

(measurements: docs/performance.md#the-untuned-default-rule-based-schedules)
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.targets import TargetInfo
from pipeline.tuning.apply import _finish, prepare
from pipeline.tuning.logs import _MS_LOG, _meta_schedule_logs
from pipeline.store.layout import RECORD_FILE, WORKLOAD_FILE
from pipeline.tuning.search import _light_tensor_intrin, _register_missing_rules
from pipeline.tuning.space import TuningSpace, space_for, tuning_num_cores, tuning_target

if TYPE_CHECKING:
    import tvm

log = logging.getLogger("pipeline.tuning")

#: The version of this module's choices (seed, tries, space); part of the build key of a rules build.
RULES_VERSION = 1
_SEED = 0
_UNMEASURED_S = 1.0
_TRIES = 4  # draws per kernel until the rules' postprocessors accept one (one suffices for every kernel seen)


def rules_inputs(target: TargetInfo) -> str:
    """What keys a rules build beside the model and target: this code's version, the space and the cores."""
    return f"rules-v{RULES_VERSION},{space_for(target).name},cores={tuning_num_cores(target)},seed={_SEED}"


def schedule_with_rules(mod: tvm.IRModule, target: TargetInfo) -> tvm.IRModule:
    """``mod`` (as imported) with one schedule from MetaSchedule's CPU rules on every kernel, ready to compile.

    A kernel for which no draw passes the rules' postprocessors is left unscheduled (logged).
    """
    from tvm.s_tir import meta_schedule as ms

    space = space_for(target)
    tvm_target = tuning_target(target, tuning_num_cores(target))
    prepared = prepare(mod, tvm_target, space)
    with tempfile.TemporaryDirectory(prefix="tvmrp-rules-") as work, _meta_schedule_logs(None):
        database = ms.database.JSONDatabase(
            path_workload=str(Path(work) / WORKLOAD_FILE), path_tuning_record=str(Path(work) / RECORD_FILE),
            module_equality=space.equality,
        )
        commit_rule_schedules(prepared, target, tvm_target, space, database)
        return _finish(prepared, tvm_target, Path(work), space)


def commit_rule_schedules(prepared: tvm.IRModule, target: TargetInfo, tvm_target: tvm.target.Target,
                          space: TuningSpace, database: Any) -> int:
    """Draw one schedule from the rules for every task of the ``prepared`` module that ``database`` holds no
    workload of, and commit it there (a record with a stand-in run time: nothing is measured).

    Each task draws from its own seed whether or not the others are drawn, so a task's schedule is the same
    with and without records for the other tasks (:mod:`pipeline.tuning.shared`). A task for which no draw
    passes the rules' postprocessors is left unscheduled (logged).

    Returns:
        The number of tasks drawn.
    """
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    _light_tensor_intrin(target.arch)
    _register_missing_rules()
    with _meta_schedule_logs(None):
        tasks = ms.relax_integration.extract_tasks(prepared, tvm_target, module_equality=space.equality)
        drawn, unscheduled = 0, []
        for task, seed in zip(tasks, ms.utils.fork_seed(_SEED, n=len(tasks))):
            kernel = task.dispatched[0]
            if database.has_workload(kernel):
                continue  # scheduled already (a measured record)
            schedule = _draw(kernel, task, seed)
            if schedule is None:
                unscheduled.append(task.task_name)
                continue
            # A record needs a run time to be applied; nothing was measured, and each kernel has one record.
            record = ms.database.TuningRecord(
                schedule.trace, database.commit_workload(kernel), run_secs=[_UNMEASURED_S], target=tvm_target,
                args_info=ms.arg_info.ArgInfo.from_prim_func(kernel["main"]),
            )
            database.commit_tuning_record(record)
            drawn += 1
    if unscheduled:
        log.warning("build: no rule-based schedule for %d kernel(s) (%s); they are built unscheduled",
                    len(unscheduled), ", ".join(unscheduled[:5]))
    log.info("build: %d kernels scheduled by MetaSchedule's rules, no search (%.1f s)",
             drawn, time.perf_counter() - start)
    return drawn


def _draw(kernel: tvm.IRModule, task: object, seed: int) -> object | None:
    """One schedule of ``kernel`` from the rules' design space that every postprocessor accepts, or None."""
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(
        mod=kernel, target=task.target, space_generator="post-order-apply", task_name=task.task_name,  # type: ignore[attr-defined]
        logger=_MS_LOG, rand_state=seed, num_threads=1,
    ).clone()
    generator = context.space_generator
    for attempt in range(_TRIES):
        spaces = generator.generate_design_space(context.mod)  # a fresh draw of the rules' choices each call
        schedule = spaces[attempt % len(spaces)] if spaces else None
        if schedule is not None and all(postproc.apply(schedule) for postproc in generator.postprocs):
            return schedule
    return None
