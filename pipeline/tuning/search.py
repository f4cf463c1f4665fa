"""The search: :func:`run_tuning` tunes a Relax module with MetaSchedule, measuring candidates locally or on
a tracker's device, and continues a smaller database of its family when it is given one.

While MetaSchedule runs, its own logging goes to a file (:mod:`pipeline.tuning.logs`), progress goes to a
callback after every batch (:mod:`pipeline.tuning.hooks`), signals are noted and raised from our hooks, and
its worker processes are ended however the run ends (:mod:`pipeline.tuning.interrupt`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import BuildError, UsageError
from pipeline.targets import TargetInfo
from pipeline.threads import default_threads_here
from pipeline.tuning.apply import prepare
from pipeline.tuning.family import BaseTuning
from pipeline.tuning.interrupt import (
    TuningInterrupted,
    _interruptible,
    _noting_interrupts,
    _own_workers,
    _workers_in_own_group,
)
from pipeline.tuning.logs import _MS_LOG, _meta_schedule_logs
from pipeline.store.layout import RECORD_FILE, TUNING_DATABASE_FILES, WORKLOAD_FILE
from pipeline.tuning.result import (
    TuningReport,
    estimate_ms,
    format_latency,
    has_converged,
    report_tasks,
)
from pipeline.tuning.session import _Session
from pipeline.tuning.space import (
    LOCAL_RUNNER,
    TuningSpace,
    _parse_runner,
    check_request,
    space_for,
    tuning_num_cores,
    tuning_target,
)

if TYPE_CHECKING:
    import tvm

log = logging.getLogger("pipeline.tuning")  # one logger for the package: its lines read as one stage's

_SEED = 0
_MAX_TRIALS_PER_ROUND = 64
_BUILD_TIMEOUT_S = 60.0
_RUN_TIMEOUT_S = 60.0
_TOP_K_ALL = 1 << 30


def _light_tensor_intrin(arch: str) -> None:
    """Import only the tensor intrinsics of ``arch`` where MetaSchedule imports all of them.

    ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, which registers the intrinsics of every
    backend (CUDA alone takes 11 s, all of them 17 s here). A CPU target needs its own architecture's
    only, so the package is registered empty and just that submodule imported; other submodules still
    import on demand, and a later call for another architecture imports that one's.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    package = sys.modules.get(name)
    if package is None:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return
        package = types.ModuleType(name)
        package.__spec__, package.__file__ = spec, spec.origin
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = name
        sys.modules[name] = package
        setattr(importlib.import_module("tvm.s_tir"), "tensor_intrin", package)
    # Another architecture's intrinsics may be needed later in this process (a fleet, an aarch64 build after an
    # x86_64 one): each call imports its own (a no-op when already imported).
    submodule = {"x86_64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm_cpu", "arm": "arm_cpu",
                 "armv7": "arm_cpu", "armv7a": "arm_cpu", "riscv64": "riscv_cpu"}.get(arch)
    if submodule:
        setattr(package, submodule, importlib.import_module(f"{name}.{submodule}"))


#: The CPU schedule rule TVM's max-pooling kernels name (their ``schedule_rule`` annotation), which TVM 0.27 does
#: not register.
_POOL_MAX_RULE = "s_tir.meta_schedule.cpu.meta_schedule.pool_max"


def _register_missing_rules() -> None:
    """Register the CPU schedule rule that TVM's pooling kernels ask for, as "leave the kernel as written".

    MetaSchedule leaves a kernel that names an unregistered rule as written anyway, but prints a C++ warning on
    stderr for every design space of it (ResNet-18's max-pooling: on every build and tuning). The same
    behaviour, registered, is silent. A registration that exists already (a later TVM's) is kept.
    """
    import tvm

    if tvm.get_global_func(_POOL_MAX_RULE, allow_missing=True) is None:
        tvm.register_global_func(_POOL_MAX_RULE)(lambda sch, _block: [sch])


def _warn_without_cpu(target: TargetInfo) -> None:
    if "mcpu" not in json.loads(target.canonical):
        log.warning(
            "tune: the target %s names no CPU, so the schedules use the architecture's baseline instructions "
            "(no AVX on x86_64); for this machine's CPU tune and build with --target \"llvm -mcpu=native\"",
            target.canonical,
        )


