"""Small helpers shared by the backends: checking user-given files, shortening framework errors."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import ModelError


def existing_file(path: str | os.PathLike[str], what: str) -> Path:
    """Returns ``path`` made absolute, or raises ModelError if it is not a readable regular file.

    Args:
        path: The file the user named (or one derived from it).
        what: How to call it in the message, e.g. ``"ONNX model"``.
    """
    path = Path(os.path.abspath(os.path.expanduser(path)))
    if not path.exists():
        raise ModelError(f"{what} not found: {path}. Check the path.")
    if not path.is_file():
        raise ModelError(f"{what} {path} is not a regular file. Give the path of the file itself.")
    if not os.access(path, os.R_OK):
        raise ModelError(f"{what} {path} is not readable. Check its permissions.")
    return path


def describe(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, cut to its last non-empty line (TVM appends tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
