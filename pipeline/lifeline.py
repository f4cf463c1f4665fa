"""The watchdog behind :class:`pipeline.processes.Lifeline`: ``python -m pipeline.lifeline --parent PID --fd N``.

Started by ``Lifeline.start()``, in a session of its own, not by hand. It holds the read end of a pipe whose
write end only the watched process holds. Every ``--poll`` seconds it lists the watched process's
descendants and remembers each by pid and start time (psutil keeps the start time and refuses to signal a
pid that now belongs to another process). When the pipe reaches end-of-file (the watched process died or
closed it) or the watched process is gone, it ends every remembered process that still runs, with the
process groups they lead: SIGTERM, ``--grace`` seconds, SIGKILL. Then it exits.

It remembers descendants while they are descendants: a process orphaned later (its parent died) is still
ended, because it was seen under the watched process before. It never signals itself, nothing it did not
see below the watched process (PR_SET_PDEATHSIG would not do: it fires when the spawning *thread* exits and
does not reach grandchildren), nor a process the watched one started to outlive it
(:func:`pipeline.processes.detached`: the local Prefect server), checked again just before the end.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time

import psutil

from pipeline.processes import StopResult, is_alive, is_detached_from, leads_group, terminate, with_descendants

MAX_REMEMBERED = 4096  # a bound on memory; far more than one run ever starts
KILL_WAIT_S = 2.0


def main(argv: list[str] | None = None) -> int:
    """Watches ``--parent`` until it dies or closes ``--fd``; then ends what is left of its descendants."""
    args = _parse(argv)
    try:
        parent = psutil.Process(args.parent)
    except psutil.Error:
        return 1
    remembered: dict[int, psutil.Process] = {}
    remember(parent, remembered)
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    reason = watch(parent, args.fd, remembered, args.poll)
    started = time.monotonic()
    result = end_remembered(remembered, args.grace, args.parent)
    _log(
        f"{reason}: signalled {result.signalled} remaining process(es), killed {result.killed}, "
        f"{len(result.survivors)} survived, in {time.monotonic() - started:.2f} s"
    )
    return 0 if not result.survivors else 1


def watch(parent: psutil.Process, fd: int, remembered: dict[int, psutil.Process], poll_s: float) -> str:
    """Remembers ``parent``'s descendants every ``poll_s`` seconds until it dies or ``fd`` reaches EOF.

    Returns:
        Why watching ended, for the log.
    """
    while True:  # bounded by the watched process's life: each pass waits at most poll_s
        remember(parent, remembered)
        if not is_alive(parent):
            return f"process {parent.pid} is gone"
        readable, _, _ = select.select([fd], [], [], poll_s)
        if readable and not os.read(fd, 64):
            return f"the pipe of process {parent.pid} was closed"


def remember(parent: psutil.Process, remembered: dict[int, psutil.Process]) -> None:
    """Forgets remembered processes that ended and adds ``parent``'s current descendants."""
    for pid in [pid for pid, proc in remembered.items() if not is_alive(proc)]:
        del remembered[pid]
    try:
        descendants = parent.children(recursive=True)
    except psutil.Error:
        return
    me = os.getpid()
    for child in descendants:
        if (child.pid != me and child.pid not in remembered and len(remembered) < MAX_REMEMBERED
                and not is_detached_from(child, parent.pid)):
            remembered[child.pid] = child


def end_remembered(remembered: dict[int, psutil.Process], grace: float, parent: int | None = None) -> StopResult:
    """Ends the remembered processes still running, their descendants and the process groups they lead; not
    those started to outlive ``parent`` (seen between their fork and their exec, before their environment
    said so)."""
    procs = {pid: proc for pid, proc in remembered.items() if is_alive(proc)}
    if parent is not None:
        procs = {pid: proc for pid, proc in procs.items() if not is_detached_from(proc, parent)}
    groups = {pid for pid, proc in procs.items() if leads_group(proc)}
    procs = with_descendants(procs, groups)
    if parent is not None:
        procs = {pid: proc for pid, proc in procs.items() if not is_detached_from(proc, parent)}
    return terminate(procs, groups, grace=grace, kill_wait=KILL_WAIT_S)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.lifeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="pid of the process to watch")
    parser.add_argument("--fd", type=int, required=True, help="read end of the pipe the parent holds open")
    parser.add_argument("--ready-fd", type=int, required=True, help="where to write 'ready' once watching")
    parser.add_argument("--poll", type=float, default=0.3, help="seconds between listings of the descendants")
    parser.add_argument("--grace", type=float, default=1.0, help="seconds between SIGTERM and SIGKILL")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} lifeline {os.getpid()}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
