"""A run rendered: the terminal report, the Prefect tables and markdown, from its typed values.

* :func:`format_text`: what ``python -m flows.resnet_remote`` prints (a run, or a ``--build-only`` run);
* :func:`state_message`: the run in one line, the message of its Prefect flow run's final state;
* :func:`summary_markdown`, :func:`top5_table`, :func:`latency_table`, :func:`trend_points`: the Prefect
  artifacts of a run (``tasks.report`` publishes them);
* :func:`series_title`, :func:`ui_key`: how the UI names a run's series.

The ``--json`` objects are the values' own ``as_json`` (:mod:`pipeline.results`).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.results import BuildSummary, CheckResult, RunSummary, Upload
from pipeline.store.ledger import device_name
from pipeline.views.history import target_short

if TYPE_CHECKING:
    from pipeline.latency import Latency
    from pipeline.store.ledger import RunRecord
    from pipeline.views.chart import TrendPoint


def header_lines(build: BuildSummary, device: str) -> list[str]:
    """The report's first lines: model, target, build and device."""
    return [
        f"Model      {build.model}  (digest {build.model_digest[:16]})",
        f"Target     {build.target}  opt_level {build.opt_level}  schedules {build.schedules}",
        f"Build      {build.build_key[:16]}  library {build.artifact}",
        f"Device     {device}",
    ]


def stages_line(stages: dict[str, str]) -> str:
    return "Stages     " + ", ".join(f"{name} {status}" for name, status in stages.items())


def rate(size: int, seconds: float) -> str:
    """A transfer rate with the precision it deserves: ``60 MB/s``, ``0.35 MB/s``, ``12 kB/s``."""
    per_s = size / max(seconds, 1e-9)
    if per_s >= 10e6:
        return f"{per_s / 1e6:.0f} MB/s"
    if per_s >= 1e6:
        return f"{per_s / 1e6:.1f} MB/s"
    return f"{per_s / 1e3:.1f} kB/s"


def format_upload(upload: Upload) -> str:
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


def format_tuning(tuning: dict[str, Any]) -> str:
    """The report's ``Tuning`` line: trials (reused, new), the estimate, and whether more trials may pay."""
    estimate = tuning.get("estimated_ms")
    line = (f"Tuning     {tuning['trials']} trials ({tuning['trials_reused']} reused, {tuning['trials_new']} new)"
            + (f", estimated {estimate:.4g} ms" if isinstance(estimate, int | float) and estimate >= 0 else ""))
    if tuning.get("converged"):
        line += "; converged: the last two increments gained < 1 %, more trials are unlikely to pay"
    return line


def format_build(build: BuildSummary) -> str:
    """The report of a ``--build-only`` run."""
    lines = header_lines(build, "none (--build-only)") + [stages_line(build.stages)]
    gpu = f", GPU code: {build.gpu_code}" if build.gpu_code else ""
    lines.append(f"Library    {build.artifact}  ({build.library_bytes / 1e6:.1f} MB{gpu})")
    lines.append(f"Keys       build {build.build_key}  library {build.library_key}")
    lines += [f"Note       {note}" for note in build.notes]
    return "\n".join(lines)


def format_text(summary: RunSummary | BuildSummary) -> str:
    """The terminal report of a run (or of a ``--build-only`` run)."""
    if isinstance(summary, BuildSummary):
        return format_build(summary)
    build, outcome = summary.build, summary.outcome
    lines = header_lines(build, outcome.device) + [stages_line(summary.stages), format_upload(outcome.upload)]
    if build.tuning:
        lines.append(format_tuning(build.tuning))
    lines += [f"Note       {note}" for note in build.notes]
    lines.append("Top-5      class  probability  label")
    for rank, entry in enumerate(outcome.top5, 1):
        lines.append(f"  {rank}.       {entry.index:>5}  {entry.prob:11.4f}  {entry.label}")
    lines.append(format_check(outcome.check))
    lines.append(format_latency(outcome.latency))
    if summary.regression is not None:
        lines.append(f"Trend      {summary.regression.message} (series {summary.series})")
    return "\n".join(lines)


