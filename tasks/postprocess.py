"""Stage ``postprocess``: turn the device's output into the top-5 labels, and render the run's report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.models import ResolvedModel, label_for
from tasks.check import format_check
from tasks.run import Latency

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Top:
    """One of the top-k classes."""

    index: int
    label: str
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.index, "label": self.label, "prob": self.prob}


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
        "latency: mean %.3f ms, median %.3f ms, min %.3f ms, max %.3f ms, std %.3f ms",
        latency.mean, latency.median, latency.min, latency.max, latency.std,
    )
    return Prediction(top, latency)


postprocess_task = task(name="postprocess", task_run_name="postprocess", cache_policy=NO_CACHE, persist_result=False)(postprocess)


def header_lines(summary: dict[str, Any]) -> list[str]:
    """The report's first lines: model, target, build, device and what each stage did."""
    return [
        f"Model      {summary['model']}  (digest {summary['model_digest'][:16]})",
        f"Target     {summary['target']}  opt_level {summary['opt_level']}",
        f"Build      {summary['build_key'][:16]}  library {summary['artifact']}",
        f"Device     {summary['device']}",
        "Stages     " + ", ".join(f"{name} {status}" for name, status in summary["stages"].items()),
    ]


def format_upload(upload: dict[str, Any]) -> str:
    """One line on how the library reached the device."""
    size = f"{upload['bytes'] / 1e6:.1f} MB"
    if upload.get("reused"):
        return f"Upload     none: the device kept this library ({size}) from an earlier run, as {upload['remote_name']}"
    return (f"Upload     {size} in {upload['seconds']:.2f} s ({upload['mb_per_s']:.0f} MB/s)"
            + (f" to {upload['remote_name']}" if upload.get("remote_name") else ""))


def format_report(summary: dict[str, Any]) -> str:
    """The human-readable report of a run summary (the dict the flow returns)."""
    lines = header_lines(summary)
    if summary.get("upload"):
        lines.append(format_upload(summary["upload"]))
    lines += [f"Note       {note}" for note in summary.get("notes", [])]
    lines.append("Top-5      class  probability  label")
    for rank, entry in enumerate(summary["top5"], 1):
        lines.append(f"  {rank}.       {entry['class']:>5}  {entry['prob']:11.4f}  {entry['label']}")
    if "check" in summary:
        lines.append(format_check(summary["check"]))
    lat = summary["latency_ms"]
    lines.append(
        f"Latency    mean {lat['mean']:.3f} ms  median {lat['median']:.3f} ms  min {lat['min']:.3f} ms  "
        f"max {lat['max']:.3f} ms  std {lat['std']:.3f} ms  ({summary['timing']['repeat']} x "
        f"{summary['timing']['number']} runs)"
    )
    return "\n".join(lines)
