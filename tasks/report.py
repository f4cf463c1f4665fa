"""The run's report: one typed :class:`RunSummary`, and every rendering of it.

* :func:`format_text`: what the command line prints;
* :meth:`RunSummary.as_json`: the ``--json`` object (the flow's return value);
* :func:`record_of`: the run ledger's record (:mod:`pipeline.store.ledger`), also for a run that failed;
* :func:`publish_artifacts`: the Prefect artifacts of the flow run, keyed by the run's series so that the
  UI's Artifacts page keeps each series' history: ``summary-<series>`` (markdown, with the trend chart),
  ``top5-<series>`` and ``latency-<series>`` (tables), ``latency-trend-<series>`` (image);
* :func:`report` (the ``report`` task): judges the run against its series' history in the ledger (a
  regression is marked), writes the ledger record, publishes the artifacts. It never fails the run: a
  store or API problem is logged as a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import re
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.views.chart import TrendPoint, data_url, draw_trend
from pipeline.device.cache import Placement
from pipeline.views.history import target_short
from pipeline.latency import HISTORY, Latency, Verdict, judge
from pipeline.store.ledger import Ledger, RunRecord, device_name, series_of
from tasks.check import CheckResult
from tasks.postprocess import Top

log = logging.getLogger(__name__)

TREND_RUNS = 20


@dataclass(frozen=True)
class RunSummary:
    """What one run of a model on a device produced (see ``--json`` in the README for the JSON form)."""

    run_id: str
    started: str
    model: str
    model_digest: str
    weights: str | None
    target: str
    opt_level: int
    tune_trials: int
    tuning_key: str | None
    import_key: str
    build_key: str
    library_key: str
    artifact: str
    device: str
    device_identity: str
    image: str
    input_shape: tuple[int, ...]
    stages: dict[str, str]
    top5: tuple[Top, ...]
    latency: Latency
    upload: Placement
    check: CheckResult | None
    notes: tuple[str, ...] = ()
    regression: Verdict | None = None
    tuning: dict[str, Any] | None = None
    """What the tuning this build applies did (``tasks.tune.read_summary``): trials (reused, new), estimate,
    convergence; None for an untuned build."""
    schedules: str = "tvm-default"
    """The schedules the build applies: ``tuned``, ``rules`` or ``tvm-default`` (``BuildPlan.applied``)."""

    @property
    def series(self) -> str:
        return series_of(self.build_key, self.device, self.device_identity, self.input_shape)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        upload = self.upload
        return {
            "run_id": self.run_id, "series": self.series,
            "model": self.model, "model_digest": self.model_digest, "weights": self.weights,
            "target": self.target, "opt_level": self.opt_level, "tune_trials": self.tune_trials,
            "tuning_key": self.tuning_key, "import_key": self.import_key, "build_key": self.build_key,
            "library_key": self.library_key, "artifact": self.artifact, "device": self.device,
            "device_identity": self.device_identity, "image": self.image, "stages": dict(self.stages),
            "top5": [entry.as_dict() for entry in self.top5],
            "latency_ms": self.latency.as_dict(),
            "timing": {"number": self.latency.number, "repeat": self.latency.repeat},
            "upload": {
                "bytes": upload.bytes, "seconds": upload.seconds, "reused": upload.reused,
                "mb_per_s": None if upload.reused else upload.bytes / 1e6 / max(upload.seconds, 1e-9),
                "remote_name": upload.remote_name,
            },
            "check": self.check.as_dict() if self.check is not None else None,
            "regression": self.regression.as_dict() if self.regression is not None else None,
            "tuning": self.tuning, "schedules": self.schedules,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class BuildSummary:
    """What a ``--build-only`` run produced: the compiled library and its keys, no device."""

    model: str
    model_digest: str
    target: str
    opt_level: int
    tune_trials: int
    tuning_key: str | None
    import_key: str
    build_key: str
    library_key: str
    artifact: str
    library_bytes: int
    gpu_code: str | None
    """For a GPU target, what the library holds: ``cubin`` (machine code), ``ptx`` or ``source``."""
    stages: dict[str, str]
    notes: tuple[str, ...] = ()
    schedules: str = "tvm-default"
    """The schedules the build applies: ``tuned``, ``rules`` or ``tvm-default`` (``BuildPlan.applied``)."""

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object of a ``--build-only`` run."""
        return {
            "build_only": True, "model": self.model, "model_digest": self.model_digest, "target": self.target,
            "opt_level": self.opt_level, "tune_trials": self.tune_trials, "tuning_key": self.tuning_key,
            "import_key": self.import_key, "build_key": self.build_key, "library_key": self.library_key,
            "artifact": self.artifact, "library_bytes": self.library_bytes, "gpu_code": self.gpu_code,
            "stages": dict(self.stages), "schedules": self.schedules, "notes": list(self.notes),
        }


