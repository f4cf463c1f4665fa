"""The run ledger read back: which runs to list, and every rendering of runs for ``python -m flows.history``.

Pure functions of :class:`pipeline.store.ledger.RunRecord` (no Prefect, no TVM: the history command starts in
a fraction of a second):

* :func:`select`: the runs that pass a :class:`Selection` (model, device, target, lineage, series, since,
  last), newest first;
* :func:`format_table`, :func:`format_markdown`, :func:`format_csv`, :func:`runs_json`: a list of runs;
* :func:`format_run`: one run in full;
* :func:`compare` (a :class:`Comparison`) and :func:`format_comparison`: what differs between two runs, and
  whether the latency change is beyond the runs' noise (:func:`latency_change`).

Records are untrusted (a store may be shared): every text rendering escapes control characters
(:mod:`pipeline.views.text`), and a field of an unexpected shape inside a record's dicts reads as unknown.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pipeline.errors import UsageError, clip
from pipeline.latency import (
    CONFIDENCE, MIN_BOOTSTRAP_SAMPLES, MIN_CHANGE, NOISY_SPREAD, Measured, percentile, percentile_to_judge,
)
from pipeline.store.ledger import RunRecord
from pipeline.results import Profile
from pipeline.store.lineage import spread
from pipeline.views.profile import KernelComparison, facts_line, format_kernel_changes, kernel_changes, profile_lines
from pipeline.views.text import csv_text, markdown_cell, printable

LATENCY_FIELDS = ("mean", "median", "p90", "p99", "min", "max", "std", "cv")
_RELATIVE = re.compile(r"(\d{1,6})([mhdw])")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SINCE_FORMS = "an ISO date or time (2026-11-28, 2026-11-28T10:00, 2026-11-28T10:00+01:00) or 30m, 12h, 7d, 2w"


# -- which runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which runs to list (None: any).

    Attributes:
        model: a substring of the model name (case-insensitive; the exact name matches too).
        device: a substring of the device's name (a fleet's device name, ``--device-name``) or of its address
            (case-insensitive).
        target: a substring of the canonical target or of its short form (:func:`target_short`).
        lineage: the start of a lineage id; series: the start of a series id.
        since: only runs started at or after this time (aware).
        last: at most this many runs, the newest.
    """

    model: str | None = None
    device: str | None = None
    target: str | None = None
    since: dt.datetime | None = None
    last: int | None = None
    lineage: str | None = None
    series: str | None = None

    def __post_init__(self) -> None:
        if self.last is not None and self.last < 1:
            raise UsageError(f"--last must be at least 1 (got {self.last})")


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """The time ``--since`` means: an ISO date or datetime (UTC when it names no zone), or ``12h``/``7d`` ago.

    Raises:
        UsageError: ``text`` is neither.
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text.lower())
    if relative:
        now = now or dt.datetime.now(dt.timezone.utc)
        return now - dt.timedelta(**{_UNIT[relative[2]]: int(relative[1])})
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {clip(text, 60)!r} is not a date: give {_SINCE_FORMS}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def started_at(record: RunRecord) -> dt.datetime:
    """When the run started (UTC); from its id when ``started`` does not parse (the id starts with the time)."""
    try:
        when = dt.datetime.fromisoformat(record.started)
    except ValueError:
        when = dt.datetime.strptime(record.id[:16], "%Y%m%dT%H%M%SZ")
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def _contains(text: str | None, part: str) -> bool:
    return text is not None and part.lower() in text.lower()


def select(records: Iterable[RunRecord], selection: Selection) -> list[RunRecord]:
    """The records (newest first, as :meth:`Ledger.records` gives them) that pass ``selection``."""
    s, found = selection, []
    for record in records:
        if s.model is not None and not _contains(record.model, s.model):
            continue
        if s.device is not None and not (_contains(record.device_name, s.device) or _contains(record.device, s.device)):
            continue
        if s.lineage is not None and not (record.lineage_id or "").startswith(s.lineage.lower()):
            continue
        if s.series is not None and not (record.series or "").startswith(s.series.lower()):
            continue
        if s.target is not None and not (_contains(record.target, s.target)
                                         or _contains(target_short(record.target), s.target)):
            continue
        if s.since is not None and started_at(record) < s.since:
            continue
        found.append(record)
        if s.last is not None and len(found) >= s.last:
            break
    return found


# -- cells ----------------------------------------------------------------------------------------------


def target_short(canonical: str) -> str:
    """A canonical target's short form: ``llvm (x86_64-conda-linux-gnu, znver4)``; the text itself if not JSON."""
    try:
        spec = json.loads(canonical)
    except (TypeError, ValueError):
        return str(canonical)
    if not isinstance(spec, dict):
        return str(canonical)
    details = [str(spec[k]) for k in ("mtriple", "mcpu", "arch") if spec.get(k)]
    kind = str(spec.get("kind", "?"))
    return f"{kind} ({', '.join(details)})" if details else kind


