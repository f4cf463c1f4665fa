"""Progress of long work (tuning, slow uploads, fleet runs): in the terminal and as a Prefect progress artifact.

``Progress(key, description)`` is a context manager; ``update(done, total, detail)`` moves it. In a run
it creates (then updates) a *progress* artifact on the flow run, so the UI shows a bar; on a terminal
(stderr is a TTY) it redraws one line with a bar; otherwise it logs a line every ``log_every`` percent
(and at least every ``log_seconds``). It never raises: without a reachable API only the terminal or the
log lines remain, and a single warning says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

_BAR = 30


class Progress:
    """Progress of one piece of long work (see the module docstring).

    Args:
        key: the Prefect artifact key (lower case, dashes).
        description: what is in progress, e.g. ``tuning resnet18_v2 (256 trials)``.
        log_every: percent between log lines (when stderr is not a terminal).
        log_seconds: seconds between log lines at most, whatever the percent.
    """

    def __init__(self, key: str, description: str, log_every: float = 10.0, log_seconds: float = 30.0) -> None:
        self.key, self.description, self.log_every, self.log_seconds = key, description, log_every, log_seconds
        self._artifact_id: Any = None
        self._logged, self._logged_at = -log_every, 0.0
        self._failed = False
        self._tty = sys.stderr.isatty()
        self._percent = 0.0

    def __enter__(self) -> Progress:
        self.update(0, 1)
        return self

    def update(self, done: float, total: float, detail: str = "") -> None:
        """``done`` of ``total`` (clamped to 0-100 %), with an optional ``detail`` (e.g. the best latency so far)."""
        percent = max(0.0, min(100.0, 100.0 * done / total)) if total > 0 else 100.0
        self._percent = percent
        text = f"{self.description}: {percent:.0f}%" + (f" ({detail})" if detail else "")
        if self._tty:
            filled = round(_BAR * percent / 100)
            sys.stderr.write(f"\r{'#' * filled}{'.' * (_BAR - filled)} {text}"[:200] + "\x1b[K")
            sys.stderr.flush()
        now = time.monotonic()
        due = percent - self._logged >= self.log_every or now - self._logged_at >= self.log_seconds
        if due or (percent == 100.0 and self._logged < 100.0):
            if not self._tty:
                log.info("%s", text)
            self._logged, self._logged_at = percent, now
            self._publish(percent, detail)

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.update(1, 1)
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _publish(self, percent: float, detail: str) -> None:
        if self._failed:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext
            from prefect.settings import PREFECT_API_URL

            if FlowRunContext.get() is None and TaskRunContext.get() is None and not PREFECT_API_URL.value():
                return  # no run and no server: Prefect would start a temporary one just for this
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, key=self.key, description=self.description)
            else:
                update_progress_artifact(self._artifact_id, percent, description=f"{self.description} {detail}".strip())
        except Exception as exc:  # noqa: BLE001 - progress reporting must not break the work it reports
            self._failed = True
            log.warning("progress of %s is not published to the Prefect API: %s", self.description, exc)


@contextlib.contextmanager
def while_waiting(key: str, description: str, after: float = 2.0, every: float = 2.0) -> Iterator[None]:
    """Show that one long blocking call (an upload over a slow link) is still going: its elapsed time.

    Nothing is shown if the block ends within ``after`` seconds. The call itself cannot report how far it
    got (TVM's RPC upload is one call), so the progress stays at 0 % with the elapsed time until it is done.
    """
    done = threading.Event()
    context = contextvars.copy_context()  # the run's context: the progress artifact belongs to the run

    def tick() -> None:
        if done.wait(after):
            return
        start = time.monotonic() - after
        with Progress(key, description, log_seconds=every) as progress:
            while not done.wait(every):
                progress.update(0, 1, f"{time.monotonic() - start:.0f} s so far")

    ticker = threading.Thread(target=context.run, args=(tick,), name=f"progress {key}", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join(every + 1)
