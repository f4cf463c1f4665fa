"""The run ledger read back: which runs to list, and every rendering of runs for ``python -m flows.history``.

Pure functions of :class:`pipeline.store.ledger.RunRecord` (no Prefect, no TVM: the history command starts in
a fraction of a second):

* :func:`select`: the runs that pass a :class:`Selection` (model, device, target, since, last), newest first;
* :func:`format_table`, :func:`format_markdown`, :func:`format_csv`, :func:`runs_json`: a list of runs;
* :func:`format_run`: one run in full;
* :func:`compare` (a :class:`Comparison`) and :func:`format_comparison`: what differs between two runs, and
  whether the latency change is beyond the runs' noise (:func:`latency_change`).
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
from pipeline.latency import MIN_CHANGE, NOISY_SPREAD
from pipeline.store.ledger import RunRecord

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
        device: a substring of the device name (case-insensitive).
        target: a substring of the canonical target or of its short form (:func:`target_short`).
        since: only runs started at or after this time (aware).
        last: at most this many runs, the newest.
    """

    model: str | None = None
    device: str | None = None
    target: str | None = None
    since: dt.datetime | None = None
    last: int | None = None

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
        if s.device is not None and not _contains(record.device, s.device):
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
    return None if not isinstance(record.check, dict) else bool(record.check.get("passed"))


def regressed(record: RunRecord) -> bool | None:
    """Whether the run was judged a regression of its series; None when it was not judged."""
    return None if not isinstance(record.regression, dict) else bool(record.regression.get("regression"))


def trend_mark(record: RunRecord) -> str:
    """The trend cell: ``REGRESSION +30.2%``, ``+1.2%``, ``+12.0% noisy``, ``first`` or ``-`` (not judged)."""
    verdict = record.regression
    if not isinstance(verdict, dict):
        return "-"
    change = verdict.get("change")
    if not isinstance(change, (int, float)):
        return "first"
    if verdict.get("regression"):
        return f"REGRESSION {change * 100:+.1f}%"
    noisy = " noisy" if "inconclusive" in str(verdict.get("message", "")) else ""
    return f"{change * 100:+.1f}%{noisy}"


def _ms(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _latency(record: RunRecord, name: str) -> Any:
    return (record.latency_ms or {}).get(name)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


TABLE_COLUMNS = ("id", "started (UTC)", "model", "target", "device", "status", "median ms", "p90 ms", "CV",
                 "check", "trend", "build")
_RIGHT = {"median ms", "p90 ms", "CV"}


def table_cells(record: RunRecord) -> dict[str, str]:
    """One run as the table's cells (:data:`TABLE_COLUMNS`)."""
    cv, passed = _latency(record, "cv"), check_passed(record)
    return {
        "id": record.id,
        "started (UTC)": f"{started_at(record):%Y-%m-%d %H:%M}",
        "model": _cut(record.model, 28),
        "target": _cut(target_short(record.target), 36),
        "device": _cut(record.device, 24),
        "status": record.status,
        "median ms": _ms(_latency(record, "median")),
        "p90 ms": _ms(_latency(record, "p90")),
        "CV": f"{cv * 100:.1f}%" if isinstance(cv, (int, float)) else "-",
        "check": "-" if passed is None else ("passed" if passed else "FAILED"),
        "trend": trend_mark(record),
        "build": (record.build_key or "-")[:12],
    }


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
    """Runs as a markdown table (``|`` in a cell escaped)."""
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join("---:" if c in _RIGHT else "---" for c in TABLE_COLUMNS) + "|"
    body = [row(table_cells(r)[c] if c != "id" else f"`{r.id}`" for c in TABLE_COLUMNS) for r in records]
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
)
# A spreadsheet runs a cell that starts with one of these as a formula: text cells get a leading quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_row(record: RunRecord) -> dict[str, Any]:
    """One run as flat CSV values (:data:`CSV_COLUMNS`; None where the run has no value)."""
    r, verdict, check = record, record.regression or {}, record.check or {}
    row: dict[str, Any] = {name: getattr(r, name) for name in CSV_COLUMNS if hasattr(r, name)}
    row.update({f"latency_{name}_ms": _latency(r, name) for name in LATENCY_FIELDS if name != "cv"})
    row.update(
        target_short=target_short(r.target), latency_cv=_latency(r, "cv"),
        input_shape="x".join(str(n) for n in r.input_shape) if r.input_shape else None,
        check_passed=check_passed(r), check_max_abs_diff=check.get("max_abs_diff"),
        regression=regressed(r), regression_change=verdict.get("change"),
        regression_baseline_ms=verdict.get("baseline_ms"),
        versions="; ".join(f"{k} {v}" for k, v in sorted(r.versions.items())) if isinstance(r.versions, dict) else None,
    )
    return row


