"""Ending the processes we started: one way to stop a process tree, and a lifeline for when we die first.

:func:`stop_process_tree` is the single implementation of "stop this process, its process group and every
process they spawned" used by the embedded rpc_server and tracker (:mod:`pipeline.device.servers`), the
local stack (``scripts/stack.py``) and the emulated aarch64 device (``scripts/aarch64_device.py``): SIGTERM
and SIGCONT (a stopped process must run to terminate), a grace period, SIGKILL, reaping. A process is only
ever signalled while its pid still has the start time we recorded, so a pid the kernel gave to another
process is never hit. Zombies count as gone: orphans are reaped by init, which may take a while or never
happen in a container whose init does not reap.

:class:`Lifeline` covers the case the tree cannot: our own process killed with SIGKILL (OOM killer, a CI
timeout) leaves its children running, among them servers in sessions of their own and processes others
spawned for us (TVM's ``popen_worker``, Prefect's temporary ``uvicorn`` server). A lifeline is a small
watchdog process (:mod:`pipeline.lifeline`) that remembers our descendants and ends them when we die. A process
meant to outlive us (the local Prefect server a command line starts for the next runs too) is started with
:data:`DETACHED_ENV` set to our pid in its environment (:func:`detached`): the lifeline leaves it alone.

:class:`PidRecord` is the pid file of a process a script or a command line started and others must find
again (the local stack's components, the emulated aarch64 device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self, TypeVar

import psutil

__all__ = [
    "DETACHED_ENV",
    "Lifeline",
    "PidRecord",
    "StopResult",
    "detached",
    "is_alive",
    "leads_group",
    "live_group_members",
    "read_record",
    "same_process",
    "start_lifeline",
    "stop_process_tree",
    "terminate",
    "with_descendants",
    "write_record",
]

logger = logging.getLogger(__name__)

# psutil derives start times from boot time and clock ticks: the same process always gets the same value,
# a recycled pid a later one. The tolerance only absorbs rounding in records written as JSON.
CREATE_TIME_TOLERANCE_S = 0.5
_POLL_S = 0.05
_LIFELINE_READY_S = 15.0
_LIFELINE_EXIT_S = 10.0


# ------------------------------------------------------------------------------------- process tree


@dataclasses.dataclass(frozen=True)
class StopResult:
    """What :func:`stop_process_tree` did.

    Attributes:
        signalled: How many processes it found and signalled (0: nothing of ours was running).
        killed: How many of them were still running after the grace period and got SIGKILL.
        survivors: Pids still alive after SIGKILL and the kill wait (normally empty).
    """

    signalled: int = 0
    killed: int = 0
    survivors: tuple[int, ...] = ()


def same_process(proc: psutil.Process, create_time: float) -> bool:
    """True if ``proc`` (alive or a zombie) is the process that started at ``create_time``."""
    try:
        return abs(proc.create_time() - create_time) <= CREATE_TIME_TOLERANCE_S
    except psutil.Error:
        return False


def is_alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs (psutil checks that its pid was not reused); a zombie is not alive."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def live_group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes whose process group is ``pgid``, read from ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # After "pid (comm)": state, ppid, pgrp.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            with contextlib.suppress(psutil.Error):
                members.append(psutil.Process(int(entry)))
    return members


def stop_process_tree(
    pid: int,
    create_time: float,
    *,
    grace: float = 5.0,
    kill_wait: float = 5.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> StopResult:
    """Ends process ``pid``, the process group it leads and every descendant of either.

    The process is ours only while its start time is ``create_time``: a pid now used by another process is
    left alone. When ``popen`` is given and the leader already exited and was reaped, the members of its
    group are still ended (the kernel keeps a group's number from being reused while a member lives).
    Idempotent; never raises for processes already gone.

    Args:
        pid: The process (normally the leader of its own process group: ``start_new_session=True``).
        create_time: Its start time as psutil reports it, recorded when it was started.
        grace: Seconds between SIGTERM and SIGKILL.
        kill_wait: Seconds to wait for the processes to die after SIGKILL.
        popen: The ``Popen`` of ``pid`` when it is our child: it is reaped too.

    Returns:
        How many processes were signalled, killed, and survived.
    """
    try:
        leader: psutil.Process | None = psutil.Process(pid)
    except psutil.NoSuchProcess:
        if popen is None:
            return StopResult()  # gone, and not our child: nothing proves a group of that number is ours
        leader = None  # our child, exited and reaped by us: members of its group may still run
    except psutil.Error:
        return StopResult()
    if leader is not None and not same_process(leader, create_time):
        return StopResult()  # the pid belongs to another process now
    groups: set[int] = set()
    if (leader is not None and leads_group(leader)) or (leader is None and live_group_members(pid)):
        groups.add(pid)
    procs = {} if leader is None or not is_alive(leader) else {pid: leader}
    procs.update(with_descendants(procs, groups))
    if not procs and not groups:
        _reap(popen, 0.0)
        return StopResult()
    return terminate(procs, groups, grace=grace, kill_wait=kill_wait, popen=popen)


def terminate(
    procs: dict[int, psutil.Process],
    groups: set[int],
    *,
    grace: float,
    kill_wait: float,
    popen: subprocess.Popen[bytes] | None = None,
) -> StopResult:
    """SIGTERM + SIGCONT to ``procs`` and ``groups``, up to ``grace`` seconds, then SIGKILL to what is left.

    ``groups`` must be process groups of ours: their members are signalled with ``killpg`` (which also
    reaches members started after ``procs`` was collected). Processes are signalled through psutil, which
    checks that each pid still is the process it was. Descendants that appear meanwhile are added before
    SIGKILL.
    """
    signalled = len(procs)
    _signal(procs, groups, signal.SIGTERM)
    _signal(procs, groups, signal.SIGCONT)
    if _wait_gone(procs, groups, time.monotonic() + grace, popen):
        return StopResult(signalled)
    alive = {pid: proc for pid, proc in procs.items() if is_alive(proc)}
    alive.update(with_descendants(alive, groups))
    _signal(alive, groups, signal.SIGKILL)
    if _wait_gone(alive, groups, time.monotonic() + kill_wait, popen):
        return StopResult(signalled, len(alive))
    survivors = [pid for pid, proc in alive.items() if is_alive(proc)]
    survivors += [p.pid for group in groups for p in live_group_members(group) if p.pid not in alive]
    return StopResult(signalled, len(alive), tuple(sorted(set(survivors))))


def leads_group(proc: psutil.Process) -> bool:
    """True if ``proc`` leads a process group (its pgid is its pid)."""
    try:
        return os.getpgid(proc.pid) == proc.pid
    except OSError:
        return bool(live_group_members(proc.pid))


def with_descendants(procs: dict[int, psutil.Process], groups: set[int]) -> dict[int, psutil.Process]:
    """``procs``, the live members of ``groups`` and the descendants of all of them."""
    found = dict(procs)
    for group in groups:
        for member in live_group_members(group):
            found.setdefault(member.pid, member)
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    return {pid: proc for pid, proc in found.items() if pid != os.getpid()}


def _signal(procs: dict[int, psutil.Process], groups: set[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)  # psutil refuses a pid that now belongs to another process


def _wait_gone(
    procs: dict[int, psutil.Process], groups: set[int], deadline: float, popen: subprocess.Popen[bytes] | None
) -> bool:
    """Waits until no process of ``procs`` or ``groups`` lives; False if some still do at ``deadline``."""
    while True:
        if popen is not None:
            popen.poll()  # reap our child as soon as it exits
        if not any(is_alive(proc) for proc in procs.values()) and not any(
            live_group_members(group) for group in groups
        ):
            _reap(popen, max(0.0, deadline - time.monotonic()))
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _reap(popen: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)


# ----------------------------------------------------------------------------------------- lifeline

DETACHED_ENV = "TVMRP_DETACHED_FROM"
"""An environment variable naming the pid of a process whose lifeline must not end this one (see
:func:`detached`)."""


def detached(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child meant to outlive this process: this process's lifeline leaves it and its descendants
    running when this process ends (the local Prefect server, kept for the next runs). The value is our pid, so
    a variable inherited from a shell never exempts the children of another process."""
    return {**env, DETACHED_ENV: str(os.getpid())}


def is_detached_from(proc: psutil.Process, pid: int) -> bool:
    """True if ``proc`` was started by :func:`detached` from process ``pid`` (or descends from one that was:
    children inherit the environment)."""
    try:
        return proc.environ().get(DETACHED_ENV) == str(pid)
    except psutil.Error:
        return False



class Lifeline:
    """A watchdog that ends every descendant of this process within about 2 s after this process dies.

    :meth:`start` spawns ``python -m pipeline.lifeline`` in a session of its own and hands it the read end
    of a pipe whose write end only this process holds (close-on-exec, so children started with ``exec``
    do not inherit it). The watchdog lists this process's descendants every ``poll_s`` seconds and remembers
    each by pid and start time. When the pipe reaches end-of-file (this process died, or :meth:`close`) or
    this process is gone, it ends every remembered process that still runs (their process groups too where
    they lead one): SIGTERM, ``grace_s`` seconds, SIGKILL. It never signals a process that was not seen as
    a descendant of this one, nor a pid that now belongs to another process.

    Call :meth:`close` after your own cleanup (or use ``with``): the watchdog then finds nothing left and
    exits. Not calling it is fine too: when this process exits the kernel closes the pipe, and the watchdog
    ends what is left just after (useful when libraries clean up in ``atexit`` handlers, as Prefect stops its
    temporary server there). A child forked without ``exec`` inherits the write end; the watchdog then
    notices this process's death by polling its pid and start time instead. A descendant started less than
    ``poll_s`` before a SIGKILL and already orphaned when the watchdog looked cannot be found.

    Args:
        poll_s: Seconds between two listings of the descendants.
        grace_s: Seconds between SIGTERM and SIGKILL when cleaning up.
        log_path: File for the watchdog's messages; none if None.
        python: The interpreter to run the watchdog with (it needs psutil).
    """

    def __init__(
        self,
        *,
        poll_s: float = 0.3,
        grace_s: float = 1.0,
        log_path: str | os.PathLike[str] | None = None,
        python: str | os.PathLike[str] = sys.executable,
    ) -> None:
        self._poll_s = poll_s
        self._grace_s = grace_s
        self._log_path = None if log_path is None else Path(log_path)
        self._python = os.fspath(python)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None

    @property
    def pid(self) -> int | None:
        """The watchdog's pid, or None when not started."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> Self:
        """Starts the watchdog and waits (at most 15 s) until it watches; does nothing if it runs.

        Raises:
            OSError: The watchdog could not be started or did not report ready in time.
        """
        if self._proc is not None:
            return self
        read_fd, write_fd = os.pipe()  # both close-on-exec: no child started with exec inherits them
        ready_read, ready_write = os.pipe()
        try:
            self._proc = self._spawn(read_fd, ready_write)
        except BaseException:
            os.close(write_fd)
            os.close(ready_read)
            raise
        finally:
            os.close(read_fd)
            os.close(ready_write)
        self._write_fd = write_fd
        try:
            _wait_ready(ready_read, self._proc, _LIFELINE_READY_S)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_read)
        logger.info("lifeline watchdog %d watches process %d", self._proc.pid, os.getpid())
        return self

    def close(self, timeout: float = _LIFELINE_EXIT_S) -> None:
        """Lets the watchdog go: it ends whatever descendant is left, then exits; waits at most ``timeout`` s.

        Idempotent. Call it after stopping your own children, so that it finds nothing to end.
        """
        write_fd, self._write_fd = self._write_fd, None
        if write_fd is not None:
            os.close(write_fd)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("lifeline watchdog %d did not exit within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self, read_fd: int, ready_fd: int) -> subprocess.Popen[bytes]:
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        argv = [
            self._python, "-m", "pipeline.lifeline",
            "--parent", str(os.getpid()),
            "--fd", str(read_fd),
            "--ready-fd", str(ready_fd),
            "--poll", str(self._poll_s),
            "--grace", str(self._grace_s),
        ]  # fmt: skip
        log = open(self._log_path, "ab") if self._log_path is not None else None  # noqa: SIM115
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log if log is not None else subprocess.DEVNULL,
                pass_fds=(read_fd, ready_fd),
                start_new_session=True,  # not in our process group: a kill of the group must not end it
                env=env,
            )
        finally:
            if log is not None:
                log.close()


def start_lifeline(
    *,
    poll_s: float = 0.3,
    grace_s: float = 1.0,
    log_path: str | os.PathLike[str] | None = None,
    python: str | os.PathLike[str] = sys.executable,
) -> Lifeline:
    """Starts a :class:`Lifeline` (arguments as its constructor takes them) and returns it, watching.

    Raises:
        OSError: The watchdog could not be started or did not report ready in time.
    """
    return Lifeline(poll_s=poll_s, grace_s=grace_s, log_path=log_path, python=python).start()


def _wait_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    received = b""
    while not received.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OSError(f"the lifeline watchdog {proc.pid} did not report ready within {timeout:.0f} s")
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if not readable:
            continue
        chunk = os.read(fd, 64)
        if not chunk:
            raise OSError(f"the lifeline watchdog {proc.pid} exited before it was ready (code {proc.poll()})")
        received += chunk


# ---------------------------------------------------------------------------------------------- pid files


@dataclasses.dataclass(frozen=True)
class PidRecord:
    """A process a script or a command line started, in a pid file: enough to find it again and never to hit
    another (a pid the kernel has since given to another process is never taken for ours)."""

    name: str
    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process, or None when it is gone or its pid now belongs to another process."""
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return None
        return proc if same_process(proc, self.create_time) and is_alive(proc) else None


R = TypeVar("R", bound=PidRecord)


def read_record(cls: type[R], path: Path) -> R | None:
    """The record in ``path``, or None if it is missing or unreadable."""
    try:
        return cls(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(path: Path, record: PidRecord) -> None:
    """Write ``record`` to ``path`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)))
    tmp.replace(path)
