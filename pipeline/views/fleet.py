"""A fleet run rendered: the terminal table, the Prefect table and markdown, and JUnit XML, from
:class:`FleetSummary`.

Device and model names, errors and verdicts come from a fleet file, devices and the ledger: every rendering
escapes their control characters (:mod:`pipeline.views.text`).
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from typing import Any

from pipeline.latency import Latency, Verdict
from pipeline.results import FleetSummary, PairResult
from pipeline.views.history import verdict_text
from pipeline.views.text import markdown_cell, printable

TABLE_COLUMNS = ("device", "model", "status", "median ms", "p90 ms", "check", "change", "error")


def _ms(latency: Latency | None, name: str) -> str:
    return "-" if latency is None else f"{getattr(latency, name):.4g}"


def _check_text(result: PairResult) -> str:
    check = result.summary.check if result.summary is not None else None
    if check is None:
        return "-"
    return "passed" if check.passed else "FAILED"


def change_text(regression: Verdict | None) -> str:
    """The table's ``change`` cell: the verdict as the run history shows it (``REGRESSION +12.0%``, ``+3.1%``,
    ``+8.0% inconclusive``, ``faster -20.0% [schedules]``, ``first``), ``first run`` or ``-``."""
    if regression is None:
        return "-"
    if regression.change is None:
        return "first run"
    return verdict_text(regression.as_dict())


def table_rows(summary: FleetSummary) -> list[dict[str, Any]]:
    """One row per pair with the table's columns (the Prefect table artifact), each text printable."""
    return [
        {"device": printable(r.device), "model": printable(r.model), "status": r.status,
         "median ms": _ms(r.latency, "median"), "p90 ms": _ms(r.latency, "p90"), "check": _check_text(r),
         "change": change_text(r.regression), "error": printable(r.error or "")}
        for r in summary.results
    ]


def _headline(summary: FleetSummary) -> str:
    devices = len({r.device for r in summary.results})
    models = len({r.model for r in summary.results})
    passed = sum(r.passed for r in summary.results)
    regressed = sum(bool(r.regression and r.regression.regression) for r in summary.results)
    return (f"{devices} device(s) x {models} model(s): {passed} passed, {len(summary.failed)} failed"
            + (f", {regressed} regressed" if regressed else "") + f" in {summary.seconds:.1f} s")


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
        f"Fleet      {printable(summary.source)}: {_headline(summary)}  (fleet run {summary.fleet_run})",
        f"Builds     {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else ""),
        "",
        line({c: c for c in TABLE_COLUMNS}),
        *(line(row) for row in rows),
    ]
    return "\n".join(lines)


def format_markdown(summary: FleetSummary) -> str:
    """The markdown summary of a fleet run (a Prefect markdown artifact)."""
    b = summary.builds
    lines = [
        f"# Fleet {markdown_cell(summary.source)}", "",
        f"{_headline(summary)}. Builds: {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else "")
        + f". Fleet run `{summary.fleet_run}`.", "",
        "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in table_rows(summary):
        cells = [markdown_cell(row[c]) for c in TABLE_COLUMNS]
        if row["status"] == "failed":
            cells[TABLE_COLUMNS.index("status")] = "**failed**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _xml_text(value: Any) -> str:
    """Text XML 1.0 can hold: control characters escaped (XML forbids most of them, even as references)."""
    return printable(value, keep_newlines=True)


def format_junit(summary: FleetSummary) -> str:
    """The fleet run as JUnit XML: one ``testsuite`` (the fleet file), one ``testcase`` per (device, model) pair
    (``classname`` the device, ``name`` the model); a failed stage, a failed check or a latency regression is a
    ``failure`` (``type``: the error's class, ``CheckFailed`` or ``LatencyRegression``) with the reason as its
    message and the pair's details as its text. The pair's latency and verdict are its ``system-out``."""
    failures = 0
    try:
        started = dt.datetime.strptime(summary.fleet_run[:16], "%Y%m%dT%H%M%SZ").isoformat()
    except ValueError:
        started = ""
    suite = ET.Element("testsuite", name=_xml_text(f"fleet {summary.source}"), tests=str(len(summary.results)),
                       timestamp=started, time=f"{summary.seconds:.3f}")
    for result in summary.results:
        case = ET.SubElement(suite, "testcase", classname=_xml_text(f"fleet.{result.device}"),
                             name=_xml_text(result.model), time=f"{result.seconds or 0.0:.3f}")
        verdict = result.regression
        lines = [f"run {result.run_id} on {result.device_address}", f"target {result.target}"]
        if result.latency is not None:
            lat = result.latency
            lines.append(f"median {lat.median:.4g} ms, p90 {lat.p90:.4g} ms, p99 {lat.p99:.4g} ms "
                         f"({lat.repeat} samples)")
        if verdict is not None:
            lines.append(f"verdict: {verdict.message}")
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=_xml_text(result.error or "failed"),
                                    type=_xml_text(result.error_type or "Failed"))
            failure.text = _xml_text("\n".join(lines))
            failures += 1
        elif verdict is not None and verdict.regression:
            failure = ET.SubElement(case, "failure", message=_xml_text(verdict.message), type="LatencyRegression")
            failure.text = _xml_text("\n".join(lines))
            failures += 1
        out = ET.SubElement(case, "system-out")
        out.text = _xml_text("\n".join(lines))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    root = ET.Element("testsuites", name="tvm-remote-pipeline fleet", tests=str(len(summary.results)),
                      failures=str(failures), errors="0", time=f"{summary.seconds:.3f}")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