def format_csv(records: Sequence[RunRecord]) -> str:
    """Runs as CSV (RFC 4180: a header row, one row per run, CRLF line ends, quoted where needed)."""
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
    figures = "  ".join(f"{name.replace('_', ' ')} {check[name]:.3g}" for name in ("max_abs_diff", "max_rel_diff")
                        if isinstance(check.get(name), (int, float)))
    return f"{'passed' if check.get('passed') else 'FAILED'}  {figures}  ({check.get('reason', '')})"


def latency_line(latency: dict[str, Any] | None, samples: int | None = None) -> str:
    """``median 0.022 ms  p90 ...  CV 5.9%`` (every statistic of a record's ``latency_ms``)."""
    if not latency:
        return "none (the run did not get that far)"
    text = "  ".join(f"{name} {_ms(latency.get(name))} ms" for name in LATENCY_FIELDS if name != "cv")
    cv = latency.get("cv")
    text += f"  CV {cv * 100:.1f}%" if isinstance(cv, (int, float)) else ""
    return text + (f"  ({samples} samples)" if samples else "")


def format_run(record: RunRecord) -> str:
    """Everything the ledger keeps about one run, for people."""
    r = record
    finished = f" -> {r.finished}" if r.finished else ""
    lines = [
        f"Run        {r.id}  {r.status} (exit {r.exit_code})  {r.started}{finished}",
        f"Series     {r.series or '- (the run failed before it had one)'}",
        f"Model      {r.model}  digest {r.model_digest or '-'}",
        f"Target     {target_short(r.target)}  {r.target}",
        f"Build      opt_level {r.opt_level}  tuning {_tuning(r)}",
        f"           build key {r.build_key or '-'}",
        f"           library key {r.library_key or '-'}",
        f"Device     {r.device}  identity {r.device_identity or '-'}",
        f"Input      {'x'.join(map(str, r.input_shape)) if r.input_shape else '-'}  image {r.image or '-'}",
        "Stages     " + (", ".join(f"{name} {status}" for name, status in r.stages.items()) or "-"),
        f"Latency    {latency_line(r.latency_ms, r.samples)}",
        f"Check      {_check_line(r.check)}",
        f"Trend      {(r.regression or {}).get('message', 'not judged')}",
        "Versions   " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())),
    ]
    if r.flow_run_id or r.fleet_run:
        fleet = f"  fleet run {r.fleet_run}" if r.fleet_run else ""
        lines.append(f"Prefect    flow run {r.flow_run_id or '-'}{fleet}")
    if r.error:
        lines.append(f"Error      {r.error}")
    return "\n".join(lines)


# -- two runs -------------------------------------------------------------------------------------------

#: What :func:`compare` looks at, besides each entry of ``versions``.
COMPARED_FIELDS = ("model", "model_digest", "target", "opt_level", "tune_trials", "schedules", "tuning_key",
                   "build_key", "library_key", "device", "device_identity", "input_shape", "image", "series", "status")


@dataclass(frozen=True)
class Difference:
    """A field whose value differs between run A and run B (``versions.<name>`` for a version)."""

    field: str
    a: Any
    b: Any