def check_passed(record: RunRecord) -> bool | None:
    """Whether the run's check passed; None when it did not run (``--no-check``, or the run failed before)."""
    return None if not isinstance(record.check, dict) else record.check.get("passed") is True


def regressed(record: RunRecord) -> bool | None:
    """Whether the run was judged a regression; None when it was not judged."""
    return None if not isinstance(record.regression, dict) else record.regression.get("regression") is True


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _changed_names(verdict: dict[str, Any]) -> list[str]:
    """The fields a verdict names as changed (``versions.`` left out: ``apache-tvm``)."""
    changes = verdict.get("changes")
    if not isinstance(changes, list):
        return []
    names = [str(c.get("field")) for c in changes if isinstance(c, dict) and c.get("field") is not None]
    return [name.removeprefix("versions.") for name in names]


def verdict_text(verdict: Any) -> str:
    """A verdict (a record's ``regression``, ``Verdict.as_dict()``) as a table cell: ``REGRESSION +30.2%``,
    ``faster -20.0%``, ``+1.2%``, ``+12.0% inconclusive``, ``first`` or ``-`` (not judged); ``(p10)`` when noisy
    runs were judged on their 10th percentile; what changed since the runs it was judged against in brackets:
    ``REGRESSION +141.0% [schedules]``. Records judged before intervals were: ``+12.0% noisy`` for a run too
    noisy to judge."""
    if not isinstance(verdict, dict):
        return "-"
    change = _number(verdict.get("change"))
    if change is None:
        return "first"
    decision = verdict.get("decision")
    if verdict.get("regression") is True:
        decision = "regression"
    elif not isinstance(decision, str):
        decision = "noisy" if "inconclusive" in str(verdict.get("message", "")) else "same"
    figure = f"{change * 100:+.1f}%" + (f" ({verdict['statistic']})" if verdict.get("statistic") not in (None, "median")
                                         and isinstance(verdict.get("statistic"), str) else "")
    text = {"regression": f"REGRESSION {figure}", "faster": f"faster {figure}",
            "inconclusive": f"{figure} inconclusive", "noisy": f"{figure} noisy"}.get(decision, figure)
    names = _changed_names(verdict)
    return printable(f"{text} [{', '.join(names)}]" if names else text)


def trend_mark(record: RunRecord) -> str:
    """The verdict cell of a run (:func:`verdict_text` of its ``regression``)."""
    return verdict_text(record.regression)


def _ms(value: Any) -> str:
    number = _number(value)
    return f"{number:.4g}" if number is not None else "-"


def _latency(record: RunRecord, name: str) -> Any:
    return (record.latency_ms or {}).get(name)


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut in the middle (the ends tell names apart: a tracker's key)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "~" + text[len(text) - (width - 1 - head):]


def tvm_version(record: RunRecord) -> str | None:
    """The TVM version the run was built and run with (its ``versions``)."""
    value = (record.versions or {}).get("apache-tvm")
    return value if isinstance(value, str) else None


TABLE_COLUMNS = ("id", "started (UTC)", "model", "target", "device", "schedules", "opt", "trials", "tvm", "status",
                 "median ms", "p90 ms", "p99 ms", "check", "verdict", "build")
_RIGHT = {"opt", "trials", "median ms", "p90 ms", "p99 ms"}


def table_cells(record: RunRecord) -> dict[str, str]:
    """One run as the table's cells (:data:`TABLE_COLUMNS`), each printable."""
    passed = check_passed(record)
    cells = {
        "id": record.id,
        "started (UTC)": f"{started_at(record):%Y-%m-%d %H:%M}",
        "model": _cut(printable(record.model), 32),
        "target": _cut(printable(target_short(record.target)), 40),
        "device": _cut(printable(record.name), 48),
        "schedules": printable(record.schedules or "-"),
        "opt": str(record.opt_level),
        "trials": str(record.tune_trials),
        "tvm": _cut(printable(tvm_version(record) or "-"), 16),
        "status": printable(record.status),
        "median ms": _ms(_latency(record, "median")),
        "p90 ms": _ms(_latency(record, "p90")),
        "p99 ms": _ms(_latency(record, "p99")),
        "check": "-" if passed is None else ("passed" if passed else "FAILED"),
        "verdict": trend_mark(record),
        "build": printable(record.build_key or "-")[:8],
    }
    return cells


# -- lists of runs --------------------------------------------------------------------------------------


def format_table(records: Sequence[RunRecord]) -> str:
    """Runs as an aligned text table, one line per run."""
    rows = [table_cells(r) for r in records]
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in TABLE_COLUMNS}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[c].rjust(widths[c]) if c in _RIGHT else cells[c].ljust(widths[c])
                         for c in TABLE_COLUMNS).rstrip()

    return "\n".join([line({c: c for c in TABLE_COLUMNS}), *(line(row) for row in rows)])


