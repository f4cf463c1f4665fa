"""Accuracy mode: run every labelled image through the compiled model on a device and through the reference.

    python -m flows.accuracy --model efficientnet_lite0 --target llvm [--artifacts DIR] [--json]

Compiles the model with the pipeline's own stages (import-model, build, export-library: cached in the
artifact store), uploads and loads it once on the device, then for every image of the labelled set
(``data/labelled/``, see ``pipeline.labelled``) sets the input, runs it, computes the reference output with
the model's own framework (stage ``reference``, cached) and checks the two (stage ``check``). Prints a table
and the top-1 / top-5 accuracy of both. Exit codes as ``flows.resnet_remote``: 0 ok, 2 bad usage or input,
1 a stage failed or a check failed (unless ``--no-check``).

Plain Python (no Prefect run): it is a measuring tool, run by hand or in CI.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line: its lifeline and embedded device start before the imports below
    from flows._cli import start_early

    start_early(sys.argv[1:], embedded_device=True)

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from flows._cli import Parser, add_request_arguments, request_fields, run_command
from tasks.chains import compile_chain, run_plain
from pipeline.device import Device
from pipeline.errors import CheckFailed, UsageError
from pipeline.image import load_image
from pipeline.labelled import DEFAULT_LABELLED_DIR, LabelledImage, load_labelled_set
from pipeline.latency import Timing
from pipeline.models import ResolvedModel, label_for
from pipeline.planning.plan import plan_build, plan_reference
from pipeline.planning.request import ResolvedRequest, RunRequest, resolve
from tasks._live import opened
from tasks.accuracy import accuracy, hit
from tasks.check import CheckResult, Thresholds, check, failure_message, thresholds_for
from tasks.export_library import LIBRARY_FILE
from tasks.load import load
from tasks.reference import load_reference, reference
from tasks.report import header_lines
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload

log = logging.getLogger("flows.accuracy")

#: The run options that apply to an accuracy run (the rest of RunRequest is about one image and timing).
OPTIONS = ("model", "weights", "seed", "target", "opt_level", "schedules", "artifacts", "refresh", "host", "port",
           "tracker", "key", "connect_timeout", "request_timeout", "call_timeout", "max_abs_diff")


@dataclass(frozen=True)
class Evaluation:
    """An accuracy run: the JSON summary, and each image's check (in the order of ``summary["images"]``)."""

    summary: dict[str, Any]
    checks: tuple[CheckResult, ...]