@dataclass(frozen=True)
class LatencyChange:
    """B's median against A's, against the runs' noise.

    Attributes:
        change: relative change of B's median against A's (+0.30 = B is 30 % slower); None without both.
        threshold: the smallest relative change that is beyond the noise (see :func:`latency_change`).
        beyond_noise: ``abs(change) > threshold``.
        message: one line for people: ``within noise (...)``, ``slower by 30.2 % ...`` or ``faster by ...``.
    """

    change: float | None
    threshold: float | None
    beyond_noise: bool
    message: str


def spread(latency: dict[str, Any]) -> float:
    """A run's own noise: how far its p90 lies above its median, relative to the median (0 when unknown)."""
    median, p90 = latency.get("median"), latency.get("p90")
    if not isinstance(median, (int, float)) or not isinstance(p90, (int, float)) or median <= 0:
        return 0.0
    return max(0.0, (p90 - median) / median)


def latency_change(a: dict[str, Any] | None, b: dict[str, Any] | None) -> LatencyChange:
    """Is B's median slower or faster than A's by more than the noise?

    The rule follows :func:`pipeline.latency.judge`, with the two runs' own spread in place of a series'
    history (two runs have no history): a change counts when it is larger than ``max(5 %, spread A,
    spread B)``, where a run's spread is how far its p90 lies above its median. A noisy run (spread > 10 %)
    thus raises the bar above 10 %.
    """
    if not a or not b or not a.get("median") or not isinstance(b.get("median"), (int, float)):
        return LatencyChange(None, None, False, "no latency to compare: a run did not get as far as timing")
    change = (b["median"] - a["median"]) / a["median"]
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

    def as_json(self) -> dict[str, Any]:
        """The ``compare --json`` object."""
        lat = self.latency
        return {
            "a": self.a.id, "b": self.b.id,
            "differences": [{"field": d.field, "a": d.a, "b": d.b} for d in self.differences],
            "same": list(self.same),
            "latency": {"a": self.a.latency_ms, "b": self.b.latency_ms, "change": lat.change,
                        "threshold": lat.threshold, "beyond_noise": lat.beyond_noise, "message": lat.message},
        }


def compare(a: RunRecord, b: RunRecord) -> Comparison:
    """What differs between runs ``a`` and ``b`` (:data:`COMPARED_FIELDS` and each version), and B's latency change."""
    pairs = [(name, getattr(a, name), getattr(b, name)) for name in COMPARED_FIELDS]
    va, vb = a.versions or {}, b.versions or {}
    pairs += [(f"versions.{name}", va.get(name), vb.get(name)) for name in sorted(set(va) | set(vb))]
    differences = tuple(Difference(name, x, y) for name, x, y in pairs if x != y)
    same = tuple(name for name, x, y in pairs if x == y)
    return Comparison(a, b, differences, same, latency_change(a.latency_ms, b.latency_ms))


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return clip(value, 120)


def format_comparison(comparison: Comparison) -> str:
    """The comparison for people: the two runs, what differs (A -> B), the latency of each and the change."""
    c = comparison
    lines = [f"A          {c.a.id}  {c.a.status}  {c.a.started}  {c.a.model}",
             f"B          {c.b.id}  {c.b.status}  {c.b.started}  {c.b.model}"]
    if c.differences:
        width = max(len(d.field) for d in c.differences)
        lines += [f"{'Differs' if i == 0 else '':<11}{d.field:<{width}}  {_value(d.a)} -> {_value(d.b)}"
                  for i, d in enumerate(c.differences)]
    else:
        lines.append("Differs    nothing that is recorded")
    lines.append("Same       " + (", ".join(c.same) or "nothing"))
    lines.append(f"Latency A  {latency_line(c.a.latency_ms, c.a.samples)}")
    lines.append(f"Latency B  {latency_line(c.b.latency_ms, c.b.samples)}")
    if c.latency.change is not None and c.a.latency_ms and c.b.latency_ms:
        medians = f"{_ms(c.a.latency_ms.get('median'))} -> {_ms(c.b.latency_ms.get('median'))}"
        lines.append(f"Change     median {medians} ms: {c.latency.message}")
    else:
        lines.append(f"Change     {c.latency.message}")
    if c.a.series != c.b.series:
        lines.append("Note       different series: the change includes the effect of what differs above")
    return "\n".join(lines)
