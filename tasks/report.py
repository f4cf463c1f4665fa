"""Stage ``report``: judge a run against its lineage, record it in the ledger, publish its Prefect artifacts.

* :func:`report` (the ``report`` task): the verdict against the earlier runs of the run's lineage in the ledger
  (:func:`pipeline.store.lineage.judge_record`; a regression also emits the Prefect event
  ``tvmrp.latency.regression``), the ledger record (:func:`pipeline.store.ledger.record_of`), and the Prefect
  artifacts of the lineage, keyed by its model and device (:func:`pipeline.views.run.ui_key`, e.g.
  ``efficientnet-lite0-embedded-3f2a9c``), so that the UI's Artifacts page keeps one history per lineage:
  ``summary-<key>`` (markdown: the run, its verdict, the lineage's last runs, the trend chart), ``runs-<key>``
  (table: date, build change, median, p90, verdict of the last runs), ``latency-trend-<key>`` (image: build
  changes marked), ``top5-<key>`` and ``latency-<key>`` (tables), and with ``--profile`` ``profile-<key>`` (a
  table: every kernel's calls, time, share, GFLOP/s and shapes, then the glue). It never fails the run: a
  store or API problem is logged as a warning.
* :func:`record_failure`: the ledger record of a run that failed before it had a summary, from its plan.

What the artifacts show is rendered by :mod:`pipeline.views.run`.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import replace
from importlib import metadata
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import REGRESSION_EXIT_CODE
from pipeline.planning.keys import BUILD_CODE_VERSION, EXPORT_CODE_VERSION, IMPORT_CODE_VERSION
from pipeline.results import RunStamp, RunSummary, device_name, lineage_of, utc_now
from pipeline.store import ArtifactStore
from pipeline.store.ledger import RunRecord, record_of
from pipeline.store.lineage import judge_record
from pipeline.views.chart import data_url, draw_trend
from pipeline.views.profile import profile_rows
from pipeline.views.run import (
    latency_table,
    lineage_rows,
    lineage_title,
    summary_markdown,
    top5_table,
    trend_points,
    ui_key,
)
from pipeline.views.text import printable

if TYPE_CHECKING:
    from pipeline.planning.plan import RunPlan
    from pipeline.planning.request import ResolvedRequest

log = logging.getLogger(__name__)

TREND_RUNS = 20
LINEAGE_RUNS = 50
"""How many earlier runs of a lineage are read to judge a run (the verdict uses the last 10 of a build)."""
BUILD_CODE = f"import={IMPORT_CODE_VERSION},build={BUILD_CODE_VERSION},export={EXPORT_CODE_VERSION}"


def versions() -> dict[str, str]:
    """The versions a run record keeps: Python, TVM, TVM-FFI, Prefect, this project, and the versions of our
    build code (``build-code``: what the build keys hash, so a change of ours is named as one)."""
    found = {"python": platform.python_version(), "build-code": BUILD_CODE}
    for dist in ("apache-tvm", "apache-tvm-ffi", "prefect", "tvm-remote-pipeline"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def flow_run_id() -> str | None:
    """The current Prefect flow run's id, if any."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001
        return None


def write_record(store: ArtifactStore, record: RunRecord) -> None:
    """Write ``record`` to the store's ledger; a failure is a warning, never the run's failure."""
    try:
        path = store.ledger.write(record)
        log.info("run %s recorded in %s", record.id, path)
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its record
        log.warning("could not record the run in the ledger: %s", exc)


def record_failure(req: ResolvedRequest, plan: RunPlan | None, stamp: RunStamp, exc: BaseException,
                   fleet_run: str | None = None) -> RunRecord:
    """Write the ledger record of a run that failed before it had a summary (device down, build failed...).

    Args:
        plan: the run's plan, whose keys the record names (None: planning itself failed).
    """
    interrupted = isinstance(exc, KeyboardInterrupt)
    build = plan.build if plan is not None else None
    name = req.device_name or device_name(req.device.describe())
    record = RunRecord(
        id=stamp.id, series=None, started=stamp.started, finished=utc_now(),
        status="interrupted" if interrupted else "failed",
        exit_code=130 if interrupted else int(getattr(exc, "exit_code", 1)), error=str(exc)[:2000] or type(exc).__name__,
        model=req.model.name, model_digest=req.model.digest, target=req.target.canonical, opt_level=req.opt_level,
        tune_trials=req.tune_trials, tuning_key=build.tune.key if build and build.tune else None,
        build_key=build.build.key if build else None, library_key=build.library.key if build else None,
        device=device_name(req.device.describe()), device_identity=None, image=str(req.image),
        input_shape=list(req.model.input_shape), stages={}, latency_ms=None, samples=None, check=None,
        regression=None, versions=versions(), flow_run_id=flow_run_id(), fleet_run=fleet_run,
        schedules=build.applied if build else None, device_name=name,
        lineage=lineage_of(req.model.name, name, req.target.canonical, req.model.input_shape),
        conditions={"threads": None, "threads_requested": req.timing.threads, "device": None, "host": None},
    )
    write_record(req.store, record)
    return record