def format_markdown(records: Sequence[RunRecord]) -> str:
    """Runs as a markdown table (each cell escaped: ``|``, backticks, HTML, control characters)."""
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("---:" if c in _RIGHT else "---" for c in TABLE_COLUMNS) + "|"
    body = [row(f"`{r.id}`" if c == "id" else markdown_cell(table_cells(r)[c]) for c in TABLE_COLUMNS)
            for r in records]
    return "\n".join([row(TABLE_COLUMNS), rule, *body])


def runs_json(records: Sequence[RunRecord]) -> dict[str, Any]:
    """The ``--json`` object: ``{"runs": [record, ...]}``, each record exactly as the ledger keeps it."""
    return {"runs": [r.as_json() for r in records]}


CSV_COLUMNS = (
    "id", "series", "started", "finished", "status", "exit_code", "model", "model_digest", "target",
    "target_short", "opt_level", "tune_trials", "tuning_key", "build_key", "library_key", "device",
    "device_identity", "image", "input_shape", "samples",
    *(f"latency_{name}_ms" for name in LATENCY_FIELDS if name != "cv"), "latency_cv",
    "check_passed", "check_max_abs_diff", "regression", "regression_change", "regression_baseline_ms",
    "error", "flow_run_id", "fleet_run", "versions",
    "lineage", "device_name", "schedules", "threads", "verdict", "regression_interval_low",
    "regression_interval_high", "regression_against", "regression_changes", "host_loadavg_1m", "device_loadavg_1m",
    "load_ms", "first_inference_ms", "peak_memory_bytes", "profile_total_ms", "profile_glue_ms",
)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True)
    return csv_text(value)


def _interval(verdict: dict[str, Any]) -> tuple[float | None, float | None]:
    interval = verdict.get("interval")
    if isinstance(interval, list) and len(interval) == 2:
        return _number(interval[0]), _number(interval[1])
    return None, None


def _loadavg_1m(conditions: Any, machine: str) -> float | None:
    """The 1-minute load average of ``machine`` (``device`` or ``host``) in a record's ``conditions``."""
    load = conditions.get(machine) if isinstance(conditions, dict) else None
    loadavg = load.get("loadavg") if isinstance(load, dict) else None
    return _number(loadavg[0]) if isinstance(loadavg, list) and loadavg else None


def csv_row(record: RunRecord) -> dict[str, Any]:
    """One run as flat CSV values (:data:`CSV_COLUMNS`; None where the run has no value)."""
    r = record
    verdict = r.regression if isinstance(r.regression, dict) else {}
    check = r.check if isinstance(r.check, dict) else {}
    facts = r.device_facts if isinstance(r.device_facts, dict) else {}
    profile = r.profile if isinstance(r.profile, dict) else {}
    row: dict[str, Any] = {name: getattr(r, name) for name in CSV_COLUMNS if hasattr(r, name)}
    row.update({f"latency_{name}_ms": _latency(r, name) for name in LATENCY_FIELDS if name != "cv"})
    low, high = _interval(verdict)
    row.update(
        target_short=target_short(r.target), latency_cv=_latency(r, "cv"),
        input_shape="x".join(str(n) for n in r.input_shape) if r.input_shape else None,
        check_passed=check_passed(r), check_max_abs_diff=check.get("max_abs_diff"),
        regression=regressed(r), regression_change=verdict.get("change"),
        regression_baseline_ms=verdict.get("baseline_ms"),
        versions="; ".join(f"{k} {v}" for k, v in sorted(r.versions.items())),
        lineage=r.lineage_id, device_name=r.name, threads=r.threads,
        verdict=trend_mark(r) if isinstance(r.regression, dict) else None,
        regression_interval_low=low, regression_interval_high=high,
        regression_against=verdict.get("against"),
        regression_changes="; ".join(_changed_names(verdict)) or None,
        host_loadavg_1m=_loadavg_1m(r.conditions, "host"), device_loadavg_1m=_loadavg_1m(r.conditions, "device"),
        **{key: _number(facts.get(key)) for key in ("load_ms", "first_inference_ms", "peak_memory_bytes")},
        profile_total_ms=_number(profile.get("total_ms")), profile_glue_ms=_number(profile.get("glue_ms")),
    )
    return row


