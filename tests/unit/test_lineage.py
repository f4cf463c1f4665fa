"""Judging a run against its lineage (pipeline/latency.py judge_runs, pipeline/store/lineage.py judge_record):
the interval from the samples, build changes named, old records without samples, and the decision's robustness
on noisy numbers. (Real runs judged end to end: tests/integration/test_lineage_runs.py.)"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt

import numpy as np
import pytest

from pipeline.latency import (
    FASTER,
    FIRST,
    INCONCLUSIVE,
    KEPT_SAMPLES,
    PREVIOUS_BUILD,
    REGRESSION,
    SAME,
    SAME_BUILD,
    Measured,
    judge_runs,
    kept_samples,
    latency_of,
)
from pipeline.results import RunStamp, lineage_of, series_of
from pipeline.store import ArtifactStore
from pipeline.store.ledger import RunRecord
from pipeline.store.lineage import changes_between, judge_record, same_setup

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'
NOW = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.timezone.utc)
VERSIONS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1", "python": "3.11.7"}


def samples(median: float, cv: float, n: int = 30, seed: int = 0, busy: float = 0.05) -> list[float]:
    """``n`` latency samples around ``median``: log-normal noise, and a ``busy`` share of them slowed 2-6x by
    other work on the machine (a loaded 2-core host: about half, and bimodal)."""
    rng = np.random.default_rng(seed)
    values = median * rng.lognormal(0, cv, n)
    disturbed = rng.random(n) < busy
    values[disturbed] *= rng.uniform(2, 6, int(disturbed.sum()))
    return [float(v) for v in values]


def run(when: int, latency: list[float] | None, *, build: str = "ab", schedules: str = "rules", threads: int = 1,
        versions: dict[str, str] | None = None, identity: str = "x86_64-conda-linux-gnu, tvm 0.27.0.post1",
        keep_samples: bool = True) -> RunRecord:
    """A passed run of the lineage, ``when`` hours after NOW, of the build ``build``."""
    build_key = build * 32
    lat = latency_of(latency, 1) if latency else None
    return RunRecord(
        id=RunStamp.new(NOW + dt.timedelta(hours=when)).id,
        series=series_of(build_key, "embedded", identity, [1, 3, 32, 32]),
        started=(NOW + dt.timedelta(hours=when)).isoformat(), finished=(NOW + dt.timedelta(hours=when)).isoformat(),
        status="passed", exit_code=0, error=None, model="conv.onnx", model_digest="1f" * 32, target=TARGET,
        opt_level=3, tune_trials=0, tuning_key=None, build_key=build_key, library_key="ef" * 32, device="embedded",
        device_identity=identity, image="data/cat.png", input_shape=[1, 3, 32, 32], stages={},
        latency_ms=lat.as_dict() if lat else None, samples=lat.repeat if lat else None, check=None, regression=None,
        versions=dict(versions or VERSIONS), number=1, schedules=schedules,
        samples_ms=list(lat.samples_ms) if lat and keep_samples else None,
        conditions={"threads": threads, "threads_requested": None, "device": None, "host": None},
    )


# -- the decision on samples ------------------------------------------------------------------------------------


def test_judge_runs__first_same_slower_faster():
    base = [Measured(1.0, tuple(samples(1.0, 0.03, seed=i))) for i in range(3)]
    first = judge_runs(Measured(1.0, tuple(samples(1.0, 0.03))), [])
    assert first.decision == FIRST and first.change is None and not first.regression
    same = judge_runs(Measured(1.01, tuple(samples(1.01, 0.03, seed=9))), base)
    assert same.decision == SAME and same.method == "bootstrap" and same.against == SAME_BUILD
    low, high = same.interval
    assert low < same.change < high and "within the noise" in same.message
    slower = judge_runs(Measured(2.4, tuple(samples(2.4, 0.03, seed=9))), base)
    assert slower.decision == REGRESSION and slower.regression and slower.interval[0] > 1.0
    assert slower.message.startswith("REGRESSION: +") and "2.40x" in slower.message and "99% interval" in slower.message
    faster = judge_runs(Measured(0.5, tuple(samples(0.5, 0.03, seed=9))), base)
    assert faster.decision == FASTER and not faster.regression and faster.interval[1] < 0
    assert same.as_dict()["interval"] == list(same.interval) and same.as_dict()["confidence"] == 0.99


def test_judge_runs__inconclusive_only_when_the_interval_reaches_zero():
    base = [Measured(1.0, tuple(samples(1.0, 0.02, seed=i))) for i in range(5)]
    # A bimodal run: +60 % by its median, but nearly half its samples faster than before: the interval reaches zero.
    mixed = latency_of(samples(0.9, 0.02, n=15, seed=7) + samples(1.6, 0.02, n=16, seed=8), 1)
    verdict = judge_runs(Measured(mixed.median, mixed.samples_ms), base)
    assert verdict.interval[0] <= 0 < 0.5 < verdict.change and verdict.decision == INCONCLUSIVE
    assert "inconclusive: the interval reaches zero" in verdict.message and not verdict.regression


def test_judge_runs__without_samples_the_medians_decide():
    verdict = judge_runs(Measured(1.3), [Measured(1.0), Measured(1.02), Measured(0.99)])
    assert verdict.method == "medians" and verdict.interval is None and verdict.decision == REGRESSION
    noisy = judge_runs(Measured(1.3), [Measured(1.0)], noisy=True)
    assert noisy.decision == INCONCLUSIVE and not noisy.regression and "inconclusive" in noisy.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_judge_runs__unusable_numbers_of_old_records_are_left_out(bad):
    base = [Measured(bad, (bad, 1.0, bad)), Measured(1.0, tuple(samples(1.0, 0.03)))]
    verdict = judge_runs(Measured(1.0, tuple(samples(1.0, 0.03, seed=3))), base)
    assert verdict.runs == 1 and verdict.decision == SAME


def test_judge_runs__noise_alone_rarely_flags_and_a_real_slowdown_always_does():
    """60 simulated nightly runs each (fixed seeds): unchanged runs on a quiet host and on a loaded one (half the
    samples slowed 2-6x by other work, as on a shared 2-core host), and a 2x slowdown on loaded and noisy hosts,
    against 3 earlier runs. Unchanged runs are almost never regressions and mostly `same`; a 2x slowdown is found
    in nearly every run (in the rest the interval reaches zero: `inconclusive`), never `same`."""
    rng = np.random.default_rng(2)

    def one(median: float, cv: float, drift: float, busy: float, seed: int) -> Measured:
        lat = latency_of(samples(median * (1 + rng.normal(0, drift)), cv, seed=seed, busy=busy), 1)
        return Measured(lat.median, lat.samples_ms)

    def decisions(cv: float, drift: float, busy: float, factor: float, runs: int) -> collections.Counter:
        return collections.Counter(
            judge_runs(one(factor, cv, drift, busy, 1000 + i),
                       [one(1.0, cv, drift, busy, 10 * i + j) for j in range(runs)]).decision
            for i in range(60))

    for cv, drift, busy, runs, same in [(0.03, 0.01, 0.05, 5, 57), (0.03, 0.02, 0.5, 6, 52), (0.15, 0.03, 0.0, 6, 48)]:
        unchanged = decisions(cv, drift, busy, 1.0, runs)
        assert unchanged[REGRESSION] <= 1 and unchanged[SAME] >= same, (cv, drift, busy, runs, unchanged)
    for cv, drift, busy, factor, found in [(0.03, 0.02, 0.5, 2.0, 57), (0.03, 0.03, 0.6, 2.4, 57),
                                           (0.25, 0.05, 0.0, 2.0, 57)]:
        slower = decisions(cv, drift, busy, factor, 3)
        assert slower[REGRESSION] >= found and slower[SAME] == slower[FASTER] == 0, (cv, drift, busy, factor, slower)


def test_kept_samples__at_most_256_evenly_spaced_in_time_order():
    many = [float(i) for i in range(10_000)]
    kept = kept_samples(many)
    assert len(kept) == KEPT_SAMPLES and kept[0] == 0.0 and kept == tuple(sorted(kept)) and kept[-1] > 9900
    assert kept_samples([1.23456789, 2.0]) == (1.23457, 2.0)
    assert latency_of(many, 1).samples_ms == kept and latency_of(many, 1).repeat == 10_000


# -- the lineage: which runs, and what changed -------------------------------------------------------------------


def test_judge_record__three_rule_runs_then_no_schedules_is_a_regression_naming_the_change():
    history = [run(i, samples(1.6, 0.05, seed=i)) for i in range(3)]
    none = run(3, samples(4.0, 0.05, seed=3), build="cd", schedules="tvm-default")
    verdict = judge_record(none, history)
    assert verdict.decision == REGRESSION and verdict.against == PREVIOUS_BUILD and verdict.runs == 3
    assert [c.field for c in verdict.changes] == ["schedules"]
    assert (verdict.changes[0].a, verdict.changes[0].b) == ("rules", "tvm-default")
    assert "changed: schedules rules -> tvm-default" in verdict.message
    assert verdict.baseline_runs == tuple(r.id for r in history)
    again = judge_record(run(4, samples(4.0, 0.05, seed=4), build="cd", schedules="tvm-default"), [*history, none])
    assert again.against == SAME_BUILD and again.runs == 1 and not again.regression  # the new build's own series


def test_judge_record__a_tvm_upgrade_names_the_versions_and_the_device_and_the_speed_up():
    history = [run(i, samples(2.0, 0.03, seed=i)) for i in range(4)]
    upgraded = run(5, samples(1.5, 0.03, seed=5), build="cd",
                   versions={**VERSIONS, "apache-tvm": "0.28.0", "apache-tvm-ffi": "0.1.15"},
                   identity="x86_64-conda-linux-gnu, tvm 0.28.0")
    verdict = judge_record(upgraded, history)
    assert verdict.decision == FASTER and verdict.message.startswith("faster: -25.")
    assert [c.field for c in verdict.changes] == ["versions.apache-tvm", "versions.apache-tvm-ffi", "device_identity"]


def test_judge_record__threads_are_part_of_the_setup_unless_unknown():
    history = [run(i, samples(2.0, 0.03, seed=i), threads=2) for i in range(3)]
    one_thread = run(4, samples(2.6, 0.03, seed=4), threads=1)
    verdict = judge_record(one_thread, history)
    assert verdict.against == PREVIOUS_BUILD and [str(c) for c in verdict.changes] == ["threads 2 -> 1"]
    old = dataclasses.replace(history[0], conditions=None)  # recorded before threads were
    assert same_setup(old, one_thread) and same_setup(old, history[1])
    assert not changes_between(history[0], history[1])


def test_judge_record__same_build_drift_keeps_its_own_judgement_and_old_records_count():
    old = [run(i, samples(1.0, 0.02, seed=i), keep_samples=False) for i in range(6)]  # no samples, no lineage field
    assert all(r.samples_ms is None and r.lineage is None for r in old)
    slow = run(7, samples(1.3, 0.02, seed=7))
    verdict = judge_record(slow, old)
    assert verdict.against == SAME_BUILD and verdict.runs == 6 and verdict.decision == REGRESSION
    assert verdict.method == "bootstrap" and not verdict.changes


def test_lineage__old_records_derive_it_and_a_fleet_name_is_its_own():
    record = run(0, samples(1.0, 0.02))
    assert record.lineage is None and record.lineage_id == lineage_of("conv.onnx", "embedded", TARGET, [1, 3, 32, 32])
    named = dataclasses.replace(record, device="tracker 127.0.0.1:9190 key=dev-b", device_name="dev-b")
    assert named.name == "dev-b" and named.lineage_id == lineage_of("conv.onnx", "dev-b", TARGET, [1, 3, 32, 32])
    assert named.lineage_id != record.lineage_id
    # The embedded server's port does not split a lineage; another target or input does.
    assert lineage_of("m", "embedded 127.0.0.1:5000", TARGET, [1]) == lineage_of("m", "embedded", TARGET, [1])
    assert lineage_of("m", "embedded", "llvm", [1]) != lineage_of("m", "embedded", TARGET, [1])


def test_ledger_lineage_history__passed_runs_of_the_lineage_oldest_first(store_root):
    ledger = ArtifactStore(store_root).ledger
    mine = [run(i, samples(1.0, 0.02, seed=i)) for i in range(3)]
    other = dataclasses.replace(run(1, samples(1.0, 0.02)), model="other.onnx", id=RunStamp.new(NOW).id)
    failed = dataclasses.replace(run(2, None), status="failed", id=RunStamp.new(NOW + dt.timedelta(hours=2)).id)
    for r in (*mine, other, failed):
        ledger.write(r)
    found = ledger.lineage_history(mine[0].lineage_id, "99999999T999999Z-ffffff", 10)
    assert [r.id for r in found] == [r.id for r in mine]
    assert [r.id for r in ledger.lineage_history(mine[0].lineage_id, mine[2].id, 1)] == [mine[1].id]


def test_run_request__threads_device_name_and_the_gate_are_checked_where_the_run_starts():
    from pipeline.errors import REGRESSION_EXIT_CODE, RegressionFound, UsageError
    from pipeline.planning.request import RunRequest, check_request, request_fields

    check_request(RunRequest(threads=4, device_name="bench-b", fail_on_regression=True))
    with pytest.raises(UsageError, match=r"^--threads must be a whole number from 1 to 1024 \(got 0\)$"):
        check_request(RunRequest(threads=0))
    for bad in ("", "  ", "x\x1b[2J", "n" * 101):
        with pytest.raises(UsageError, match=r"^--device-name must be 1 to 100 printable characters"):
            check_request(RunRequest(device_name=bad))
    assert {"threads", "fail_on_regression"} <= {f.name for f in request_fields("fleet")}
    assert "threads" in {f.name for f in request_fields("fleet-device")}
    assert REGRESSION_EXIT_CODE == RegressionFound("x").exit_code == 3
