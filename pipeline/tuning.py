"""MetaSchedule tuning: the schedule space, tuning a Relax module, applying a tuning database.

TVM 0.27's default CPU pipeline applies no schedules; MetaSchedule searches a schedule for every fused
kernel (a "task") and measures candidates on the device. The result is the tuning database (MetaSchedule's
two JSON files). The ``tune`` stage (:mod:`tasks.tune`) stores it as an artifact next to ``tuning.json``
(tuning time, tasks, trials, best measured latency per task); ``build`` applies it (:func:`apply_tuning`).

Keyed (:func:`tune_inputs`) by model digest, canonical target, trial budget, the core count the schedules
are made for, TVM version and our tuning code version (which names the schedule space, :data:`SPACE`).
Where candidates are measured (locally or on a tracker's device) is recorded but not part of the key: the
target says what the schedules are for.

The schedule space, chosen by measuring ResNet-18 v2 (random weights, ``llvm -mcpu=native``, 64 trials) on
the 2-core Zen 5 development machine:

* TVM's ``static_shape_tuning`` preparation (inference ops decomposed, legalised, fused) with CPU weight
  prepacking: the constant weights are laid out for each tuned kernel at build time, so the model's
  interface does not change (73.6 ms after 180 s; without prepacking 78.7 ms after 162 s);
* ``anchor-block`` task equality: kernels around the same convolution share one task (20 tasks instead of
  28; structural: 125.8 ms after 241 s);
* evolutionary search with a population of 64 instead of TVM's 512: one search round of a convolution
  takes ~5 s instead of ~40 s on 2 cores, which at these budgets is the dominant cost;
* every task measured in the first round (trials per round = budget / tasks, at most 64), then TVM's
  gradient task scheduler spends the rest where the latency is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import keys
from pipeline.errors import BuildError, StoreError, UsageError
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import TargetInfo

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)
_MS_LOG = logging.getLogger(f"{__name__}.meta_schedule")  # MetaSchedule's per-task chatter (DEBUG)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
REPORT_FILE = "tuning.json"
DATABASE_FILES = (WORKLOAD_FILE, RECORD_FILE)

LOCAL_RUNNER = "local"
_SEED = 0
_MAX_TRIALS_PER_ROUND = 64
_BUILD_TIMEOUT_S = 60.0
_RUN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TuningSpace:
    """How the module is prepared and searched (see :data:`SPACE`; other values are for experiments).

    Attributes:
        prepack: lay the constant weights out for each tuned kernel (``cpu_weight_prepack``).
        population: the evolutionary search's population size (TVM's default is 512).
        equality: how MetaSchedule tells tasks apart: ``"structural"`` (every fused kernel is a task) or
            ``"anchor-block"`` (kernels with the same main block, e.g. one convolution with different fused
            epilogues, share a task and its schedule).
    """

    prepack: bool = True
    population: int = 64
    equality: str = "anchor-block"

    @property
    def name(self) -> str:
        """A stable name of the space, part of the tuning key."""
        return (
            f"static-shape{'+prepack' if self.prepack else ''},{self.equality},population={self.population}"
        )


DEFAULT_SPACE = TuningSpace()
#: The schedule space this code searches; part of the tuning key.
SPACE = DEFAULT_SPACE.name


def default_num_cores() -> int:
    """The physical cores of this machine (what the local runner measures on)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a locked dependency
        return os.cpu_count() or 1


def tuning_num_cores(target: TargetInfo) -> int:
    """Cores the schedules are made for: the target's ``num-cores`` if it has one, else this machine's."""
    value = json.loads(target.canonical).get("num-cores")
    return int(value) if value else default_num_cores()


def tracker_runner(tracker: str, key: str) -> str:
    """The ``runner`` text that measures on the device registered as ``key`` at ``tracker`` (``HOST:PORT``)."""
    return f"{tracker}/{key}"


def _parse_runner(runner: str) -> tuple[str, int, str] | None:
    """None for the local runner, else ``(tracker_host, tracker_port, key)``.

    Raises:
        UsageError: neither ``local`` nor ``HOST:PORT/KEY``.
    """
    if runner == LOCAL_RUNNER:
        return None
    from pipeline.device import DeviceSpec

    tracker, sep, key = str(runner).rpartition("/")
    if not sep or not key:
        raise UsageError(f"tuning runner {runner!r} is neither 'local' nor TRACKER_HOST:PORT/KEY")
    host, port = DeviceSpec(tracker=tracker, key=key).tracker_address
    return host, port, key


def tuning_target(target: TargetInfo, num_cores: int) -> tvm.target.Target:
    """The target MetaSchedule tunes for: the build target with ``num-cores`` (its schedule rules need it)."""
    import tvm

    return tvm.target.Target({**json.loads(target.canonical), "num-cores": int(num_cores)})


