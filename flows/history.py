"""The runs recorded in the artifact store's ledger, read back: list, show one, compare two.

    python -m flows.history [--model M] [--device D] [--target T] [--last N] [--since DATE] [--json|--csv|--markdown]
    python -m flows.history show RUN [--json]
    python -m flows.history compare RUN_A RUN_B [--json]

Every ``python -m flows.resnet_remote`` run writes one record (``<store>/.runs/``, see :mod:`pipeline.store.ledger`);
this reads the same store: ``--artifacts DIR``, else ``$TVMRP_ARTIFACTS``, else ``artifacts/``. RUN is a run
id or a unique prefix of one. Exit codes: 0 ok (an empty ledger too), 2 bad usage (unknown or ambiguous run,
bad date). Plain Python, no Prefect and no TVM: it answers in a fraction of a second. The renderings are
:mod:`pipeline.views.history`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Sequence

from flows._cli import Parser, run_command
from pipeline.views.history import (
    Selection, compare, format_comparison, format_csv, format_markdown, format_run, format_table, parse_since,
    runs_json, select,
)
from pipeline.store.ledger import Ledger
from pipeline.store import ENV_VAR, ArtifactStore


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
    p.add_argument("--model", help="only runs of this model (its name, or a part of it)")
    p.add_argument("--device", help="only runs on devices whose name contains this")
    p.add_argument("--target", help="only runs whose target (canonical or short form) contains this")
    p.add_argument("--last", type=int, metavar="N", help="only the N newest runs (after the filters)")
    p.add_argument("--since", metavar="DATE",
                   help="only runs started since: an ISO date or time (UTC unless it names a zone), or 12h, 7d")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="print CSV (a header row, one row per run)")
    form.add_argument("--markdown", action="store_true", help="print a markdown table")
    commands = p.add_subparsers(dest="command", metavar="{show,compare}")
    show = commands.add_parser("show", help="one run in full")
    show.add_argument("run", metavar="RUN", help="a run id, or a unique prefix of one")
    _add_common(show, command=True)
    diff = commands.add_parser("compare", help="what differs between two runs, and the latency change")
    diff.add_argument("run_a", metavar="RUN_A", help="the run to compare against (a run id or a unique prefix)")
    diff.add_argument("run_b", metavar="RUN_B", help="the run compared")
    _add_common(diff, command=True)
    return p


def _list(ledger: Ledger, args: argparse.Namespace) -> Output:
    since = parse_since(args.since) if args.since is not None else None
    selection = Selection(model=args.model, device=args.device, target=args.target, since=since, last=args.last)
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


def _execute(args: argparse.Namespace) -> Output:
    ledger = ArtifactStore(args.artifacts).ledger  # reads only: the store is not created
    if args.command == "show":
        record = ledger.find(args.run)
        return Output(json.dumps(record.as_json(), indent=1) if args.json else format_run(record))
    if args.command == "compare":
        comparison = compare(ledger.find(args.run_a), ledger.find(args.run_b))
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
