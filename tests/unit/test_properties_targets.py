"""Properties of the target grammar (pipeline/targets/grammar.py) and its two users, the CPU and CUDA parsers.

TVM-free: only the text -> dict layer runs here (``parse_target`` itself: test_targets.py, test_cuda_target.py).
"""

from __future__ import annotations

import json
import shlex

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import TargetError
from pipeline.targets import grammar, target_dict
from pipeline.targets.cuda import cuda_target_dict, is_cuda_target

FAST = settings(max_examples=100, deadline=None, database=None)

# Option names as TVM spells them; "kind" is the first word, "target" an alias, "host" CUDA's own.
NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True).filter(lambda k: k not in ("kind", "target", "host"))
# Text values that the typing rule keeps as text (not a bool, not a whole number).
TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
).filter(lambda v: v.lower() not in ("true", "false") and not grammar._INT.fullmatch(v))
ITEM = TEXT.filter(lambda v: "," not in v)
INT = st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)


@st.composite
def configs(draw: st.DrawFn, kind: st.SearchStrategy[str] = NAMES) -> dict:
    """A target dict in the CLI's types: list attributes as lists, else a bool, an int or text."""
    config = {"kind": draw(kind)}
    for key in draw(st.lists(st.one_of(NAMES, st.sampled_from(sorted(grammar.LIST_ATTRS))), max_size=6, unique=True)):
        values = st.lists(ITEM, max_size=4) if key in grammar.LIST_ATTRS else st.one_of(st.booleans(), INT, TEXT)
        config[key] = draw(values)
    return config


def _options(config: dict) -> str:
    """``config``'s options (not its kind) in the CLI form."""
    return grammar.render({"kind": "x", **config}).partition(" ")[2]


def _without_kind(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "kind"}


# ------------------------------------------------------------------------------------------- round trips


@FAST
@given(configs())
def test_grammar__render_then_parse_is_identity(config):
    assert grammar.target_dict(grammar.render(config), "") == config


@FAST
@given(configs(st.just("llvm")))
def test_llvm_target_dict__round_trips_cli_and_json(config):
    assert target_dict(grammar.render(config)) == config
    assert target_dict(json.dumps(config)) == config


@FAST
@given(configs(st.just("cuda")))
def test_cuda_target_dict__round_trips_cli_and_json(config):
    assert cuda_target_dict(grammar.render(config)) == config
    assert cuda_target_dict(json.dumps(config)) == config


# ------------------------------------------------------------------------------- the two parsers agree


@FAST
@given(configs())
def test_llvm_and_cuda__same_options_same_entries(config):
    options = _options(config)
    assert _without_kind(target_dict(f"llvm {options}")) == _without_kind(cuda_target_dict(f"cuda {options}"))


@FAST
@given(st.lists(st.tuples(NAMES, st.from_regex(r"[A-Za-z0-9_.+,-]{0,12}", fullmatch=True)), max_size=5))
@example([("arch", "sm_90")])
def test_llvm_and_cuda__quotes_group_and_are_removed(pairs):
    plain = " ".join(f"-{k}={v}" for k, v in pairs)
    double = " ".join(f'-{k}="{v}"' for k, v in pairs)
    single = " ".join(f"'-{k}={v}'" for k, v in pairs)
    llvm = _without_kind(target_dict(f"llvm {plain}"))
    assert llvm == _without_kind(target_dict(f"llvm {double}")) == _without_kind(target_dict(f"llvm {single}"))
    assert llvm == _without_kind(cuda_target_dict(f"cuda {double}")) == _without_kind(cuda_target_dict(f"cuda {plain}"))


@FAST
@given(st.lists(st.text(st.sampled_from("-=,\"' abc1{}\\\t"), max_size=8), max_size=5))
def test_llvm_and_cuda__reject_the_same_options(words):
    options = " ".join(words)
    outcomes = []
    for parse, kind in ((target_dict, "llvm"), (cuda_target_dict, "cuda")):
        try:
            outcomes.append(_without_kind(parse(f"{kind} {options}")))
        except TargetError:
            outcomes.append("rejected")
    assert outcomes[0] == outcomes[1]


# ------------------------------------------------------------------------------------ never a traceback


def _junk() -> st.SearchStrategy[str]:
    pieces = st.one_of(
        st.text(max_size=30),
        st.sampled_from(["llvm", "cuda", "nvidia/", "h100", "-arch=", "-host=", "-mattr=", "=", "-", ",", '"', "'",
                         "\\", "{", "}", "[", "]", ":", '{"kind": "cuda"', '{"kind":', " ", "\0", "\U000e0001"]),
    )
    joined = st.lists(pieces, max_size=12).map("".join)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    ).map(json.dumps)
    return st.one_of(joined, json_values, st.text())


@FAST
@given(_junk())
@example("{" + "[" * 50_000)
@example('{"kind": "cuda", "arch": ' + "1" * 5000 + "}")
@example('cuda -arch="sm_90')
@example("-" * 3)
def test_parsers__arbitrary_text_is_a_target_or_a_target_error(text):
    for parse in (target_dict, cuda_target_dict):
        try:
            config = parse(text)
        except TargetError as exc:
            assert "\n" not in str(exc) or "\n" in text
            assert len(str(exc)) < 5000
        else:
            assert isinstance(config, dict)
    assert isinstance(is_cuda_target(text), bool)


@settings(max_examples=40, deadline=None, database=None)
@given(_junk(), st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=3),
       st.integers(min_value=3000, max_value=20_000))
@example("cuda -arch=", "x", 5000)
def test_parsers__long_junk_gives_a_short_message(prefix, unit, length):
    text = prefix + unit * (length // len(unit))
    for parse in (target_dict, cuda_target_dict):
        try:
            parse(text)
        except TargetError as exc:
            # Two clipped echoes (~200 characters each, repr'd) and the examples: the input's length does not count.
            limit = 1000 if text.isascii() and text.isprintable() else 5000
            assert len(str(exc)) < limit, len(str(exc))


def test_grammar__render_quotes_what_the_shell_would_split():
    config = {"kind": "cuda", "arch": "sm_90", "label": "two words", "mattr": ["+a", "-b"], "flag": True, "n": -3}
    text = grammar.render(config)
    assert shlex.split(text) == ["cuda", "-arch=sm_90", "-label=two words", "-mattr=+a,-b", "-flag=true", "-n=-3"]
    assert grammar.target_dict(text, "") == config
