"""Interrupts and worker processes of a tuning run.

SIGINT and SIGTERM are only noted while MetaSchedule runs, then raised from our hooks as a KeyboardInterrupt
(see :func:`_noting_interrupts` for why); a hook that waits on MetaSchedule's worker pools waits
interruptibly (:func:`_interruptible`); the worker processes run in a process group of their own, so that a
terminal's Ctrl-C (SIGINT to the whole foreground group) reaches only this process
(:func:`_workers_in_own_group`), and are ended however the run ends (:func:`_own_workers`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.tuning.result import TuningReport
    from pipeline.tuning.session import _Session

log = logging.getLogger("pipeline.tuning")  # one logger for the package: its lines read as one stage's
_HELPER_JOIN_S = 15.0  # how long an interrupted run waits for its builder/runner thread once the workers are gone


class TuningInterrupted(KeyboardInterrupt):
    """A tuning ended by SIGINT or SIGTERM (a KeyboardInterrupt: callers that catch those still do).

    Attributes:
        partial: what the run had measured by then, as the report of a tuning of that many trials (the
            database is in the run's work directory); None when it had measured nothing.
    """

    def __init__(self, message: str, partial: TuningReport | None) -> None:
        super().__init__(message)
        self.partial = partial


def _interruptible(session: _Session, call: Callable[[], Any]) -> Any:
    """``call()`` in a helper thread while the main thread waits in 0.1 s steps, raising a noted interrupt.

    Blocked in a lock (MetaSchedule's builder and runner wait on their worker pools there), the main thread
    would see Ctrl-C only when the batch ends.
    """
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    helper = threading.Thread(target=target, name="tvmrp-tune-worker", daemon=True)
    session.helpers.append(helper)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
        session.raise_if_interrupted()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def _noting_interrupts(session: _Session) -> Iterator[None]:
    """While MetaSchedule runs, SIGINT and SIGTERM are noted in ``session`` and raised by our hooks only.

    MetaSchedule calls Python back from C++ in two kinds of places: our hooks (builder, runner, search
    strategy, measure callback), where an exception unwinds the tuning, and its log messages, which call the
    logger from a C++ destructor: an exception raised there (a KeyboardInterrupt from the default handler
    landing in a log call) ends the process with std::terminate (a "Segfault encountered" and exit -11).
    So the handler only notes the signal; :meth:`_Session.raise_if_interrupted` raises it at the next hook
    (within ~0.1 s while a batch builds or runs, after the current search round otherwise). TVM's FFI then
    turns that KeyboardInterrupt into a ``RuntimeError`` with an empty message, and
    :func:`pipeline.tuning.search.run_tuning` turns it back into a KeyboardInterrupt by the note. Only in the
    main thread (where Python runs handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def noting(signum: int, _frame: Any) -> None:
        session.interrupted = signum

    changed = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]
    for signum in changed:
        signal.signal(signum, noting)
    try:
        yield
    finally:
        for signum in changed:
            signal.signal(signum, previous[signum])


@contextlib.contextmanager
def _workers_in_own_group(session: _Session) -> Iterator[None]:
    """MetaSchedule's worker processes (TVM's ``PopenWorker``: the builder's and the runner's pools) start in a
    process group of their own while this is active, and none starts once the run is ending.

    A terminal sends Ctrl-C to its whole foreground process group: a worker in ours would die of it mid-import
    (a KeyboardInterrupt traceback on the run's stderr) or mid-batch, and the run would wait on the broken
    pool. In their own group only this process gets the signal, notes it, and ends them
    (:func:`_own_workers`); they remain our children, so the lifeline still ends them if we are killed.
    Once the run ends (``session.ending``), a pool thread that would replace a worker we ended (TVM's pools
    start one per remaining input of the batch, seconds each) gets an error at once instead, so the batch
    left in a helper thread finishes within moments. Only in the main thread (one tuning at a time per
    process).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from tvm.support import popen_pool

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        if session.ending:
            raise OSError("the tuning is ending: no new MetaSchedule worker")
        return subprocess.Popen(*args, process_group=0, **kwargs)

    original = popen_pool.subprocess
    shim = types.SimpleNamespace(**vars(subprocess))
    shim.Popen = popen
    popen_pool.subprocess = shim
    try:
        yield
    finally:
        popen_pool.subprocess = original


@contextlib.contextmanager
def _own_workers(session: _Session) -> Iterator[None]:
    """End MetaSchedule's worker processes when the run ends, however it ends, and the threads that waited on them.

    The builder starts a pool of ``tvm.exec.popen_worker`` processes per batch and the runner one for the
    whole run; an interrupted batch leaves its pool behind. Children of this process that are popen workers
    and were not there before are killed (with their own children). A helper thread of
    :func:`_interruptible` left inside a TVM call would abort the interpreter at exit (a daemon thread is
    unwound there by force, which TVM's C++ catches: "FATAL: exception not rethrown"), so it is joined once
    its workers are gone.
    """
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    try:
        yield
    finally:
        session.ending = True
        for pool in session.pools:
            if pool is not None:
                try:
                    pool.shutdown(wait=False)
                except Exception as exc:  # noqa: BLE001 - the sweep below ends what shutdown missed
                    log.debug("tune: the runner's pool did not shut down: %s", exc)
        deadline = time.monotonic() + _HELPER_JOIN_S
        while True:  # a worker started just before ``ending`` was set is ended in the next pass
            _kill_workers(me, before)
            waiting = [helper for helper in session.helpers if helper.is_alive()]
            if not waiting or time.monotonic() > deadline:
                break
            waiting[0].join(0.05)


def _kill_workers(me: Any, before: set[int]) -> None:
    """Kill the popen workers among the children of ``me`` that were not in ``before``, and their children."""
    import psutil

    victims = []
    for child in me.children():
        try:
            if child.pid in before or "tvm.exec.popen_worker" not in child.cmdline():
                continue
            victims += [*child.children(recursive=True), child]
        except psutil.Error:
            continue
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=5)
