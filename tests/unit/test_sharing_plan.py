"""Tuning records shared across models, the parts that need no MetaSchedule run (pipeline/tuning/shared.py): which
tunings of the store a build may draw on (the tuning index, verified), the build key's ``records`` input, what a
build stores about where its kernels' schedules came from, and how the run shows it. (A real tuning shared with
another model's build: tests/integration/test_shared_tunings.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import make_summary
from pipeline.errors import BuildError
from pipeline.planning import keys
from pipeline.planning.plan import plan_build
from pipeline.planning.request import RunRequest, resolve
from pipeline.results import TuningSource, TuningSources
from pipeline.store import ArtifactStore
from pipeline.store.layout import RECORD_FILE, TUNING_REPORT_FILE, WORKLOAD_FILE
from pipeline.targets import TargetInfo, parse_target
from pipeline.tuning import family_key, remember_tuning, tune_inputs
from pipeline.tuning.shared import SharedTuning, parse_sources, shared_tunings, sources_json
from pipeline.views.run import format_text

FAST = settings(max_examples=75, deadline=None, database=None)


def put_tuning(store: ArtifactStore, digest: str, target: TargetInfo, trials: int, name: str = "m.onnx") -> str:
    """A real tuning artifact (an empty database: enough for planning, not for a build), indexed."""
    inputs = tune_inputs(digest, target, trials)

    def produce(directory: Path) -> None:
        for file_name in (WORKLOAD_FILE, RECORD_FILE):
            (directory / file_name).write_text("")
        (directory / TUNING_REPORT_FILE).write_text(json.dumps({"trials": trials}))

    key = keys.key_of(inputs)
    store.put(key, "tuning", produce, {**inputs, "name": name})
    remember_tuning(store, inputs, key)
    return key


def test_build_inputs__records_are_sorted_and_absent_without_any():
    plain = keys.build_inputs("a" * 64, "llvm", 3, schedules="rules-v1")
    assert "records" not in plain
    assert keys.build_inputs("a" * 64, "llvm", 3, schedules="rules-v1", records=[]) == plain
    shared = keys.build_inputs("a" * 64, "llvm", 3, schedules="rules-v1", records=["f" * 64, "0" * 64])
    assert shared == {**plain, "records": ["0" * 64, "f" * 64]}
    assert keys.key_of(shared) != keys.key_of(plain)


def test_shared_tunings__the_largest_verified_tuning_of_each_model_for_the_same_target(store_root, caplog):
    store, llvm = ArtifactStore(store_root), parse_target("llvm")
    put_tuning(store, "a" * 64, llvm, 4, "a.onnx")
    a8 = put_tuning(store, "a" * 64, llvm, 8, "a.onnx")
    b4 = put_tuning(store, "b" * 64, llvm, 4, "b.onnx")
    put_tuning(store, "c" * 64, parse_target("llvm -mcpu=znver4"), 4)  # another target: not shared
    put_tuning(store, "d" * 64, parse_target('{"kind": "llvm", "num-cores": 64}'), 4)  # other cores: not shared
    found = shared_tunings(store, llvm)
    assert found == tuple(sorted([SharedTuning(a8, "a.onnx", "a" * 64, 8), SharedTuning(b4, "b.onnx", "b" * 64, 4)],
                                 key=lambda t: t.key))
    # The largest no longer verifies: the next smaller one of the family is shared instead.
    (store.path(a8) / RECORD_FILE).write_text("[0, tampered]\n")
    assert {(t.model_digest, t.trials) for t in shared_tunings(ArtifactStore(store_root), llvm)} == {
        ("a" * 64, 4), ("b" * 64, 4)}
    assert shared_tunings(store, parse_target("cuda -arch=sm_90")) == ()


def test_shared_tunings__an_index_without_its_inputs_or_with_false_ones_is_not_shared(store_root):
    store, llvm = ArtifactStore(store_root), parse_target("llvm")
    put_tuning(store, "a" * 64, llvm, 4)
    index = store_root / ".tuning" / f"{family_key('a' * 64, llvm)}.json"
    data = json.loads(index.read_text())
    assert data["inputs"] == {k: v for k, v in tune_inputs("a" * 64, llvm, 4).items() if k != "trials"}
    # Inputs that do not hash to the family's key (planted or altered) are no family's.
    index.write_text(json.dumps({**data, "inputs": {**data["inputs"], "model": "e" * 64}}))
    assert shared_tunings(store, llvm) == ()
    # An index written before it recorded the inputs is shared again once the tuning is remembered again.
    index.write_text(json.dumps({k: v for k, v in data.items() if k != "inputs"}))
    assert shared_tunings(store, llvm) == ()
    remember_tuning(store, tune_inputs("a" * 64, llvm, 4), keys.key_of(tune_inputs("a" * 64, llvm, 4)))
    assert [t.model_digest for t in shared_tunings(store, llvm)] == ["a" * 64]
    (store_root / ".tuning" / "not-a-family.json").write_text("{}")
    index.write_text("{not json")
    assert shared_tunings(store, llvm) == ()


def test_plan__shared_records_are_keyed_only_where_the_build_applies_metaschedule_schedules(model):
    llvm = parse_target("llvm")
    other = SharedTuning("1" * 64, "other.onnx", "b" * 64, 8)
    own = SharedTuning("2" * 64, model.name, model.digest, 16)
    rules, shared = plan_build(model, llvm, 3), plan_build(model, llvm, 3, shared=(own, other))
    assert shared.shared == (other, own) and shared.build.inputs["records"] == [other.key, own.key]
    assert shared.build.inputs == {**rules.build.inputs, "records": [other.key, own.key]}
    assert shared.build.key != rules.build.key and shared.library.key != rules.library.key
    # A tuned build applies its own tuning: its own model's other tunings are left out, the others shared.
    tuned = plan_build(model, llvm, 3, 8, shared=(own, other))
    assert tuned.shared == (other,) and tuned.build.inputs["records"] == [other.key]
    assert plan_build(model, llvm, 3, 8, shared=(own,)).build == plan_build(model, llvm, 3, 8).build
    # TVM's own pipeline applies no MetaSchedule schedules: nothing shared, the key of before.
    none = plan_build(model, llvm, 3, schedules="none", shared=(other,))
    assert none.shared == () and none.build == plan_build(model, llvm, 3, schedules="none").build


def test_resolve__shared_tunings_on_finds_the_stores_tunings_and_off_none(store_root, tiny_onnx):
    store = ArtifactStore(store_root)
    key = put_tuning(store, "b" * 64, parse_target("llvm"), 4, "b.onnx")
    common = {"model": str(tiny_onnx), "artifacts": str(store_root), "build_only": True}
    on = resolve(RunRequest(**common))
    assert [t.key for t in on.shared] == [key] and on.shared_tunings == "on"
    assert resolve(RunRequest(**common, shared_tunings="off")).shared == ()
    assert resolve(RunRequest(**common, schedules="none")).shared == ()
    assert resolve(RunRequest(**common, target="llvm -mcpu=znver4")).shared == ()
    with pytest.raises(Exception, match="--shared-tunings must be on or off"):
        resolve(RunRequest(**common, shared_tunings="maybe"))


SOURCES = TuningSources(kernels=12, rules=2, considered=3, tunings=(
    TuningSource("1" * 64, "tiny.onnx", 8, 3, own=True), TuningSource("2" * 64, "resnet18_v2", 4096, 6)))


def test_sources__round_trip_and_the_report_says_which_tunings_scheduled_how_many_kernels():
    assert parse_sources(sources_json(SOURCES)) == SOURCES
    assert SOURCES.unscheduled == 1
    assert SOURCES.as_dict()["tunings"][1] == {"tuning": "2" * 64, "model": "resnet18_v2", "trials": 4096,
                                               "kernels": 6, "own": False}
    summary = make_summary(tuning_sources=SOURCES)
    assert summary.as_json()["tuning_sources"] == SOURCES.as_dict()
    assert summary.build.as_json()["tuning_sources"] == SOURCES.as_dict()
    assert make_summary().as_json()["tuning_sources"] is None
    line = next(line for line in format_text(summary).splitlines() if line.startswith("Records"))
    assert line.startswith(f"Records    12 kernels: 3 from its own tuning {'1' * 16} (8 trials), 6 from the tuning "
                           f"of resnet18_v2 {'2' * 16} (4096 trials), 2 from the rules, 1 unscheduled; ")
    assert "Records" in format_text(summary.build) and "Records" not in format_text(make_summary())


_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                      max_size=4), max_leaves=20)
_SOURCE = st.builds(TuningSource, st.text("0123456789abcdef", min_size=64, max_size=64),
                    st.text(max_size=100), st.integers(0, 10**6), st.integers(0, 10**4), st.booleans())


@FAST
@given(st.builds(TuningSources, st.integers(0, 10**4), st.integers(0, 10**4), st.lists(_SOURCE, max_size=5).map(tuple),
                 st.integers(0, 100)))
def test_parse_sources__round_trips(sources):
    assert parse_sources(sources_json(sources)) == sources


@FAST
@given(st.one_of(_ANY_JSON, st.fixed_dictionaries({"kernels": _ANY_JSON, "rules": _ANY_JSON, "considered": _ANY_JSON,
                                                    "tunings": st.lists(_ANY_JSON, max_size=3)})))
def test_parse_sources__anything_else_is_none_never_a_traceback(data):
    parsed = parse_sources(json.dumps(data).encode())
    assert parsed is None or isinstance(parsed, TuningSources)
    assert parse_sources(b"\xff{") is None


def test_build__refuses_shared_tunings_its_plan_does_not_name(store_root, model):
    from tasks.build import build

    store = ArtifactStore(store_root)
    plan = plan_build(model, parse_target("llvm"), 3)
    other = SharedTuning("1" * 64, "other.onnx", "b" * 64, 8)
    with pytest.raises(BuildError, match="does not name the shared tunings"):
        build(None, parse_target("llvm"), 3, plan.build, store, shared=(other,))  # type: ignore[arg-type]
