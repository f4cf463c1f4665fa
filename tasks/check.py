"""Stage ``check``: compare the compiled model's output with its own framework's output (stage ``reference``).

A compiled model that runs fast and returns wrong numbers is worse than none, so every run measures how far
TVM's output is from the reference and fails when it breaks the thresholds of its precision:

=========  =============  ==========================  ======================================================
precision  max abs diff   top-k                       why
=========  =============  ==========================  ======================================================
float32    1e-4           top-5 identical, in order   TVM vs the frameworks measures 5e-7 (ResNet-18) to 7e-6
                                                      (EfficientNet-Lite0) on logits of magnitude ~10-20
float16    5e-2           top-1 identical             ~3 significant digits; cosine similarity >= 0.999
bfloat16   2e-1           top-1 identical             ~2 significant digits; cosine similarity >= 0.995
int8       not checked    top-1 identical             quantisation moves every logit; cosine >= 0.99
=========  =============  ==========================  ======================================================

The lower-precision rows are conventional starting points (this pipeline builds float32 today); every
threshold can be overridden (``--max-abs-diff X`` on the command line, :func:`thresholds_for`).

"Top-5 identical" means the same five class indices in the same order. The one exception is a tie: two
classes whose reference values differ by at most ``Thresholds.tie_tolerance`` (1e-6, far below the abs-diff
threshold) may come in either order, since no implementation can be expected to break an exact tie (or a
softmax that underflowed to 0.0) the same way as the framework.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import CheckFailed
from pipeline.results import CheckResult, RunSummary
from pipeline.thresholds import Thresholds

log = logging.getLogger(__name__)

TOP_K = 5


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values of each row, largest first (ties: lower index first)."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def _same_ranking(output: np.ndarray, reference: np.ndarray, k: int, tie: float) -> bool:
    """Whether every row's top-``k`` of ``output`` is the reference's, rank by rank, up to reference ties."""
    out_top, ref_top = _top(output, k), _top(reference, k)
    rows = np.arange(reference.shape[0])[:, None]
    # At each rank, the class the output put there must be the reference's, or tied with it in the reference.
    return bool(np.all(np.abs(reference[rows, out_top] - reference[rows, ref_top]) <= tie))


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^n above ``value`` (a threshold to suggest)."""
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * 10.0**exponent > value:
            return float(f"{step * 10.0 ** exponent:.3g}")
    return float(f"{10.0 ** (exponent + 1):.3g}")