def state_message(summary: RunSummary | BuildSummary) -> str:
    """The run in one line (median, check, top-1; a regression): its flow run's final state message, which the
    UI, ``prefect flow-run inspect`` and ``prefect deployment run --watch`` show."""
    if isinstance(summary, BuildSummary):
        return (f"built {summary.model}: library {summary.library_key[:16]} ({summary.library_bytes / 1e6:.1f} MB), "
                + ", ".join(f"{name} {status}" for name, status in summary.stages.items()))
    check = summary.check
    verdict = "check skipped" if check is None else "check passed" if check.passed else "check FAILED"
    top = summary.outcome.top5[0] if summary.outcome.top5 else None
    line = f"median {summary.latency.median:.3f} ms, {verdict}" + (f", top-1 {top.index} {top.label}" if top else "")
    regression = summary.regression
    if regression is not None and regression.regression and regression.change is not None:
        line += f", REGRESSION {regression.change * 100:+.1f}%"
    return line


# -- the Prefect artifacts of a run ----------------------------------------------------------------------------------


def ui_key(summary: RunSummary) -> str:
    """The lower-case-dashes suffix of the Prefect artifact keys of the run's series, e.g.
    ``efficientnet-lite0-3f2a9c0d1e2b4a5c`` (Prefect keys allow lower-case letters, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", summary.build.model.lower()).strip("-")[:40] or "model"
    return f"{slug}-{summary.series}"


def series_title(summary: RunSummary) -> str:
    build = summary.build
    tuning = f", tuned {build.tune_trials} trials" if build.tune_trials else ""
    return (f"{build.model} @ {target_short(build.target)} opt_level {build.opt_level}{tuning} "
            f"on {device_name(summary.outcome.device)}")


def top5_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows of the top-5 table: rank, class, label, probability."""
    return [{"rank": rank, "class": e.index, "label": e.label, "probability": round(e.prob, 4)}
            for rank, e in enumerate(summary.outcome.top5, 1)]


def latency_table(summary: RunSummary) -> list[dict[str, Any]]:
    """The latency table: one row per statistic, in ms, with the measurement counts."""
    lat = summary.latency
    return [{"statistic": name, "ms": round(float(value), 4), "repeat": lat.repeat, "number": lat.number}
            for name, value in lat.as_dict().items() if name != "cv"] + [
        {"statistic": "cv", "ms": round(lat.cv, 4), "repeat": lat.repeat, "number": lat.number}]


def trend_points(history: Sequence[RunRecord], summary: RunSummary) -> list[TrendPoint]:
    """The trend chart's points: the series' earlier runs, then this one."""
    from pipeline.views.chart import TrendPoint

    def point(when: str, lat: dict[str, float], regression: bool) -> TrendPoint:
        return TrendPoint(dt.datetime.fromisoformat(when), lat["median"], lat["min"], lat["p90"], regression)

    points = [point(r.started, r.latency_ms, bool((r.regression or {}).get("regression")))
              for r in history if r.latency_ms and "p90" in r.latency_ms]
    this = summary.latency.as_dict()
    return points + [point(summary.started, this, bool(summary.regression and summary.regression.regression))]


def summary_markdown(summary: RunSummary, chart_url: str) -> str:
    """The markdown summary of a run: what was built, where it ran, each stage, the latency and its trend."""
    build, outcome, lat, stages = summary.build, summary.outcome, summary.latency, summary.stages
    verdict = summary.regression.message if summary.regression else "first run of this series"
    lines = [
        f"# {series_title(summary)}", "", "| | |", "|---|---|",
        f"| Model | `{build.model}` (digest `{build.model_digest[:16]}`) |",
        f"| Target | `{build.target}` |", f"| opt_level | {build.opt_level} |",
        f"| Build key | `{build.build_key}` |", f"| Library | `{build.artifact}` |",
        f"| Device | {outcome.device} ({outcome.device_identity}) |", f"| Run | `{summary.run_id}` |",
        "", "## Stages", "", "| stage | status |", "|---|---|",
        *(f"| {name} | {'**cached**' if status == 'cached' else status} |" for name, status in stages.items()),
        "", f"Cached (not rebuilt): {', '.join(n for n, s in stages.items() if s == 'cached') or 'none'}.",
        "", "## Latency", "",
        f"Median **{lat.median:.4g} ms** (mean {lat.mean:.4g}, p90 {lat.p90:.4g}, p99 {lat.p99:.4g}, min "
        f"{lat.min:.4g}, max {lat.max:.4g}, CV {lat.cv * 100:.1f}%, {lat.repeat} samples); {verdict}.",
        "", f"![median latency per run]({chart_url})",
    ]
    lines += ["", *(f"> {note}" for note in build.notes)] if build.notes else []
    return "\n".join(lines) + "\n"
