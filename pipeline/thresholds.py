"""Check thresholds per precision: what the compiled output must satisfy against its framework's output.

Validated where a run starts (``pipeline.planning.request``); applied by the ``check`` stage (``tasks/check.py``,
whose docstring explains the defaults).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.errors import UsageError


@dataclass(frozen=True)
class Thresholds:
    """What the compiled output must satisfy against the reference output.

    Attributes:
        max_abs_diff: largest allowed ``|output - reference|`` over all values; None: not checked.
        top5_identical: the top-5 class indices must be the reference's, in the same order (ties aside).
        top1_match: the top-1 class must be the reference's (ties aside).
        min_cosine: smallest allowed cosine similarity of the flattened outputs; None: not checked.
        tie_tolerance: reference values this close count as tied, so their classes may swap ranks.
        precision: the precision these thresholds were chosen for (shown in messages).
    """

    max_abs_diff: float | None = 1e-4
    top5_identical: bool = True
    top1_match: bool = True
    min_cosine: float | None = None
    tie_tolerance: float = 1e-6
    precision: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRECISIONS: dict[str, Thresholds] = {
    "float32": Thresholds(),
    "float16": Thresholds(max_abs_diff=5e-2, top5_identical=False, min_cosine=0.999, precision="float16"),
    "bfloat16": Thresholds(max_abs_diff=2e-1, top5_identical=False, min_cosine=0.995, precision="bfloat16"),
    "int8": Thresholds(max_abs_diff=None, top5_identical=False, min_cosine=0.99, precision="int8"),
}


def thresholds_for(dtype: str = "float32", max_abs_diff: float | None = None) -> Thresholds:
    """The default thresholds of a precision, with ``max_abs_diff`` overriding its abs-diff threshold if given.

    Raises:
        UsageError: unknown precision, or a ``max_abs_diff`` that is not a positive finite number.
    """
    if dtype not in PRECISIONS:
        raise UsageError(f"no check thresholds for precision {dtype!r}; known: {', '.join(PRECISIONS)}")
    thresholds = PRECISIONS[dtype]
    if max_abs_diff is not None:
        if not (isinstance(max_abs_diff, (int, float)) and math.isfinite(max_abs_diff) and max_abs_diff > 0):
            raise UsageError(f"--max-abs-diff must be a positive number (got {max_abs_diff!r})")
        thresholds = replace(thresholds, max_abs_diff=float(max_abs_diff))
    return thresholds
