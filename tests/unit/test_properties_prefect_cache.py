"""Properties of Prefect's cache records (tasks/_cache.py ArtifactRefSerializer, _built_from_json).

A record is read back by whoever runs next (and names its serializer), so it is untrusted input: the contract
of ``_built_from_json`` is "ValueError unless it has exactly the shape and types we write". The cases at the end
are what the properties once found (wrong types converted or let through, deep nesting).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.store import Artifact, FileEntry
from tasks._cache import ArtifactRefSerializer, Built, _built_from_json

FAST = settings(max_examples=100, deadline=None, database=None)

HEX64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def builts(draw: st.DrawFn) -> Built:
    names = draw(st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True), max_size=4, unique=True))
    files = tuple(FileEntry(name, draw(HEX64), draw(st.integers(0, 2**40))) for name in sorted(names))
    inputs = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=4))
    artifact = Artifact(draw(HEX64), draw(st.sampled_from(["relax-ir", "build", "library", "tuning"])), files, inputs)
    return Built(artifact, draw(st.booleans()), draw(st.floats(min_value=0, max_value=1e6)))


@FAST
@given(builts())
def test_serializer__round_trips_built_values(built):
    serializer = ArtifactRefSerializer()
    assert serializer.loads(serializer.dumps(built)) == built


@FAST
@given(st.text(max_size=300))
def test_serializer__a_failed_stage_is_kept_as_text(message):
    serializer = ArtifactRefSerializer()
    error = serializer.loads(serializer.dumps(RuntimeError(message)))
    assert isinstance(error, PipelineError) and str(error) == f"RuntimeError: {message[:2000]}"


def _shaped() -> st.SearchStrategy[dict[str, Any]]:
    """Records with exactly the keys dumps writes, and values of any JSON type (or the right one)."""
    file = st.fixed_dictionaries({"name": st.one_of(JSON, st.just("model.so")), "sha256": st.one_of(JSON, HEX64),
                                  "size": st.one_of(JSON, st.integers(0, 10))})
    return st.fixed_dictionaries({
        "key": st.one_of(JSON, HEX64), "kind": st.one_of(JSON, st.just("build")),
        "inputs": st.one_of(JSON, st.just({})),
        "built": st.one_of(JSON, st.booleans()), "seconds": st.one_of(JSON, st.floats()),
        "files": st.one_of(JSON, st.lists(st.one_of(JSON, file), max_size=3)),
    })


@FAST
@given(st.one_of(JSON, _shaped()))
@example({"key": "a" * 64, "kind": "build", "inputs": {}, "built": True, "seconds": 0.5, "files": []})
def test_built_from_json__any_json_is_a_built_or_a_value_error(data):
    try:
        built = _built_from_json(data)
    except ValueError:
        return
    assert isinstance(built, Built) and isinstance(built.artifact, Artifact)


@FAST
@given(st.one_of(st.binary(max_size=200), st.one_of(JSON, _shaped()).map(lambda d: json.dumps(d).encode())))
def test_serializer_loads__any_bytes_are_a_built_an_error_record_or_a_value_error(blob):
    try:
        loaded = ArtifactRefSerializer().loads(blob)
    except ValueError:
        return
    assert isinstance(loaded, (Built, PipelineError))


# ------------------------------------------------------------------- cases the properties found, kept


_GOOD = {"key": "a" * 64, "kind": "build", "inputs": {}, "built": True, "seconds": 0.5,
         "files": [{"name": "model.so", "sha256": "b" * 64, "size": 3}]}


def _with_file(**fields: Any) -> dict[str, Any]:
    return {**_GOOD, "files": [{**_GOOD["files"][0], **fields}]}


@pytest.mark.parametrize("data", [{**_GOOD, "key": "zz"}, {**_GOOD, "seconds": None}, {**_GOOD, "seconds": 10**400},
                                  _with_file(size=[]), _with_file(size=float("inf"))],
                         ids=["key", "seconds-null", "seconds-huge", "size-list", "size-inf"])
def test_built_from_json__a_wrong_typed_field_is_a_value_error(data):
    with pytest.raises(ValueError):
        _built_from_json(data)


def test_serializer_loads__a_deeply_nested_record_is_a_value_error():
    with pytest.raises(ValueError):
        ArtifactRefSerializer().loads(b"[" * 100_000)


@pytest.mark.parametrize("data", [_with_file(size=1.5), {**_GOOD, "seconds": "2"}, {**_GOOD, "kind": 5},
                                  _with_file(sha256="b")], ids=["size-float", "seconds-text", "kind-int", "sha256"])
def test_built_from_json__accepts_only_what_dumps_writes(data):
    with pytest.raises(ValueError):
        _built_from_json(data)
