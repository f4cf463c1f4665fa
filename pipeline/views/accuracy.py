"""An accuracy run rendered: one row per labelled image, then the accuracy of the compiled model and the reference."""

from __future__ import annotations

from pipeline.results import AccuracySummary
from pipeline.views.run import header_lines, stages_line


def _short(text: str, width: int) -> str:
    text = text.split(",")[0]
    return text if len(text) <= width else text[: width - 1] + "~"


def state_message(summary: AccuracySummary) -> str:
    """The accuracy run in one line (its flow run's final state message): top-1 and top-5, the checks."""
    acc = summary.tvm
    return (f"accuracy of {summary.build.model}: top-1 {acc.top1}/{acc.count} ({100 * acc.top1_rate:.1f}%), "
            f"top-5 {acc.top5}/{acc.count} ({100 * acc.top5_rate:.1f}%), "
            f"checks {'passed' if summary.checks_passed else 'FAILED'}")


def format_accuracy(summary: AccuracySummary) -> str:
    """The terminal report of ``python -m flows.accuracy``."""
    lines = [
        *header_lines(summary.build, summary.device), stages_line(summary.stages),
        f"{'image':<18} {'label':<24} {'TVM top-1':<24} {'reference top-1':<24} {'top-5 hit':<10} "
        f"{'max abs diff':>12}  check",
    ]
    for image in summary.images:
        label = _short(f"{image.label} {image.label_text}", 24)
        tvm1 = _short(f"{image.tvm.top5[0]} {image.tvm_top1_label}", 24)
        ref1 = _short(f"{image.reference.top5[0]} {image.reference_top1_label}", 24)
        hits = ("yes" if image.tvm.top5_hit else "no") + "/" + ("yes" if image.reference.top5_hit else "no")
        diff = image.check.as_dict()["max_abs_diff"]
        diff_text = "n/a" if diff is None else f"{diff:.3g}"
        verdict = "passed" if image.check.passed else "FAILED"
        lines.append(
            f"{_short(image.file, 18):<18} {label:<24} {tvm1:<24} {ref1:<24} {hits:<10} {diff_text:>12}  {verdict}"
        )
    for who, acc in (("TVM", summary.tvm), ("reference", summary.reference)):
        lines.append(
            f"{'Accuracy' if who == 'TVM' else '':<10} {who:<10} "
            f"top-1 {acc.top1}/{acc.count} ({100 * acc.top1_rate:.1f}%)  "
            f"top-5 {acc.top5}/{acc.count} ({100 * acc.top5_rate:.1f}%)"
        )
    agree, worst = summary.as_json()["agreement"], summary.max_abs_diff
    lines.append(
        f"Agreement  top-1 {agree['top1']}/{agree['count']}  "
        f"top-5 identical {agree['top5_identical']}/{agree['count']}  "
        f"checks {'passed' if summary.checks_passed else 'FAILED'} ({summary.thresholds.precision}, "
        f"max abs diff {'n/a' if worst is None else format(worst, '.3g')})"
    )
    return "\n".join(lines)