def check(output: np.ndarray, reference: np.ndarray, thresholds: Thresholds) -> CheckResult:
    """Compare ``output`` (the compiled model's) with ``reference`` (the framework's) under ``thresholds``.

    Both are logits (or probabilities) of shape ``(rows, classes)`` or anything of the same size; the class
    axis is the reference's last axis. Pure numpy, float64 arithmetic.

    Returns:
        The figures, and ``passed`` with a ``reason`` naming each broken threshold and by how much.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    nan = float("nan")
    if out.size != ref.size or ref.size == 0:
        reason = f"the compiled output has shape {tuple(out.shape)}, the reference {tuple(ref.shape)}"
        return CheckResult(nan, nan, nan, nan, False, False, False, reason, thresholds)
    classes = ref.shape[-1] if ref.ndim else 1
    ref, out = ref.reshape(-1, classes), out.reshape(-1, classes)
    k = min(TOP_K, classes)
    output_top5 = tuple(int(i) for i in _top(out[0], k))
    reference_top5 = tuple(int(i) for i in _top(ref[0], k))
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad or not np.all(np.isfinite(ref)):
        where = (f"the compiled output has {bad} NaN or infinite values" if bad
                 else "the reference has NaN or infinite values")
        return CheckResult(nan, nan, nan, nan, False, False, False, where, thresholds, output_top5, reference_top5)

    diff = np.abs(out - ref)
    max_abs = float(diff.max())
    floor = max(1e-3 * float(np.abs(ref).max()), np.finfo(np.float64).tiny)
    max_rel = float((diff / np.maximum(np.abs(ref), floor)).max())
    norms = float(np.linalg.norm(out)) * float(np.linalg.norm(ref))
    cosine = float(np.clip(np.dot(out.ravel(), ref.ravel()) / norms, -1.0, 1.0)) if norms > 0 else float(max_abs == 0.0)
    mse = float(np.mean(diff**2))
    peak = max(float(ref.max() - ref.min()), np.finfo(np.float64).tiny)
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse)
    top1 = _same_ranking(out, ref, 1, thresholds.tie_tolerance)
    top5 = _same_ranking(out, ref, k, thresholds.tie_tolerance)

    broken = []
    t = thresholds
    if t.max_abs_diff is not None and not max_abs <= t.max_abs_diff:
        ratio = max_abs / t.max_abs_diff
        times = f"{ratio:.3g}" if ratio < 1000 else f"{ratio:,.0f}"
        broken.append(f"max abs diff {max_abs:.3g} > {t.max_abs_diff:.3g} ({times}x the threshold)")
    if t.top5_identical and not top5:
        broken.append(f"top-{k} differs: compiled {list(output_top5)} vs reference {list(reference_top5)}")
    elif t.top1_match and not top1:
        broken.append(f"top-1 differs: compiled {output_top5[0]} vs reference {reference_top5[0]}")
    if t.min_cosine is not None and not cosine >= t.min_cosine:
        broken.append(f"cosine similarity {cosine:.6f} < {t.min_cosine}")
    if broken:
        reason = "; ".join(broken)
    else:
        held = [f"max abs diff {max_abs:.3g} <= {t.max_abs_diff:.3g}" if t.max_abs_diff is not None else ""]
        held.append(f"top-{k} identical" if t.top5_identical else "top-1 identical" if t.top1_match else "")
        held.append(f"cosine {cosine:.6f} >= {t.min_cosine}" if t.min_cosine is not None else "")
        reason = ", ".join(h for h in held if h) or "no thresholds set"
    return CheckResult(
        max_abs_diff=max_abs, max_rel_diff=max_rel, cosine=cosine, psnr_db=psnr, top1_match=top1,
        top5_match=top5, passed=not broken, reason=reason, thresholds=thresholds,
        output_top5=output_top5, reference_top5=reference_top5,
    )


def failure_message(result: CheckResult, subject: str = "the compiled model") -> str:
    """The user-facing message of a failed check: what broke, by how much, and how to override it."""
    t = result.thresholds
    hint = "Wrong weights in the library, a miscompilation or a different input can cause this."
    override = "skip the check with --no-check"
    if t.max_abs_diff is not None and math.isfinite(result.max_abs_diff) and result.max_abs_diff > t.max_abs_diff:
        also = "" if result.top5_match or not t.top5_identical else " (the top-5 must still match)"
        suggested = _nice_ceiling(result.max_abs_diff)
        override = f"raise the threshold with --max-abs-diff {suggested:g}{also} or {override}"
    return (
        f"check failed: the output of {subject} differs from its framework's ({t.precision} thresholds): "
        f"{result.reason}. {hint} If the difference is expected, {override}."
    )


def raise_if_failed(result: CheckResult, subject: str = "the compiled model", summary: RunSummary | None = None) -> None:
    """Raise :class:`CheckFailed` (exit code 1) with :func:`failure_message` if ``result`` did not pass.

    Args:
        subject: what was checked, for the message (e.g. the model's name).
        summary: the run's summary, carried by the exception so that the CLI can still print it.
    """
    if not result.passed:
        raise CheckFailed(failure_message(result, subject), result.as_dict(), summary)


def _check_and_log(output: np.ndarray, reference: np.ndarray, thresholds: Thresholds) -> CheckResult:
    """:func:`check`, logged: what the Prefect task runs (it does not raise on failure)."""
    result = check(output, reference, thresholds)
    (log.info if result.passed else log.error)("check %s: %s", "passed" if result.passed else "FAILED", result.reason)
    return result


check_task = task(name="check", task_run_name="check", cache_policy=NO_CACHE, persist_result=False)(_check_and_log)
