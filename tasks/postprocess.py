"""Stage ``postprocess``: turn the device's output into the top-5 classes with their labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.models import ResolvedModel, label_for
from pipeline.latency import Latency
from pipeline.results import Top

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The top-k classes and the latency they came with."""

    top: tuple[Top, ...]
    latency: Latency


def probabilities(output: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of the first row, unless the output already is a probability vector."""
    row = np.asarray(output, dtype=np.float64).reshape(output.shape[0] if output.ndim > 1 else 1, -1)[0]
    if row.min() >= 0.0 and abs(row.sum() - 1.0) < 1e-3:
        return row
    shifted = np.exp(row - row.max())
    return shifted / shifted.sum()


def postprocess(model: ResolvedModel, output: np.ndarray, latency: Latency, k: int = 5) -> Prediction:
    """The ``k`` most probable classes of ``output`` with ``model``'s labels."""
    probs = probabilities(output)
    order = np.argsort(-probs, kind="stable")[:k]
    top = tuple(Top(int(i), label_for(model, int(i)), float(probs[i])) for i in order)
    for rank, entry in enumerate(top, 1):
        log.info("top-%d: class %d %s (%.4f)", rank, entry.index, entry.label, entry.prob)
    log.info(
        "latency: median %.3f ms, mean %.3f ms, p90 %.3f ms, p99 %.3f ms, min %.3f ms, max %.3f ms, CV %.1f%% (%d samples)",
        latency.median, latency.mean, latency.p90, latency.p99, latency.min, latency.max, latency.cv * 100,
        latency.repeat,
    )
    return Prediction(top, latency)


postprocess_task = task(name="postprocess", task_run_name="postprocess", cache_policy=NO_CACHE, persist_result=False)(postprocess)
