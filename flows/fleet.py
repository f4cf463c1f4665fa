"""The ``fleet`` flow: every model on every device in one run, each compilation once.

    compile     import-model -> [tune] -> build -> export-library     once per distinct (model, target,
    reference   the model's own output on its image                   opt_level, tuning); what the store
                                                                      lacks, in worker processes
    each pair   upload -> load -> set-input -> run -> check -> postprocess -> report
                devices side by side (one session per device at a time, or one per server its tracker
                has under its key); the pairs of one device one after another

Run ``python -m flows.fleet FLEET.yaml`` (``--help``); the flow is ``flows/fleet.py:fleet`` for Prefect
deployments (``fleet-nightly`` in ``prefect.yaml``). :mod:`pipeline.fleet.spec` reads and checks the fleet file
(``docs/fleet.md`` describes it), :mod:`pipeline.fleet.plan` resolves and plans its pairs, and :mod:`tasks.fleet` holds
the stages wired here (``compile``, ``remote-build``, ``prepare-reference``, ``run-pair``). A pair that fails (its device down, a key with no server, a failed check)
fails alone, with its reason; the run then ends ``Failed`` (exit 1) with the whole table. With
``fail_on_regression`` (``--fail-on-regression``), a run whose pairs all passed but some were judged latency
regressions ends ``Failed`` with exit code 3. ``--junit FILE`` writes the table as JUnit XML for CI. Each pair
records its run in the run ledger as a ``resnet_remote`` run does, with ``fleet_run`` set to the fleet run's
id and its device's name as the run's ``device_name``.

Concurrency is Prefect's: the compilations are tasks on a ``ProcessPoolTaskRunner`` (TVM's compiler is not
thread-safe; the compile chain is safe across processes, see the store's locks), or runs of a ``build_only``
deployment on another work pool (``build_deployment``); the pairs are tasks on a ``ThreadPoolTaskRunner`` (the
device stages are thread-safe, see ``tasks/_live.py``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows._cli import Parser, exit_command, result_state, run_command
from pipeline.device import tracker_summary
from pipeline.errors import (
    DeviceUnavailable, FleetFailed, PairFailed, PipelineError, RegressionFound, StoreError, UsageError, clip, one_line,
)
from pipeline.fleet.plan import FleetPair, ResolvedFleet, resolve_fleet
from pipeline.fleet.spec import FleetSpec, fleet_from_mapping, load_fleet
from pipeline.results import BuildCounts, FleetSummary, PairResult, RunStamp
from pipeline.views.fleet import format_junit, format_markdown, format_text, state_message, table_rows
from tasks.chains import Compiled, Prepared, Reference
from tasks.fleet import compile_task, in_store, not_run, pair_task, reference_once_task, remote_build_task
from tasks.report import flow_run_id

log = logging.getLogger("flows.fleet")

FLEET_FILE = "fleet.yaml"
_SUMMARY_TIMEOUT_S = 5.0


# -- the flow -----------------------------------------------------------------------------------------------


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return "fleet (inline spec)" if p.get("spec") else f"fleet {os.path.basename(str(p.get('fleet_file') or FLEET_FILE))}"


def load_spec(fleet_file: str = FLEET_FILE, spec: dict[str, Any] | None = None) -> FleetSpec:
    """The fleet to run: ``spec`` (the file's content, inline) if given, else the file ``fleet_file``."""
    return fleet_from_mapping(spec) if spec is not None else load_fleet(fleet_file)


def _fleet(fleet_file: str = FLEET_FILE, artifacts: str | None = None, spec: dict[str, Any] | None = None,
           fail_on_regression: bool = False) -> Any:
    """Run every model of the fleet file on every device of it; each distinct compilation once.

    Args:
        fleet_file: the fleet file (YAML), relative to the working directory (a deployment's: the repository
            root); relative paths inside it are taken from its directory.
        artifacts: the artifact store, a directory or ``s3://BUCKET/PREFIX`` (default: the fleet file's
            ``artifacts``, else ``$TVMRP_ARTIFACTS``, else ``artifacts/``).
        spec: the fleet file's content as a mapping, instead of ``fleet_file``.
        fail_on_regression: end with :class:`RegressionFound` (exit code 3) when a pair was judged a latency
            regression (as the fleet file's ``fail_on_regression: true``).

    Returns:
        The run's summary (``--json``): every pair's result and the builds' counts (to Prefect: the flow run's
        final state, whose message counts the pairs passed and failed).

    Raises:
        UsageError: the fleet file is wrong (file, line and field named), before anything runs.
        FleetFailed: some pairs failed; the others completed. It carries the summary (the flow run ends
            ``Failed`` with the counts in its message).
        RegressionFound: every pair passed, some regressed, and the run was asked to fail on that. It carries the
            summary (the flow run ends ``Failed`` too).
    """
    clock = time.perf_counter()
    fleet_run = RunStamp.new().id
    fleet_spec = with_gate(load_spec(fleet_file, spec), fail_on_regression)
    fleet = resolve_fleet(fleet_spec, artifacts)
    log.info("fleet run %s: %d device(s) x %d model(s), store %s", fleet_run, len(fleet.spec.devices),
             len(fleet.spec.models), fleet.store.location)
    resolved = time.perf_counter()
    prepared = _prepare(fleet)
    compiled = time.perf_counter()
    results = _run_devices(fleet, prepared, fleet_run)
    done = time.perf_counter()
    summary = FleetSummary(
        fleet_run=fleet_run, source=fleet.spec.source, results=tuple(results[i] for i in range(len(fleet.pairs))),
        builds=prepared.counts, seconds=round(done - clock, 3), flow_run_id=flow_run_id(),
        phases={"resolve": round(resolved - clock, 3), "compile": round(compiled - resolved, 3),
                "devices": round(done - compiled, 3)},
    )
    _publish(summary)
    try:
        raise_if_failed(summary, fleet_spec.shared.fail_on_regression)
    except (FleetFailed, RegressionFound) as error:  # the flow run fails with the counts in its message
        return result_state(state_message(summary), error, failed=True)
    return result_state(state_message(summary), summary)


def raise_if_failed(summary: FleetSummary, fail_on_regression: bool = False) -> None:
    """End a fleet run that did not pass: a failed pair is :class:`FleetFailed` (exit 1); with
    ``fail_on_regression``, a pair judged a latency regression is :class:`RegressionFound` (exit 3). Each
    carries the summary, so the command line still prints the table."""
    def names(results: Sequence[PairResult]) -> str:
        return ", ".join(f"{r.model} on {r.device}" for r in results[:5]) + (", ..." if len(results) > 5 else "")

    failed = summary.failed
    if failed:
        raise FleetFailed(f"{len(failed)} of {len(summary.results)} pairs failed ({names(failed)}); the first: "
                          f"{failed[0].error}", summary)
    regressed = [r for r in summary.results if r.regression is not None and r.regression.regression]
    if regressed and fail_on_regression:
        raise RegressionFound(f"latency regression in {len(regressed)} of {len(summary.results)} pairs "
                              f"(--fail-on-regression): {names(regressed)}; the first: "
                              f"{regressed[0].regression.message}", summary)


def with_gate(spec: FleetSpec, fail_on_regression: bool) -> FleetSpec:
    """``spec`` with ``fail_on_regression`` set for every pair when asked (the file may set it itself)."""
    from dataclasses import replace

    if not fail_on_regression or spec.shared.fail_on_regression:
        return spec
    return replace(spec, shared=replace(spec.shared, fail_on_regression=True))


fleet = flow(name="fleet", flow_run_name=_run_name, log_prints=False)(_fleet)


@dataclass(frozen=True)
class CompilePhase:
    """What the compile phase left for the pairs: libraries and references by key, or why there are none."""

    compiled: dict[str, Compiled]
    references: dict[str, Reference]
    failures: dict[str, BaseException]
    counts: BuildCounts

    def blocker(self, pair: FleetPair) -> BaseException | None:
        """Why ``pair`` cannot run (its planning, build or reference failed); None when it can."""
        if pair.plan is None:
            return PipelineError(pair.unplanned or "its build could not be planned")
        reference = pair.plan.reference
        for key in (pair.plan.build.library.key, reference.key if reference else None):
            if key is not None and key in self.failures:
                return self.failures[key]
        return None

    def for_pair(self, pair: FleetPair) -> Prepared:
        """What ``pair`` runs with (a pair without a :meth:`blocker`)."""
        assert pair.plan is not None
        reference = pair.plan.reference
        return Prepared(self.compiled[pair.plan.build.library.key],
                        self.references[reference.key] if reference is not None else None)


def _prepare(fleet: ResolvedFleet) -> CompilePhase:
    """Compile every distinct build and compute every reference, each once.

    What the store already holds is looked up here, one after another (milliseconds: digests are checked, nothing
    is compiled). What must be produced runs in worker processes, up to ``build_concurrency`` at a time
    (default: :func:`default_build_concurrency`): TVM's compiler is not thread-safe (two ``tvm.compile`` in one
    process fail with "nested op_tag is not allowed"), and each process has its own. With one at a time, or a
    single job, it all runs here, one after another, without a worker's start-up.
    With ``build_deployment``, the builds run on that deployment's workers instead
    (:func:`tasks.fleet.build_on_deployment`).
    """
    spec, store = fleet.spec, fleet.store
    builds, references = fleet.builds(), fleet.references()
    jobs: dict[str, tuple[Any, dict[str, Any], str]] = {}
    for key, pair in builds.items():
        assert pair.plan is not None
        plan = pair.plan.build
        name = f"compile {plan.model.name} for {plan.target.arch} ({plan.build.key[:12]})"
        jobs[key] = compile_task, {"plan": plan, "store": store}, name
    for key, pair in references.items():
        jobs[key] = reference_once_task, {"pair": pair}, f"reference {pair.label}"
    stored = {key for key, pair in builds.items() if pair.plan is not None and in_store(store, pair.plan.build)}
    stored |= {key for key in references if store.get(key) is not None}
    to_produce = [key for key in jobs if key not in stored]
    remote = [key for key in to_produce if key in builds and spec.build_deployment]
    local = [key for key in to_produce if key not in remote]
    workers = max(1, min(spec.build_concurrency or default_build_concurrency(), len(local)))
    log.info("%d distinct build(s), %d reference(s): %d in the store, %d to produce here (%d at a time)%s",
             len(builds), len(references), len(stored), len(local), workers,
             f", {len(remote)} on deployment {spec.build_deployment}" if remote else "")
    values: dict[str, Any] = {}
    with contextlib.ExitStack() as running:
        futures = {}
        if remote:
            threads = running.enter_context(ThreadPoolTaskRunner(max_workers=len(remote)))
            for key in remote:
                pair = builds[key]
                futures[key] = threads.submit(
                    remote_build_task.with_options(task_run_name=f"{jobs[key][2]} on {spec.build_deployment}"[:120]),
                    {"pair": pair, "deployment": spec.build_deployment, "timeout": spec.build_timeout})
        if len(local) > 1 and workers > 1:
            running.enter_context(_api_for_workers())
            processes = running.enter_context(ProcessPoolTaskRunner(max_workers=workers))
            for key in local:
                task_, parameters, name = jobs[key]
                futures[key] = processes.submit(task_.with_options(task_run_name=name[:120]), parameters)
        for key, job in jobs.items():
            if key not in futures:  # in the store (or a single job): here, while the workers produce the rest
                values[key] = _call(*job)
        for key, future in futures.items():
            values[key] = future.result(raise_on_failure=False)  # each job is bounded; a failure is returned
    compiled = {k: v for k, v in values.items() if isinstance(v, Compiled)}
    refs = {k: v for k, v in values.items() if isinstance(v, Reference)}
    failures = {k: v if isinstance(v, BaseException) else StoreError(f"the compile phase gave nothing for {k}; run again")
                for k, v in values.items() if not isinstance(v, (Compiled, Reference))}
    ran = sum(1 for c in compiled.values() if "ran" in c.stages.values())
    counts = BuildCounts(ran=ran, cached=len(compiled) - ran, failed=sum(1 for k in builds if k in failures))
    log.info("builds: %d ran, %d cached, %d failed", counts.ran, counts.cached, counts.failed)
    return CompilePhase(compiled, refs, failures, counts)


def default_build_concurrency() -> int:
    """Compile processes at once when the fleet file does not say: half the cores (one compile keeps more than
    one core busy with TVM's and LLVM's threads, and every process pays ~2-5 s to import TVM); 1 on two cores."""
    return max(1, (os.cpu_count() or 1) // 2)


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """Point worker processes at this run's Prefect API, also when it is the temporary server Prefect started for
    a command line run without ``PREFECT_API_URL`` (each worker would otherwise start a server of its own, and
    its task runs would be lost with it)."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    context = FlowRunContext.get()
    api_url = getattr(getattr(context, "client", None), "api_url", None)
    if PREFECT_API_URL.value() or not api_url:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(api_url)}):
        yield


def _call(stage_task: Any, parameters: dict[str, Any], name: str) -> Any:
    """Run a task here; its result, or its exception."""
    state = stage_task.with_options(task_run_name=name[:120])(**parameters, return_state=True)
    return state.result(raise_on_failure=False)


def _sessions(fleet: ResolvedFleet) -> dict[str, int]:
    """How many sessions each device may hold at once: the servers its tracker has under its key (at least 1)."""
    summaries: dict[str, dict[str, Any] | None] = {}
    sessions = {}
    for device in fleet.spec.devices:
        spec = device.spec
        if spec.kind != "tracker":
            sessions[device.name] = 1
            continue
        tracker = str(spec.tracker)
        if tracker not in summaries:
            try:
                summaries[tracker] = tracker_summary(*spec.tracker_address, min(spec.connect_timeout, _SUMMARY_TIMEOUT_S))
            except DeviceUnavailable as exc:  # its pairs will fail with the reason when they ask for a device
                log.info("tracker %s gave no summary: %s", tracker, one_line(exc))
                summaries[tracker] = None
        servers = (summaries[tracker] or {}).get("server_info", [])
        sessions[device.name] = max(1, sum(1 for s in servers if isinstance(s, dict) and s.get("key") == f"server:{spec.key}"))
    return sessions


def _run_devices(fleet: ResolvedFleet, prepared: CompilePhase, fleet_run: str) -> dict[int, PairResult]:
    """Run every pair: devices side by side, each device's pairs one after another (or one per server).

    A pair whose device was unavailable (no session within its timeouts) leaves that device's remaining
    pairs not run, failed with that reason, instead of each waiting out the same timeouts.
    """
    results: dict[int, PairResult] = {}
    queues: dict[str, collections.deque[int]] = {d.name: collections.deque() for d in fleet.spec.devices}
    for index, pair in enumerate(fleet.pairs):
        blocker = prepared.blocker(pair)
        if blocker is not None:
            results[index] = not_run(pair, blocker, fleet_run)
        else:
            queues[pair.device.name].append(index)
    queues = {name: queue for name, queue in queues.items() if queue}
    if not queues:
        return results
    sessions = _sessions(fleet)
    lanes = sum(min(sessions[name], len(queue)) for name, queue in queues.items())
    workers = min(fleet.spec.concurrency, lanes)
    log.info("running %d pair(s) on %d device(s), %d session(s) at a time", sum(map(len, queues.values())),
             len(queues), workers)
    down: dict[str, str] = {}
    in_flight: dict[concurrent.futures.Future[Any], tuple[str, int, Any]] = {}
    with ThreadPoolTaskRunner(max_workers=workers) as runner:

        def start_next(name: str) -> None:
            queue = queues[name]
            while queue:
                index = queue.popleft()
                pair = fleet.pairs[index]
                if name in down:
                    results[index] = not_run(pair, DeviceUnavailable(down[name]), fleet_run)
                    continue
                future = runner.submit(pair_task.with_options(task_run_name=pair.name[:120]), {
                    "pair": pair, "prepared": prepared.for_pair(pair), "fleet_run": fleet_run,
                })
                in_flight[future.wrapped_future] = (name, index, future)
                return

        for name, queue in queues.items():
            for _ in range(min(sessions[name], len(queue))):
                start_next(name)
        # Ends: each pair's device calls are bounded (request, connect and call timeouts), and each
        # completion starts at most one more pair of the queues, which only shrink.
        while in_flight:
            done, _ = concurrent.futures.wait(list(in_flight), return_when=concurrent.futures.FIRST_COMPLETED)
            for wrapped in done:
                name, index, future = in_flight.pop(wrapped)
                result = _outcome(fleet.pairs[index], future, fleet_run)
                results[index] = result
                (log.info if result.passed else log.warning)(
                    "%s: %s%s", fleet.pairs[index].name, result.status, f" ({result.error})" if result.error else "")
                if result.error_type == DeviceUnavailable.__name__ and name not in down:
                    down[name] = (f"not run: device {name!r} was unavailable earlier in this fleet run "
                                  f"({result.model}: {result.error})")
                start_next(name)
    return results


def _outcome(pair: FleetPair, future: Any, fleet_run: str) -> PairResult:
    value = future.result(raise_on_failure=False)
    if isinstance(value, PairResult):
        return value
    if isinstance(value, PairFailed):
        return value.result
    # Not the pair's own failure (the task could not start, say): record it here.
    error = value if isinstance(value, BaseException) else PipelineError(f"the pair's task ended without a result: {value!r}")
    return not_run(pair, error, fleet_run)


def ui_key(source: str) -> str:
    """The Prefect artifact key suffix of a fleet file: ``fleet.yaml`` -> ``fleet``, so each file keeps its history."""
    stem = os.path.splitext(os.path.basename(source))[0]
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "fleet"


def _publish(summary: FleetSummary) -> None:
    """The fleet run's Prefect artifacts: the device x model table and a markdown summary. Never raises."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        key = ui_key(summary.source)
        create_table_artifact(table_rows(summary), key=f"fleet-{key}", description=f"Fleet {summary.source}: device x model")
        create_markdown_artifact(format_markdown(summary), key=f"fleet-summary-{key}",
                                 description=f"Fleet run {summary.fleet_run} of {summary.source}")
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its report
        log.warning("could not publish the fleet's artifacts to the Prefect API: %s: %s", type(exc).__name__, exc)


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> Parser:
    """The command line of ``python -m flows.fleet``."""
    parser = Parser(
        prog="python -m flows.fleet",
        description="Run every model of a fleet file on every device of it: each distinct compilation once, "
                    "devices side by side; print the device x model table (see docs/fleet.md).",
    )
    parser.add_argument("fleet_file", metavar="FLEET.yaml", help="the fleet file: tracker, devices, models, ...")
    parser.add_argument("--artifacts", default=None, metavar="DIR|s3://BUCKET/PREFIX",
                        help="the artifact store: a directory or s3://BUCKET/PREFIX (default: the fleet file's "
                             "artifacts, else $TVMRP_ARTIFACTS, else artifacts/ at the repository root)")
    parser.add_argument("--json", action="store_true", help="print the fleet's results as one JSON object on the last line")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit with code 3 when every pair passed but some were judged latency regressions "
                             "against their lineage (a CI gate; docs/history.md)")
    parser.add_argument("--junit", metavar="FILE", default=None,
                        help="also write the results as JUnit XML: one test case per (device, model) pair; a failed "
                             "stage, a failed check or a latency regression is a failure")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return parser


def _execute(args: Any) -> FleetSummary:
    junit = _junit_path(args.junit) if args.junit else None
    resolve_fleet(load_fleet(args.fleet_file), args.artifacts)  # fail fast on a bad file, before Prefect starts
    try:
        summary = fleet(fleet_file=args.fleet_file, artifacts=args.artifacts,
                        fail_on_regression=args.fail_on_regression)
    except (FleetFailed, RegressionFound) as exc:  # they carry the table: the report still gets written
        if junit is not None and exc.summary is not None:
            write_junit(exc.summary, junit)
        raise
    if junit is not None:
        write_junit(summary, junit)
    return summary


def _junit_path(text: str) -> Path:
    """Where ``--junit`` writes, checked before anything runs: its directory must exist."""
    path = Path(text).expanduser()
    if path.is_dir() or not path.parent.is_dir():
        raise UsageError(f"--junit {clip(text)!r}: give a file in an existing directory")
    return path


def write_junit(summary: FleetSummary, path: Path) -> None:
    """Write the JUnit XML of ``summary`` to ``path`` atomically (temporary file, then rename).

    Raises:
        StoreError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(format_junit(summary), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the JUnit file {clip(path)} ({exc.strerror})") from exc


def _show(summary: FleetSummary, as_json: bool) -> None:
    print(format_text(summary))
    if as_json:
        print(json.dumps(summary.as_json()))
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 all pairs passed, 1 some failed, 2 a bad fleet file, 3 a
    regression with --fail-on-regression, 130 interrupted)."""
    return run_command(argv, build_parser(), _execute, _show)


if __name__ == "__main__":
    # Run the module's own definitions, not __main__'s: the worker processes of the compile phase get the run's
    # context, this flow among it, and find it by name (flows.fleet), which they could not in a __main__ of
    # another process.
    from flows.fleet import main as _main

    exit_command(_main())