def _f_build():
    """MetaSchedule's build function without ``import tvm.s_tir.tensor_intrin``.

    TVM's default imports it in every builder worker (23 s here, against a 30 s timeout); float32 CPU
    schedules need no tensor intrinsics. A closure, so cloudpickle sends it by value (the worker does not
    import this module, nor Prefect).
    """

    def f_build(mod: Any, target: Any, _params: Any) -> Any:
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return f_build


def _make_runner(runner: str) -> Any:
    from tvm.s_tir import meta_schedule as ms

    tracker = _parse_runner(runner)
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
    if tracker is None:
        # Its workers measure with TVM's pool on every core (the schedules are made for them), not on the half
        # of the logical CPUs TVM takes on x86-64 by default (pipeline/threads.py).
        default_threads_here()
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=_RUN_TIMEOUT_S)
    host, port, key = tracker
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(_RUN_TIMEOUT_S)
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def _known_candidates(database: Any, mods: list[Any], replay: bool = True) -> tuple[list[set[int]], dict[int, float]]:
    """Per task: the structural hashes of the candidates the database measured, and the best latency (s).

    Args:
        replay: compute the hashes (replaying every record's trace); False gives empty sets.
    """
    import tvm_ffi

    known: list[set[int]] = []
    best: dict[int, float] = {}
    unreplayable = 0
    for i, mod in enumerate(mods):
        hashes: set[int] = set()
        if database.has_workload(mod):
            records = database.get_top_k(database.commit_workload(mod), _TOP_K_ALL if replay else 1)
            for record in records if replay else ():
                try:
                    hashes.add(tvm_ffi.structural_hash(record.as_measure_candidate().sch.mod))
                except Exception:  # noqa: BLE001 - a record that no longer replays is just not skipped
                    unreplayable += 1
            costs = [sum(float(c) for c in r.run_secs) / len(r.run_secs) for r in records if r.run_secs]
            if costs:
                best[i] = min(costs)
        known.append(hashes)
    if unreplayable:
        log.warning("tune: %d records of the earlier database do not replay; the search may measure them again",
                    unreplayable)
    return known, best


def _warm_cost_model(cost_model: Any, database: Any, contexts: list[Any]) -> int:
    """Train the cost model on the database's measured records, as if this run had measured them."""
    from tvm.s_tir import meta_schedule as ms

    taught = 0
    for context in contexts:
        if not database.has_workload(context.mod):
            continue
        records = database.get_top_k(database.commit_workload(context.mod), _TOP_K_ALL)
        pairs = []
        for record in records:
            try:
                pairs.append((record.as_measure_candidate(), ms.runner.RunnerResult([float(c) for c in record.run_secs], None)))
            except Exception as exc:  # noqa: BLE001 - a record that no longer replays is not taught
                log.debug("tune: a record of %s does not replay: %s", context.task_name, exc)
        if pairs:
            cost_model.update(context, [c for c, _ in pairs], [r for _, r in pairs])
            taught += len(pairs)
    return taught


@dataclass(frozen=True)
class _Search:
    """What one run searches with: a context per task, the database, the cost model and the shared state.

    Attributes:
        mods: each task's kernel. per_round: trials per task in a search round. taught: records of the
            database continued from that the cost model was trained on.
    """

    session: _Session
    contexts: list[Any]
    mods: list[Any]
    database: Any
    cost_model: Any
    per_round: int
    taught: int


