"""The state of one tuning run that MetaSchedule's hooks (:mod:`pipeline.tuning.hooks`), the interrupt
handling (:mod:`pipeline.tuning.interrupt`) and the search (:mod:`pipeline.tuning.search`) share."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.tuning.result import format_latency


class _Session:
    """The state of one tuning run that the hooks share: trials, best latency per task, progress.

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
        self.ending = False  # the run is over (done or interrupted): no new worker process starts
        self.helpers: list[threading.Thread] = []  # threads of :func:`pipeline.tuning.interrupt._interruptible`
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
        """Raise the interrupt noted by :func:`pipeline.tuning.interrupt._noting_interrupts`: only our hooks call
        this (see there)."""
        if self.interrupted is not None:
            raise KeyboardInterrupt(f"signal {self.interrupted}")

    def report_progress(self) -> None:
        if self.progress is not None:
            done = min(self.generated, self.budget)
            # "recorded": in the database, what an interrupt keeps (a batch is recorded when its task is joined)
            self.progress(done, self.budget,
                          f"{done}/{self.budget} trials ({self.measured} recorded), {self.estimate_text()}")
