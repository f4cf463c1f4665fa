"""A fleet run rendered: the terminal table, the Prefect table and markdown, from :class:`FleetSummary`."""

from __future__ import annotations

from typing import Any

from pipeline.latency import Latency, Verdict
from pipeline.results import FleetSummary, PairResult

TABLE_COLUMNS = ("device", "model", "status", "median ms", "p90 ms", "check", "change", "error")


def _ms(latency: Latency | None, name: str) -> str:
    return "-" if latency is None else f"{getattr(latency, name):.4g}"


def _check_text(result: PairResult) -> str:
    check = result.summary.check if result.summary is not None else None
    if check is None:
        return "-"
    return "passed" if check.passed else "FAILED"


def change_text(regression: Verdict | None) -> str:
    """The table's ``change`` cell: ``+3.1%``, ``REGRESSION +12.0%``, ``first run`` or ``-``."""
    if regression is None:
        return "-"
    if regression.change is None:
        return "first run"
    text = f"{regression.change * 100:+.1f}%"
    return f"REGRESSION {text}" if regression.regression else text


def table_rows(summary: FleetSummary) -> list[dict[str, Any]]:
    """One row per pair with the table's columns (the Prefect table artifact)."""
    return [
        {"device": r.device, "model": r.model, "status": r.status, "median ms": _ms(r.latency, "median"),
         "p90 ms": _ms(r.latency, "p90"), "check": _check_text(r), "change": change_text(r.regression),
         "error": r.error or ""}
        for r in summary.results
    ]


def _headline(summary: FleetSummary) -> str:
    devices = len({r.device for r in summary.results})
    models = len({r.model for r in summary.results})
    passed = sum(r.passed for r in summary.results)
    return (f"{devices} device(s) x {models} model(s): {passed} passed, {len(summary.failed)} failed in "
            f"{summary.seconds:.1f} s")


def state_message(summary: FleetSummary) -> str:
    """The fleet run in one line (its flow run's final state message): pairs passed and failed."""
    return f"fleet {summary.source}: {_headline(summary)}"


def format_text(summary: FleetSummary) -> str:
    """The terminal report: a headline, the builds, then the device x model table."""
    rows = [{k: (v.upper() if k == "status" and v == "failed" else v) for k, v in row.items()}
            for row in table_rows(summary)]
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in TABLE_COLUMNS[:-1]}
    numeric = {"median ms", "p90 ms"}

    def line(cells: dict[str, Any]) -> str:
        parts = [str(cells[c]).rjust(widths[c]) if c in numeric else str(cells[c]).ljust(widths[c])
                 for c in TABLE_COLUMNS[:-1]]
        return "  ".join(parts + [str(cells["error"])]).rstrip()

    b = summary.builds
    lines = [
        f"Fleet      {summary.source}: {_headline(summary)}  (fleet run {summary.fleet_run})",
        f"Builds     {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else ""),
        "",
        line({c: c for c in TABLE_COLUMNS}),
        *(line(row) for row in rows),
    ]
    return "\n".join(lines)


def format_markdown(summary: FleetSummary) -> str:
    """The markdown summary of a fleet run (a Prefect markdown artifact)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    b = summary.builds
    lines = [
        f"# Fleet {cell(summary.source)}", "",
        f"{_headline(summary)}. Builds: {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else "")
        + f". Fleet run `{summary.fleet_run}`.", "",
        "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in table_rows(summary):
        if row["status"] == "failed":
            row = {**row, "status": "**failed**"}
        lines.append("| " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