def run_tuning(
    mod: tvm.IRModule,
    target: TargetInfo,
    trials: int,
    work_dir: Path,
    runner: str = LOCAL_RUNNER,
    num_cores: int | None = None,
    space: TuningSpace | None = None,
    base: BaseTuning | None = None,
    progress: Callable[[float, float, str], None] | None = None,
    log_file: Path | None = None,
) -> TuningReport:
    """Tune ``mod`` for ``target`` up to ``trials`` measurements; write the database files into ``work_dir``.

    Args:
        space: the schedule space (default: the target's, :func:`~pipeline.tuning.space.space_for`).
        base: a database of the same family with fewer trials: it is continued (its records are kept,
            taught to the cost model and seed the search; what it measured is not measured again), and
            only ``trials - base.trials`` new candidates are measured.
        progress: called as ``progress(done, total, detail)`` once the tasks are known and after every
            measured batch (e.g. :meth:`tasks.progress.Progress.update`).
        log_file: where MetaSchedule's own logging goes (none of it reaches the caller's log handlers).

    Raises:
        UsageError: ``trials`` < 1 or a malformed ``runner``.
        BuildError: MetaSchedule failed.
        TuningInterrupted: SIGINT or SIGTERM during the search; MetaSchedule's worker processes are ended, and
            the database in ``work_dir`` holds what was measured, reported by the exception's ``partial``
            as a tuning of that many trials. (A KeyboardInterrupt before the search started: nothing.)
    """
    check_request(trials, runner)
    reused = base.trials if base is not None else 0
    if reused >= trials:
        raise ValueError(f"the base tuning has {reused} trials, not fewer than {trials}")
    _warn_without_cpu(target)
    space = space or space_for(target)
    _light_tensor_intrin(target.arch)
    _register_missing_rules()
    cores = num_cores or tuning_num_cores(target)
    tvm_target = tuning_target(target, cores)
    start = time.perf_counter()
    if base is not None:
        for name in TUNING_DATABASE_FILES:
            (work_dir / name).write_bytes(base.database[name])
    with _meta_schedule_logs(log_file):
        search = _start_search(mod, tvm_target, work_dir, trials, base, cores, space, progress)
        log.info(
            "tune: %d tasks, %d trials (%s%d per task in the first round), %d cores, runner %s, space %s",
            len(search.mods), trials, f"{reused} reused, {trials - reused} new, " if base is not None else "",
            search.per_round, cores, runner, space.name,
        )
        if base is not None:
            log.info("tune: continuing from %s: %d records taught to the cost model, %s",
                     base.key[:16], search.taught, search.session.estimate_text())
        search.session.report_progress()
        try:
            _search(search, work_dir, runner, space, target)
        except KeyboardInterrupt as exc:
            partial = _measured_so_far(search, work_dir, trials, base, time.perf_counter() - start, runner, cores,
                                       space)
            raise TuningInterrupted(str(exc), partial) from exc
        _, final_best = _known_candidates(search.database, search.mods, replay=False)
    return _report(search.session, final_best, work_dir, trials, base, time.perf_counter() - start, runner, cores,
                   space)


