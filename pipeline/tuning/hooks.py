"""MetaSchedule's hooks of a tuning run: search strategy, builder, runner and measure callback wrappers, and
the ``weighted`` task scheduler. Each holds the run's :class:`~pipeline.tuning.session._Session`.

* the search strategy wraps each task's evolutionary search: it drops candidates the earlier database
  already measured (MetaSchedule only remembers what it measured in this run) and trims the last
  batch to the budget (MetaSchedule's scheduler checks the budget before a batch, not within it);
* the builder and the runner wait for their pools interruptibly
  (:func:`pipeline.tuning.interrupt._interruptible`) and report progress after each batch;
* the measure callback logs each measured batch.

This module imports TVM: only :func:`pipeline.tuning.search.run_tuning` imports it, when it runs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from pipeline.tuning.interrupt import _interruptible
from pipeline.tuning.result import format_latency
from pipeline.tuning.session import _Session

log = logging.getLogger("pipeline.tuning")  # one logger for the package: its lines read as one stage's
_MAX_REGENERATE = 3  # search rounds per batch when the search offers only candidates measured before


@derived_object
class Strategy(ms.search_strategy.PySearchStrategy):
    def __init__(self, session: _Session, inner: Any, task_id: int) -> None:
        self.session, self.inner, self.task_id = session, inner, task_id

    def _initialize_with_tune_context(self, context: Any) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.per_iter = num_trials_per_iter
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self) -> Any:
        session = self.session
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
        return Strategy(self.session, self.inner.clone(), self.task_id)


@derived_object
class Builder(ms.builder.PyBuilder):
    def __init__(self, session: _Session, inner: Any) -> None:
        self.session, self.inner = session, inner

    def build(self, build_inputs: list[Any]) -> list[Any]:
        return _interruptible(self.session, lambda: self.inner.build(build_inputs))


@derived_object
class Future(ms.runner.PyRunnerFuture):
    def __init__(self, session: _Session, inner: Any) -> None:
        self.session, self.inner = session, inner

    def done(self) -> bool:
        return bool(self.inner.done())

    def result(self) -> Any:
        return _interruptible(self.session, self.inner.result)


@derived_object
class Runner(ms.runner.PyRunner):
    def __init__(self, session: _Session, inner: Any) -> None:
        self.session, self.inner = session, inner

    def run(self, runner_inputs: list[Any]) -> list[Any]:
        session = self.session
        futures = _interruptible(session, lambda: self.inner.run(runner_inputs))
        # The local runner measures before it returns: take the results in now, not after the first round.
        if futures and all(f.done() for f in futures):
            session.note_results(session.task, [f.result() for f in futures])
            session.report_progress()
            return list(futures)
        session.report_progress()
        return [Future(session, f) for f in futures]


@derived_object
class Callback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, session: _Session) -> None:
        self.session = session

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        session = self.session
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

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session
        self.first_round = 0
        self.quota: dict[int, float] | None = None
        self.spent_before: list[int] = []

    def next_task_id(self) -> int:
        session = self.session
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


def _task_scheduler(kind: str, session: _Session) -> Any:
    if kind == "weighted":
        return Weighted(session)
    if kind in ("gradient", "round-robin"):
        return kind
    raise ValueError(f"unknown task scheduler {kind!r}")
