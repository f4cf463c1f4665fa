"""What the artifact store holds, removing what is no longer used, and checking that it is intact.

    python -m flows.store du     [--artifacts DIR|s3://BUCKET/PREFIX] [--json]
    python -m flows.store gc     [--artifacts ...] [--keep-days D] [--grace-hours H] [--tunings] [--apply] [--json]
    python -m flows.store verify [--artifacts ...] [--json]

``du``: the store's artifacts by kind, by model and by age, and the runs its ledger records. ``gc``: what is no
longer used (a dry run unless ``--apply``): it keeps what a run used in the last ``--keep-days`` days (7), the
latest build of every lineage (model, weights, target, opt_level, schedules, tuning budget), what those need,
every tuning (unless ``--tunings``), and anything created or used in the last ``--grace-hours`` (1) or whose
lock or lease is held, so that it never removes what a running flow is using
(:mod:`pipeline.store.maintenance`). ``verify``: every manifest's MAC and every file's digest; exit 1 naming
each entry that fails. The store is chosen as for every command: ``--artifacts``, else ``$TVMRP_ARTIFACTS``,
else ``artifacts/``; a store in a bucket is checked in the bucket, and this machine's copy of it too. Plain
Python, no Prefect and no TVM.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from flows._cli import Parser, run_command
from pipeline.errors import StoreError, UsageError
from pipeline.store import ENV_VAR, ArtifactStore
from pipeline.store.maintenance import (
    Policy,
    apply_gc,
    format_gc,
    format_usage,
    format_verify,
    plan_gc,
    usage,
    verify,
)


@dataclass(frozen=True)
class Output:
    """What a command prints on stdout."""

    text: str


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX", default=None,
                        help=f"the artifact store (default: ${ENV_VAR} or artifacts/)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")


def build_parser() -> Parser:
    p = Parser(prog="python -m flows.store", description="What the artifact store holds (du), removing what is no "
               "longer used (gc, a dry run unless --apply), and checking every manifest and digest (verify).")
    commands = p.add_subparsers(dest="command", metavar="{du,gc,verify}", required=True)
    du = commands.add_parser("du", help="what the store holds, by kind, model and age")
    _add_common(du)
    gc = commands.add_parser("gc", help="remove what no run uses any more (a dry run unless --apply)")
    _add_common(gc)
    gc.add_argument("--keep-days", type=float, default=7.0, metavar="D",
                    help="keep what any run used in the last D days (7); the latest build of each lineage is kept "
                         "however old")
    gc.add_argument("--grace-hours", type=float, default=1.0, metavar="H",
                    help="keep anything created or used in the last H hours (1): what a running flow may be using")
    gc.add_argument("--tunings", action="store_true", help="also remove tunings that no kept build uses")
    gc.add_argument("--apply", action="store_true", help="remove (without it: only say what would be removed)")
    check = commands.add_parser("verify", help="check every manifest's MAC and every file's digest")
    _add_common(check)
    return p


def _execute(args: argparse.Namespace) -> Output:
    store = ArtifactStore(args.artifacts)
    if store.remote is not None:
        store.remote.check()
    if args.command == "du":
        found = usage(store)
        return Output(json.dumps(found.as_json()) if args.json else format_usage(found))
    if args.command == "gc":
        if args.keep_days < 0 or args.grace_hours < 0:
            raise UsageError("--keep-days and --grace-hours must be 0 or more")
        policy = Policy(keep_days=args.keep_days, grace=args.grace_hours * 3600, tunings=args.tunings)
        plan = plan_gc(store, policy)
        removed = apply_gc(store, plan, policy) if args.apply else 0
        text = json.dumps(plan.as_json(args.apply, removed)) if args.json else format_gc(plan, args.apply, removed)
        return Output(text)
    checked, problems = verify(store)
    text = (json.dumps({"store": store.location, "checked": checked,
                        "problems": [{"key": p.key, "where": p.where, "problem": p.problem} for p in problems]})
            if args.json else format_verify(store.location, checked, problems))
    if problems:
        error = StoreError(f"{len(problems)} of {checked} entries of {store.location} failed verification (listed "
                           "above): they are never used, and runs rebuild them when they need them")
        error.summary = Output(text)  # type: ignore[attr-defined] - shown before the error line
        raise error
    return Output(text)


def _show(output: Output, as_json: bool) -> None:
    sys.stdout.write(output.text if output.text.endswith("\n") else output.text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 verify found problems or the store failed, 2 bad
    usage)."""
    return run_command(argv, build_parser(), _execute, _show, uses_prefect=False)


if __name__ == "__main__":
    sys.exit(main())
