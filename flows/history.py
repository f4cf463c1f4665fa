"""The runs recorded in the artifact store's ledger, read back: list, show one, compare two.

    python -m flows.history [--model M] [--device D] [--target T] [--lineage ID] [--series ID] [--last N]
                            [--since DATE] [--json|--csv|--markdown]
    python -m flows.history show RUN [--json]
    python -m flows.history compare RUN_A RUN_B [--kernels] [--json]  (RUN: an id, a prefix, latest or previous)

Every ``python -m flows.resnet_remote`` run writes one record (``<store>/.runs/``, see :mod:`pipeline.store.ledger`);
this reads the same store: ``--artifacts DIR``, else ``$TVMRP_ARTIFACTS``, else ``artifacts/``. RUN is a run
id or a unique prefix of one; ``latest`` is the newest run (of those the list's filters keep), ``previous``
the run before the other one in its lineage (``compare previous latest``: the newest run against the one
before it). ``compare --kernels`` also compares the two runs' profiles kernel by kernel (both recorded with
``--profile``). Records that are not valid records are skipped, with one warning on stderr. Exit codes: 0 ok (an
empty ledger too), 2 bad usage (unknown or ambiguous run, bad date). Plain Python, no Prefect and no TVM: it
answers in a fraction of a second. The renderings are :mod:`pipeline.views.history`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Sequence

from flows._cli import Parser, run_command
from pipeline.errors import UsageError
from pipeline.store import ENV_VAR, ArtifactStore
from pipeline.store.ledger import Ledger, RunRecord
from pipeline.views.text import printable
from pipeline.views.history import (
    Selection, compare, format_comparison, format_csv, format_markdown, format_run, format_table, parse_since,
    runs_json, select,
)

LATEST, PREVIOUS = "latest", "previous"


@dataclass(frozen=True)
class Output:
    """What a command prints: ``text`` on stdout, ``note`` (if any) on stderr."""

    text: str
    note: str | None = None


def _add_common(parser: argparse.ArgumentParser, command: bool = False) -> None:
    """--artifacts, --json, --verbose; a command's own default is SUPPRESS, so it keeps what came before it."""
    unset, off = (argparse.SUPPRESS, argparse.SUPPRESS) if command else (None, False)
    parser.add_argument("--artifacts", metavar="DIR", default=unset,
                        help=f"the artifact store whose runs to read (default: ${ENV_VAR} or artifacts/)")
    parser.add_argument("--json", action="store_true", default=off, help="print JSON")
    parser.add_argument("--verbose", action="store_true", default=off, help="show tracebacks of errors")


def build_parser() -> Parser:
    """The command line of ``python -m flows.history``: the list's options, and the ``show``/``compare`` commands."""
    p = Parser(prog="python -m flows.history", description="List, show and compare the runs recorded in the "
               "artifact store (newest first).")
    _add_common(p)
    _add_filters(p)
    p.add_argument("--last", type=int, metavar="N", help="only the N newest runs (after the filters)")
    p.add_argument("--since", metavar="DATE",
                   help="only runs started since: an ISO date or time (UTC unless it names a zone), or 12h, 7d")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="print CSV (a header row, one row per run)")
    form.add_argument("--markdown", action="store_true", help="print a markdown table")
    commands = p.add_subparsers(dest="command", metavar="{show,compare}")
    show = commands.add_parser("show", help="one run in full")
    show.add_argument("run", metavar="RUN", help="a run id, a unique prefix of one, or latest")
    _add_common(show, command=True)
    _add_filters(show, command=True)
    diff = commands.add_parser("compare", help="what differs between two runs, and the latency change")
    diff.add_argument("run_a", metavar="RUN_A", help="the run to compare against: a run id or a unique prefix, or "
                      "previous (the run before RUN_B in its lineage) or latest")
    diff.add_argument("run_b", metavar="RUN_B", help="the run compared: the same forms (compare previous latest)")
    diff.add_argument("--kernels", action="store_true",
                      help="also compare the runs' profiles kernel by kernel: which kernels got slower or faster, "
                           "and the glue (both runs recorded with --profile)")
    _add_common(diff, command=True)
    _add_filters(diff, command=True)
    return p


