"""Content digests of models: SHA-256 over length-prefixed fields, never over a path string."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.errors import ModelError

# Bump when the framing or the meaning of a field changes: old digests must not match new content.
_SCHEME = "pipeline.models.digest/1"
_CHUNK = 1 << 20


class ContentDigest:
    """SHA-256 of a model's content, built from typed, length-prefixed fields.

    The first field is a format tag (``"onnx"``, ``"torch-pt2"``, ...) so that equal bytes read as
    different formats never share a digest. Every field is framed as ``label, length, bytes``, so
    two different field sequences cannot produce the same byte stream.
    """

    def __init__(self, format_tag: str) -> None:
        self._sha = hashlib.sha256()
        self.text("scheme", _SCHEME)
        self.text("format", format_tag)

    def _frame(self, label: str, size: int) -> None:
        encoded = label.encode()
        self._sha.update(len(encoded).to_bytes(8, "little") + encoded + size.to_bytes(8, "little"))

    def text(self, label: str, value: str) -> None:
        """Adds a string field (architecture ids, seeds, versions)."""
        data = value.encode()
        self._frame(label, len(data))
        self._sha.update(data)

    def file(self, label: str, path: Path, *, also: "hashlib._Hash | None" = None) -> None:
        """Adds a file's bytes, read in chunks; ``also`` gets the same bytes (e.g. a SHA-1 to verify).

        Raises:
            ModelError: The file is missing or unreadable; the message names it.
        """
        try:
            with open(path, "rb") as f:
                self._frame(label, os.fstat(f.fileno()).st_size)
                while chunk := f.read(_CHUNK):
                    self._sha.update(chunk)
                    if also is not None:
                        also.update(chunk)
        except OSError as e:
            raise ModelError(
                f"Cannot read model file {path}: {e.strerror or e}. Check the path and its permissions."
            ) from e

    def hexdigest(self) -> str:
        """The 64-hex digest."""
        return self._sha.hexdigest()