def prepare(mod: tvm.IRModule, target: tvm.target.Target, space: TuningSpace = DEFAULT_SPACE) -> tvm.IRModule:
    """The module as MetaSchedule sees it: the passes of TVM's ``static_shape_tuning`` pipeline before tuning.

    Tuning and :func:`apply_tuning` both start from this, so the database's workloads match the kernels.
    """
    import tvm
    from tvm import relax

    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.pipeline.zero_pipeline(),
    ]
    if space.prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _finish(mod: tvm.IRModule, target: tvm.target.Target, database_dir: Path, space: TuningSpace) -> tvm.IRModule:
    """Apply the database in ``database_dir`` to a prepared module (then the weight prepacking)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(
        path_workload=str(database_dir / WORKLOAD_FILE), path_tuning_record=str(database_dir / RECORD_FILE),
        module_equality=space.equality,
    )
    with target, database:
        passes = [relax.transform.MetaScheduleApplyDatabase()]
        if space.prepack:
            # Constant weights: the layout rewrite is folded into new constants at build time.
            passes += [
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
            ]
        return tvm.transform.Sequential(passes)(mod)


def apply_tuning(mod: tvm.IRModule, tuning: Artifact, store: ArtifactStore) -> tvm.IRModule:
    """The imported ``mod`` with the schedules of the ``tuning`` artifact applied (what ``build`` compiles).

    The database files are copied first: MetaSchedule's JSON database appends to its files when it is
    queried, and the stored copy must stay byte-identical to its manifest.

    Raises:
        StoreError: the tuning artifact is missing or corrupt.
    """
    if store.get(tuning.key) is None:
        raise StoreError(f"the tuning database {tuning.key} vanished from the store; run again")
    inputs = tuning.inputs
    space = TuningSpace(**inputs.get("space_options", {}))
    import tvm

    target = tvm.target.Target(json.loads(inputs["tuning_target"]))
    with tempfile.TemporaryDirectory(prefix="tvmrp-apply-") as work:
        for name in DATABASE_FILES:
            shutil.copyfile(store.file(tuning, name), Path(work) / name)
        return _finish(prepare(mod, target, space), target, Path(work), space)


def _light_tensor_intrin(arch: str) -> None:
    """Import only the tensor intrinsics of ``arch`` where MetaSchedule imports all of them.

    ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, which registers the intrinsics of every
    backend (CUDA alone takes 11 s, all of them 17 s here). A CPU target needs its own architecture's
    only, so the package is registered empty and just that submodule imported; other submodules still
    import on demand. Does nothing when the package is already imported.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name)
    package.__spec__, package.__file__ = spec, spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    setattr(importlib.import_module("tvm.s_tir"), "tensor_intrin", package)
    submodule = {"x86_64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm_cpu", "arm": "arm_cpu",
                 "armv7": "arm_cpu", "armv7a": "arm_cpu", "riscv64": "riscv_cpu"}.get(arch)
    if submodule:
        setattr(package, submodule, importlib.import_module(f"{name}.{submodule}"))


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
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=_RUN_TIMEOUT_S)
    host, port, key = tracker
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(_RUN_TIMEOUT_S)
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def _progress_callback(names: list[str], trials: int) -> Any:
    """A measure callback that logs each round: task, trials so far, the task's best latency."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state = {"measured": 0, "start": time.perf_counter()}
    best: dict[int, float] = {}

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            state["measured"] += len(runner_results)
            costs = [
                sum(float(c) for c in r.run_secs) / len(r.run_secs)
                for r in runner_results
                if r.error_msg is None and r.run_secs
            ]
            if costs:
                best[task_id] = min(best.get(task_id, math.inf), min(costs))
            failed = sum(1 for r in runner_results if r.error_msg is not None)
            log.info(
                "tune: %d/%d trials, %.0f s: task %d/%d %s: %d measured (%d failed), best %.3f ms",
                state["measured"], trials, time.perf_counter() - state["start"], task_id + 1, len(names),
                names[task_id], len(runner_results), failed, best.get(task_id, math.nan) * 1e3,
            )

    return _Progress(), best


@dataclass(frozen=True)
class TuningReport:
    """What a tuning run did (stored as ``tuning.json`` in the artifact).

    Attributes:
        trials: the trial budget. measured: trials actually measured (successful or not).
        tasks: the tuned kernels with their weight (uses per inference) and best measured latency (ms).
        seconds: wall time of the tuning. runner: where candidates were measured.
        estimated_ms: sum over tasks of weight x best latency (tasks never measured count as NaN).
    """

    trials: int
    measured: int
    tasks: list[dict[str, Any]]
    seconds: float
    runner: str
    num_cores: int
    space: str
    estimated_ms: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_request(trials: int, runner: str) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"tuning needs a trial budget of 1 or more (got {trials!r}); 0 means no tuning")
    _parse_runner(runner)


def run_tuning(
    mod: tvm.IRModule,
    target: TargetInfo,
    trials: int,
    work_dir: Path,
    runner: str = LOCAL_RUNNER,
    num_cores: int | None = None,
    space: TuningSpace = DEFAULT_SPACE,
) -> TuningReport:
    """Tune ``mod`` for ``target`` with ``trials`` measurements; write the database files into ``work_dir``.

    Raises:
        UsageError: ``trials`` < 1 or a malformed ``runner``.
        BuildError: MetaSchedule failed.
    """
    check_request(trials, runner)
    from tvm.s_tir import meta_schedule as ms

    if "mcpu" not in json.loads(target.canonical):
        log.warning(
            "tune: the target %s names no CPU, so the schedules use the architecture's baseline instructions "
            "(no AVX on x86_64); for this machine's CPU tune and build with --target \"llvm -mcpu=native\"",
            target.canonical,
        )
    _light_tensor_intrin(target.arch)
    cores = num_cores or tuning_num_cores(target)
    tvm_target = tuning_target(target, cores)
    start = time.perf_counter()
    prepared = prepare(mod, tvm_target, space)
    extracted = ms.relax_integration.extract_tasks(prepared, tvm_target, module_equality=space.equality)
    names = [t.task_name for t in extracted]
    per_round = max(1, min(_MAX_TRIALS_PER_ROUND, trials // max(1, len(extracted))))
    log.info(
        "tune: %d tasks, %d trials (%d per task in the first round), %d cores, runner %s, space %s",
        len(extracted), trials, per_round, cores, runner, space.name,
    )
    progress, best = _progress_callback(names, trials)
    database = ms.database.JSONDatabase(
        path_workload=str(work_dir / WORKLOAD_FILE), path_tuning_record=str(work_dir / RECORD_FILE),
        module_equality=space.equality,
    )
    # Our own TuneContexts: MetaSchedule's helper configures per-task log files through logging.dictConfig,
    # which fails on the second tuning in one process (it lists handlers by name; unnamed ones break it).
    contexts = [
        ms.TuneContext(
            mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=space.population),
            task_name=t.task_name, logger=_MS_LOG, rand_state=seed, num_threads=cores,
        ).clone()
        for t, seed in zip(extracted, ms.utils.fork_seed(_SEED, n=len(extracted)))
    ]
    weights = [float(t.weight) for t in extracted]
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work_dir),
            max_trials_global=trials,
            max_trials_per_task=trials,
            num_trials_per_iter=per_round,
            builder=ms.builder.LocalBuilder(f_build=_f_build(), timeout_sec=_BUILD_TIMEOUT_S),
            runner=_make_runner(runner),
            database=database,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            module_equality=space.equality,
        )
    except Exception as exc:
        text = str(exc).strip()
        raise BuildError(
            f"MetaSchedule tuning for {target.canonical} failed: {text.splitlines()[-1] if text else type(exc).__name__}"
        ) from exc
    seconds = time.perf_counter() - start
    tasks = [
        {"name": name, "weight": float(w), "best_ms": round(best[i] * 1e3, 4) if i in best else None}
        for i, (name, w) in enumerate(zip(names, [t.weight for t in extracted]))
    ]
    estimate = sum(t["weight"] * (t["best_ms"] if t["best_ms"] is not None else math.nan) for t in tasks)
    measured = sum(1 for _ in open(work_dir / RECORD_FILE)) if (work_dir / RECORD_FILE).exists() else 0
    log.info("tune: done in %.0f s, %d records, estimated %.2f ms per inference", seconds, measured, estimate)
    return TuningReport(
        trials=trials, measured=measured, tasks=tasks, seconds=round(seconds, 3), runner=runner,
        num_cores=cores, space=space.name, estimated_ms=round(estimate, 4),
    )


def tune_inputs(model_digest: str, target: TargetInfo, trials: int) -> dict[str, Any]:
    """The inputs that key a tuning of ``model_digest`` for ``target`` with ``trials`` (hashed by the plan)."""
    return keys.tune_inputs(model_digest, target.canonical, trials, num_cores=tuning_num_cores(target), space=SPACE)


def tune_manifest_extra(target: TargetInfo, runner: str) -> dict[str, Any]:
    """What a tuning artifact records besides its key's inputs: the exact tuning target, space and runner."""
    return {
        "tuning_target": str(tuning_target(target, tuning_num_cores(target))),
        "space_options": dict(DEFAULT_SPACE.__dict__),
        "runner": runner,
    }
