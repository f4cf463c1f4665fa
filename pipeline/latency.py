"""Latency: how many samples to take, their statistics, and whether a run is slower than its series.

Peers report more than a mean: TFLite's benchmark tool gives a warm-up, p5/median/p95; MLPerf SingleStream
reports p90. A run here takes a warm-up (discarded), then at least :attr:`Timing.min_samples` samples and at
least :attr:`Timing.min_seconds` of measuring (bounded by :attr:`Timing.max_seconds`), and reports mean,
median, p90, p99, min, max, std and the coefficient of variation (std / mean). The spread that decides
whether a comparison can be trusted is robust to the odd outlier (one 8 ms hiccup among 40,000 samples of
17 us makes the CV 700 %): a run is *noisy* when its p90 is more than :data:`NOISY_SPREAD` above its median.

A regression is judged against the series' recent history, noise-aware: the run's median is slower than the
median of the last :data:`HISTORY` medians by more than ``max(5 %, 3 x MAD)`` of those medians (the median
absolute deviation: robust to the odd outlier run); with fewer than :data:`MIN_HISTORY` earlier runs the
floor is 10 %, and a noisy run is never called a regression (it is reported as inconclusive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Sequence

from pipeline.errors import UsageError

NOISY_SPREAD = 0.10
"""A p90 more than this far above the median makes a comparison untrustworthy."""

HISTORY = 10
"""How many earlier runs of a series a regression is judged against."""

MIN_CHANGE = 0.05
"""The smallest slowdown (5 %) called a regression, however quiet the series."""

MIN_HISTORY = 3
"""Below this many earlier runs the series' noise is unknown: the smallest regression is :data:`FEW_RUNS_CHANGE`."""

FEW_RUNS_CHANGE = 0.10
MAX_SAMPLES = 10_000
MAD_FACTOR = 3.0


@dataclass(frozen=True)
class Timing:
    """How a run is timed (``time_evaluator``): ``number`` inferences per sample, and how many samples.

    Attributes:
        number: inferences averaged into one sample.
        repeat: an exact number of samples; None: adaptive (see the module docstring).
        min_samples: adaptive: at least this many samples...
        min_seconds: ...and at least this much measuring...
        max_seconds: ...but no more than this (fewer samples than ``min_samples`` if one takes long).
    """

    number: int = 1
    repeat: int | None = None
    min_samples: int = 30
    min_seconds: float = 1.0
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.number < 1 or (self.repeat is not None and self.repeat < 1):
            raise UsageError(f"--number and --repeat must be at least 1 (got {self.number}, {self.repeat})")
        if self.min_samples < 1 or not 0 <= self.min_seconds <= self.max_seconds or self.max_seconds <= 0:
            raise UsageError(
                f"timing needs min_samples >= 1 and 0 <= min_seconds <= max_seconds (got {self.min_samples}, "
                f"{self.min_seconds}, {self.max_seconds})"
            )

    def samples_for(self, sample_seconds: float) -> int:
        """How many samples to take when one sample (``number`` inferences) takes ``sample_seconds``."""
        if self.repeat is not None:
            return self.repeat
        per = max(sample_seconds, 1e-7)
        wanted = max(self.min_samples, math.ceil(self.min_seconds / per))
        return int(max(1, min(wanted, math.floor(self.max_seconds / per), MAX_SAMPLES)))


@dataclass(frozen=True)
class Latency:
    """Latency of one inference in milliseconds, over ``repeat`` samples of ``number`` inferences each."""

    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float
    std: float
    cv: float
    number: int
    repeat: int

    @property
    def noisy(self) -> bool:
        """The spread is too large to trust a comparison (p90 more than :data:`NOISY_SPREAD` above the median)."""
        return self.median > 0 and (self.p90 - self.median) / self.median > NOISY_SPREAD

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in ("mean", "median", "p90", "p99", "min", "max", "std", "cv")}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_of(samples_ms: Sequence[float], number: int) -> Latency:
    """The statistics of ``samples_ms`` (each the mean of ``number`` inferences)."""
    n = len(samples_ms)
    if n == 0:
        raise ValueError("no latency samples")
    mean = sum(samples_ms) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in samples_ms) / n)
    return Latency(
        mean=mean, median=percentile(samples_ms, 50), p90=percentile(samples_ms, 90), p99=percentile(samples_ms, 99),
        min=min(samples_ms), max=max(samples_ms), std=std, cv=std / mean if mean > 0 else 0.0,
        number=number, repeat=n,
    )


@dataclass(frozen=True)
class Verdict:
    """A run's latency against its series' history.

    Attributes:
        regression: slower than the baseline by more than the threshold.
        change: relative change of the median against the baseline (+0.30 = 30 % slower); None without history.
        baseline_ms: median of the earlier runs' medians.
        threshold: the relative slowdown that counts (``max(5 %, 3 x MAD / baseline)``).
        runs: how many earlier runs were compared.
        message: one line for people.
    """

    regression: bool
    change: float | None
    baseline_ms: float | None
    threshold: float | None
    runs: int
    message: str

    def as_dict(self) -> dict[str, object]:
        return {"regression": self.regression, "change": self.change, "baseline_ms": self.baseline_ms,
                "threshold": self.threshold, "runs": self.runs, "message": self.message}


def judge(median_ms: float, history_ms: Sequence[float], noisy: bool = False) -> Verdict:
    """Is a run with ``median_ms`` slower than the series' earlier medians (oldest first)?"""
    earlier = list(history_ms)[-HISTORY:]
    if not earlier:
        return Verdict(False, None, None, None, 0, "first run of this series")
    base = median(earlier)
    mad = median(abs(m - base) for m in earlier)
    floor = MIN_CHANGE if len(earlier) >= MIN_HISTORY else FEW_RUNS_CHANGE
    threshold = max(floor, MAD_FACTOR * mad / base) if base > 0 else floor
    change = (median_ms - base) / base if base > 0 else 0.0
    regression = change > threshold and not noisy
    text = (f"{change * 100:+.1f}% against the median of the previous {len(earlier)} run(s) ({base:.4g} ms); "
            f"a regression is > {threshold * 100:.1f}%")
    if regression:
        text = "REGRESSION: " + text
    if noisy:
        text += "; inconclusive: this run's spread is large (p90 > 10 % above the median)"
    return Verdict(regression, change, base, threshold, len(earlier), text)
