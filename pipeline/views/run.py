"""A run rendered: the terminal report, the Prefect tables and markdown, from its typed values.

* :func:`format_text`: what ``python -m flows.resnet_remote`` prints (a run, or a ``--build-only`` run);
* :func:`state_message`: the run in one line, the message of its Prefect flow run's final state;
* :func:`summary_markdown`, :func:`top5_table`, :func:`latency_table`, :func:`lineage_rows`,
  :func:`trend_points`: the Prefect artifacts of a run's lineage (``tasks.report`` publishes them);
* :func:`lineage_title`, :func:`ui_key`: how the UI names a lineage (:func:`series_title`: a build of it).

Every value that came from outside (a model's file name, a device's answer, a label) is escaped
(:mod:`pipeline.views.text`). The ``--json`` objects are the values' own ``as_json`` (:mod:`pipeline.results`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.results import BuildSummary, CheckResult, Conditions, RunSummary, TuningSources, Upload, device_name
from pipeline.store.lineage import changes_between, same_setup
from pipeline.views.history import conditions_line, started_at, target_short, verdict_text
from pipeline.views.profile import facts_line, profile_lines, profile_markdown
from pipeline.views.text import markdown_cell, printable

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
            + (f", estimated {estimate:.4g} ms" if isinstance(estimate, int | float) and 0 < estimate < math.inf else ""))
    if tuning.get("converged"):
        line += "; converged: the last two increments gained < 1 %, more trials are unlikely to pay"
    return line


def format_sources(sources: TuningSources) -> str:
    """The report's ``Records`` line: which tunings scheduled how many of the build's kernels."""
    parts = [f"{s.kernels} from {'its own tuning' if s.own else 'the tuning of ' + s.model} {s.tuning[:16]} "
             f"({s.trials} trials)" for s in sources.tunings]
    if sources.rules:
        parts.append(f"{sources.rules} from the rules")
    if sources.unscheduled:
        parts.append(f"{sources.unscheduled} unscheduled")
    shared = sum(1 for s in sources.tunings if not s.own and s.kernels)
    return (f"Records    {sources.kernels} kernels: {', '.join(parts) or 'none scheduled'}; records shared from "
            f"{shared} of the store's {sources.considered} other tuning(s) for this target "
            "(--shared-tunings off: none)")


def format_build(build: BuildSummary) -> str:
    """The report of a ``--build-only`` run."""
    lines = header_lines(build, "none (--build-only)") + [stages_line(build.stages)]
    if build.tuning_sources is not None:
        lines.append(format_sources(build.tuning_sources))
    gpu = f", GPU code: {build.gpu_code}" if build.gpu_code else ""
    lines.append(f"Library    {build.artifact}  ({build.library_bytes / 1e6:.1f} MB{gpu})")
    lines.append(f"Keys       build {build.build_key}  library {build.library_key}")
    lines += [f"Note       {note}" for note in build.notes]
    return "\n".join(lines)


def format_conditions(conditions: Conditions | None) -> str:
    """The report's ``Measured`` line: the device's TVM threads, and the load of the device and this host."""
    return "Measured   " + conditions_line(conditions.as_dict() if conditions is not None else None)


def format_text(summary: RunSummary | BuildSummary) -> str:
    """The terminal report of a run (or of a ``--build-only`` run), control characters escaped."""
    if isinstance(summary, BuildSummary):
        return "\n".join(printable(line) for line in format_build(summary).splitlines())
    build, outcome = summary.build, summary.outcome
    device = outcome.device if not outcome.name else f"{outcome.name} ({outcome.device})"
    lines = [f"Run        {summary.run_id}  (python -m flows.history show {summary.run_id})",
             *header_lines(build, device), stages_line(summary.stages), format_upload(outcome.upload)]
    if build.tuning:
        lines.append(format_tuning(build.tuning))
    if build.tuning_sources is not None:
        lines.append(format_sources(build.tuning_sources))
    lines += [f"Note       {note}" for note in build.notes]
    lines.append("Top-5      class  probability  label")
    for rank, entry in enumerate(outcome.top5, 1):
        lines.append(f"  {rank}.       {entry.index:>5}  {entry.prob:11.4f}  {entry.label}")
    lines.append(format_check(outcome.check))
    lines.append(format_latency(outcome.latency))
    lines.append(format_conditions(outcome.conditions))
    lines.append("On device  " + facts_line(outcome.facts))
    if outcome.profile is not None:
        lines += [f"{'Profile' if i == 0 else '':<11}{line}" for i, line in enumerate(profile_lines(outcome.profile))]
    lines += [f"Note       {note}" for note in outcome.notes]
    if summary.regression is not None:
        lines.append(f"Trend      {summary.regression.message} (lineage {summary.lineage}, series {summary.series})")
    return "\n".join(printable(line) for line in lines)


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


# -- the Prefect artifacts of a run's lineage --------------------------------------------------------------------


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


def device_label(name: str) -> str:
    """A device's name, short: a tracker device by its key (``tracker H:P key=rpi4`` -> ``rpi4``)."""
    match = re.fullmatch(r"tracker \S+ key=(.+)", name)
    return match[1] if match else name


