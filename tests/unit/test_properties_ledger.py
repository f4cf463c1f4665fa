"""Properties of ledger records (pipeline/store/ledger.py RunRecord.as_json / from_json).

A record file is untrusted input (the store may be shared): whatever JSON it holds, from_json returns a record
whose every field has its declared type, or raises ValueError. pydantic's strict mode is the independent judge
of "has its declared type".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from pipeline.store.ledger import FORMAT, RunRecord

FAST = settings(max_examples=75, deadline=None, database=None)

HINTS = get_type_hints(RunRecord)
FIELDS = [f.name for f in dataclasses.fields(RunRecord)]
REQUIRED = [f.name for f in dataclasses.fields(RunRecord)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory
            for f in dataclasses.fields(RunRecord) if f.name not in REQUIRED}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
RUN_ID = st.from_regex(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}", fullmatch=True)


def _of(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of ``annotation`` as JSON gives them back (floats without NaN, so that records compare equal)."""
    if annotation is Any:
        return JSON
    if annotation is type(None):
        return st.none()
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union or (origin is not None and type(annotation).__name__ == "UnionType"):
        return st.one_of(*(_of(arm) for arm in args))
    if origin is list:
        return st.lists(_of(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(_of(args[0]), _of(args[1]), max_size=3)
    scalars = {bool: st.booleans(), int: st.integers(), float: st.floats(allow_nan=False), str: st.text(max_size=12)}
    return scalars[annotation]


@st.composite
def records(draw: st.DrawFn) -> RunRecord:
    values = {name: draw(_of(HINTS[name])) for name in FIELDS}
    return RunRecord(**{**values, "id": draw(RUN_ID), "format": FORMAT})


def _conforms(value: Any, annotation: Any) -> bool:
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


@FAST
@given(records())
def test_from_json__round_trips_as_json(record):
    assert RunRecord.from_json(json.loads(json.dumps(record.as_json()))) == record


@FAST
@given(records(), st.sampled_from([f for f in FIELDS if f not in ("id", "format")]), JSON)
def test_from_json__a_field_of_another_type_is_a_value_error(record, name, value):
    data = {**json.loads(json.dumps(record.as_json())), name: value}
    try:
        read = RunRecord.from_json(data)
    except ValueError as exc:
        assert not _conforms(value, HINTS[name]), exc
    else:
        assert _conforms(value, HINTS[name]) and getattr(read, name) == value


@FAST
@given(records(), st.sampled_from(FIELDS))
def test_from_json__a_missing_field_without_default_is_a_value_error(record, name):
    data = record.as_json()
    del data[name]
    if name in REQUIRED or name == "format":  # format: a record of no known format
        with pytest.raises(ValueError):
            RunRecord.from_json(data)
    else:
        default = DEFAULTS[name]
        assert getattr(RunRecord.from_json(data), name) == (default() if callable(default) else default)


@FAST
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=len(FIELDS))))
def test_from_json__any_json_is_a_record_or_a_value_error(data):
    try:
        record = RunRecord.from_json(data)
    except ValueError:
        return
    for name in FIELDS:
        assert _conforms(getattr(record, name), HINTS[name]), name


@pytest.mark.parametrize(
    ("name", "value"),
    [("check", "yes"), ("regression", 5), ("versions", ["tvm", "0.27"]), ("latency_ms", {"median": "fast"}),
     ("exit_code", True), ("opt_level", 3.0), ("input_shape", [1, "3"]), ("stages", {"build": 1}),
     ("latency_ms", {"median": 10**400}), ("top5", [["x"]]), ("extra", None), ("format", True)],
)
def test_from_json__named_wrong_types_are_value_errors(name, value, record_json):
    with pytest.raises(ValueError):
        RunRecord.from_json({**record_json, name: value})


@pytest.fixture
def record_json() -> dict[str, Any]:
    return {
        "id": "20261128T101500Z-3f2a9c", "series": None, "started": "2026-11-28T10:15:00Z",
        "finished": "2026-11-28T10:15:09Z", "status": "passed", "exit_code": 0, "error": None, "model": "m",
        "model_digest": None, "target": "llvm", "opt_level": 3, "tune_trials": 0, "tuning_key": None,
        "build_key": None, "library_key": None, "device": "embedded", "device_identity": None, "image": None,
        "input_shape": [1, 3, 224, 224], "stages": {"build": "ran"}, "latency_ms": {"median": 1.5, "mean": 2},
        "samples": 10, "check": None, "regression": None, "versions": {"tvm": "0.27.0"}, "format": FORMAT,
    }


def test_from_json__the_fixture_is_a_record(record_json):
    assert RunRecord.from_json(record_json).median_ms == 1.5