def format_csv(records: Sequence[RunRecord]) -> str:
    """Runs as CSV (RFC 4180: a header row, one row per run, CRLF line ends, quoted where needed); text cells
    escape control characters (line breaks kept) and never start a formula (:func:`pipeline.views.text.csv_text`)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_cell(v) for k, v in csv_row(record).items()})
    return out.getvalue()


# -- one run --------------------------------------------------------------------------------------------


def _tuning(record: RunRecord) -> str:
    if not record.tune_trials:
        return f"none (schedules: {record.schedules})" if record.schedules else "none"
    return f"{record.tune_trials} trials (tuning key {record.tuning_key or '-'})"


def _check_line(check: dict[str, Any] | None) -> str:
    if not isinstance(check, dict):
        return "not run"
    figures = "  ".join(f"{name.replace('_', ' ')} {_number(check[name]):.3g}"
                        for name in ("max_abs_diff", "max_rel_diff") if _number(check.get(name)) is not None)
    return f"{'passed' if check.get('passed') is True else 'FAILED'}  {figures}  ({check.get('reason', '')})"


def latency_line(latency: dict[str, Any] | None, samples: int | None = None) -> str:
    """``median 0.022 ms  p90 ...  CV 5.9%`` (every statistic of a record's ``latency_ms``)."""
    if not latency:
        return "none (the run did not get that far)"
    text = "  ".join(f"{name} {_ms(latency.get(name))} ms" for name in LATENCY_FIELDS if name != "cv")
    cv = _number(latency.get("cv"))
    text += f"  CV {cv * 100:.1f}%" if cv is not None else ""
    return text + (f"  ({samples} samples)" if samples else "")


def _load_text(load: Any) -> str:
    """``load 0.52 0.40 0.33, CPUs 0-1 of 2`` from a ``conditions`` entry (``-`` when unknown)."""
    if not isinstance(load, dict):
        return "-"
    parts = []
    loadavg = load.get("loadavg")
    if isinstance(loadavg, list) and all(_number(x) is not None for x in loadavg):
        parts.append("load " + " ".join(f"{_number(x):.2f}" for x in loadavg))
    affinity, cpus = load.get("affinity"), load.get("cpus")
    if isinstance(affinity, list) and all(type(x) is int for x in affinity):
        parts.append(f"CPUs {cpu_list(affinity)}" + (f" of {cpus}" if type(cpus) is int else ""))
    return ", ".join(parts) or "-"


def cpu_list(cpus: Sequence[int]) -> str:
    """``0-3,6`` for CPUs 0, 1, 2, 3 and 6."""
    ordered, spans = sorted(set(cpus)), []
    for cpu in ordered:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans) or "none"


def conditions_line(conditions: Any) -> str:
    """What a run was timed under: ``threads 1 (asked 1); device load ...; host load ...``."""
    if not isinstance(conditions, dict):
        return "not recorded"
    threads, asked = conditions.get("threads"), conditions.get("threads_requested")
    text = f"threads {threads if type(threads) is int else '-'}"
    text += f" (asked {asked})" if type(asked) is int else ""
    return f"{text}; device {_load_text(conditions.get('device'))}; host {_load_text(conditions.get('host'))}"


def verdict_lines(verdict: Any) -> list[str]:
    """The verdict's message (its interval and what changed are in it), then which runs it was judged against."""
    if not isinstance(verdict, dict):
        return ["not judged"]
    lines = [str(verdict.get("message", "not judged"))]
    against, runs = verdict.get("against"), verdict.get("baseline_runs")
    if isinstance(against, str) and isinstance(runs, list) and runs:
        lines.append(f"judged against the {against}'s {len(runs)} run(s): {runs[0]}"
                     + (f" to {runs[-1]}" if len(runs) > 1 else ""))
    return lines