def ui_key(summary: RunSummary) -> str:
    """The lower-case-dashes suffix of the Prefect artifact keys of the run's lineage: its model, its device and
    the start of its lineage id, e.g. ``efficientnet-lite0-embedded-3f2a9c`` (Prefect keys allow lower-case
    letters, digits and dashes)."""
    model = _slug(summary.build.model, 40) or "model"
    device = _slug(device_label(summary.device_name), 40) or "device"
    return f"{model}-{device}-{summary.lineage[:6]}"


def lineage_title(summary: RunSummary) -> str:
    """``efficientnet_lite0 on embedded @ llvm (x86_64-conda-linux-gnu)``: the lineage, for people."""
    return f"{summary.build.model} on {summary.device_name} @ {target_short(summary.build.target)}"


def series_title(summary: RunSummary) -> str:
    build = summary.build
    tuning = f", tuned {build.tune_trials} trials" if build.tune_trials else ""
    return (f"{build.model} @ {target_short(build.target)} opt_level {build.opt_level}{tuning} "
            f"on {device_name(summary.outcome.device)}")


def top5_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows of the top-5 table: rank, class, label, probability."""
    return [{"rank": rank, "class": e.index, "label": printable(e.label), "probability": round(e.prob, 4)}
            for rank, e in enumerate(summary.outcome.top5, 1)]


def latency_table(summary: RunSummary) -> list[dict[str, Any]]:
    """The latency table: one row per statistic, in ms, with the measurement counts."""
    lat = summary.latency
    return [{"statistic": name, "ms": round(float(value), 4), "repeat": lat.repeat, "number": lat.number}
            for name, value in lat.as_dict().items() if name != "cv"] + [
        {"statistic": "cv", "ms": round(lat.cv, 4), "repeat": lat.repeat, "number": lat.number}]


def _short_changes(names: list[str]) -> str:
    return ", ".join(dict.fromkeys(name.removeprefix("versions.") for name in names))


def _record_changes(history: Sequence[RunRecord]) -> list[str | None]:
    """For each run of ``history`` (oldest first), what changed since the run before it (None: nothing)."""
    marks: list[str | None] = []
    for i, record in enumerate(history):
        previous = history[i - 1] if i else None
        if previous is None or same_setup(previous, record):
            marks.append(None)
        else:
            marks.append(_short_changes([c.field for c in changes_between(previous, record)]) or "build")
    return marks


def _this_change(summary: RunSummary) -> str | None:
    verdict = summary.regression
    if verdict is None or not verdict.changes:
        return None
    return _short_changes([c.field for c in verdict.changes])


def trend_points(history: Sequence[RunRecord], summary: RunSummary) -> list[TrendPoint]:
    """The trend chart's points: the lineage's earlier runs, then this one, each with what changed before it."""
    from pipeline.views.chart import TrendPoint

    def point(when: dt.datetime, lat: dict[str, Any], regression: bool, change: str | None) -> TrendPoint:
        return TrendPoint(when, lat["median"], lat.get("min", lat["median"]), lat.get("p90", lat["median"]),
                          regression, change)

    usable = [r for r in history if r.median_ms]
    points = [point(started_at(r), r.latency_ms or {}, bool((r.regression or {}).get("regression") is True), change)
              for r, change in zip(usable, _record_changes(usable))]
    this = summary.latency.as_dict()
    return points + [point(dt.datetime.fromisoformat(summary.started), this,
                           bool(summary.regression and summary.regression.regression), _this_change(summary))]


def lineage_rows(history: Sequence[RunRecord], summary: RunSummary) -> list[dict[str, Any]]:
    """The lineage's last runs as table rows, newest first: date, run, build change, median, p90, verdict."""
    usable = [r for r in history if r.median_ms]
    rows = [{"date": f"{started_at(r):%Y-%m-%d %H:%M}", "run": r.id, "build change": printable(change or ""),
             "median ms": round(float(r.median_ms or 0), 4), "p90 ms": _round((r.latency_ms or {}).get("p90")),
             "verdict": verdict_text(r.regression)}
            for r, change in zip(usable, _record_changes(usable))]
    lat = summary.latency
    rows.append({"date": f"{dt.datetime.fromisoformat(summary.started):%Y-%m-%d %H:%M}", "run": summary.run_id,
                 "build change": printable(_this_change(summary) or ""), "median ms": round(lat.median, 4),
                 "p90 ms": round(lat.p90, 4),
                 "verdict": verdict_text(summary.regression.as_dict() if summary.regression else None)})
    return rows[::-1]


