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

import json
import logging
import os
from typing import Any, Sequence

from prefect import flow

from flows._cli import (
    Parser,
    add_request_arguments,
    exit_command,
    recorded_run,
    request_fields,
    result_state,
    request_signature,
    run_command,
    run_stamp,
    wait_for_api,
)
from pipeline.errors import CheckFailed, PipelineError, RegressionFound
from pipeline.planning.plan import plan_run
from pipeline.planning.request import DEFAULT_MODEL, DEFAULT_TARGET, RunRequest, resolve_once, resolved_in_advance
from pipeline.results import BuildSummary, RunSummary
from pipeline.views.run import format_text, state_message
from tasks.chains import build_summary, compile_chain, prepare_here, run_one
from tasks.check import raise_if_failed
from tasks.report import record_failure

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


def _resnet_remote(**parameters: Any) -> Any:
    """Import, compile (cached), export (cached), upload, load, set the input, run and time a model.

    Returns:
        The run summary (its JSON form is ``--json``: model, digests, keys, stages ran/cached, top-5, latency),
        or with ``build_only`` the build summary: to Prefect, the flow run's final state, whose message is the
        result in one line (median, check, top-1), as the UI's run list, ``prefect flow-run inspect`` and
        ``--watch`` show it; to a caller of the flow, the summary itself.

    Raises:
        CheckFailed: the device's output failed the check (the summary rides on the exception; the flow run
            ends ``Failed`` with the result in its message).
        RegressionFound: ``fail_on_regression`` and the run was judged a latency regression (exit code 3; the
            summary rides on it; the flow run ends ``Failed``).
    """
    stamp = run_stamp()  # the command line's, when it started this run: it records what Prefect lost
    req = resolve_once(RunRequest(**parameters))
    try:
        plan = plan_run(req)
    except PipelineError as exc:
        if not req.build_only:
            record_failure(req, None, stamp, exc)
        raise
    if req.build_only:
        built = build_summary(plan.build, compile_chain(plan.build, req.store, req.refresh), req.store)
        return result_state(state_message(built), built)
    summary = run_one(plan, stamp, lambda: prepare_here(plan))
    if summary.check is not None:
        try:
            raise_if_failed(summary.check, req.model.name, summary)
        except CheckFailed as failed:  # the flow run fails with the result in its message; the caller gets the error
            return result_state(state_message(summary), failed, failed=True)
    verdict = summary.regression
    if req.fail_on_regression and verdict is not None and verdict.regression:
        regressed = RegressionFound(f"latency regression (--fail-on-regression): {verdict.message}", summary)
        return result_state(state_message(summary), regressed, failed=True)
    return result_state(state_message(summary), summary)


_resnet_remote.__signature__ = request_signature(RunRequest, RunSummary | BuildSummary)  # type: ignore[attr-defined]
resnet_remote = flow(name="resnet-remote", flow_run_name=_run_name, log_prints=False)(_resnet_remote)


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
    parameters = request_fields(args, RunRequest)
    with resolved_in_advance(RunRequest(**parameters)) as req:  # fails fast on bad input, before Prefect starts
        if req.build_only:
            wait_for_api()
            return resnet_remote(**parameters)
        with recorded_run(req):  # a run that Prefect could not start or finish is in the ledger all the same
            return resnet_remote(**parameters)


def _show(summary: RunSummary | BuildSummary, as_json: bool) -> None:
    print(format_text(summary))
    if as_json:
        print(json.dumps(summary.as_json()))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage failed, 3 a latency
    regression with --fail-on-regression, 130 interrupted)."""
    return run_command(argv, build_parser(), _execute, _show, records_runs=True)


if __name__ == "__main__":
    exit_command(main())
