"""Properties of Prefect's cache records (tasks/_cache.py ArtifactRefSerializer, _built_from_json).

A record is read back by whoever runs next (and names its serializer), so it is untrusted input: the contract
of ``_built_from_json`` is "ValueError unless it has exactly the shape we write". Known bugs in
tasks/_cache.py (owned elsewhere) are shown by the strict xfail tests at the end; the property over arbitrary
JSON lets exactly those through (:func:`_known_bug`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError, StoreError
from pipeline.store import Artifact, FileEntry
from tasks._cache import ArtifactRefSerializer, Built, _built_from_json

FAST = settings(max_examples=100, deadline=None, database=None)

# Why (the strict xfails' reasons): _built_from_json converts with check_key (StoreError for a bad key), int()
# and float() (TypeError for a list/dict/null, OverflowError for Infinity or 10**400) and lets those through;
# loads lets json.loads's RecursionError through; and the conversions accept what dumps never writes (size 1.5
# -> 1, seconds "2" -> 2.0, kind 5 -> "5", a sha256 that is not 64 hex).
NOT_VALUE_ERROR = "BUG tasks/_cache.py: a wrong-typed field raises StoreError/TypeError/OverflowError, not ValueError"
NESTING = "BUG tasks/_cache.py: a deeply nested record raises RecursionError in loads"
LAX = "BUG tasks/_cache.py: _built_from_json converts wrong types (size 1.5, seconds '2') instead of rejecting them"

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


def _known_bug(exc: BaseException) -> str | None:
    if isinstance(exc, RecursionError):
        return NESTING
    if isinstance(exc, (StoreError, TypeError, OverflowError)):
        return NOT_VALUE_ERROR
    return None


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
    except Exception as exc:  # the property: nothing else, but the known bugs
        if _known_bug(exc) is None:
            raise
        return
    assert isinstance(built, Built) and isinstance(built.artifact, Artifact)


@FAST
@given(st.one_of(st.binary(max_size=200), st.one_of(JSON, _shaped()).map(lambda d: json.dumps(d).encode())))
def test_serializer_loads__any_bytes_are_a_built_an_error_record_or_a_value_error(blob):
    try:
        loaded = ArtifactRefSerializer().loads(blob)
    except ValueError:
        return
    except Exception as exc:
        if _known_bug(exc) is None:
            raise
        return
    assert isinstance(loaded, (Built, PipelineError))


# --------------------------------------------------------------------------- known bugs (owned elsewhere)


_GOOD = {"key": "a" * 64, "kind": "build", "inputs": {}, "built": True, "seconds": 0.5,
         "files": [{"name": "model.so", "sha256": "b" * 64, "size": 3}]}


def _with_file(**fields: Any) -> dict[str, Any]:
    return {**_GOOD, "files": [{**_GOOD["files"][0], **fields}]}


@pytest.mark.xfail(strict=True, reason=NOT_VALUE_ERROR, raises=(StoreError, TypeError, OverflowError))
@pytest.mark.parametrize("data", [{**_GOOD, "key": "zz"}, {**_GOOD, "seconds": None}, {**_GOOD, "seconds": 10**400},
                                  _with_file(size=[]), _with_file(size=float("inf"))],
                         ids=["key", "seconds-null", "seconds-huge", "size-list", "size-inf"])
def test_built_from_json__a_wrong_typed_field_is_a_value_error(data):
    with pytest.raises(ValueError):
        _built_from_json(data)


@pytest.mark.xfail(strict=True, reason=NESTING, raises=RecursionError)
def test_serializer_loads__a_deeply_nested_record_is_a_value_error():
    with pytest.raises(ValueError):
        ArtifactRefSerializer().loads(b"[" * 100_000)


@pytest.mark.xfail(strict=True, reason=LAX)
@pytest.mark.parametrize("data", [_with_file(size=1.5), {**_GOOD, "seconds": "2"}, {**_GOOD, "kind": 5},
                                  _with_file(sha256="b")], ids=["size-float", "seconds-text", "kind-int", "sha256"])
def test_built_from_json__accepts_only_what_dumps_writes(data):
    with pytest.raises(ValueError):
        _built_from_json(data)
