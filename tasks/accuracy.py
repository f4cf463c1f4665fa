"""Stage ``accuracy``: top-1 / top-5 accuracy of a model's outputs on labelled images.

Used by ``python -m flows.accuracy`` for the compiled model's outputs and for the reference framework's, on
the labelled set in ``data/labelled/`` (see :mod:`pipeline.labelled`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.results import Accuracy, Hit


def hit(output: np.ndarray, label: int, k: int = 5) -> Hit:
    """Whether ``label`` is the top-1 / in the top-``k`` classes of ``output`` (first row; ties: lower index first)."""
    row = np.asarray(output, dtype=np.float64).reshape(-1, np.asarray(output).shape[-1])[0]
    top = tuple(int(i) for i in np.argsort(-row, kind="stable")[:k])
    return Hit(top, top[0] == label, label in top)


def accuracy(outputs: Sequence[np.ndarray], labels: Sequence[int], k: int = 5) -> Accuracy:
    """Top-1 and top-``k`` accuracy of ``outputs`` (logits or probabilities, one per image) against ``labels``.

    Raises:
        ValueError: ``outputs`` and ``labels`` differ in length.
    """
    if len(outputs) != len(labels):
        raise ValueError(f"{len(outputs)} outputs for {len(labels)} labels")
    hits = [hit(output, label, k) for output, label in zip(outputs, labels)]
    return Accuracy(len(hits), sum(h.top1_hit for h in hits), sum(h.top5_hit for h in hits))

