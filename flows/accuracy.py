"""The ``accuracy`` flow: every labelled image through the compiled model on a device and through the reference.

    python -m flows.accuracy --model efficientnet_lite0 --target llvm [--artifacts DIR] [--json]

Compiles the model with the pipeline's own compile chain (import-model, [tune], build, export-library: cached in
the artifact store), then runs every image of the labelled set (``data/labelled/``, see ``pipeline.labelled``)
through the same device chain as a single run (``tasks.chains.device_chain``: upload and load once, then
set-input and run per image; a lost device retried, a kept library reused, CUDA and version checks), computes
each image's reference output with the model's own framework (stage ``reference``, cached) and checks the two
(stage ``check``). Prints a table and the top-1 / top-5 accuracy of both. Its options are :class:`RunRequest`'s
fields that apply to it. Exit codes as ``flows.resnet_remote``: 0 ok, 2 bad usage or input, 1 a stage failed
or a check failed (unless ``--no-check``).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line: its lifeline and embedded device start before the imports below
    from flows._cli import start_early

    start_early(sys.argv[1:], embedded_device=True)

import inspect
import json
import logging
from typing import Any, Sequence

from prefect import flow

from flows._cli import (
    Parser,
    add_request_arguments,
    exit_command,
    request_fields,
    request_signature,
    result_state,
    run_command,
)
from pipeline.device import Device
from pipeline.errors import CheckFailed, UsageError
from pipeline.labelled import DEFAULT_LABELLED_DIR, LabelledImage, load_labelled_set
from pipeline.models import label_for
from pipeline.planning.plan import plan_build, plan_reference
from pipeline.planning.request import ACCURACY, ResolvedRequest, RunRequest, request_fields as accuracy_fields
from pipeline.planning.request import resolve_once, resolved_in_advance
from pipeline.results import AccuracySummary, ImageResult, Upload
from pipeline.views.accuracy import format_accuracy, state_message
from tasks._cache import run_cached
from tasks.accuracy import accuracy, hit
from tasks.chains import DeviceJob, build_summary, compile_chain, device_chain, preflight
from tasks.check import check_task, failure_message
from tasks.reference import load_reference, reference_task

log = logging.getLogger("flows.accuracy")

OPTIONS = tuple(f.name for f in accuracy_fields(ACCURACY))
"""The run options that apply to an accuracy run (the rest of RunRequest is about one image and its timing)."""


def evaluate(req: ResolvedRequest, images: Sequence[LabelledImage]) -> AccuracySummary:
    """Compile (cached), run every image on the device and in the reference framework, check each, and count.

    Never raises for a failed check: ``summary.checks_passed`` says whether every image passed.

    Raises:
        UsageError: the model does not have the 1000 ImageNet classes the labels refer to.
        PipelineError: a stage failed (build, device, store...).
    """
    from pipeline.image import load_image

    model, store = req.model, req.store
    if model.labels != "imagenet1k":
        raise UsageError(
            f"{model.name} does not output the 1000 ImageNet-1k classes that the labelled set uses; "
            "accuracy mode needs an ImageNet classifier"
        )
    inputs = tuple(load_image(image.path, model.preprocess, model.input_shape) for image in images)
    plan = plan_build(model, req.target, req.opt_level, req.tune_trials, req.tune_runner, req.schedules,
                      req.shared)
    with Device(req.device) as device:  # the embedded server starts now and imports TVM while we compile
        if req.target.device == "cuda":
            preflight(device, req.target, req.policy.allow_version_skew)
        compiled = compile_chain(plan, store, req.refresh)
        on = device_chain(device, store, DeviceJob(compiled.library, req.target, inputs, None, req.policy))
    references, statuses = [], []
    for data in inputs:
        artifact, status = run_cached(reference_task, store, plan_reference(model, data), req.refresh, model=model,
                                      data=data)
        references.append(load_reference(artifact, store))
        statuses.append(status)
    ran = statuses.count("ran")
    status = "cached" if not ran else "ran" if ran == len(statuses) else f"ran {ran}, cached {len(statuses) - ran}"
    outputs = [result.output for result in on.results]
    results = []
    for image, output, expected in zip(images, outputs, references):
        tvm_hit, ref_hit = hit(output, image.label), hit(expected, image.label)
        results.append(ImageResult(
            file=image.path.name, label=image.label, label_text=label_for(model, image.label), tvm=tvm_hit,
            reference=ref_hit, tvm_top1_label=label_for(model, tvm_hit.top5[0]),
            reference_top1_label=label_for(model, ref_hit.top5[0]),
            check=check_task(output, expected, req.thresholds),
        ))
    labels = [image.label for image in images]
    placement = on.loaded.placement
    return AccuracySummary(
        build=build_summary(plan, compiled, store), device=on.device,
        upload=Upload(placement.remote_name, placement.bytes, placement.seconds, placement.reused),
        reference_status=status, images=tuple(results),
        tvm=accuracy(outputs, labels), reference=accuracy(references, labels), thresholds=req.thresholds,
    )


def _accuracy(images: str | None = None, fail_on_check: bool = True, **parameters: Any) -> Any:
    """The accuracy of the compiled model on a device against its own framework, over a labelled set.

    Returns the summary (to Prefect: the flow run's final state, whose message is top-1, top-5 and the checks).

    Args:
        images: a directory with labels.json and its images (default: ``data/labelled/``).
        fail_on_check: raise :class:`CheckFailed` when an image fails the check (the summary rides on it; the
            flow run ends ``Failed`` with the accuracy in its message).
        parameters: :class:`RunRequest` fields (those of :data:`OPTIONS`).
    """
    labelled = load_labelled_set(images)
    summary = evaluate(resolve_once(RunRequest(**parameters)), labelled)
    failed = [image for image in summary.images if not image.check.passed]
    if failed and fail_on_check:
        first = failed[0]
        error = CheckFailed(
            f"{len(failed)} of {len(summary.images)} images failed the check; first, "
            + failure_message(first.check, f"{summary.build.model} on {first.file}"),
            first.check.as_dict(), summary,
        )
        return result_state(state_message(summary), error, failed=True)
    return result_state(state_message(summary), summary)


_request = request_signature(RunRequest, AccuracySummary)
_accuracy.__signature__ = _request.replace(parameters=[  # type: ignore[attr-defined]
    inspect.Parameter("images", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
    inspect.Parameter("fail_on_check", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool),
    *(p for p in _request.parameters.values() if p.name in OPTIONS),
])
accuracy_flow = flow(name="accuracy", flow_run_name="accuracy", log_prints=False)(_accuracy)


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


def _execute(args: Any) -> AccuracySummary:
    parameters = request_fields(args, RunRequest)
    load_labelled_set(args.images)  # fail fast on a bad set, before Prefect starts
    with resolved_in_advance(RunRequest(**parameters)):
        return accuracy_flow(images=args.images, fail_on_check=not args.no_check, **parameters)


def _show(summary: AccuracySummary, as_json: bool) -> None:
    print(format_accuracy(summary))
    if as_json:
        print(json.dumps(summary.as_json()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage or the check failed)."""
    return run_command(argv, build_parser(), _execute, _show)


if __name__ == "__main__":
    exit_command(main())
