"""A run judged against its lineage: the earlier runs of the same model on the same device, target and input.

A nightly job's runs form a lineage whatever build each used (:func:`pipeline.results.lineage_of`). Within
it, the runs of one *setup* (one build on one device, its series; the same TVM threads and ``--number``) are
the same measurement repeated (:func:`same_setup`). :func:`judge_record` judges a run:

* against the earlier runs of its own setup when the lineage's last run had it too: drift of one build
  (``against: same build``);
* against the runs of the previous setup when the lineage's last run had another one (a TVM upgrade, other
  schedules, opt_level, tuning, code, device or threads): the verdict names what changed (:func:`changes_between`)
  and says how much faster or slower this build is (``against: previous build``).

The decision itself is :func:`pipeline.latency.judge_runs` (an interval from the samples; records without
samples: their medians).
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.latency import (
    HISTORY, NOISY_SPREAD, PREVIOUS_BUILD, SAME_BUILD, Change, Measured, Verdict, judge_runs,
)
from pipeline.store.ledger import RunRecord

#: Fields of a record that make its build or its measurement, named when they change (besides ``versions.*``).
BUILD_FIELDS = ("model_digest", "weights", "opt_level", "tune_trials", "schedules", "tuning_key", "number")


def spread(latency: dict[str, Any] | None) -> float:
    """A run's own noise: how far its p90 lies above its median, relative to the median (0 when unknown)."""
    latency = latency or {}
    median, p90 = latency.get("median"), latency.get("p90")
    if not isinstance(median, (int, float)) or not isinstance(p90, (int, float)) or not median > 0:
        return 0.0
    return max(0.0, (p90 - median) / median)


def measured(record: RunRecord) -> Measured:
    """What judging needs of a record: its median and its samples (none in records written before they were)."""
    return Measured(record.median_ms or 0.0, tuple(record.samples_ms or ()), record.id)


def _threads(record: RunRecord) -> int | None:
    """The TVM threads the run was timed with: what the device reported, else what ``--threads`` asked for."""
    return record.threads if record.threads is not None else record.threads_requested


def same_setup(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs are the same measurement: the same series (build, device, input), the same inferences
    per sample, and the same TVM threads where both runs recorded them."""
    ta, tb = _threads(a), _threads(b)
    return a.series == b.series and a.number == b.number and (ta is None or tb is None or ta == tb)


def changes_between(a: RunRecord, b: RunRecord) -> tuple[Change, ...]:
    """What differs from run ``a`` to run ``b`` in their build, versions, device and timing setup.

    The tuning key is named only when the trial budget is the same (a new budget is a new key); the build key
    only when nothing else explains it (our build code, the linker or the schedule rules changed)."""
    found = []
    for name in BUILD_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x != y and not (name == "tuning_key" and a.tune_trials != b.tune_trials):
            found.append(Change(name, x, y))
    va, vb = a.versions or {}, b.versions or {}
    found += [Change(f"versions.{name}", va.get(name), vb.get(name)) for name in sorted(set(va) | set(vb))
              if va.get(name) != vb.get(name)]
    if a.device != b.device:
        found.append(Change("device", a.device, b.device))
    if a.device_identity != b.device_identity:
        found.append(Change("device_identity", a.device_identity, b.device_identity))
    if None not in (_threads(a), _threads(b)) and _threads(a) != _threads(b):
        found.append(Change("threads", _threads(a), _threads(b)))
    if not found and a.build_key != b.build_key:
        found.append(Change("build_key", (a.build_key or "-")[:12], (b.build_key or "-")[:12]))
    return tuple(found)


def judge_record(run: RunRecord, earlier: Sequence[RunRecord]) -> Verdict:
    """The verdict on ``run`` against the ``earlier`` passed runs of its lineage (oldest first), see the module
    docstring."""
    usable = [r for r in earlier if r.median_ms]
    noisy = spread(run.latency_ms) > NOISY_SPREAD
    if not usable:
        return judge_runs(measured(run), [], noisy)
    last = usable[-1]
    if same_setup(run, last):
        same = [measured(r) for r in usable if same_setup(run, r)][-HISTORY:]
        return judge_runs(measured(run), same, noisy, SAME_BUILD)
    previous: list[RunRecord] = []
    for record in reversed(usable):  # the previous setup's last consecutive runs
        if not same_setup(record, last) or len(previous) >= HISTORY:
            break
        previous.append(record)
    return judge_runs(measured(run), [measured(r) for r in reversed(previous)], noisy, PREVIOUS_BUILD,
                      changes_between(usable[-1], run))