# -- Prefect artifacts and events ---------------------------------------------------------------------------------


def publish_artifacts(summary: RunSummary, history: list[RunRecord]) -> None:
    """Create the artifacts of the run's lineage in the current flow run (summary, runs, trend, top-5, latency,
    profile).

    Never raises: a failure (the API unreachable, say) is logged as a warning.
    """
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

        key, title = ui_key(summary), lineage_title(summary)
        rows = lineage_rows(history, summary)
        create_table_artifact(rows, key=f"runs-{key}", description=f"The last runs of {title}")
        create_table_artifact(latency_table(summary), key=f"latency-{key}", description=f"Latency (ms) of {title}")
        create_table_artifact(top5_table(summary), key=f"top5-{key}", description=f"Top-5 of {title}")
        if summary.outcome.profile is not None:
            create_table_artifact(profile_rows(summary.outcome.profile), key=f"profile-{key}",
                                  description=f"Where an inference's time goes, kernel by kernel: {title}")
        points = trend_points(history, summary)
        chart = data_url(draw_trend(points, f"Median latency (ms): {title}"))
        create_image_artifact(chart, key=f"latency-trend-{key}", description=f"Median latency of the last {len(points)} runs")
        create_markdown_artifact(summary_markdown(summary, chart, rows), key=f"summary-{key}",
                                 description=f"Run summary: {title}")
        log.info("published the run's artifacts under %s (%d runs in the trend)", key, len(points))
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its report
        log.warning("could not publish the run's artifacts to the Prefect API: %s: %s", type(exc).__name__, exc)


def emit_regression(summary: RunSummary) -> None:
    """The Prefect event ``tvmrp.latency.regression`` of a regressed run, for an automation to notify on
    (docs/history.md); in a flow run Prefect relates it to the run, its flow and deployment."""
    try:
        from prefect.events import emit_event

        verdict = summary.regression
        emit_event(
            event="tvmrp.latency.regression",
            resource={"prefect.resource.id": f"tvmrp.series.{summary.series}",
                      "prefect.resource.name": lineage_title(summary)},
            payload={"run_id": summary.run_id, "series": summary.series, "lineage": summary.lineage,
                     "device_name": summary.device_name, "median_ms": summary.latency.median,
                     "message": verdict.message if verdict else "", "change": verdict.change if verdict else None,
                     "baseline_ms": verdict.baseline_ms if verdict else None,
                     "interval": list(verdict.interval) if verdict and verdict.interval else None,
                     "changes": [c.as_dict() for c in verdict.changes] if verdict else []},
        )
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its event
        log.warning("could not emit the regression event: %s", exc)


def report(summary: RunSummary, store: ArtifactStore, fleet_run: str | None = None, gate: bool = False) -> RunSummary:
    """Judge the run against its lineage, record it in the ledger, publish its artifacts; return it judged.

    The record's status is ``failed`` (exit code 1) when the check failed, else ``passed``; its exit code is 3
    when ``gate`` (``--fail-on-regression``) and the run is judged a regression (the flow then raises
    :class:`pipeline.errors.RegressionFound`).
    """
    ledger = store.ledger
    try:
        history = ledger.lineage_history(summary.lineage, summary.run_id, LINEAGE_RUNS)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read the lineage's history from the ledger: %s", exc)
        history = []
    note = ledger.skipped_note()
    if note:
        log.warning("%s", printable(note))
    passed = summary.passed
    record = record_of(summary, "passed" if passed else "failed", 0 if passed else 1,
                       None if passed else "check failed", versions=versions(), flow_run_id=flow_run_id(),
                       fleet_run=fleet_run)
    verdict = judge_record(record, history)
    judged = replace(summary, regression=verdict)
    (log.warning if verdict.regression else log.info)("latency trend: %s", printable(verdict.message))
    if verdict.regression:
        emit_regression(judged)
    exit_code = REGRESSION_EXIT_CODE if passed and gate and verdict.regression else record.exit_code
    write_record(store, replace(record, regression=verdict.as_dict(), exit_code=exit_code))
    publish_artifacts(judged, history[-(TREND_RUNS - 1):])
    return judged


report_task = task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)(report)
