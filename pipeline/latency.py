"""Latency: how many samples to take, their statistics, and whether a run is slower than the runs before it.

Peers report more than a mean: TFLite's benchmark tool gives a warm-up, p5/median/p95; MLPerf SingleStream
reports p90. A run here takes a warm-up (discarded), then at least :attr:`Timing.min_samples` samples and at
least :attr:`Timing.min_seconds` of measuring (bounded by :attr:`Timing.max_seconds`), and reports mean,
median, p90, p99, min, max, std and the coefficient of variation (std / mean). The spread shown as *noisy* is
robust to the odd outlier (one 8 ms hiccup among 40,000 samples of 17 us makes the CV 700 %): a run is noisy
when its p90 is more than :data:`NOISY_SPREAD` above its median.

Judging (:func:`judge_runs`): a run's median against the median of the earlier runs' medians (the last
:data:`HISTORY`), with a 99 % interval of that change from the raw samples. The interval is a predictive
two-level bootstrap: the earlier runs are resampled, and each run's samples within it (the uncertainty of the
baseline); with :data:`MIN_HISTORY` or more earlier runs, the run's own resampled median is also shifted by one
of their deviations from their median (a run drifts as runs of its build do). Noise within a run and drift
between runs both widen it. When a run is noisy (p90 more than 10 % above its median) and every run has its
samples, the runs are compared by their 10th percentile instead (:func:`percentile_to_judge`): on a loaded host
the samples are bimodal and the median is what the load moves, while other work only ever adds time
(measurements: docs/history.md#lineages-and-the-verdict). The smallest change that counts is
``max(5 %, 3 sd)``, where sd is the spread of the earlier runs' figures (1.4826 x their median absolute
deviation: robust to the odd outlier run); 10 % while fewer than :data:`MIN_HISTORY` runs tell that spread. The
decision:

* ``regression``: the change is above that threshold and the whole interval lies above zero (slower, surely);
* ``faster``: the mirror image;
* ``same``: the change is within the threshold (within the noise);
* ``inconclusive``: a change beyond the threshold whose interval reaches zero: the data cannot tell.

Runs recorded without their samples (older records) are judged on their medians alone (:func:`judge`): no
interval, and a noisy run is never called a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Sequence

from pipeline.errors import UsageError

NOISY_SPREAD = 0.10
"""A p90 more than this far above the median makes a comparison untrustworthy."""

HISTORY = 10
"""How many earlier runs of a series a regression is judged against."""

MIN_CHANGE = 0.05
"""The smallest slowdown (5 %) called a regression, however quiet the series."""

MIN_HISTORY = 5
"""Below this many earlier runs the series' noise is unknown: the smallest regression is :data:`FEW_RUNS_CHANGE`."""

FEW_RUNS_CHANGE = 0.10
MAX_SAMPLES = 10_000
MAD_FACTOR = 3.0
"""The smallest change that counts, in standard deviations of the earlier runs' medians."""
MAD_TO_SD = 1.4826
"""MAD x this estimates the standard deviation of normally distributed values."""
KEPT_SAMPLES = 256
"""The most samples a run keeps (its ledger record, its verdict): evenly spaced in time order when it took more."""
CONFIDENCE = 0.99
RESAMPLES = 2000
NOISY_PERCENTILE = 10
"""What noisy runs are judged on: their 10th percentile, which interference from other work hardly moves."""
MIN_BOOTSTRAP_SAMPLES = 5
"""Fewer samples than this in the judged run: it is judged on its median alone."""
MAX_THREADS = 1024


@dataclass(frozen=True)
class Timing:
    """How a run is timed (``time_evaluator``): ``number`` inferences per sample, and how many samples.

    Attributes:
        number: inferences averaged into one sample.
        repeat: an exact number of samples; None: adaptive (see the module docstring).
        min_samples: adaptive: at least this many samples...
        min_seconds: ...and at least this much measuring...
        max_seconds: ...but no more than this (fewer samples than ``min_samples`` if one takes long).
        threads: the threads of the device's TVM thread pool, set over RPC before timing (None: as it is).
    """

    number: int = 1
    repeat: int | None = None
    min_samples: int = 30
    min_seconds: float = 1.0
    max_seconds: float = 60.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.number < 1 or (self.repeat is not None and self.repeat < 1):
            raise UsageError(f"--number and --repeat must be at least 1 (got {self.number}, {self.repeat})")
        if self.min_samples < 1 or not 0 <= self.min_seconds <= self.max_seconds or self.max_seconds <= 0:
            raise UsageError(
                f"timing needs min_samples >= 1 and 0 <= min_seconds <= max_seconds (got {self.min_samples}, "
                f"{self.min_seconds}, {self.max_seconds})"
            )
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be a whole number from 1 to {MAX_THREADS} (got {self.threads})")

    def samples_for(self, sample_seconds: float) -> int:
        """How many samples to take when one sample (``number`` inferences) takes ``sample_seconds``."""
        if self.repeat is not None:
            return self.repeat
        per = max(sample_seconds, 1e-7)
        wanted = max(self.min_samples, math.ceil(self.min_seconds / per))
        return int(max(1, min(wanted, math.floor(self.max_seconds / per), MAX_SAMPLES)))


