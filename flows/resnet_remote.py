"""The ``resnet_remote`` flow: compile a model with TVM once, run it on a TVM RPC device every time.

    import-model -> [tune] -> build -> export-library -> reference        cached by the plan's keys
    upload -> load -> set-input -> run -> check -> postprocess -> report  every run

Run ``python -m flows.resnet_remote --help`` for the command line; the flow is
``flows/resnet_remote.py:resnet_remote`` for Prefect deployments. Its parameters are the fields of
:class:`pipeline.planning.request.RunRequest`, where their defaults live.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line: its lifeline and embedded device start before the imports below
    from flows._cli import start_early

    start_early(sys.argv[1:], embedded_device=True)

import datetime as dt
import json
import logging
import os
from typing import Any, Sequence

from prefect import flow

from flows._cli import Parser, add_request_arguments, request_fields, request_signature, run_command
from tasks.chains import STAGES, compile_chain, preflight, run_on_device
from pipeline.cuda.builder import library_gpu_code
from pipeline.device import Device
from pipeline.errors import CheckFailed, PipelineError
from pipeline.store.ledger import new_run_id
from pipeline.planning.plan import RunPlan, plan_run
from pipeline.planning.request import DEFAULT_MODEL, DEFAULT_TARGET, ResolvedRequest, RunRequest, resolve
from tasks._cache import run_cached
from tasks.check import raise_if_failed
from tasks.export_library import LIBRARY_FILE
from tasks.reference import reference_task
from tasks.report import BuildSummary, RunSummary, format_text, record_failure

log = logging.getLogger("flows.resnet_remote")

def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    if p.get("tracker"):
        device = f"{p.get('key')}@{p['tracker']}"
    elif p.get("host"):
        device = f"{p['host']}:{p.get('port')}"
    else:
        device = "embedded"
    model = os.path.basename(str(p.get("model") or DEFAULT_MODEL))  # a file's name, not its whole path
    return f"{model}@{p.get('target', DEFAULT_TARGET)} on {device}"


def _resnet_remote(**parameters: Any) -> RunSummary | BuildSummary:
    """Import, compile (cached), export (cached), upload, load, set the input, run and time a model.

    Returns:
        The run summary (its JSON form is ``--json``: model, digests, keys, stages ran/cached, top-5, latency).
    """
    request = RunRequest(**parameters)
    run_id, started = new_run_id(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    req = resolve(request)
    if req.build_only:
        return _build_only(req, plan_run(req))
    try:
        plan = plan_run(req)
        with Device(req.device) as device:  # the embedded server starts now and imports TVM while we compile
            return _run(req, plan, device, run_id, started)
    except CheckFailed:
        raise  # the report recorded the run with its figures
    except (PipelineError, KeyboardInterrupt) as exc:
        record_failure(req, run_id, started, exc)
        raise


_resnet_remote.__signature__ = request_signature(RunRequest, RunSummary | BuildSummary)  # type: ignore[attr-defined]
resnet_remote = flow(name="resnet-remote", flow_run_name=_run_name, log_prints=False)(_resnet_remote)


def _build_only(req: ResolvedRequest, plan: RunPlan) -> BuildSummary:
    store, build = req.store, plan.build
    compiled = compile_chain(build, store, req.refresh)
    library = store.file(compiled.library, LIBRARY_FILE)
    return BuildSummary(
        model=req.model.name, model_digest=req.model.digest, target=req.target.canonical, opt_level=req.opt_level,
        tune_trials=req.tune_trials, tuning_key=build.tune.key if build.tune else None, import_key=build.imported.key,
        build_key=build.build.key, library_key=build.library.key, artifact=str(library),
        library_bytes=compiled.library.size, gpu_code=library_gpu_code(library) if req.target.device == "cuda" else None,
        stages={name: compiled.stages.get(name, "skipped") for name in STAGES[:4]},
        notes=req.model.notes, schedules=build.applied,
    )


def _run(req: ResolvedRequest, plan: RunPlan, device: Device, run_id: str, started: str) -> RunSummary:
    if req.target.device == "cuda":
        preflight(device, req.target, req.allow_version_skew)  # a GPU-less device fails now, not after compiling
    compiled = compile_chain(plan.build, req.store, req.refresh)
    reference = None
    if plan.reference is not None:  # the framework's output, found or computed before the device is held
        reference = run_cached(reference_task, req.store, plan.reference, req.refresh, model=req.model, data=req.input)
    summary = run_on_device(req, plan.build, compiled, device, reference, run_id, started)
    if summary.check is not None:
        raise_if_failed(summary.check, req.model.name, summary)  # the flow run fails; the summary rides on it
    return summary


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> Parser:
    """The command line of ``python -m flows.resnet_remote``, generated from :class:`RunRequest`."""
    parser = Parser(
        prog="python -m flows.resnet_remote",
        description="Compile a model with TVM (cached) and run it on a TVM RPC device; print its top-5 and latency.",
    )
    add_request_arguments(parser, RunRequest)
    parser.add_argument("--json", action="store_true", help="print the run summary as one JSON object on the last line")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def _execute(args: Any) -> RunSummary | BuildSummary:
    request = RunRequest(**request_fields(args, RunRequest))
    resolve(request)  # fail fast on bad input, before Prefect starts
    return resnet_remote(**request_fields(args, RunRequest))


def _show(summary: RunSummary | BuildSummary, as_json: bool) -> None:
    print(format_text(summary))
    if as_json:
        print(json.dumps(summary.as_json()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage failed, 130 interrupted)."""
    return run_command(argv, build_parser(), _execute, _show)


if __name__ == "__main__":
    sys.exit(main())
