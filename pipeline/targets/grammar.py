"""The one grammar of what users type as a target, shared by the CPU and the CUDA parsers. No TVM.

Two forms:

    kind -key=value -key=value ...   the CLI form, split like a shell line (shlex): quotes group and are removed,
                                     so ``cuda -arch="sm_90"`` is ``cuda -arch=sm_90``
    {"kind": "...", ...}             TVM's JSON form, taken as it is

A CLI value is typed by one rule, whatever the kind: ``mattr``, ``keys`` and ``libs`` are lists (split on commas,
empty entries dropped), ``true``/``false`` (any case) are booleans, a whole number of at most 18 digits is an
int, anything else is text. ``-target=`` is the old spelling of ``-mtriple=``. :func:`render` writes a dict of
those types back as CLI text, so that ``target_dict(render(config)) == config``.

Every message echoes at most ~200 characters of the user's text (:func:`pipeline.errors.clip`).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from pipeline.errors import TargetError, clip

#: Attributes that TVM 0.27 stores as arrays: the CLI form gives them comma-separated.
LIST_ATTRS = frozenset({"mattr", "keys", "libs"})
#: Old CLI spellings -> TVM 0.27 attribute names.
ALIASES = {"target": "mtriple"}

# Larger numbers stay text: TVM's integers are 64-bit, and Python refuses to convert over 4300 digits.
_INT = re.compile(r"[+-]?[0-9]{1,18}")
_BOOLS = {"true": True, "false": False}


def parse_value(key: str, value: str) -> Any:
    """The typed value of ``-key=value``: a list for :data:`LIST_ATTRS`, a bool, an int, or the text."""
    if key in LIST_ATTRS:
        return [entry for entry in value.split(",") if entry]
    if value.lower() in _BOOLS:
        return _BOOLS[value.lower()]
    if _INT.fullmatch(value):
        return int(value)
    return value


def split_words(text: str, examples: str) -> list[str]:
    """``text`` split like a shell line (quotes group, and are removed).

    Raises:
        TargetError: unbalanced quotes, or nothing but whitespace.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise TargetError(f"cannot split the target {clip(text)!r}: {clip(exc)}. Examples: {examples}") from None
    if not words:
        raise TargetError(f"the target is empty. Examples: {examples}")
    return words


def parse_options(words: list[str], text: str, examples: str) -> dict[str, Any]:
    """``-key=value`` words (what follows the kind) as a dict, typed by :func:`parse_value`; a later key wins.

    Raises:
        TargetError: a word that is not ``-key=value`` (naming it and the target, both clipped).
    """
    config: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or not sep or not key:
            raise TargetError(
                f"cannot parse {clip(word)!r} in the target {clip(text)!r}: options are -key=value. "
                f"Examples: {examples}"
            )
        if key == "kind":
            raise TargetError(
                f"the kind is the target's first word, not an option (in {clip(text)!r}). Examples: {examples}"
            )
        key = ALIASES.get(key, key)
        config[key] = parse_value(key, value)
    return config


def parse_json(text: str, examples: str) -> dict[str, Any]:
    """The JSON form as a dict (not yet checked for ``kind``).

    Raises:
        TargetError: not JSON (also too deeply nested, or a number too long), or not an object.
    """
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int over 4300 digits, [[[[...
        reason = exc if isinstance(exc, ValueError) else "nested too deeply"
        raise TargetError(f"target JSON is invalid ({clip(reason)}). Examples: {examples}") from None
    if not isinstance(config, dict):
        raise TargetError(f"target JSON must be an object with a \"kind\" key. Examples: {examples}")
    return config


def target_dict(text: str, examples: str) -> dict[str, Any]:
    """Either form as TVM's dict form: ``{"kind": ..., key: typed value, ...}``.

    Raises:
        TargetError: empty text, bad JSON or JSON without ``"kind"``, unbalanced quotes, or an option that is
            not ``-key=value``.
    """
    text = (text or "").strip()
    if not text:
        raise TargetError(f"the target is empty. Examples: {examples}")
    if text.startswith("{"):
        config = parse_json(text, examples)
        if "kind" not in config:
            raise TargetError(f'target JSON needs a "kind" key. Examples: {examples}')
        return config
    words = split_words(text, examples)
    return {"kind": words[0], **parse_options(words[1:], text, examples)}


def render_value(key: str, value: Any) -> str:
    """The CLI spelling of a value :func:`parse_value` gives back unchanged (a list, a bool, an int or text)."""
    if key in LIST_ATTRS:
        return ",".join(str(entry) for entry in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(config: dict[str, Any]) -> str:
    """The CLI form of a dict in the CLI's types (the kind first), quoted where the shell would split it."""
    options = [f"-{key}={render_value(key, value)}" for key, value in config.items() if key != "kind"]
    words = [str(config["kind"]), *options]
    return " ".join(shlex.quote(word) for word in words)
