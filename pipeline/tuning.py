"""MetaSchedule tuning: the schedule space, tuning a Relax module, applying a tuning database.

TVM 0.27's default CPU pipeline applies no schedules; MetaSchedule searches a schedule for every fused
kernel (a "task") and measures candidates on the device. The result is the tuning database (MetaSchedule's
two JSON files). The ``tune`` stage (:mod:`tasks.tune`) stores it as an artifact next to ``tuning.json``
(tuning time, tasks, trials, best measured latency per task); ``build`` applies it (:func:`apply_tuning`).

Keyed (:func:`tune_inputs`) by model digest, canonical target, trial budget, the core count the schedules
are made for, TVM version and our tuning code version (which names the schedule space, :data:`SPACE`).
Where candidates are measured (locally or on a tracker's device) is recorded but not part of the key: the
target says what the schedules are for.

Tunings that differ only in their budget form a *family* (:func:`family_key`); the store indexes each family
in ``<store>/.tuning/<family>.json`` (:func:`remember_tuning`). A larger budget continues from the largest
verified database of its family (:func:`find_base`): its records are kept, taught to the cost model and seed
the search, what it measured is not measured again, and only the difference is measured. ``--tune-more N``
is that largest budget + N (:func:`resolve_trials`). ``tuning.json`` keeps the estimate's history over the
increments and whether it has converged (:func:`has_converged`).

While MetaSchedule runs, its own logging goes to a file (``tuning.log`` in the artifact) and nowhere else,
progress goes to a callback after every batch, and SIGINT/SIGTERM are only noted, then raised from our
hooks as a KeyboardInterrupt (see :func:`_noting_interrupts` for why); its worker processes are ended
however the run ends.

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

Re-measured with this code (ResNet-18 v2, 64 trials, on the same 2 cores shared with other work: load
2-6 while tuning; every library then timed at load ~2, median / min of 15 x 10 runs):

* task scheduler: gradient 128 / 123 ms and 120 / 111 ms (two runs), round-robin 88 / 82 ms, ``weighted``
  (the rest of the budget in shares of weight x latency after the first round) 96 / 89 ms and 133 / 130 ms.
  The first round takes 48 of the 64 trials whatever the scheduler (tasks with one or two candidates take
  fewer than 3), so only 16 trials differ, and two runs of one scheduler differ as much as two schedulers:
  no scheduler is shown better at this budget and ``gradient`` stays (``weighted`` and ``round-robin`` are
  there to compare at 256 trials and more);
* ``num-cores`` 1 instead of this machine's 2: 140 / 122 ms: no gain, the machine's count stays;
* measurements taken on a loaded machine pick worse schedules: 64 trials gave 73.6 ms on a quiet machine.

Applying a database replays each task's schedule on every kernel of the task (:func:`_unappliable`): on
EfficientNet-Lite0 one convolution whose epilogue ends in the next layer's padding rejects it, and is left
unscheduled instead of failing the build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pipeline import keys
from pipeline.errors import BuildError, StoreError, UsageError, clip
from pipeline.store import Artifact, ArtifactStore, check_key
from pipeline.targets import TargetInfo

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)
_MS_LOG = logging.getLogger(f"{__name__}.meta_schedule")  # MetaSchedule's per-task chatter (to tuning.log)
#: MetaSchedule's loggers: ours for its tasks, and its own (task scheduler, builder, runner, cost model).
_MS_LOGGERS = (_MS_LOG.name, "tvm.s_tir.meta_schedule")

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
REPORT_FILE = "tuning.json"
LOG_FILE = "tuning.log"
DATABASE_FILES = (WORKLOAD_FILE, RECORD_FILE)

LOCAL_RUNNER = "local"
_SEED = 0
_MAX_TRIALS_PER_ROUND = 64
_BUILD_TIMEOUT_S = 60.0
_RUN_TIMEOUT_S = 60.0
_MAX_REGENERATE = 3  # search rounds per batch when the search offers only candidates measured before
_TOP_K_ALL = 1 << 30
_HELPER_JOIN_S = 15.0  # how long an interrupted run waits for its builder/runner thread once the workers are gone
_LOG_LIMIT = 32 << 20  # bytes of MetaSchedule's log kept in the artifact
#: Stop rule of --tune-more: tuning has converged when the last two increments gained less than this.
CONVERGED_GAIN = 0.01
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class TuningSpace:
    """How the module is prepared and searched (see :data:`SPACE`; other values are for experiments).

    Attributes:
        prepack: lay the constant weights out for each tuned kernel (``cpu_weight_prepack``).
        population: the evolutionary search's population size (TVM's default is 512).
        equality: how MetaSchedule tells tasks apart: ``"structural"`` (every fused kernel is a task) or
            ``"anchor-block"`` (kernels with the same main block, e.g. one convolution with different fused
            epilogues, share a task and its schedule).
        scheduler: how trials are shared between tasks after the first round: ``"gradient"`` (TVM's
            gradient task scheduler), ``"round-robin"``, or ``"weighted"`` (each task gets a share of the
            rest of the budget proportional to weight x its latency after the first round).
    """

    prepack: bool = True
    population: int = 64
    equality: str = "anchor-block"
    scheduler: str = "gradient"

    @property
    def name(self) -> str:
        """A stable name of the space, part of the tuning key."""
        scheduler = "" if self.scheduler == "gradient" else f",scheduler={self.scheduler}"
        return (
            f"static-shape{'+prepack' if self.prepack else ''},{self.equality},population={self.population}"
            f"{scheduler}"
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
        # Kernels whose task's schedule does not replay on them are set aside, built unscheduled, and put back.
        aside = _unappliable(mod, target, database)
        kept = mod.clone() if aside else mod
        for gv in aside:
            del kept[gv]
        scheduled = relax.transform.MetaScheduleApplyDatabase()(kept)
        for gv in aside:
            scheduled[gv] = mod[gv]
        if not space.prepack:
            return scheduled
        # Constant weights: the layout rewrite is folded into new constants at build time.
        passes = [
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ]
        return tvm.transform.Sequential(passes)(scheduled)


def _unappliable(mod: tvm.IRModule, target: tvm.target.Target, database: Any) -> list[Any]:
    """The kernels of ``mod`` on which the schedule of their task fails to replay.

    With ``anchor-block`` equality a task's schedule is replayed on every kernel with the same main block
    (``ScheduleUsingAnchorTrace``), and TVM's ``MetaScheduleApplyDatabase`` fails the whole build when one
    replay fails: EfficientNet-Lite0's convolutions whose fused epilogue ends in the next layer's padding
    reject the ``reverse-compute-inline`` of a schedule found on the same convolution without it. Those
    kernels are returned (and logged) so the build leaves just them unscheduled.
    """
    import tvm
    import tvm_ffi
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    aside = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        query = normalize(func)
        record = database.query_tuning_record(query, target, gv.name_hint)
        if record is None or tvm_ffi.structural_equal(query, record.workload.mod):
            continue  # no schedule, or the very kernel the schedule was found on
        try:
            schedule_using_anchor_trace(Schedule(query, debug_mask=0), record.trace, target)
        except Exception as exc:  # noqa: BLE001 - any failure to replay leaves the kernel unscheduled
            log.warning("build: kernel %s does not take its task's schedule (%s); it is built unscheduled",
                        gv.name_hint, clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
            aside.append(gv)
    return aside


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
    known = {f.name for f in dataclasses.fields(TuningSpace)}
    space = TuningSpace(**{k: v for k, v in inputs.get("space_options", {}).items() if k in known})
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


def format_latency(seconds: float | None) -> str:
    """A kernel's or a model's latency for people, 3 digits: ``0.014 us``, ``43.2 us``, ``1.27 ms``, ``174 ms``."""
    if seconds is None or not math.isfinite(seconds):
        return "not measured yet"
    return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


# -- what one tuning run shares with MetaSchedule's hooks ----------------------------------------------------


class _Session:
    """The state of one tuning run that the hooks below share: trials, best latency per task, progress.

    ``best`` starts from the database continued from, so the estimate and "not measured yet" are about the
    whole database, not only this run's candidates.
    """

    def __init__(
        self, names: list[str], weights: list[float], budget: int, best: dict[int, float],
        known: list[set[int]], progress: Callable[[float, float, str], None] | None,
    ) -> None:
        self.names, self.weights, self.budget = names, weights, budget
        self.best = dict(best)
        self.known = known
        self.progress = progress
        self.generated = 0  # candidates handed to the builder (never more than the budget)
        self.measured = 0  # candidates whose results came back
        self.skipped = 0  # candidates of the earlier database that the search proposed again
        self.task = 0  # the task whose candidates are being built and measured
        self.per_task = [0] * len(names)  # candidates generated per task
        self.running: set[int] = set()  # tasks whose batch was sent and not yet joined
        self.interrupted: int | None = None  # the signal that interrupted the run
        self.helpers: list[threading.Thread] = []  # threads of :func:`_interruptible`
        self.pools: list[Any] = []  # worker pools that live for the whole run (the local runner's)
        self.start = time.perf_counter()

    def estimate(self) -> tuple[float, int]:
        """Sum over the measured tasks of weight x best latency (seconds), and how many tasks that covers."""
        measured = [i for i in range(len(self.names)) if i in self.best]
        return sum(self.weights[i] * self.best[i] for i in measured), len(measured)

    def estimate_text(self) -> str:
        total, measured = self.estimate()
        if not measured:
            return "estimate: not measured yet"
        coverage = "" if measured == len(self.names) else f" ({measured}/{len(self.names)} tasks measured)"
        return f"estimated {format_latency(total)}{coverage}"

    def note_results(self, task_id: int, results: list[Any]) -> tuple[int, int]:
        """Take a batch's runner results into the task's best; returns (measured, failed)."""
        costs = [sum(float(c) for c in r.run_secs) / len(r.run_secs)
                 for r in results if r.error_msg is None and r.run_secs]
        if costs:
            self.best[task_id] = min(self.best.get(task_id, math.inf), min(costs))
        return len(results), sum(1 for r in results if r.error_msg is not None)

    def raise_if_interrupted(self) -> None:
        """Raise the interrupt noted by :func:`_noting_interrupts`: only our hooks call this (see there)."""
        if self.interrupted is not None:
            raise KeyboardInterrupt(f"signal {self.interrupted}")

    def report_progress(self) -> None:
        if self.progress is not None:
            done = min(self.generated, self.budget)
            self.progress(done, self.budget, f"{done}/{self.budget} trials, {self.estimate_text()}")


def _interruptible(session: _Session, call: Callable[[], Any]) -> Any:
    """``call()`` in a helper thread while the main thread waits in 0.1 s steps, raising a noted interrupt.

    Blocked in a lock (MetaSchedule's builder and runner wait on their worker pools there), the main thread
    would see Ctrl-C only when the batch ends.
    """
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    helper = threading.Thread(target=target, name="tvmrp-tune-worker", daemon=True)
    session.helpers.append(helper)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
        session.raise_if_interrupted()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _hooks(session: _Session) -> tuple[Any, Any, Any, Any, Any]:
    """MetaSchedule hooks of one run: the classes of the search strategy, builder, runner and measure callback
    wrappers, and of the ``weighted`` task scheduler.

    * the search strategy wraps each task's evolutionary search: it drops candidates the earlier database
      already measured (MetaSchedule only remembers what it measured in this run) and trims the last
      batch to the budget (MetaSchedule's scheduler checks the budget before a batch, not within it);
    * the builder and the runner wait for their pools interruptibly (:func:`_interruptible`) and report
      progress after each batch;
    * the measure callback logs each measured batch.
    """
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Strategy(ms.search_strategy.PySearchStrategy):
        def __init__(self, inner: Any, task_id: int) -> None:
            self.inner, self.task_id = inner, task_id

        def _initialize_with_tune_context(self, context: Any) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
            self.per_iter = num_trials_per_iter
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self) -> Any:
            session.raise_if_interrupted()
            room = session.budget - session.generated
            if room <= 0:
                return None
            known = session.known[self.task_id]
            picked: list[Any] = []
            for _ in range(_MAX_REGENERATE):
                candidates = self.inner.generate_measure_candidates()
                if candidates is None:
                    break
                fresh = [c for c in candidates if not known or tvm_ffi.structural_hash(c.sch.mod) not in known]
                session.skipped += len(candidates) - len(fresh)
                picked += fresh
                if len(picked) >= min(room, self.per_iter) or (candidates and len(fresh) == len(candidates)):
                    break
            if not picked:
                return None  # the search is exhausted (or offers only what was measured before)
            picked = picked[: min(room, self.per_iter)]
            session.generated += len(picked)
            session.per_task[self.task_id] += len(picked)
            session.task = self.task_id
            session.running.add(self.task_id)
            return picked

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self) -> Any:
            return Strategy(self.inner.clone(), self.task_id)

    @derived_object
    class Builder(ms.builder.PyBuilder):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def build(self, build_inputs: list[Any]) -> list[Any]:
            return _interruptible(session, lambda: self.inner.build(build_inputs))

    @derived_object
    class Future(ms.runner.PyRunnerFuture):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def done(self) -> bool:
            return bool(self.inner.done())

        def result(self) -> Any:
            return _interruptible(session, self.inner.result)

    @derived_object
    class Runner(ms.runner.PyRunner):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = _interruptible(session, lambda: self.inner.run(runner_inputs))
            # The local runner measures before it returns: take the results in now, not after the first round.
            if futures and all(f.done() for f in futures):
                session.note_results(session.task, [f.result() for f in futures])
                session.report_progress()
                return list(futures)
            session.report_progress()
            return [Future(f) for f in futures]

    @derived_object
    class Callback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            session.raise_if_interrupted()
            session.running.discard(task_id)
            measured, failed = session.note_results(task_id, list(runner_results))
            session.measured += measured
            log.info(
                "tune: %d/%d trials, %.0f s: task %d/%d %s: %d measured (%d failed), best %s; %s",
                min(session.measured, session.budget), session.budget, time.perf_counter() - session.start,
                task_id + 1, len(session.names), session.names[task_id], measured, failed,
                format_latency(session.best.get(task_id)), session.estimate_text(),
            )
            session.report_progress()

    @derived_object
    class Weighted(ms.task_scheduler.PyTaskScheduler):
        """Every task once, then the rest of the budget in shares of weight x latency after that round."""

        def __init__(self) -> None:
            super().__init__()
            self.first_round = 0
            self.quota: dict[int, float] | None = None
            self.spent_before: list[int] = []

        def next_task_id(self) -> int:
            tasks = self._outer().tasks_
            alive = [i for i, task in enumerate(tasks) if not task.is_terminated]
            if not alive:
                return -1
            while self.first_round < len(tasks):
                i, self.first_round = self.first_round, self.first_round + 1
                if i in alive:
                    return i
            for i in sorted(session.running):
                if i in alive:
                    self.join_running_task(i)
            if self.quota is None:
                costs = {i: session.weights[i] * session.best.get(i, 0.0) for i in range(len(tasks))}
                total, rest = sum(costs.values()), max(0, session.budget - session.generated)
                self.quota = {i: rest * c / total if total > 0 else rest / len(tasks) for i, c in costs.items()}
                self.spent_before = list(session.per_task)
            owed = {i: self.quota[i] - (session.per_task[i] - self.spent_before[i]) for i in alive}
            best = max(alive, key=lambda i: (owed[i], self.quota[i]))
            return best

    return Strategy, Builder, Runner, Callback, Weighted


def _task_scheduler(kind: str, weighted: Any) -> Any:
    if kind == "weighted":
        return weighted()
    if kind in ("gradient", "round-robin"):
        return kind
    raise ValueError(f"unknown task scheduler {kind!r}")


# -- where the run's signals, logs and worker processes go ---------------------------------------------------


@contextlib.contextmanager
def _noting_interrupts(session: _Session) -> Iterator[None]:
    """While MetaSchedule runs, SIGINT and SIGTERM are noted in ``session`` and raised by our hooks only.

    MetaSchedule calls Python back from C++ in two kinds of places: our hooks (builder, runner, search
    strategy, measure callback), where an exception unwinds the tuning, and its log messages, which call the
    logger from a C++ destructor: an exception raised there (a KeyboardInterrupt from the default handler
    landing in a log call) ends the process with std::terminate (a "Segfault encountered" and exit -11).
    So the handler only notes the signal; :meth:`_Session.raise_if_interrupted` raises it at the next hook
    (within ~0.1 s while a batch builds or runs, after the current search round otherwise). TVM's FFI then
    turns that KeyboardInterrupt into a ``RuntimeError`` with an empty message, and :func:`run_tuning` turns
    it back into a KeyboardInterrupt by the note. Only in the main thread (where Python runs handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def noting(signum: int, _frame: Any) -> None:
        session.interrupted = signum

    changed = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]
    for signum in changed:
        signal.signal(signum, noting)
    try:
        yield
    finally:
        for signum in changed:
            signal.signal(signum, previous[signum])


class _CappedFileHandler(logging.FileHandler):
    """A log file that stops growing at ``limit`` bytes (with a last line that says so)."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, encoding="utf-8")
        self.limit, self.full = limit, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.full:
            return
        if self.stream is not None and self.stream.tell() >= self.limit:
            self.full = True
            self.stream.write(f"... the log stops here: it reached {self.limit} bytes\n")
            self.flush()
            return
        super().emit(record)


@contextlib.contextmanager
def _meta_schedule_logs(path: Path | None) -> Iterator[None]:
    """Send MetaSchedule's logging (per-task search chatter, design spaces, statistics) to ``path`` only.

    Its loggers (``_MS_LOG``, given to every TuneContext, and ``tvm.s_tir.meta_schedule.*``, the task
    scheduler, builder, runner and cost model) stop propagating for the duration, so none of it reaches the
    run's log handlers (terminal, Prefect UI). Without ``path`` it is dropped.
    """
    handler: logging.Handler = _CappedFileHandler(path, _LOG_LIMIT) if path is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _MS_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()


@contextlib.contextmanager
def _own_workers(session: _Session) -> Iterator[None]:
    """End MetaSchedule's worker processes when the run ends, however it ends, and the threads that waited on them.

    The builder starts a pool of ``tvm.exec.popen_worker`` processes per batch and the runner one for the
    whole run; an interrupted batch leaves its pool behind. Children of this process that are popen workers
    and were not there before are killed (with their own children). A helper thread of
    :func:`_interruptible` left inside a TVM call would abort the interpreter at exit (a daemon thread is
    unwound there by force, which TVM's C++ catches: "FATAL: exception not rethrown"), so it is joined once
    its workers are gone.
    """
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    try:
        yield
    finally:
        for pool in session.pools:
            if pool is not None:
                try:
                    pool.shutdown(wait=False)
                except Exception as exc:  # noqa: BLE001 - the sweep below ends what shutdown missed
                    log.debug("tune: the runner's pool did not shut down: %s", exc)
        victims = []
        for child in me.children():
            try:
                if child.pid in before or "tvm.exec.popen_worker" not in child.cmdline():
                    continue
                victims += [*child.children(recursive=True), child]
            except psutil.Error:
                continue
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        psutil.wait_procs(victims, timeout=5)
        deadline = time.monotonic() + _HELPER_JOIN_S
        for helper in session.helpers:
            helper.join(max(0.0, deadline - time.monotonic()))


# -- the tuning run ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseTuning:
    """A tuning of the same family with fewer trials, to continue from (:func:`find_base`).

    Attributes:
        key: its artifact key. trials: its trial count. history: its ``tuning.json`` history.
        database: the verified bytes of its two database files, by file name.
    """

    key: str
    trials: int
    history: tuple[dict[str, Any], ...]
    database: dict[str, bytes]


@dataclass(frozen=True)
class TuningReport:
    """What a tuning run did (stored as ``tuning.json`` in the artifact).

    Attributes:
        trials: the total trial budget (the key's). trials_reused: trials of the database continued from
            (0 without one). trials_new: trials this run measured (``trials - trials_reused``).
        measured: records in the database (failed candidates included).
        tasks: the tuned kernels with their weight (uses per inference) and best measured latency (ms,
            ``None`` if never measured), over the whole database.
        seconds: wall time of this run. runner: where candidates were measured.
        estimated_ms: sum over tasks of weight x best latency (None while a task was never measured).
        base: the key of the tuning continued from, or None.
        history: ``{trials, estimated_ms, seconds}`` of every run of the chain that led here, oldest first.
        converged: the last two increments improved the estimate by less than 1 % in total.
    """

    trials: int
    trials_reused: int
    trials_new: int
    measured: int
    tasks: list[dict[str, Any]]
    seconds: float
    runner: str
    num_cores: int
    space: str
    estimated_ms: float | None
    base: str | None
    history: list[dict[str, Any]]
    converged: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def has_converged(history: list[dict[str, Any]], threshold: float = CONVERGED_GAIN) -> bool:
    """Whether the last two increments of ``history`` improved the estimate by less than ``threshold`` in total."""
    if len(history) < 3:
        return False
    before, after = history[-3].get("estimated_ms"), history[-1].get("estimated_ms")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or before <= 0:
        return False
    return (before - after) / before < threshold


def check_request(trials: int, runner: str) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"tuning needs a trial budget of 1 or more (got {trials!r}); 0 means no tuning")
    _parse_runner(runner)


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


def run_tuning(
    mod: tvm.IRModule,
    target: TargetInfo,
    trials: int,
    work_dir: Path,
    runner: str = LOCAL_RUNNER,
    num_cores: int | None = None,
    space: TuningSpace = DEFAULT_SPACE,
    base: BaseTuning | None = None,
    progress: Callable[[float, float, str], None] | None = None,
    log_file: Path | None = None,
) -> TuningReport:
    """Tune ``mod`` for ``target`` up to ``trials`` measurements; write the database files into ``work_dir``.

    Args:
        base: a database of the same family with fewer trials: it is continued (its records are kept,
            taught to the cost model and seed the search; what it measured is not measured again), and
            only ``trials - base.trials`` new candidates are measured.
        progress: called as ``progress(done, total, detail)`` once the tasks are known and after every
            measured batch (e.g. :meth:`tasks.progress.Progress.update`).
        log_file: where MetaSchedule's own logging goes (none of it reaches the caller's log handlers).

    Raises:
        UsageError: ``trials`` < 1 or a malformed ``runner``.
        BuildError: MetaSchedule failed.
        KeyboardInterrupt: SIGINT or SIGTERM during the run; MetaSchedule's worker processes are ended.
    """
    check_request(trials, runner)
    reused = base.trials if base is not None else 0
    if reused >= trials:
        raise ValueError(f"the base tuning has {reused} trials, not fewer than {trials}")
    budget = trials - reused
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
    if base is not None:
        for name in DATABASE_FILES:
            (work_dir / name).write_bytes(base.database[name])
    with _meta_schedule_logs(log_file):
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
        Strategy, Builder, Runner, Callback, Weighted = _hooks(session)
        # Our own TuneContexts: MetaSchedule's helper configures per-task log files through logging.dictConfig,
        # which fails on the second tuning in one process. A continuation searches with other seeds.
        contexts = [
            ms.TuneContext(
                mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                search_strategy=Strategy(ms.search_strategy.EvolutionarySearch(population_size=space.population), i),
                task_name=t.task_name, logger=_MS_LOG, rand_state=seed, num_threads=cores,
            ).clone()
            for i, (t, seed) in enumerate(zip(extracted, ms.utils.fork_seed(_SEED + reused, n=len(extracted))))
        ]
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores, tree_method="auto")
        taught = _warm_cost_model(cost_model, database, contexts) if base is not None else 0
        log.info(
            "tune: %d tasks, %d trials (%s%d per task in the first round), %d cores, runner %s, space %s",
            len(extracted), trials, f"{reused} reused, {budget} new, " if base is not None else "", per_round,
            cores, runner, space.name,
        )
        if base is not None:
            log.info("tune: continuing from %s: %d records taught to the cost model, %s",
                     base.key[:16], taught, session.estimate_text())
        session.report_progress()
        # From here a signal is only noted (see _noting_interrupts), also while the builder's and runner's
        # constructors start their first workers.
        with _noting_interrupts(session), _own_workers(session):
            try:
                inner_runner = _make_runner(runner)
                session.pools.append(getattr(inner_runner, "pool", None))
                builder = Builder(ms.builder.LocalBuilder(f_build=_f_build(), timeout_sec=_BUILD_TIMEOUT_S))
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=str(work_dir),
                    max_trials_global=budget,
                    max_trials_per_task=budget,
                    num_trials_per_iter=per_round,
                    builder=builder,
                    runner=Runner(inner_runner),
                    database=database,
                    cost_model=cost_model,
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Callback()],
                    task_scheduler=_task_scheduler(space.scheduler, Weighted),
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
        _, final_best = _known_candidates(database, mods, replay=False)
    seconds = time.perf_counter() - start
    tasks = [
        {"name": name, "weight": w, "best_ms": round(final_best[i] * 1e3, 6) if i in final_best else None}
        for i, (name, w) in enumerate(zip(names, weights))
    ]
    unmeasured = any(t["best_ms"] is None for t in tasks)
    estimate = None if unmeasured else round(sum(t["weight"] * t["best_ms"] for t in tasks), 6)
    records = sum(1 for _ in open(work_dir / RECORD_FILE)) if (work_dir / RECORD_FILE).exists() else 0
    history = [*(base.history if base is not None else ()),
               {"trials": trials, "estimated_ms": estimate, "seconds": round(seconds, 3)}]
    converged = has_converged(history)
    log.info(
        "tune: done in %.0f s, %d new trials (%d proposed again and skipped), %d records, estimated %s per "
        "inference%s", seconds, session.generated, session.skipped, records,
        format_latency(estimate / 1e3 if estimate is not None else None),
        "; converged: the last two increments gained less than 1 %" if converged else "",
    )
    return TuningReport(
        trials=trials, trials_reused=reused, trials_new=budget, measured=records, tasks=tasks,
        seconds=round(seconds, 3), runner=runner, num_cores=cores, space=space.name, estimated_ms=estimate,
        base=base.key if base is not None else None, history=history, converged=converged,
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


# -- the family index: earlier tunings to continue from ------------------------------------------------------

INDEX_DIR = ".tuning"
_INDEX_VERSION = 1


def family_key(model_digest: str, target: TargetInfo) -> str:
    """The key of the tunings of ``model_digest`` for ``target`` that differ only in their trial count."""
    return keys.tune_family(tune_inputs(model_digest, target, 1))


def _index_path(store: ArtifactStore, family: str) -> Path:
    return store.root / INDEX_DIR / f"{check_key(family)}.json"


def _read_index(store: ArtifactStore, family: str) -> dict[int, str]:
    """The index's ``{trials: artifact key}``; empty when missing or unreadable (it is only a hint)."""
    try:
        data = json.loads(_index_path(store, family).read_text())
        entries = data["tunings"] if data.get("version") == _INDEX_VERSION and data.get("family") == family else {}
        return {int(trials): str(key) for trials, key in entries.items() if int(trials) > 0}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        log.warning("tune: the tuning index %s is unreadable (%s); it is rebuilt as tunings run",
                    _index_path(store, family), exc)
        return {}


def remember_tuning(store: ArtifactStore, inputs: dict[str, Any], key: str) -> None:
    """Add the tuning ``key`` (of key inputs ``inputs``) to its family's index ``<store>/.tuning/<family>.json``.

    Written atomically under the family's lock. Never raises: without the index a larger budget starts over
    instead of continuing.
    """
    try:
        trials, family = int(inputs["trials"]), keys.tune_family(inputs)
        with store.lock(family):
            entries = _read_index(store, family)
            if entries.get(trials) == key:
                return
            entries[trials] = key
            path = _index_path(store, family)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"version": _INDEX_VERSION, "family": family,
                               "tunings": {str(t): k for t, k in sorted(entries.items())}}, indent=2)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{family[:16]}.", delete=False) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(f.name, 0o644)
            os.replace(f.name, path)
    except (OSError, KeyError, ValueError, TypeError, StoreError) as exc:
        log.warning("tune: tuning %s is not indexed (%s); a larger budget will not continue from it",
                    key[:16], exc)


def family_tunings(store: ArtifactStore, inputs: dict[str, Any]) -> list[tuple[int, Artifact]]:
    """The verified tunings of the family of ``inputs`` (a tuning's key inputs), largest trial count first.

    An index entry counts only if its key is the key of the family's inputs with its trial count and the
    store's copy verifies (:meth:`ArtifactStore.get`); other entries are ignored.
    """
    family = keys.tune_family(inputs)
    found = []
    for trials, key in sorted(_read_index(store, family).items(), reverse=True):
        if key != keys.key_of({**inputs, "trials": trials}):
            log.warning("tune: the tuning index of %s names %s for %d trials, which is not that tuning's key; "
                        "ignored", family[:16], key[:16], trials)
            continue
        artifact = store.get(key)
        if artifact is not None and artifact.kind == "tuning":
            found.append((trials, artifact))
    return found


def find_base(store: ArtifactStore, inputs: dict[str, Any]) -> BaseTuning | None:
    """The largest verified tuning of the family of ``inputs`` with fewer trials than ``inputs["trials"]``."""
    if not isinstance(inputs.get("trials"), int):
        return None
    trials = inputs["trials"]
    for found, artifact in family_tunings(store, {k: v for k, v in inputs.items() if k != "trials"}):
        if found >= trials:
            continue
        try:
            database = {name: store.read_verified(artifact.key, name)[0] for name in DATABASE_FILES}
            report = json.loads(store.read_verified(artifact.key, REPORT_FILE)[0])
        except (StoreError, ValueError) as exc:
            log.warning("tune: tuning %s cannot be continued (%s); trying a smaller one", artifact.key[:16], exc)
            continue
        history = report.get("history") if isinstance(report, dict) else None
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            history = [{"trials": found, "estimated_ms": report.get("estimated_ms"), "seconds": report.get("seconds")}]
        return BaseTuning(artifact.key, found, tuple(history), database)
    return None


def resolve_trials(store_root: str | os.PathLike[str] | None, model_digest: str, target: TargetInfo,
                   tune_trials: int, tune_more: int) -> int:
    """The total trial budget of a run: ``tune_trials``, or with ``tune_more`` the family's largest + N.

    ``--tune-more N`` continues the best (largest) existing tuning of (model, target, cores, space, TVM) by
    N trials; with none, it tunes N. It is resolved when the run is planned, so the build key names the
    total.

    Raises:
        UsageError: both given, a negative count, or a total above 100000.
    """
    for name, value in (("--tune-trials", tune_trials), ("--tune-more", tune_more)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{name} must be 0 or more (got {value!r})")
    if not tune_more:
        return tune_trials
    if tune_trials:
        raise UsageError("give --tune-trials (a total) or --tune-more (trials added to the largest tuning), not both")
    inputs = {k: v for k, v in tune_inputs(model_digest, target, 1).items() if k != "trials"}
    existing = family_tunings(ArtifactStore(store_root), inputs)
    total = (existing[0][0] if existing else 0) + tune_more
    if total > MAX_TRIALS:
        raise UsageError(f"--tune-more {tune_more} would make {total} trials, above {MAX_TRIALS}")
    return total