def _round(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summary_markdown(summary: RunSummary, chart_url: str, runs: Sequence[dict[str, Any]] = ()) -> str:
    """The markdown summary of a run and its lineage: what was built, where it ran, each stage, the latency and
    the verdict, the lineage's last runs (``runs``: :func:`lineage_rows`) and its trend chart."""
    build, outcome, lat, stages = summary.build, summary.outcome, summary.latency, summary.stages
    verdict = summary.regression.message if summary.regression else "first run of this lineage"
    m = markdown_cell
    lines = [
        f"# {m(lineage_title(summary))}", "", "| | |", "|---|---|",
        f"| Model | `{m(build.model)}` (digest `{m(build.model_digest[:16])}`) |",
        f"| Target | `{m(build.target)}` |", f"| opt_level | {build.opt_level} |",
        f"| Schedules | {m(build.schedules)} |", f"| Tuning trials | {build.tune_trials} |",
        f"| Build key | `{m(build.build_key)}` |", f"| Library | `{m(build.artifact)}` |",
        f"| Device | {m(summary.device_name)}: {m(outcome.device)} ({m(outcome.device_identity)}) |",
        f"| Run | `{summary.run_id}` |", f"| Lineage | `{summary.lineage}` (series `{summary.series}`) |",
        "", "## Stages", "", "| stage | status |", "|---|---|",
        *(f"| {name} | {'**cached**' if status == 'cached' else status} |" for name, status in stages.items()),
        "", f"Cached (not rebuilt): {', '.join(n for n, s in stages.items() if s == 'cached') or 'none'}.",
        "", "## Latency", "",
        f"Median **{lat.median:.4g} ms** (mean {lat.mean:.4g}, p90 {lat.p90:.4g}, p99 {lat.p99:.4g}, min "
        f"{lat.min:.4g}, max {lat.max:.4g}, CV {lat.cv * 100:.1f}%, {lat.repeat} samples); {m(verdict)}.",
        "", f"Measured under: {m(conditions_line(outcome.conditions.as_dict() if outcome.conditions else None))}.",
        "", f"On the device: {m(facts_line(outcome.facts))}.",
    ]
    if outcome.profile is not None:
        lines += ["", *profile_markdown(outcome.profile)]
    if runs:
        columns = ("date", "run", "build change", "median ms", "p90 ms", "verdict")
        lines += ["", "## Last runs of this lineage", "", "| " + " | ".join(columns) + " |",
                  "|---|---|---|---:|---:|---|",
                  *("| " + " | ".join(m("-" if row.get(c) is None else row.get(c)) for c in columns) + " |"
                    for row in runs)]
    lines += ["", f"![median latency per run]({chart_url})"]
    notes = (*build.notes, *outcome.notes)
    lines += ["", *(f"> {m(note)}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"