def _profile_lines(data: Any) -> list[str]:
    """A record's profile (``--profile``), or nothing."""
    profile = Profile.from_dict(data)
    if profile is None:
        return []
    return [f"{'Profile' if i == 0 else '':<11}{line}" for i, line in enumerate(profile_lines(profile))]


def format_run(record: RunRecord) -> str:
    """Everything the ledger keeps about one run, for people (control characters escaped)."""
    r = record
    finished = f" -> {r.finished}" if r.finished else ""
    device = r.device if not r.device_name or r.device_name == r.device else f"{r.device_name} ({r.device})"
    verdict = verdict_lines(r.regression)
    lines = [
        f"Run        {r.id}  {r.status} (exit {r.exit_code})  {r.started}{finished}",
        f"Lineage    {r.lineage_id or '-'}  series {r.series or '- (the run failed before it had one)'}",
        f"Model      {r.model}  digest {r.model_digest or '-'}" + (f"  weights {r.weights}" if r.weights else ""),
        f"Target     {target_short(r.target)}  {r.target}",
        f"Build      opt_level {r.opt_level}  tuning {_tuning(r)}",
        f"           build key {r.build_key or '-'}",
        f"           library key {r.library_key or '-'}",
        f"Device     {device}  identity {r.device_identity or '-'}",
        f"Input      {'x'.join(map(str, r.input_shape)) if r.input_shape else '-'}  image {r.image or '-'}",
        "Stages     " + (", ".join(f"{name} {status}" for name, status in r.stages.items()) or "-"),
        f"Latency    {latency_line(r.latency_ms, r.samples)}",
        f"Measured   {conditions_line(r.conditions)}",
        f"On device  {facts_line(r.device_facts)}",
        *_profile_lines(r.profile),
        f"Check      {_check_line(r.check)}",
        *(f"{'Verdict' if i == 0 else '':<11}{line}" for i, line in enumerate(verdict)),
        "Versions   " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())),
    ]
    if r.flow_run_id or r.fleet_run:
        fleet = f"  fleet run {r.fleet_run}" if r.fleet_run else ""
        lines.append(f"Prefect    flow run {r.flow_run_id or '-'}{fleet}")
    if r.error:
        error = printable(r.error, keep_newlines=True).splitlines() or [""]
        lines += [f"{'Error' if i == 0 else '':<11}{line}" for i, line in enumerate(error)]
    return "\n".join(printable(line) for line in lines)


# -- two runs -------------------------------------------------------------------------------------------

#: What :func:`compare` looks at, besides each entry of ``versions`` and of ``conditions``.
COMPARED_FIELDS = ("model", "model_digest", "weights", "target", "opt_level", "tune_trials", "schedules",
                   "tuning_key", "build_key", "library_key", "device", "device_name", "device_identity", "input_shape",
                   "image", "number", "samples", "lineage", "series", "status")
#: The entries of ``conditions`` that :func:`compare` looks at (``device.loadavg``: the device's load averages).
COMPARED_CONDITIONS = ("threads", "threads_requested", "device.loadavg", "device.affinity", "device.cpus",
                       "host.loadavg", "host.affinity", "host.cpus")


@dataclass(frozen=True)
class Difference:
    """A field whose value differs between run A and run B (``versions.<name>`` for a version,
    ``conditions.<name>`` for what the latency was measured under)."""

    field: str
    a: Any
    b: Any


@dataclass(frozen=True)
class LatencyChange:
    """B's median against A's, against the runs' noise.

    Attributes:
        change: relative change of B's median against A's (+0.30 = B is 30 % slower); None without both.
        threshold: the smallest relative change that counts (see :func:`latency_change`).
        beyond_noise: the change counts (see :func:`latency_change`).
        message: one line for people: ``within noise (...)``, ``slower by 30.2 % ...`` or ``faster by ...``.
        interval: the 99 % interval of the change, from both runs' samples (None: a run has none).
        statistic: what was compared: ``median``, or ``p10`` when a run is noisy (both with samples).
        values: A's and B's figure of that statistic (ms).
    """

    change: float | None
    threshold: float | None
    beyond_noise: bool
    message: str
    interval: tuple[float, float] | None = None
    statistic: str = "median"
    values: tuple[float, float] | None = None


