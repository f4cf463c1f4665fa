"""The parts of tuning that need no MetaSchedule run: the build key with and without a tuning, a tuning's
family, the family index behind ``--tune-more`` and continuing from the largest verified database, a
tuning's summary, the convergence rule and latencies for people. (The tuning itself:
``tests/integration/test_tune.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.planning import keys
from pipeline.errors import UsageError
from pipeline.store import ArtifactStore
from pipeline.targets import TargetInfo, parse_target
from pipeline.store.layout import RECORD_FILE, TUNING_REPORT_FILE, WORKLOAD_FILE
from pipeline.tuning import (
    TuningSpace,
    family_key,
    find_base,
    format_latency,
    has_converged,
    remember_tuning,
    resolve_trials,
    space_for,
    tune_inputs,
    tune_manifest_extra,
)
from tasks.tune import read_summary


def test_build_inputs__tuning_is_keyed_and_absent_without_one():
    plain = keys.build_inputs("a" * 64, "llvm", 3)
    assert "tuning" not in plain
    assert plain == keys.build_inputs("a" * 64, "llvm", 3, None)
    with_db = keys.build_inputs("a" * 64, "llvm", 3, "b" * 64)
    assert with_db == {**plain, "tuning": "b" * 64}
    assert keys.key_of(with_db) != keys.key_of(plain)


# -- continuing a smaller tuning, the family index, --tune-more ----------------------------------------------


def put_tuning(store: ArtifactStore, digest: str, target: TargetInfo, trials: int, estimated_ms: float = 1.0) -> str:
    """A real tuning artifact of ``trials`` (a one-record database: enough for the index, not for a build)."""
    inputs = tune_inputs(digest, target, trials)

    def produce(directory: Path) -> None:
        (directory / WORKLOAD_FILE).write_text("")
        (directory / RECORD_FILE).write_text("")
        report = {"trials": trials, "estimated_ms": estimated_ms, "seconds": 1.0,
                  "history": [{"trials": trials, "estimated_ms": estimated_ms, "seconds": 1.0}]}
        (directory / TUNING_REPORT_FILE).write_text(json.dumps(report))

    key = keys.key_of(inputs)
    store.put(key, "tuning", produce, inputs)
    remember_tuning(store, inputs, key)
    return key


def test_tune_family__is_the_tuning_key_without_its_budget():
    target, digest = parse_target("llvm"), "a" * 64
    four, eight = tune_inputs(digest, target, 4), tune_inputs(digest, target, 8)
    assert keys.tune_family(four) == keys.tune_family(eight) == family_key(digest, target)
    assert keys.key_of(four) != keys.key_of(eight)
    assert family_key("b" * 64, target) != family_key(digest, target)
    assert family_key(digest, parse_target("llvm -mcpu=znver4")) != family_key(digest, target)


def test_resolve_trials__tune_more_adds_to_the_largest_tuning(store_root):
    target, digest = parse_target("llvm"), "a" * 64
    assert resolve_trials(ArtifactStore(store_root), digest, target, 64, 0) == 64
    assert resolve_trials(ArtifactStore(store_root), digest, target, 0, 32) == 32  # none yet: N
    store = ArtifactStore(store_root)
    put_tuning(store, digest, target, 4)
    put_tuning(store, digest, target, 8)
    put_tuning(store, "b" * 64, target, 100)  # another family
    assert resolve_trials(ArtifactStore(store_root), digest, target, 0, 32) == 8 + 32
    assert resolve_trials(ArtifactStore(store_root), digest, target, 16, 0) == 16
    index = json.loads((store_root / ".tuning" / f"{family_key(digest, target)}.json").read_text())
    assert index["tunings"] == {"4": keys.key_of(tune_inputs(digest, target, 4)),
                                "8": keys.key_of(tune_inputs(digest, target, 8))}
    for trials, more, message in [(8, 8, "not both"), (0, -1, "0 or more"), (0, 100_000, "above")]:
        with pytest.raises(UsageError, match=message):
            resolve_trials(ArtifactStore(store_root), digest, target, trials, more)


def test_find_base__ignores_a_corrupt_or_foreign_indexed_tuning(store_root, caplog):
    target, digest = parse_target("llvm"), "a" * 64
    store = ArtifactStore(store_root)
    four = put_tuning(store, digest, target, 4)
    eight = put_tuning(store, digest, target, 8)
    sixteen = tune_inputs(digest, target, 16)
    base = find_base(store, sixteen)
    assert base is not None and (base.key, base.trials) == (eight, 8)
    assert find_base(store, tune_inputs(digest, target, 8)).key == four  # only smaller budgets are bases
    assert find_base(store, tune_inputs(digest, target, 4)) is None

    # The 8-trial database no longer verifies: the 4-trial one is continued, --tune-more counts from 4.
    (store.path(eight) / RECORD_FILE).write_text("[0, tampered]\n")
    assert find_base(store, sixteen).key == four
    assert resolve_trials(ArtifactStore(store_root), digest, target, 0, 10) == 14
    # An index entry that names another key than the family's for its budget is ignored.
    index = store_root / ".tuning" / f"{family_key(digest, target)}.json"
    data = json.loads(index.read_text())
    data["tunings"]["32"] = four
    index.write_text(json.dumps(data))
    assert find_base(store, tune_inputs(digest, target, 64)).key == four
    assert any("not that tuning's key" in r.getMessage() for r in caplog.records)
    # An unreadable index is no base at all (a larger budget then starts over).
    index.write_text("{not json")
    assert find_base(store, sixteen) is None
    assert resolve_trials(ArtifactStore(store_root), digest, target, 0, 10) == 10


def test_read_summary__of_a_continued_and_of_an_older_tuning(store_root):
    target, store = parse_target("llvm"), ArtifactStore(store_root)
    key = put_tuning(store, "a" * 64, target, 8, estimated_ms=2.5)
    summary = read_summary(store.get(key), ArtifactStore(store_root))
    assert summary["key"] == key and summary["trials"] == 8 and summary["estimated_ms"] == 2.5
    assert (summary["trials_reused"], summary["trials_new"], summary["converged"]) == (0, 8, False)
    assert summary["history"] == [{"trials": 8, "estimated_ms": 2.5, "seconds": 1.0}] and "tasks" not in summary


def test_read_summary__figures_out_of_range_are_never_shown(store_root):
    """A ``tuning.json`` with a negative estimate, counts beyond the budget, non-numbers: each becomes None (or
    its default) and the report line shows no estimate."""
    from pipeline.views.run import format_tuning

    target, store = parse_target("llvm"), ArtifactStore(store_root)
    inputs = tune_inputs("c" * 64, target, 8)
    bad = {"trials": -3, "trials_reused": 99, "trials_new": "x", "measured": -1, "seconds": float("inf"),
           "estimated_ms": -1, "converged": "yes", "base": "../etc", "runner": 7,
           "history": [{"trials": 4, "estimated_ms": -1, "seconds": -2}, "junk", {"trials": 0}]}
    key = keys.key_of(inputs)
    tuning = store.put(key, "tuning", lambda d: (d / TUNING_REPORT_FILE).write_text(json.dumps(bad)), inputs)
    summary = read_summary(tuning, store)
    assert summary == {
        "key": key, "trials": 8, "trials_reused": 0, "trials_new": 8, "measured": None, "seconds": None,
        "estimated_ms": None, "converged": False, "history": [{"trials": 4, "estimated_ms": None, "seconds": None}],
        "base": None, "runner": None,
    }
    assert format_tuning(summary) == "Tuning     8 trials (0 reused, 8 new)"
    assert format_tuning({**summary, "estimated_ms": float("inf")}) == format_tuning({**summary, "estimated_ms": -1})


def test_has_converged__when_two_increments_gained_less_than_one_percent():
    def history(*estimates):
        return [{"trials": 64 * (i + 1), "estimated_ms": e, "seconds": 1.0} for i, e in enumerate(estimates)]

    assert not has_converged(history(100.0, 99.9))  # one increment is not enough to tell
    assert has_converged(history(100.0, 99.6, 99.2))  # 0.8 % over the last two increments
    assert not has_converged(history(100.0, 99.6, 98.8))  # 1.2 %
    assert has_converged(history(200.0, 100.0, 99.5, 99.4))  # only the last two count
    assert not has_converged(history(100.0, 99.9, None))  # a task was never measured: unknown


def test_format_latency__us_below_a_millisecond_and_never_zero():
    assert format_latency(1.4e-8) == "0.014 us"
    assert format_latency(4.32e-5) == "43.2 us"
    assert format_latency(1.27e-3) == "1.27 ms"
    assert format_latency(0.1742) == "174 ms"
    assert format_latency(None) == format_latency(float("nan")) == "not measured yet"


def test_space__cpu_tunings_are_nhwc_gpu_and_older_tunings_nchw():
    cpu, gpu = parse_target("llvm"), parse_target("cuda -arch=sm_90")
    assert space_for(cpu).layout == "NHWC" and space_for(gpu).layout == "NCHW"
    assert space_for(cpu).name == "static-shape+prepack+nhwc,anchor-block,population=64"
    # The NCHW name is the one tunings had before the layout existed: their keys are unchanged.
    assert space_for(gpu).name == "static-shape+prepack,anchor-block,population=64"
    assert tune_inputs("a" * 64, cpu, 8)["space"] != tune_inputs("a" * 64, gpu, 8)["space"]
    # What a tuning artifact records is what its build replays: an older record without a layout is NCHW.
    recorded = tune_manifest_extra(cpu, "local")["space_options"]
    assert TuningSpace.from_options(recorded) == space_for(cpu)
    older = {k: v for k, v in recorded.items() if k != "layout"}
    assert TuningSpace.from_options({**older, "unknown": 1}).layout == "NCHW"
