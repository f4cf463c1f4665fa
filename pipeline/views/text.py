"""Untrusted text made safe to print: every rendering of recorded or reported values goes through these.

A ledger record, a model's file name, a device's answer or an error message may hold control characters: an
ANSI escape that clears the screen or sets the terminal's title, a carriage return that overwrites what was
printed, a bidirectional override that reorders it. :func:`printable` writes each as a visible escape
(``\\x1b``, ``\\r``, ``\\u202e``), :func:`markdown_cell` also escapes what markdown would read as a table cell's
end, code or HTML, and :func:`csv_text` keeps a spreadsheet from running a cell as a formula.
"""

from __future__ import annotations

import unicodedata
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A spreadsheet runs a cell that starts with one of these (after any spaces) as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_MARKDOWN = {"\\": "\\\\", "|": "\\|", "`": "\\`", "<": "&lt;", ">": "&gt;"}


def _unsafe(ch: str) -> bool:
    # Cc: C0 and C1 controls and DEL; Cf: format characters (bidirectional overrides, zero-width marks);
    # Zl/Zp: line and paragraph separators, which some terminals break lines at.
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: Any, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control or format character written as a visible escape; ``keep_newlines``
    keeps ``\\n`` (multi-line text such as an error message)."""
    text = str(value)
    if not any(_unsafe(ch) for ch in text):
        return text
    return "".join(ch if not _unsafe(ch) or (keep_newlines and ch == "\n") else _escape(ch) for ch in text)


def markdown_cell(value: Any) -> str:
    """A value as markdown text for a table cell or a line: printable, with ``|``, backticks, ``\\`` and HTML's
    ``<`` ``>`` escaped."""
    return "".join(_MARKDOWN.get(ch, ch) for ch in printable(value))


def csv_text(value: str) -> str:
    """A CSV text cell: control characters escaped (line breaks kept, the CSV writer quotes them), and a
    leading ``'`` when the cell would start a formula, also after spaces."""
    text = printable(value, keep_newlines=True)
    return "'" + text if text.lstrip(" ").startswith(_FORMULA_START) else text
