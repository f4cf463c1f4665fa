"""What a tuning did: the report ``tuning.json`` of a tuning artifact (:class:`TuningReport`), with the estimate's
history over the increments and whether it has converged (:func:`has_converged`). The artifact's file names are
declared with every other kind's in :mod:`pipeline.store.layout`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Stop rule of --tune-more: tuning has converged when the last two increments gained less than this.
CONVERGED_GAIN = 0.01


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
        interrupted_budget: for the trials an interrupted run had measured, kept as a tuning of that many
            (``trials``): the budget that run had (None: a run that finished).
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
    interrupted_budget: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def report_tasks(names: list[str], weights: list[float], best: dict[int, float]) -> list[dict[str, Any]]:
    """The report's ``tasks``: name, weight and best latency (ms, None if never measured) of every task."""
    return [
        {"name": name, "weight": w, "best_ms": round(best[i] * 1e3, 6) if i in best else None}
        for i, (name, w) in enumerate(zip(names, weights))
    ]


def estimate_ms(tasks: list[dict[str, Any]]) -> float | None:
    """Sum over ``tasks`` of weight x best latency (ms); None while a task was never measured."""
    if any(t["best_ms"] is None for t in tasks):
        return None
    return round(sum(t["weight"] * t["best_ms"] for t in tasks), 6)


def has_converged(history: list[dict[str, Any]], threshold: float = CONVERGED_GAIN) -> bool:
    """Whether the last two increments of ``history`` improved the estimate by less than ``threshold`` in total."""
    if len(history) < 3:
        return False
    before, after = history[-3].get("estimated_ms"), history[-1].get("estimated_ms")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or before <= 0:
        return False
    return (before - after) / before < threshold


def format_latency(seconds: float | None) -> str:
    """A kernel's or a model's latency for people, 3 digits: ``0.014 us``, ``43.2 us``, ``1.27 ms``, ``174 ms``."""
    if seconds is None or not math.isfinite(seconds):
        return "not measured yet"
    return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def _count(value: Any, low: int = 0, high: int = 10**9) -> int | None:
    """``value`` if it is an integer (not a bool) within ``[low, high]``, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high else None


def _amount(value: Any, positive: bool = False) -> float | None:
    """``value`` as a float if it is a finite number >= 0 (> 0 with ``positive``), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and (value > 0 if positive else value >= 0) else None


def checked_summary(report: Any, trials: int) -> dict[str, Any]:
    """What a run shows of a tuning's ``tuning.json`` (``report``), every figure checked: a count out of range,
    a negative, infinite or non-numeric time or estimate becomes None (or its default) instead of being shown.

    Args:
        report: the parsed ``tuning.json`` (anything JSON gives).
        trials: the tuning's budget as its key records it (what the summary's ``trials`` is).

    Returns:
        ``trials``, ``trials_reused``, ``trials_new``, ``measured``, ``seconds``, ``estimated_ms``,
        ``converged``, ``history`` (``{trials, estimated_ms, seconds}`` per increment), ``base``, ``runner``.
    """
    report = report if isinstance(report, dict) else {}
    reused = _count(report.get("trials_reused"), 0, trials) or 0
    new = _count(report.get("trials_new"), 0, trials)
    history = []
    for step in report.get("history") if isinstance(report.get("history"), list) else []:
        if isinstance(step, dict) and (at := _count(step.get("trials"), 1)) is not None and len(history) < 1000:
            history.append({"trials": at, "estimated_ms": _amount(step.get("estimated_ms"), positive=True),
                            "seconds": _amount(step.get("seconds"))})
    seconds, estimate = _amount(report.get("seconds")), _amount(report.get("estimated_ms"), positive=True)
    base, runner = report.get("base"), report.get("runner")
    return {
        "trials": trials, "trials_reused": reused, "trials_new": trials - reused if new is None else new,
        "measured": _count(report.get("measured")), "seconds": seconds, "estimated_ms": estimate,
        "converged": report.get("converged") is True,
        "history": history or [{"trials": trials, "estimated_ms": estimate, "seconds": seconds}],
        "base": base if isinstance(base, str) and len(base) == 64 and all(c in "0123456789abcdef" for c in base)
        else None,
        "runner": runner[:200] if isinstance(runner, str) else None,
    }