def _start_search(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, work_dir: Path, trials: int, base: BaseTuning | None,
    cores: int, space: TuningSpace, progress: Callable[[float, float, str], None] | None,
) -> _Search:
    """Prepare ``mod``, extract its tasks, open the database in ``work_dir`` and set up a context per task."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning.hooks import Strategy

    reused = base.trials if base is not None else 0
    budget = trials - reused
    prepared = prepare(mod, tvm_target, space)
    extracted = ms.relax_integration.extract_tasks(prepared, tvm_target, module_equality=space.equality)
    names = [t.task_name for t in extracted]
    weights = [float(t.weight) for t in extracted]
    per_round = max(1, min(_MAX_TRIALS_PER_ROUND, budget // max(1, len(extracted))))
    database = ms.database.JSONDatabase(
        path_workload=str(work_dir / WORKLOAD_FILE), path_tuning_record=str(work_dir / RECORD_FILE),
        module_equality=space.equality,
    )
    mods = [t.dispatched[0] for t in extracted]
    known, best = _known_candidates(database, mods) if base is not None else ([set()] * len(mods), {})
    session = _Session(names, weights, budget, best, known, progress)
    evolutionary = ms.search_strategy.EvolutionarySearch
    # Our own TuneContexts: MetaSchedule's helper configures per-task log files through logging.dictConfig,
    # which fails on the second tuning in one process. A continuation searches with other seeds.
    contexts = [
        ms.TuneContext(
            mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
            search_strategy=Strategy(session, evolutionary(population_size=space.population), i),
            task_name=t.task_name, logger=_MS_LOG, rand_state=seed, num_threads=cores,
        ).clone()
        for i, (t, seed) in enumerate(zip(extracted, ms.utils.fork_seed(_SEED + reused, n=len(extracted))))
    ]
    cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores, tree_method="auto")
    taught = _warm_cost_model(cost_model, database, contexts) if base is not None else 0
    return _Search(session, contexts, mods, database, cost_model, per_round, taught)


def _search(search: _Search, work_dir: Path, runner: str, space: TuningSpace, target: TargetInfo) -> None:
    """Run MetaSchedule's search; its records go to the database in ``work_dir``.

    Raises:
        BuildError: MetaSchedule failed.
        KeyboardInterrupt: a signal was noted during the run.
    """
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning.hooks import Builder, Callback, Runner, _task_scheduler

    session, budget = search.session, search.session.budget
    # From here a signal is only noted (see _noting_interrupts), also while the builder's and runner's
    # constructors start their first workers.
    with _noting_interrupts(session), _workers_in_own_group(session), _own_workers(session):
        try:
            # Their constructors start worker processes and wait for them (seconds: each imports TVM): waited
            # for interruptibly, like the hooks' waits.
            inner_runner = _interruptible(session, lambda: _make_runner(runner))
            session.pools.append(getattr(inner_runner, "pool", None))
            builder = Builder(session, _interruptible(
                session, lambda: ms.builder.LocalBuilder(f_build=_f_build(), timeout_sec=_BUILD_TIMEOUT_S)))
            ms.tune.tune_tasks(
                tasks=search.contexts,
                task_weights=session.weights,
                work_dir=str(work_dir),
                max_trials_global=budget,
                max_trials_per_task=budget,
                num_trials_per_iter=search.per_round,
                builder=builder,
                runner=Runner(session, inner_runner),
                database=search.database,
                cost_model=search.cost_model,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Callback(session)],
                task_scheduler=_task_scheduler(space.scheduler, session),
                module_equality=space.equality,
            )
            session.raise_if_interrupted()  # a signal during the last search round: no hook ran after it
        except UsageError:
            raise
        except Exception as exc:
            if session.interrupted is not None:
                raise KeyboardInterrupt(f"signal {session.interrupted}") from exc
            text = str(exc).strip()
            raise BuildError(
                f"MetaSchedule tuning for {target.canonical} failed: "
                f"{text.splitlines()[-1] if text else type(exc).__name__}"
            ) from exc


def _measured_so_far(
    search: _Search, work_dir: Path, budget: int, base: BaseTuning | None, seconds: float, runner: str,
    cores: int, space: TuningSpace,
) -> TuningReport | None:
    """The report of what an interrupted run measured, as a tuning of that many trials (the reused ones and
    the new ones whose results came back); None when it measured nothing new or cannot say."""
    session = search.session
    if session.measured <= 0:
        return None
    try:
        _, best = _known_candidates(search.database, search.mods, replay=False)
        trials = (base.trials if base is not None else 0) + min(session.measured, session.budget)
        report = _report(session, best, work_dir, trials, base, seconds, runner, cores, space, finished=False)
    except Exception as exc:  # noqa: BLE001 - an interrupt must not end in another error
        log.warning("tune: what the interrupted tuning measured cannot be kept: %s", exc)
        return None
    return dataclasses.replace(report, interrupted_budget=budget, converged=False)


def _report(
    session: _Session, best: dict[int, float], work_dir: Path, trials: int, base: BaseTuning | None,
    seconds: float, runner: str, cores: int, space: TuningSpace, finished: bool = True,
) -> TuningReport:
    """The report of a run (logged when ``finished``), ``best`` being each task's best latency over the whole
    database."""
    tasks = report_tasks(session.names, session.weights, best)
    estimate = estimate_ms(tasks)
    records = sum(1 for _ in open(work_dir / RECORD_FILE)) if (work_dir / RECORD_FILE).exists() else 0
    history = [*(base.history if base is not None else ()),
               {"trials": trials, "estimated_ms": estimate, "seconds": round(seconds, 3)}]
    converged = has_converged(history)
    (log.info if finished else log.debug)(
        "tune: done in %.0f s, %d new trials (%d proposed again and skipped), %d records, estimated %s per "
        "inference%s", seconds, session.generated, session.skipped, records,
        format_latency(estimate / 1e3 if estimate is not None else None),
        "; converged: the last two increments gained less than 1 %" if converged else "",
    )
    reused = base.trials if base is not None else 0
    return TuningReport(
        trials=trials, trials_reused=reused, trials_new=trials - reused, measured=records, tasks=tasks,
        seconds=round(seconds, 3), runner=runner, num_cores=cores, space=space.name, estimated_ms=estimate,
        base=base.key if base is not None else None, history=history, converged=converged,
    )