@dataclass(frozen=True)
class Latency:
    """Latency of one inference in milliseconds, over ``repeat`` samples of ``number`` inferences each.

    ``samples_ms`` keeps the samples (at most :data:`KEPT_SAMPLES`, see :func:`kept_samples`): what a later run is
    judged against.
    """

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
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

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
        number=number, repeat=n, samples_ms=kept_samples(samples_ms),
    )


def kept_samples(samples_ms: Sequence[float], limit: int = KEPT_SAMPLES) -> tuple[float, ...]:
    """At most ``limit`` of the samples, evenly spaced in time order, each to 6 significant digits (a timer
    tells no more); all of them when there are no more than ``limit``."""
    n = len(samples_ms)
    chosen = samples_ms if n <= limit else [samples_ms[(i * n) // limit] for i in range(limit)]
    return tuple(float(f"{float(s):.6g}") for s in chosen)




# -- judging a run against the runs before it -----------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One run's latency as judging sees it: its median and its samples (empty: recorded without them)."""

    median_ms: float
    samples_ms: tuple[float, ...] = ()
    run_id: str | None = None


@dataclass(frozen=True)
class Change:
    """Something that differs between the earlier runs judged against and this one (``field``: ``a -> b``)."""

    field: str
    a: Any
    b: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "a": self.a, "b": self.b}

    def __str__(self) -> str:
        def text(value: Any) -> str:
            return "-" if value is None else str(value)

        return f"{self.field} {text(self.a)} -> {text(self.b)}"


#: :attr:`Verdict.decision` values.
FIRST, REGRESSION, FASTER, SAME, INCONCLUSIVE = "first", "regression", "faster", "same", "inconclusive"
SAME_BUILD, PREVIOUS_BUILD = "same build", "previous build"


@dataclass(frozen=True)
class Verdict:
    """A run's latency against the earlier runs of its lineage.

    Attributes:
        regression: slower than the baseline beyond the threshold and the noise (``decision == "regression"``).
        change: relative change of the run's median (``statistic``) against the baseline (+0.30 = 30 % slower);
            None without history.
        baseline_ms: median of the earlier runs' medians (``statistic``).
        threshold: the smallest relative change that counts (``max(5 %, 3 sd)`` of the earlier medians, 10 % with
            fewer than :data:`MIN_HISTORY` runs).
        runs: how many earlier runs were compared.
        message: one line for people.
        decision: ``first``, ``regression``, ``faster``, ``same`` or ``inconclusive`` (module docstring).
        interval: the 99 % interval of ``change`` (:data:`CONFIDENCE`; None: judged on medians alone).
        method: ``bootstrap`` (from the samples) or ``medians``; None for a first run.
        against: ``same build`` (the runs of this run's build and setup) or ``previous build`` (the runs of the
            build before it, when something changed: :attr:`changes` says what).
        changes: what differs from the runs judged against (the build, versions, device, threads).
        baseline_runs: the ids of the runs judged against, oldest first.
        statistic: what was compared: ``median``, or ``p10`` (the 10th percentile) when the runs are noisy.
    """

    regression: bool
    change: float | None
    baseline_ms: float | None
    threshold: float | None
    runs: int
    message: str
    decision: str = FIRST
    interval: tuple[float, float] | None = None
    method: str | None = None
    against: str | None = None
    changes: tuple[Change, ...] = ()
    baseline_runs: tuple[str, ...] = ()
    statistic: str = "median"

    def as_dict(self) -> dict[str, Any]:
        return {"regression": self.regression, "change": self.change, "baseline_ms": self.baseline_ms,
                "threshold": self.threshold, "runs": self.runs, "message": self.message, "decision": self.decision,
                "interval": list(self.interval) if self.interval is not None else None, "confidence": CONFIDENCE,
                "method": self.method, "statistic": self.statistic, "against": self.against,
                "changes": [c.as_dict() for c in self.changes], "baseline_runs": list(self.baseline_runs)}


def _usable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _threshold(medians: Sequence[float], base: float) -> float:
    """``max(5 %, MAD_FACTOR sd)`` of the earlier medians; 10 % with fewer than :data:`MIN_HISTORY` of them (too
    few to tell their spread)."""
    if len(medians) < MIN_HISTORY:
        return FEW_RUNS_CHANGE
    mad = median(abs(m - base) for m in medians)
    return max(MIN_CHANGE, MAD_FACTOR * MAD_TO_SD * mad / base)


def _percent(x: float) -> str:
    return f"{x * 100:+.1f}%"


def statistic_of(samples_ms: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of a run's samples (50: its median)."""
    return percentile(samples_ms, q)


def change_interval(samples_ms: Sequence[float], earlier: Sequence[Measured], confidence: float = CONFIDENCE,
                    resamples: int = RESAMPLES, seed: int = 0, predictive: bool = True,
                    q: float = 50) -> tuple[float, float]:
    """The ``confidence`` interval of the relative change of a run's ``q``-th percentile (its median by default)
    against the median of the ``earlier`` runs' ones, by a two-level bootstrap: the earlier runs are resampled
    with replacement and each one's samples within it (a run without samples counts as its median alone); the
    run's own samples are resampled too and, ``predictive`` with :data:`MIN_HISTORY` earlier runs or more,
    shifted by one of the earlier runs' deviations from their median. Deterministic (``seed``)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def statistics_of(values: Sequence[float]) -> Any:
        v = np.asarray(values, dtype=float)
        if v.size < 2:
            return np.full(resamples, float(v[0]))
        # The q-th percentile of each resample, interpolated as percentile() does (a partition: no full sort).
        position = (v.size - 1) * q / 100.0
        low = math.floor(position)
        high = min(low + 1, v.size - 1)
        part = np.partition(v[rng.integers(0, v.size, size=(resamples, v.size))], sorted({low, high}), axis=1)
        return part[:, low] + (part[:, high] - part[:, low]) * (position - low)

    this = statistics_of(samples_ms)
    per_run = np.stack([statistics_of(run.samples_ms or (run.median_ms,)) for run in earlier])
    picks = rng.integers(0, len(earlier), size=(len(earlier), resamples))
    base = np.median(np.take_along_axis(per_run, picks, axis=0), axis=0)
    if predictive and len(earlier) >= MIN_HISTORY:  # this run drifts as the earlier ones did
        points = np.array([statistic_of(run.samples_ms, q) if run.samples_ms else run.median_ms for run in earlier])
        drift = points / np.median(points) - 1.0
        this = this * (1.0 + drift[rng.integers(0, len(earlier), size=resamples)])
    tail = (1 - confidence) / 2
    low, high = np.quantile(this / base - 1.0, [tail, 1 - tail])
    return float(low), float(high)


def spread_of(samples_ms: Sequence[float]) -> float:
    """How far a run's p90 lies above its median, relative to the median (noisy: above :data:`NOISY_SPREAD`)."""
    middle = percentile(samples_ms, 50)
    return (percentile(samples_ms, 90) - middle) / middle if middle > 0 else 0.0


def percentile_to_judge(runs: Sequence[Sequence[float]]) -> int:
    """What runs are compared by: their median (50), or their 10th percentile when one of them is noisy and every
    one has its samples (the median is what other work on the machine moves; the fastest samples show the code)."""
    if all(len(s) >= MIN_BOOTSTRAP_SAMPLES for s in runs) and any(spread_of(s) > NOISY_SPREAD for s in runs):
        return NOISY_PERCENTILE
    return 50


def judge_runs(run: Measured, earlier: Sequence[Measured], noisy: bool = False, against: str = SAME_BUILD,
               changes: Sequence[Change] = ()) -> Verdict:
    """Is ``run`` slower than the ``earlier`` runs (oldest first; the last :data:`HISTORY` count)?

    With the run's samples, decided on the interval of the change (module docstring): of the medians, or of the
    10th percentiles when a run is noisy and every run has its samples. Without them (fewer than
    :data:`MIN_BOOTSTRAP_SAMPLES`), on the medians alone, as :func:`judge`. ``against`` and ``changes`` say
    which runs these are (the same build, or the build before a change) and are named in the message.
    """
    samples = [s for s in run.samples_ms if _usable(s)]
    earlier = [Measured(e.median_ms, tuple(s for s in e.samples_ms if _usable(s)), e.run_id)
               for e in earlier if _usable(e.median_ms)][-HISTORY:]
    ids = tuple(e.run_id for e in earlier if e.run_id)
    runs = (f"the previous {len(earlier)} run(s) of this build" if against == SAME_BUILD else
            f"the previous build's last {len(earlier)} run(s)")
    changed = f"; changed: {', '.join(str(c) for c in changes)}" if changes else ""
    if not earlier or not _usable(run.median_ms):
        return Verdict(False, None, None, None, 0, "first run of this lineage" if not earlier else
                       "no latency to judge", FIRST, against=against if earlier else None, changes=tuple(changes))
    if len(samples) < MIN_BOOTSTRAP_SAMPLES:
        verdict = judge(run.median_ms, [e.median_ms for e in earlier], noisy)
        message = verdict.message.replace(f"the previous {len(earlier)} run(s)", runs) + changed
        decision = REGRESSION if verdict.regression else (INCONCLUSIVE if noisy else SAME)
        return Verdict(verdict.regression, verdict.change, verdict.baseline_ms, verdict.threshold, len(earlier),
                       message, decision, None, "medians", against, tuple(changes), ids)
    q = percentile_to_judge([samples, *(e.samples_ms for e in earlier)])
    points = [e.median_ms if q == 50 else statistic_of(e.samples_ms, q) for e in earlier]
    point = run.median_ms if q == 50 else statistic_of(samples, q)
    base = median(points)
    threshold = _threshold(points, base)
    change = point / base - 1.0
    low, high = change_interval(samples, earlier, q=q)
    if change > threshold and low > 0:
        decision = REGRESSION
    elif change < -threshold and high < 0:
        decision = FASTER
    elif abs(change) > threshold:
        decision = INCONCLUSIVE
    else:
        decision = SAME
    statistic = "median" if q == 50 else f"p{q}"
    ratio = f"{point / base:.2f}x, " if abs(change) >= 0.5 else ""
    figures = f"{_percent(change)} ({ratio}{CONFIDENCE:.0%} interval {_percent(low)} to {_percent(high)}) against "
    figures += (f"the median of {runs} ({base:.4g} ms)" if q == 50 else
                f"{runs} ({base:.4g} ms by the {q}th percentile: the runs are noisy, their fastest samples show the "
                "code's speed)")
    rule = f"a change counts beyond {threshold * 100:.1f}%"
    message = {
        REGRESSION: f"REGRESSION: {figures}{changed}; {rule}",
        FASTER: f"faster: {figures}{changed}; {rule}",
        SAME: f"{figures}{changed}: within the noise ({rule})",
        INCONCLUSIVE: f"{figures}{changed}; inconclusive: the interval reaches zero ({rule})",
    }[decision]
    return Verdict(decision == REGRESSION, change, base, threshold, len(earlier), message, decision, (low, high),
                   "bootstrap", against, tuple(changes), ids, statistic)


def judge(median_ms: float, history_ms: Sequence[float], noisy: bool = False) -> Verdict:
    """The medians-only rule (runs recorded without samples): is a run with ``median_ms`` slower than the
    earlier medians (oldest first) by more than the threshold? A noisy run is never called a regression."""
    earlier = list(history_ms)[-HISTORY:]
    if not earlier:
        return Verdict(False, None, None, None, 0, "first run of this lineage")
    base = median(earlier)
    threshold = _threshold(earlier, base) if base > 0 else FEW_RUNS_CHANGE
    change = (median_ms - base) / base if base > 0 else 0.0
    regression = change > threshold and not noisy
    text = (f"{change * 100:+.1f}% against the median of the previous {len(earlier)} run(s) ({base:.4g} ms); "
            f"a regression is > {threshold * 100:.1f}%")
    if regression:
        text = "REGRESSION: " + text
    if noisy:
        text += "; inconclusive: this run's spread is large (p90 > 10 % above the median)"
    decision = REGRESSION if regression else (INCONCLUSIVE if noisy else SAME)
    return Verdict(regression, change, base, threshold, len(earlier), text, decision, method="medians")