# -- terminal text ------------------------------------------------------------------------------------


def header_lines(summary: dict[str, Any]) -> list[str]:
    """The report's first lines (from the JSON form): model, target, build, device and each stage's status."""
    return [
        f"Model      {summary['model']}  (digest {summary['model_digest'][:16]})",
        f"Target     {summary['target']}  opt_level {summary['opt_level']}  schedules {summary.get('schedules', '-')}",
        f"Build      {summary['build_key'][:16]}  library {summary['artifact']}",
        f"Device     {summary['device']}",
        "Stages     " + ", ".join(f"{name} {status}" for name, status in summary["stages"].items()),
    ]


def rate(size: int, seconds: float) -> str:
    """A transfer rate with the precision it deserves: ``60 MB/s``, ``0.35 MB/s``, ``12 kB/s``."""
    per_s = size / max(seconds, 1e-9)
    if per_s >= 10e6:
        return f"{per_s / 1e6:.0f} MB/s"
    if per_s >= 1e6:
        return f"{per_s / 1e6:.1f} MB/s"
    return f"{per_s / 1e3:.1f} kB/s"


def format_upload(upload: Placement) -> str:
    """One line on how the library reached the device."""
    size = f"{upload.bytes / 1e6:.1f} MB"
    if upload.reused:
        return f"Upload     none: the device kept this library ({size}) from an earlier run, as {upload.remote_name}"
    return f"Upload     {size} in {upload.seconds:.2f} s ({rate(upload.bytes, upload.seconds)}) to {upload.remote_name}"


def format_check(check: CheckResult | None) -> str:
    """The report's ``Check`` line (None: the check was skipped)."""
    if check is None:
        return "Check      skipped (--no-check)"
    d = check.as_dict()

    def figure(name: str, spec: str) -> str:
        return "n/a" if d[name] is None else format(d[name], spec)

    psnr = "inf" if d["psnr_db"] is None and d["max_abs_diff"] == 0.0 else figure("psnr_db", ".1f")
    return (
        f"Check      {'passed' if d['passed'] else 'FAILED'}  max abs diff {figure('max_abs_diff', '.3g')}  "
        f"max rel diff {figure('max_rel_diff', '.3g')}  cosine {figure('cosine', '.6f')}  PSNR {psnr} dB  "
        f"top-1 {'match' if d['top1_match'] else 'DIFFERS'}  top-5 {'match' if d['top5_match'] else 'DIFFERS'}  "
        f"({d['thresholds']['precision']}: {d['reason']})"
    )


def format_latency(latency: Latency) -> str:
    """The report's ``Latency`` line."""
    lat = latency
    spread = "  spread too large to compare (p90 > 10 % above the median)" if lat.noisy else ""
    return (
        f"Latency    mean {lat.mean:.3f} ms  median {lat.median:.3f} ms  p90 {lat.p90:.3f} ms  p99 {lat.p99:.3f} ms  "
        f"min {lat.min:.3f} ms  max {lat.max:.3f} ms  std {lat.std:.3f} ms  CV {lat.cv * 100:.1f}%  "
        f"({lat.repeat} x {lat.number} runs after a warm-up){spread}"
    )


def format_build(summary: BuildSummary) -> str:
    """The human-readable report of a ``--build-only`` run."""
    lines = header_lines({**summary.as_json(), "device": "none (--build-only)"})
    size = f"{summary.library_bytes / 1e6:.1f} MB"
    gpu = f", GPU code: {summary.gpu_code}" if summary.gpu_code else ""
    lines.append(f"Library    {summary.artifact}  ({size}{gpu})")
    lines.append(f"Keys       build {summary.build_key}  library {summary.library_key}")
    lines += [f"Note       {note}" for note in summary.notes]
    return "\n".join(lines)


def format_tuning(tuning: dict[str, Any]) -> str:
    """The report's ``Tuning`` line: trials (reused, new), the estimate, and whether more trials may pay."""
    estimate = tuning.get("estimated_ms")
    line = (f"Tuning     {tuning['trials']} trials ({tuning['trials_reused']} reused, {tuning['trials_new']} new)"
            + (f", estimated {estimate:.4g} ms" if isinstance(estimate, int | float) else ""))
    if tuning.get("converged"):
        line += "; converged: the last two increments gained < 1 %, more trials are unlikely to pay"
    return line


