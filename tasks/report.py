"""Stage ``report``: judge a run against its series, record it in the ledger, publish its Prefect artifacts.

* :func:`report` (the ``report`` task): the verdict against the series' earlier runs in the ledger
  (:func:`pipeline.latency.judge`; a regression also emits the Prefect event ``tvmrp.latency.regression``),
  the ledger record (:func:`pipeline.store.ledger.record_of`), the Prefect artifacts of the run (keyed by the
  run's series, so that the UI's Artifacts page keeps each series' history: ``summary-<series>`` (markdown,
  with the trend chart), ``top5-<series>`` and ``latency-<series>`` (tables), ``latency-trend-<series>``
  (image)). It never fails the run: a store or API problem is logged as a warning.
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

from pipeline.latency import HISTORY, judge
from pipeline.results import RunStamp, RunSummary, utc_now
from pipeline.store import ArtifactStore
from pipeline.store.ledger import RunRecord, device_name, record_of
from pipeline.views.chart import data_url, draw_trend
from pipeline.views.run import latency_table, series_title, summary_markdown, top5_table, trend_points, ui_key

if TYPE_CHECKING:
    from pipeline.planning.plan import RunPlan
    from pipeline.planning.request import ResolvedRequest

log = logging.getLogger(__name__)

TREND_RUNS = 20


def versions() -> dict[str, str]:
    """The versions a run record keeps."""
    found = {"python": platform.python_version()}
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
        schedules=build.applied if build else None,
    )
    write_record(req.store, record)
    return record


# -- Prefect artifacts and events ---------------------------------------------------------------------------------


def publish_artifacts(summary: RunSummary, history: list[RunRecord]) -> None:
    """Create the run's artifacts (summary, top-5, latency, latency trend) in the current flow run.

    Never raises: a failure (the API unreachable, say) is logged as a warning.
    """
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

        key, title = ui_key(summary), series_title(summary)
        create_table_artifact(latency_table(summary), key=f"latency-{key}", description=f"Latency (ms) of {title}")
        create_table_artifact(top5_table(summary), key=f"top5-{key}", description=f"Top-5 of {title}")
        points = trend_points(history, summary)
        chart = data_url(draw_trend(points, f"Median latency (ms): {title}"))
        create_image_artifact(chart, key=f"latency-trend-{key}", description=f"Median latency of the last {len(points)} runs")
        create_markdown_artifact(summary_markdown(summary, chart), key=f"summary-{key}", description=f"Run summary: {title}")
        log.info("published the run's artifacts under series %s (%d runs in the trend)", key, len(points))
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
                      "prefect.resource.name": series_title(summary)},
            payload={"run_id": summary.run_id, "series": summary.series, "median_ms": summary.latency.median,
                     "message": verdict.message if verdict else "", "change": verdict.change if verdict else None,
                     "baseline_ms": verdict.baseline_ms if verdict else None},
        )
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its event
        log.warning("could not emit the regression event: %s", exc)


def report(summary: RunSummary, store: ArtifactStore, fleet_run: str | None = None) -> RunSummary:
    """Judge the run against its series, record it in the ledger, publish its artifacts; return it judged.

    The record's status is ``failed`` (exit code 1) when the check failed, else ``passed``.
    """
    try:
        history = store.ledger.series_history(summary.series, summary.run_id, max(HISTORY, TREND_RUNS))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read the series' history from the ledger: %s", exc)
        history = []
    verdict = judge(summary.latency.median, [r.median_ms for r in history[-HISTORY:] if r.median_ms],
                    summary.latency.noisy)
    judged = replace(summary, regression=verdict)
    (log.warning if verdict.regression else log.info)("latency trend: %s", verdict.message)
    if verdict.regression:
        emit_regression(judged)
    passed = judged.passed
    write_record(store, record_of(judged, "passed" if passed else "failed", 0 if passed else 1,
                                  None if passed else "check failed", versions=versions(),
                                  flow_run_id=flow_run_id(), fleet_run=fleet_run))
    publish_artifacts(judged, history[-(TREND_RUNS - 1):])
    return judged


report_task = task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)(report)