def _samples(samples: Sequence[float] | None) -> tuple[float, ...]:
    return tuple(s for s in samples or () if _number(s) is not None and 0 < s < float("inf"))


def latency_change(a: dict[str, Any] | None, b: dict[str, Any] | None, samples_a: Sequence[float] | None = None,
                   samples_b: Sequence[float] | None = None) -> LatencyChange:
    """Is B's median slower or faster than A's by more than the noise?

    With both runs' samples: the change counts when it is larger than 5 % and its 99 % interval (a bootstrap
    of both runs' samples, :func:`pipeline.latency.change_interval`) excludes zero. Without them, the rule
    uses the two runs' own spread: a change counts when it is larger than ``max(5 %, spread A, spread B)``,
    where a run's spread is how far its p90 lies above its median; a noisy run (spread > 10 %) thus raises the
    bar above 10 %.
    """
    median_a, median_b = _number((a or {}).get("median")), _number((b or {}).get("median"))
    if not median_a or median_a <= 0 or median_b is None:
        return LatencyChange(None, None, False, "no latency to compare: a run did not get as far as timing")
    change = (median_b - median_a) / median_a
    sa, sb = _samples(samples_a), _samples(samples_b)
    if len(sa) >= MIN_BOOTSTRAP_SAMPLES and len(sb) >= MIN_BOOTSTRAP_SAMPLES:
        from pipeline.latency import change_interval  # numpy, only when comparing samples

        q = percentile_to_judge([sa, sb])
        values = (median_a, median_b) if q == 50 else (percentile(sa, q), percentile(sb, q))
        change = values[1] / values[0] - 1.0
        low, high = change_interval(sb, [Measured(median_a, sa)], q=q)
        beyond = abs(change) > MIN_CHANGE and (low > 0 or high < 0)
        by = "" if q == 50 else f"; by the {q}th percentile: a run is noisy, the fastest samples show the code's speed"
        bar = (f"{CONFIDENCE:.0%} interval {low * 100:+.1f}% to {high * 100:+.1f}% from the samples; a change "
               f"counts beyond {MIN_CHANGE * 100:.0f}% when the interval excludes zero{by}")
        message = (f"{'slower' if change > 0 else 'faster'} by {abs(change) * 100:.1f}% ({bar})" if beyond else
                   f"within noise ({change * 100:+.1f}%; {bar})")
        return LatencyChange(change, MIN_CHANGE, beyond, message, (low, high), "median" if q == 50 else f"p{q}",
                             values)
    threshold = max(MIN_CHANGE, spread(a), spread(b))
    beyond = abs(change) > threshold
    bar = f"a change must exceed {threshold * 100:.1f}%: max(5%, each run's p90 above its median)"
    if not beyond:
        message = f"within noise ({change * 100:+.1f}%; {bar})"
    else:
        message = f"{'slower' if change > 0 else 'faster'} by {abs(change) * 100:.1f}% ({bar})"
    noisy = [name for name, lat in (("A", a), ("B", b)) if spread(lat) > NOISY_SPREAD]
    if noisy:
        message += f"; run {' and '.join(noisy)} noisy (p90 > 10% above the median)"
    return LatencyChange(change, threshold, beyond, message)


@dataclass(frozen=True)
class Comparison:
    """Run B against run A: what differs, what is the same, and the latency change."""

    a: RunRecord
    b: RunRecord
    differences: tuple[Difference, ...]
    same: tuple[str, ...]
    latency: LatencyChange
    kernels: KernelComparison | None = None
    """Each kernel's time in both runs (``compare --kernels``; None: not asked)."""

    def as_json(self) -> dict[str, Any]:
        """The ``compare --json`` object (with ``kernels`` when compared by kernel)."""
        lat = self.latency
        extra = {"kernels": self.kernels.as_dict()} if self.kernels is not None else {}
        return {**extra,
            "a": self.a.id, "b": self.b.id,
            "differences": [{"field": d.field, "a": d.a, "b": d.b} for d in self.differences],
            "same": list(self.same),
            "latency": {"a": self.a.latency_ms, "b": self.b.latency_ms, "change": lat.change,
                        "threshold": lat.threshold, "beyond_noise": lat.beyond_noise, "message": lat.message,
                        "interval": list(lat.interval) if lat.interval is not None else None,
                        "statistic": lat.statistic},
        }


