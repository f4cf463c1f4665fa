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

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from flows._cli import Parser
from pipeline import keys
from pipeline.device import EmbeddedServer, open_session
from pipeline.errors import CheckFailed, PipelineError, UsageError
from pipeline.image import load_image
from pipeline.labelled import DEFAULT_LABELLED_DIR, LabelledImage, load_labelled_set
from pipeline.models import MODEL_NAMES, ResolvedModel, label_for
from pipeline.request import DEFAULT_MODEL, DEFAULT_TARGET, ResolvedRequest, RunRequest, resolve
from pipeline.store import ENV_VAR
from pipeline.targets import toolchain_for
from tasks._cache import Built
from tasks._sessions import registered
from tasks.accuracy import accuracy, hit
from tasks.build import build
from tasks.check import CheckResult, Thresholds, check, failure_message, thresholds_for
from tasks.export_library import LIBRARY_FILE, export_library
from tasks.import_model import import_model
from tasks.load import load
from tasks.postprocess import header_lines
from tasks.reference import load_reference, reference, reference_key
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload

log = logging.getLogger("flows.accuracy")


@dataclass(frozen=True)
class Evaluation:
    """An accuracy run: the JSON summary, and each image's check (in the order of ``summary["images"]``)."""

    summary: dict[str, Any]
    checks: tuple[CheckResult, ...]


@dataclass(frozen=True)
class _Compiled:
    build_key: str
    library: Built
    stages: dict[str, str]


def _compile(req: ResolvedRequest) -> _Compiled:
    """import-model -> build -> export-library, each reused from the store when there."""
    model, target, root = req.model, req.target, str(req.store.root)
    toolchain = toolchain_for(target)
    import_key = keys.key_of(keys.import_inputs(model.digest))
    imported = import_model(model, root, import_key, req.refresh)
    build_key = keys.key_of(keys.build_inputs(model.digest, target.canonical, req.opt_level))
    built = build(imported.artifact, model.digest, target, req.opt_level, root, build_key, req.refresh)
    library_key = keys.key_of(keys.export_inputs(build_key, toolchain.identity))
    library = export_library(built.artifact, target, toolchain, root, library_key, req.refresh)
    stages = {name: "ran" if b.built else "cached"
              for name, b in (("import-model", imported), ("build", built), ("export-library", library))}
    return _Compiled(build_key, library, stages)


def _run_all(req: ResolvedRequest, server: EmbeddedServer | None, library: Built,
             inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """upload and load once, then set-input and run per input; the outputs and the device's description."""
    outputs = []
    with open_session(req.device, server) as session, registered(session) as ref:
        upload(ref, library.artifact, str(req.store.root), req.target.arch)
        load(ref)
        for data in inputs:
            set_input(ref, data)
            outputs.append(run(ref, 1, 1).output)
        return outputs, ref.description


def _references(req: ResolvedRequest, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The reference output of every input (stage ``reference``, cached) and the stage's status."""
    root, outputs, cached = str(req.store.root), [], 0
    for data in inputs:
        built = reference(req.model, data, root, reference_key(req.model, data), req.refresh)
        cached += not built.built
        outputs.append(load_reference(built, root))
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
    server = EmbeddedServer() if req.device.kind == "local" else None
    if server is not None:
        server.start()  # the server imports TVM while we compile
    try:
        compiled = _compile(req)
        outputs, device = _run_all(req, server, compiled.library, inputs)
    finally:
        if server is not None:
            server.stop()
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
        "build_key": compiled.build_key,
        "library_key": compiled.library.artifact.key,
        "artifact": str(req.store.file(compiled.library.artifact, LIBRARY_FILE)),
        "device": device,
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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.accuracy``."""
    p = Parser(
        prog="python -m flows.accuracy",
        description="Top-1/top-5 accuracy of the compiled model on a device vs its own framework, on labelled images.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"an ImageNet classifier: {', '.join(MODEL_NAMES)}, or a model file (default: %(default)s)")
    p.add_argument("--weights", default="pretrained", help="resnet18_v2 only: pretrained, random or a .params file")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random (default: %(default)s)")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="TVM target, as for flows.resnet_remote (default: %(default)s)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(4), metavar="{0,1,2,3}")
    p.add_argument("--artifacts", default=None,
                   help=f"artifact store directory (default: ${ENV_VAR} or artifacts/ at the repository root)")
    p.add_argument("--refresh", action="store_true", help="rebuild the compile stages and the references")
    p.add_argument("--images", default=None,
                   help=f"a directory with labels.json and its images (default: {DEFAULT_LABELLED_DIR})")
    p.add_argument("--host", help="a running TVM RPC server (default: an embedded one on 127.0.0.1)")
    p.add_argument("--port", type=int, help="its port (with --host)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker to request a device from")
    p.add_argument("--key", help="the device key to request from the tracker")
    p.add_argument("--max-abs-diff", type=float, default=None,
                   help="check threshold on max |TVM - reference| (default: 1e-4 for float32)")
    p.add_argument("--no-check", action="store_true", help="report the check figures but do not fail on them")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage or the check failed)."""
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation chatter
    try:
        args = build_parser().parse_args(argv)
        thresholds = thresholds_for("float32", args.max_abs_diff)
        images = load_labelled_set(args.images)
        req = resolve(RunRequest(
            model=args.model, weights=args.weights, seed=args.seed, target=args.target, opt_level=args.opt_level,
            host=args.host, port=args.port, tracker=args.tracker, key=args.key, artifacts=args.artifacts,
            refresh=args.refresh,
        ))
        evaluation = evaluate(req, images, thresholds)
    except PipelineError as exc:
        if verbose:
            log.exception("accuracy run failed")
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    summary = evaluation.summary
    print(format_accuracy_report(summary))
    if args.json:
        print(json.dumps(summary))
    failed = [(row, result) for row, result in zip(summary["images"], evaluation.checks) if not result.passed]
    if failed and not args.no_check:
        row, result = failed[0]
        subject = f"{summary['model']} on {row['file']}"
        error = CheckFailed(
            f"{len(failed)} of {len(evaluation.checks)} images failed the check; first, "
            + failure_message(result, subject),
            result.as_dict(),
        )
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
