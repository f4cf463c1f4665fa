"""Properties of the fleet file (pipeline/fleet/spec.py): any text, any data -> a FleetSpec or one UsageError.

The cases at the end are what the properties once found: deep nesting, values PyYAML cannot construct, model paths
the file system refuses.
"""

from __future__ import annotations


import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import UsageError
from pipeline.fleet.spec import DEVICE_KEYS, MODEL_KEYS, TOP_KEYS, FleetSpec, fleet_from_mapping, parse_fleet

FAST = settings(max_examples=100, deadline=None, database=None)


def _check(parse, value):
    try:
        spec = parse(value)
    except UsageError as exc:
        assert str(exc)
    else:
        assert isinstance(spec, FleetSpec) and spec.devices and spec.models


# ------------------------------------------------------------------------------------------- YAML text

_WORDS = [*TOP_KEYS, *DEVICE_KEYS, *MODEL_KEYS, "efficientnet_lite0", "127.0.0.1:9190", "llvm", "random", "true",
          "no", "1", "-1", "0x10", "1e400", ".nan", "~", "null", "2001-02-03", "[", "]", "{", "}", ",", ":", "- ",
          "? ", "&a ", "*a", "!!int ", "!!str ", "!!binary ", "!!python/object ", "|", ">", "#", "'", '"', "%YAML 1.1"]


@st.composite
def _yaml_text(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        indent = " " * draw(st.sampled_from([0, 0, 2, 4, 6]))
        words = draw(st.lists(st.one_of(st.sampled_from(_WORDS), st.text(max_size=6)), max_size=5))
        lines.append(indent + " ".join(words))
    return "\n".join(lines)


_VALID = """\
tracker: 127.0.0.1:9190
devices:
  - key: local-x86
    target: llvm
  - {host: 10.0.0.2, port: 9090, name: board}
models:
  - efficientnet_lite0
  - {model: resnet18_v2, weights: random}
"""


@FAST
@given(st.one_of(_yaml_text(), st.text()))
@example(_VALID)
@example("devices: [")
@example("\0")
@example("a: &x [*x, *x]\nb: *x")
def test_parse_fleet__any_text_is_a_fleet_or_a_usage_error(text):
    _check(parse_fleet, text)


@FAST
@given(st.integers(0, len(_VALID)), st.text(max_size=4))
def test_parse_fleet__a_damaged_valid_file_is_a_fleet_or_a_usage_error(at, junk):
    _check(parse_fleet, _VALID[:at] + junk + _VALID[at:])


# ------------------------------------------------------------------------------------------ plain data

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.sampled_from(["127.0.0.1:9190", "llvm", "efficientnet_lite0", "random", "a/b.onnx", "~"]))


def _data(keys: tuple[str, ...]) -> st.SearchStrategy[object]:
    return st.recursive(
        _SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=4), st.integers()),
                                                inner, max_size=4)),
        max_leaves=12,
    )


def _fleet_shaped() -> st.SearchStrategy[dict]:
    device = st.dictionaries(st.sampled_from(DEVICE_KEYS), _SCALARS, max_size=5)
    model = st.one_of(_SCALARS, st.dictionaries(st.sampled_from(MODEL_KEYS), _SCALARS, max_size=4))
    top = {"devices": st.one_of(st.lists(device, max_size=3), _SCALARS), "models": st.lists(model, max_size=3)}
    return st.fixed_dictionaries(top, optional={k: _SCALARS for k in TOP_KEYS if k not in top})


@FAST
@given(st.one_of(_fleet_shaped(), _data(TOP_KEYS + DEVICE_KEYS + MODEL_KEYS)))
@example({"tracker": "127.0.0.1:9190", "devices": [{"key": "a"}], "models": ["efficientnet_lite0"]})
@example({"tracker": "127.0.0.1:9190", "devices": [{"key": "a", "connect_timeout": float("nan")}], "models": ["m"]})
@example({"devices": [{"host": "h", "port": True}], "models": ["m"]})
def test_fleet_from_mapping__any_data_is_a_fleet_or_a_usage_error(data):
    _check(fleet_from_mapping, data)


# ------------------------------------------------------------------- cases the properties found, kept


def _nested(depth: int) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        node.append([])
        node = node[0]
    return root


@pytest.mark.parametrize("text", ["[" * 5000, "- " * 3000 + "x", "devices: " + "{a: " * 3000])
def test_parse_fleet__deep_nesting_is_a_usage_error(text):
    with pytest.raises(UsageError):
        parse_fleet(text)


def test_fleet_from_mapping__deep_nesting_is_a_usage_error():
    with pytest.raises(UsageError):
        fleet_from_mapping({"tracker": "127.0.0.1:9190", "devices": _nested(5000), "models": ["m"]})


@pytest.mark.parametrize("text", ["tracker: 2001-02-30", "opt_level: !!int abc", "opt_level: !!float x",
                                  "tracker: !!timestamp foo"])
def test_parse_fleet__a_scalar_yaml_cannot_construct_is_a_usage_error(text):
    with pytest.raises(UsageError):
        parse_fleet(text)


@pytest.mark.parametrize("model", ["~\0x", "m" * 300])
def test_fleet_from_mapping__an_impossible_model_path_is_a_usage_error(model, tmp_path):
    data = {"tracker": "127.0.0.1:9190", "devices": [{"key": "a"}], "models": [model]}
    try:  # taking it as a name (resolve_model then says it is unknown) would do as well
        fleet_from_mapping(data, base=tmp_path)
    except UsageError:
        pass