def _add_filters(parser: argparse.ArgumentParser, command: bool = False) -> None:
    """The list's filters; on ``show``/``compare`` they choose what ``latest`` means."""
    unset = argparse.SUPPRESS if command else None
    parser.add_argument("--model", default=unset, help="only runs of this model (its name, or a part of it)")
    parser.add_argument("--device", default=unset, metavar="NAME",
                        help="only runs on devices whose name (a fleet's device name, --device-name) or address "
                             "contains this")
    parser.add_argument("--target", default=unset,
                        help="only runs whose target (canonical or short form) contains this")
    parser.add_argument("--lineage", default=unset, metavar="ID",
                        help="only runs of this lineage (an id or its start; python -m flows.history show RUN "
                             "names a run's)")
    parser.add_argument("--series", default=unset, metavar="ID", help="only runs of this series (one build on one "
                        "device; an id or its start)")


def _selection(args: argparse.Namespace, last: int | None = None) -> Selection:
    since = getattr(args, "since", None)
    return Selection(model=getattr(args, "model", None), device=getattr(args, "device", None),
                     target=getattr(args, "target", None), lineage=getattr(args, "lineage", None),
                     series=getattr(args, "series", None), since=parse_since(since) if since is not None else None,
                     last=last)


def _list(ledger: Ledger, args: argparse.Namespace) -> Output:
    selection = _selection(args, args.last)
    recorded = list(ledger.records())
    runs = select(recorded, selection)
    note = None
    if not recorded:
        note = f"no runs recorded in {ledger.directory}"
    elif not runs:
        note = f"no runs match ({len(recorded)} recorded in {ledger.directory})"
    if args.json:
        return Output(json.dumps(runs_json(runs)), note)
    if args.csv:
        return Output(format_csv(runs), note)
    if note is not None:
        return Output(note)
    return Output(format_markdown(runs) if args.markdown else format_table(runs))


def _latest(ledger: Ledger, args: argparse.Namespace) -> RunRecord:
    runs = select(ledger.records(), _selection(args, last=1))
    if not runs:
        raise UsageError(f"no run in {ledger.directory} matches: there is no latest run")
    return runs[0]


def _previous(ledger: Ledger, run: RunRecord) -> RunRecord:
    """The newest run of ``run``'s lineage before it that has a latency (else the newest before it at all)."""
    lineage, fallback = run.lineage_id, None
    for record in ledger.records():
        if record.id < run.id and lineage is not None and record.lineage_id == lineage:
            if record.median_ms:
                return record
            fallback = fallback or record
    if fallback is None:
        raise UsageError(f"run {run.id} is the first of its lineage ({lineage}): there is no previous run")
    return fallback


def _resolve(ledger: Ledger, args: argparse.Namespace, ref: str, other: str | None = None) -> RunRecord:
    """The run ``ref`` names: ``latest``, ``previous`` (the run before ``other`` in its lineage), or an id."""
    if ref == LATEST:
        return _latest(ledger, args)
    if ref == PREVIOUS:
        if other is None or other == PREVIOUS:
            raise UsageError("previous means the run before the other run named: compare previous latest, or "
                             "compare previous RUN")
        return _previous(ledger, _resolve(ledger, args, other))
    return ledger.find(ref)


def _execute(args: argparse.Namespace) -> Output:
    ledger = ArtifactStore(args.artifacts).ledger  # reads only: the store is not created
    output = _command(ledger, args)
    note = ledger.skipped_note()
    if note is not None:
        output = Output(output.text, "\n".join(filter(None, (output.note, f"Warning: {printable(note)}"))))
    return output


def _command(ledger: Ledger, args: argparse.Namespace) -> Output:
    if args.command == "show":
        record = _resolve(ledger, args, args.run)
        return Output(json.dumps(record.as_json(), indent=1) if args.json else format_run(record))
    if args.command == "compare":
        a = _resolve(ledger, args, args.run_a, args.run_b)
        b = _resolve(ledger, args, args.run_b, args.run_a)
        if PREVIOUS in (args.run_a, args.run_b) or LATEST in (args.run_a, args.run_b):
            a, b = sorted((a, b), key=lambda r: r.id)  # with the shortcuts A is the older run
        comparison = compare(a, b, kernels=args.kernels)
        return Output(json.dumps(comparison.as_json(), indent=1) if args.json else format_comparison(comparison))
    return _list(ledger, args)


def _show(output: Output, as_json: bool) -> None:
    if output.text:
        sys.stdout.write(output.text if output.text.endswith("\n") else output.text + "\n")
    if output.note:
        print(output.note, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage)."""
    return run_command(argv, build_parser(), _execute, _show, uses_prefect=False)


if __name__ == "__main__":
    sys.exit(main())