def _run_all(req: ResolvedRequest, device: Device, library: Any, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """upload and load once, then set-input and run per input; the outputs and the device's description."""
    outputs, root = [], str(req.store.root)
    with device.session() as session, opened(session) as ref:
        loaded = load(upload(ref, library, root, req.target.arch), root)
        for data in inputs:
            outputs.append(run(set_input(loaded, data), Timing(repeat=1)).output)
        return outputs, ref.description


def _references(req: ResolvedRequest, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The reference output of every input (stage ``reference``, cached) and the stage's status."""
    root, outputs, cached = str(req.store.root), [], 0
    for data in inputs:
        built = reference(req.model, data, plan_reference(req.model, data), root, req.refresh)
        cached += not built.built
        outputs.append(load_reference(built.artifact, root))
    if cached == len(inputs):
        return outputs, "cached"
    return outputs, f"ran {len(inputs) - cached}, cached {cached}" if cached else "ran"


def _row(model: ResolvedModel, image: LabelledImage, output: np.ndarray, expected: np.ndarray,
         result: CheckResult) -> dict[str, Any]:
    tvm_hit, ref_hit = hit(output, image.label), hit(expected, image.label)
    return {
        "file": image.path.name,
        "class": image.label,
        "label": label_for(model, image.label),
        "tvm_top5": list(tvm_hit.top5),
        "reference_top5": list(ref_hit.top5),
        "tvm_top1_label": label_for(model, tvm_hit.top5[0]),
        "reference_top1_label": label_for(model, ref_hit.top5[0]),
        "tvm_top1_hit": tvm_hit.top1_hit,
        "tvm_top5_hit": tvm_hit.top5_hit,
        "reference_top1_hit": ref_hit.top1_hit,
        "reference_top5_hit": ref_hit.top5_hit,
        "check": result.as_dict(),
    }


def evaluate(req: ResolvedRequest, images: Sequence[LabelledImage], thresholds: Thresholds) -> Evaluation:
    """Compile (cached), run every image on the device and in the reference framework, check each, and count.

    Never raises for a failed check: ``summary["checks_passed"]`` says whether every image passed.

    Raises:
        UsageError: the model does not have the 1000 ImageNet classes the labels refer to.
        PipelineError: a stage failed (build, device, store...).
    """
    model = req.model
    if model.labels != "imagenet1k":
        raise UsageError(
            f"{model.name} does not output the 1000 ImageNet-1k classes that the labelled set uses; "
            "accuracy mode needs an ImageNet classifier"
        )
    inputs = [load_image(image.path, model.preprocess, model.input_shape) for image in images]
    plan = plan_build(model, req.target, req.opt_level, schedules=req.schedules)
    with Device(req.device) as device:  # the embedded server imports TVM while we compile
        compiled = compile_chain(plan, req.store, req.refresh, run=run_plain)
        outputs, device_name = _run_all(req, device, compiled.library, inputs)
    references, reference_status = _references(req, inputs)

    checks = [check(output, expected, thresholds) for output, expected in zip(outputs, references)]
    rows = [_row(model, *args) for args in zip(images, outputs, references, checks)]
    labels = [image.label for image in images]
    diffs = [row["check"]["max_abs_diff"] for row in rows]  # None where an output was NaN or misshapen
    summary = {
        "model": model.name,
        "model_digest": model.digest,
        "target": req.target.canonical,
        "opt_level": req.opt_level,
        "schedules": plan.applied,
        "build_key": plan.build.key,
        "library_key": compiled.library.key,
        "artifact": str(req.store.file(compiled.library, LIBRARY_FILE)),
        "device": device_name,
        "stages": {**compiled.stages, "reference": reference_status},
        "images": rows,
        "accuracy": {"tvm": accuracy(outputs, labels).as_dict(), "reference": accuracy(references, labels).as_dict()},
        "agreement": {
            "top1": sum(r["tvm_top5"][0] == r["reference_top5"][0] for r in rows),
            "top5_identical": sum(r["tvm_top5"] == r["reference_top5"] for r in rows),
            "count": len(rows),
        },
        "checks_passed": all(result.passed for result in checks),
        "max_abs_diff": None if None in diffs else max(diffs),
        "thresholds": thresholds.as_dict(),
    }
    return Evaluation(summary, tuple(checks))


def _short(text: str, width: int) -> str:
    text = text.split(",")[0]
    return text if len(text) <= width else text[: width - 1] + "~"


def format_accuracy_report(summary: dict[str, Any]) -> str:
    """The human-readable report: one row per image, then the accuracy of the compiled model and the reference."""
    lines = [
        *header_lines(summary),
        f"{'image':<18} {'label':<24} {'TVM top-1':<24} {'reference top-1':<24} {'top-5 hit':<10} "
        f"{'max abs diff':>12}  check",
    ]
    for row in summary["images"]:
        label = _short(str(row["class"]) + " " + row["label"], 24)
        tvm1 = _short(str(row["tvm_top5"][0]) + " " + row["tvm_top1_label"], 24)
        ref1 = _short(str(row["reference_top5"][0]) + " " + row["reference_top1_label"], 24)
        hits = ("yes" if row["tvm_top5_hit"] else "no") + "/" + ("yes" if row["reference_top5_hit"] else "no")
        diff = row["check"]["max_abs_diff"]
        diff_text = "n/a" if diff is None else f"{diff:.3g}"
        verdict = "passed" if row["check"]["passed"] else "FAILED"
        lines.append(
            f"{_short(row['file'], 18):<18} {label:<24} {tvm1:<24} {ref1:<24} {hits:<10} {diff_text:>12}  {verdict}"
        )
    for who, key in (("TVM", "tvm"), ("reference", "reference")):
        acc = summary["accuracy"][key]
        lines.append(
            f"{'Accuracy' if key == 'tvm' else '':<10} {who:<10} "
            f"top-1 {acc['top1']}/{acc['count']} ({100 * acc['top1_accuracy']:.1f}%)  "
            f"top-5 {acc['top5']}/{acc['count']} ({100 * acc['top5_accuracy']:.1f}%)"
        )
    agree, worst = summary["agreement"], summary["max_abs_diff"]
    lines.append(
        f"Agreement  top-1 {agree['top1']}/{agree['count']}  "
        f"top-5 identical {agree['top5_identical']}/{agree['count']}  "
        f"checks {'passed' if summary['checks_passed'] else 'FAILED'} ({summary['thresholds']['precision']}, "
        f"max abs diff {'n/a' if worst is None else format(worst, '.3g')})"
    )
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> Parser:
    """The command line of ``python -m flows.accuracy`` (the run options come from :class:`RunRequest`)."""
    p = Parser(
        prog="python -m flows.accuracy",
        description="Top-1/top-5 accuracy of the compiled model on a device vs its own framework, on labelled images.",
    )
    add_request_arguments(p, RunRequest, only=OPTIONS)
    p.add_argument("--images", default=None,
                   help=f"a directory with labels.json and its images (default: {DEFAULT_LABELLED_DIR})")
    p.add_argument("--no-check", action="store_true", help="report the check figures but do not fail on them")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return p


def _execute(args: Any) -> Evaluation:
    thresholds = thresholds_for("float32", args.max_abs_diff)
    images = load_labelled_set(args.images)
    evaluation = evaluate(resolve(RunRequest(**request_fields(args, RunRequest))), images, thresholds)
    failed = [(row, result) for row, result in zip(evaluation.summary["images"], evaluation.checks) if not result.passed]
    if failed and not args.no_check:
        row, result = failed[0]
        subject = f"{evaluation.summary['model']} on {row['file']}"
        raise CheckFailed(
            f"{len(failed)} of {len(evaluation.checks)} images failed the check; first, "
            + failure_message(result, subject),
            result.as_dict(), evaluation,
        )
    return evaluation


def _show(evaluation: Evaluation, as_json: bool) -> None:
    print(format_accuracy_report(evaluation.summary))
    if as_json:
        print(json.dumps(evaluation.summary))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage or the check failed)."""
    return run_command(argv, build_parser(), _execute, _show, uses_prefect=False)


if __name__ == "__main__":
    sys.exit(main())