def format_text(summary: RunSummary | BuildSummary) -> str:
    """The human-readable report of a run (or of a ``--build-only`` run)."""
    if isinstance(summary, BuildSummary):
        return format_build(summary)
    lines = header_lines(summary.as_json())
    lines.append(format_upload(summary.upload))
    if summary.tuning:
        lines.append(format_tuning(summary.tuning))
    lines += [f"Note       {note}" for note in summary.notes]
    lines.append("Top-5      class  probability  label")
    for rank, entry in enumerate(summary.top5, 1):
        lines.append(f"  {rank}.       {entry.index:>5}  {entry.prob:11.4f}  {entry.label}")
    lines.append(format_check(summary.check))
    lines.append(format_latency(summary.latency))
    if summary.regression is not None:
        lines.append(f"Trend      {summary.regression.message} (series {summary.series})")
    return "\n".join(lines)


# -- the ledger -----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """The versions a run record keeps."""
    found = {"python": platform.python_version()}
    for dist in ("apache-tvm", "apache-tvm-ffi", "prefect", "tvm-remote-pipeline"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def record_of(summary: RunSummary, status: str = "passed", exit_code: int = 0, error: str | None = None,
              **context: Any) -> RunRecord:
    """The ledger record of a run that got as far as a summary (``status`` failed when the check failed)."""
    d = summary.as_json()
    return RunRecord(
        id=summary.run_id, series=summary.series, started=summary.started, finished=_now(), status=status,
        exit_code=exit_code, error=error, model=summary.model, model_digest=summary.model_digest,
        target=summary.target, opt_level=summary.opt_level, tune_trials=summary.tune_trials,
        tuning_key=summary.tuning_key, build_key=summary.build_key, library_key=summary.library_key,
        device=device_name(summary.device), device_identity=summary.device_identity, image=summary.image,
        input_shape=list(summary.input_shape), stages=d["stages"], latency_ms=d["latency_ms"],
        samples=summary.latency.repeat, check=d["check"], regression=d["regression"], versions=versions(),
        number=summary.latency.number, weights=summary.weights, top5=d["top5"], upload=d["upload"],
        schedules=summary.schedules, **context,
    )


def record_failure(req: Any, run_id: str, started: str, exc: BaseException, fleet_run: str | None = None,
                   device: str | None = None) -> RunRecord:
    """Write the ledger record of a run that failed before it had a summary (device down, build failed...).

    Args:
        req: the run's :class:`pipeline.planning.request.ResolvedRequest`.
    """
    from pipeline.planning.plan import plan_build

    interrupted = isinstance(exc, KeyboardInterrupt)
    try:
        plan = plan_build(req.model, req.target, req.opt_level, req.tune_trials, schedules=req.schedules)
        keys = plan.build.key, plan.library.key, plan.tune.key if plan.tune else None
        schedules = plan.applied
    except Exception:  # noqa: BLE001 - the keys are a courtesy here
        keys, schedules = (None, None, None), None
    record = RunRecord(
        id=run_id, series=None, started=started, finished=_now(), status="interrupted" if interrupted else "failed",
        exit_code=130 if interrupted else int(getattr(exc, "exit_code", 1)), error=str(exc)[:2000] or type(exc).__name__,
        model=req.model.name, model_digest=req.model.digest, target=req.target.canonical, opt_level=req.opt_level,
        tune_trials=req.tune_trials, tuning_key=keys[2], build_key=keys[0], library_key=keys[1],
        device=device or device_name(req.device.describe()), device_identity=None, image=str(req.image),
        input_shape=list(req.model.input_shape), stages={}, latency_ms=None, samples=None, check=None,
        regression=None, versions=versions(), flow_run_id=flow_run_id(), fleet_run=fleet_run, schedules=schedules,
    )
    write_record(str(req.store.root), record)
    return record


def write_record(store_root: str, record: RunRecord) -> None:
    """Write ``record`` to the ledger; a failure is a warning, never the run's failure."""
    try:
        path = Ledger(store_root).write(record)
        log.info("run %s recorded in %s", record.id, path)
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its record
        log.warning("could not record the run in the ledger: %s", exc)


def flow_run_id() -> str | None:
    """The current Prefect flow run's id, if any."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001
        return None


# -- Prefect artifacts --------------------------------------------------------------------------------


def artifact_key(summary: RunSummary) -> str:
    """The lower-case-dashes key suffix of the run's series, e.g. ``efficientnet-lite0-3f2a9c0d1e2b4a5c``."""
    slug = re.sub(r"[^a-z0-9]+", "-", summary.model.lower()).strip("-")[:40] or "model"
    return f"{slug}-{summary.series}"


def series_title(summary: RunSummary) -> str:
    tuning = f", tuned {summary.tune_trials} trials" if summary.tune_trials else ""
    return (f"{summary.model} @ {target_short(summary.target)} opt_level {summary.opt_level}{tuning} "
            f"on {device_name(summary.device)}")


def top5_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows of the top-5 table: rank, class, label, probability."""
    return [{"rank": rank, "class": e.index, "label": e.label, "probability": round(e.prob, 4)}
            for rank, e in enumerate(summary.top5, 1)]


def latency_table(summary: RunSummary) -> list[dict[str, Any]]:
    """The latency table: one row per statistic, in ms, with the measurement counts."""
    lat = summary.latency
    return [{"statistic": name, "ms": round(float(value), 4), "repeat": lat.repeat, "number": lat.number}
            for name, value in lat.as_dict().items() if name != "cv"] + [
        {"statistic": "cv", "ms": round(lat.cv, 4), "repeat": lat.repeat, "number": lat.number}]


def trend_points(history: list[RunRecord], summary: RunSummary) -> list[TrendPoint]:
    """The chart's points: the series' earlier runs, then this one."""
    def point(when: str, lat: dict[str, float], regression: bool) -> TrendPoint:
        return TrendPoint(dt.datetime.fromisoformat(when), lat["median"], lat["min"], lat["p90"], regression)

    points = [point(r.started, r.latency_ms, bool((r.regression or {}).get("regression")))
              for r in history if r.latency_ms and "p90" in r.latency_ms]
    this = summary.latency.as_dict()
    return points + [point(summary.started, this, bool(summary.regression and summary.regression.regression))]


def summary_markdown(summary: RunSummary, chart_url: str) -> str:
    """The markdown summary of a run: what was built, where it ran, each stage, the latency and its trend."""
    lat, stages = summary.latency, summary.stages
    verdict = summary.regression.message if summary.regression else "first run of this series"
    lines = [
        f"# {series_title(summary)}", "", "| | |", "|---|---|",
        f"| Model | `{summary.model}` (digest `{summary.model_digest[:16]}`) |",
        f"| Target | `{summary.target}` |", f"| opt_level | {summary.opt_level} |",
        f"| Build key | `{summary.build_key}` |", f"| Library | `{summary.artifact}` |",
        f"| Device | {summary.device} ({summary.device_identity}) |", f"| Run | `{summary.run_id}` |",
        "", "## Stages", "", "| stage | status |", "|---|---|",
        *(f"| {name} | {'**cached**' if status == 'cached' else status} |" for name, status in stages.items()),
        "", f"Cached (not rebuilt): {', '.join(n for n, s in stages.items() if s == 'cached') or 'none'}.",
        "", "## Latency", "",
        f"Median **{lat.median:.4g} ms** (mean {lat.mean:.4g}, p90 {lat.p90:.4g}, p99 {lat.p99:.4g}, min "
        f"{lat.min:.4g}, max {lat.max:.4g}, CV {lat.cv * 100:.1f}%, {lat.repeat} samples); {verdict}.",
        "", f"![median latency per run]({chart_url})",
    ]
    lines += ["", *(f"> {note}" for note in summary.notes)] if summary.notes else []
    return "\n".join(lines) + "\n"


def publish_artifacts(summary: RunSummary, history: list[RunRecord]) -> None:
    """Create the run's artifacts (summary, top-5, latency, latency trend) in the current flow run.

    Never raises: a failure (the API unreachable, say) is logged as a warning.
    """
    try:
        from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

        key, title = artifact_key(summary), series_title(summary)
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


def report(summary: RunSummary, store_root: str, status: str = "passed", error: str | None = None,
           fleet_run: str | None = None) -> RunSummary:
    """Judge the run against its series, record it in the ledger, publish its artifacts; return it judged."""
    try:
        history = Ledger(store_root).series_history(summary.series, summary.run_id, max(HISTORY, TREND_RUNS))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read the series' history from the ledger: %s", exc)
        history = []
    verdict = judge(summary.latency.median, [r.median_ms for r in history[-HISTORY:] if r.median_ms],
                    summary.latency.noisy)
    judged = replace(summary, regression=verdict)
    (log.warning if verdict.regression else log.info)("latency trend: %s", verdict.message)
    if verdict.regression:
        emit_regression(judged)
    exit_code = 0 if status == "passed" else 1
    write_record(store_root, record_of(judged, status, exit_code, error, flow_run_id=flow_run_id(), fleet_run=fleet_run))
    publish_artifacts(judged, history[-(TREND_RUNS - 1):])
    return judged


report_task = task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)(report)