def _condition(record: RunRecord, path: str) -> Any:
    value: Any = record.conditions if isinstance(record.conditions, dict) else None
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def compare(a: RunRecord, b: RunRecord, kernels: bool = False) -> Comparison:
    """What differs between runs ``a`` and ``b`` (:data:`COMPARED_FIELDS`, each version, each of
    :data:`COMPARED_CONDITIONS`), and B's latency change; with ``kernels``, each kernel's time in both runs'
    profiles (:func:`pipeline.views.profile.kernel_changes`).

    Raises:
        UsageError: ``kernels`` and a run has no profile (it ran without ``--profile``).
    """
    compared = None
    if kernels:
        profiles = [Profile.from_dict(r.profile) for r in (a, b)]
        missing = [f"{name} ({r.id})" for name, r, p in zip("AB", (a, b), profiles) if p is None]
        if missing:
            raise UsageError(f"--kernels compares the runs' profiles, and run {' and '.join(missing)} has none: "
                             "record one with python -m flows.resnet_remote ... --profile")
        compared = kernel_changes(profiles[0], profiles[1])  # type: ignore[arg-type]
    pairs = [(name, getattr(a, name), getattr(b, name)) for name in COMPARED_FIELDS]
    pairs = [(name, a.lineage_id, b.lineage_id) if name == "lineage" else (name, x, y) for name, x, y in pairs]
    va, vb = a.versions or {}, b.versions or {}
    pairs += [(f"versions.{name}", va.get(name), vb.get(name)) for name in sorted(set(va) | set(vb))]
    pairs += [(f"conditions.{path}", _condition(a, path), _condition(b, path)) for path in COMPARED_CONDITIONS]
    differences = tuple(Difference(name, x, y) for name, x, y in pairs if x != y)
    same = tuple(name for name, x, y in pairs if x == y)
    return Comparison(a, b, differences, same, latency_change(a.latency_ms, b.latency_ms, a.samples_ms, b.samples_ms),
                      compared)


def _value(value: Any, field: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, list) and field == "input_shape":
        return "x".join(map(str, value))
    if isinstance(value, list) and field.endswith("affinity") and all(type(x) is int for x in value):
        return cpu_list(value)
    if isinstance(value, list):
        return " ".join(map(str, value))
    return clip(value, 120)


def format_comparison(comparison: Comparison) -> str:
    """The comparison for people: the two runs, what differs (A -> B), the latency of each and the change."""
    c = comparison
    lines = [f"A          {c.a.id}  {c.a.status}  {c.a.started}  {c.a.model} on {c.a.name}",
             f"B          {c.b.id}  {c.b.status}  {c.b.started}  {c.b.model} on {c.b.name}"]
    if c.differences:
        width = max(len(d.field) for d in c.differences)
        lines += [f"{'Differs' if i == 0 else '':<11}{d.field:<{width}}  {_value(d.a, d.field)} -> "
                  f"{_value(d.b, d.field)}" for i, d in enumerate(c.differences)]
    else:
        lines.append("Differs    nothing that is recorded")
    lines.append("Same       " + (", ".join(c.same) or "nothing"))
    lines.append(f"Latency A  {latency_line(c.a.latency_ms, c.a.samples)}")
    lines.append(f"Latency B  {latency_line(c.b.latency_ms, c.b.samples)}")
    if c.latency.change is not None and c.latency.values is not None:
        figures = f"{_ms(c.latency.values[0])} -> {_ms(c.latency.values[1])}"
        lines.append(f"Change     {c.latency.statistic} {figures} ms: {c.latency.message}")
    elif c.latency.change is not None and c.a.latency_ms and c.b.latency_ms:
        medians = f"{_ms(c.a.latency_ms.get('median'))} -> {_ms(c.b.latency_ms.get('median'))}"
        lines.append(f"Change     median {medians} ms: {c.latency.message}")
    else:
        lines.append(f"Change     {c.latency.message}")
    if c.kernels is not None:
        lines += format_kernel_changes(c.kernels)
    if c.a.lineage_id != c.b.lineage_id:
        lines.append("Note       different lineages (model, device, target or input): not the same measurement")
    elif c.a.series != c.b.series:
        lines.append("Note       different builds: the change includes the effect of what differs above")
    return "\n".join(printable(line) for line in lines)
