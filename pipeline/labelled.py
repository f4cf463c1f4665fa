"""The labelled image set of the accuracy mode: a few real photos with known ImageNet-1k classes.

``data/labelled/labels.json`` lists ``{"file", "class", "name"}`` per image; ``data/labelled/LICENSES.txt``
records where each photo comes from and its licence (all CC0 or public domain).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

#: The bundled set (package data, works offline; ``data/labelled/`` in a checkout).
DEFAULT_LABELLED_DIR: Path = Path(__file__).resolve().parent / "data" / "labelled"
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelledImage:
    """One photo and its ImageNet-1k class."""

    path: Path
    label: int
    name: str


def load_labelled_set(directory: str | os.PathLike[str] | None = None) -> tuple[LabelledImage, ...]:
    """The images listed in ``<directory>/labels.json`` (default: the bundled set), in the listed order.

    Raises:
        InputError: the manifest is missing or malformed, lists no image, a class outside 0-999, or a
            file that does not exist.
    """
    root = Path(directory).expanduser().resolve() if directory else DEFAULT_LABELLED_DIR
    manifest = root / LABELS_FILE
    try:
        entries = json.loads(manifest.read_text())["images"]
        images = tuple(
            LabelledImage(root / str(entry["file"]), int(entry["class"]), str(entry.get("name", "")))
            for entry in entries
        )
    except FileNotFoundError:
        raise InputError(f"no labelled image set at {root}: {LABELS_FILE} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{manifest} is not a labelled image set ({type(exc).__name__}: {exc}); "
            'expected {"images": [{"file": ..., "class": ..., "name": ...}, ...]}'
        ) from exc
    if not images:
        raise InputError(f"{manifest} lists no images")
    for image in images:
        if not 0 <= image.label < 1000:
            raise InputError(
                f"{manifest}: class {image.label} of {image.path.name} is not an ImageNet-1k class (0-999)"
            )
        if not image.path.is_file():
            raise InputError(f"{manifest} lists {image.path.name}, which is not in {root}")
    return images
