"""Where MetaSchedule's own logging goes while it tunes: ``tuning.log`` in the artifact, and nowhere else."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

#: MetaSchedule's per-task chatter (to tuning.log); the name it had when the package was one module.
_MS_LOG = logging.getLogger("pipeline.tuning.meta_schedule")
#: MetaSchedule's loggers: ours for its tasks, and its own (task scheduler, builder, runner, cost model).
_MS_LOGGERS = (_MS_LOG.name, "tvm.s_tir.meta_schedule")
_LOG_LIMIT = 32 << 20  # bytes of MetaSchedule's log kept in the artifact


class _CappedFileHandler(logging.FileHandler):
    """A log file that stops growing at ``limit`` bytes (with a last line that says so)."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, encoding="utf-8")
        self.limit, self.full = limit, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.full:
            return
        if self.stream is not None and self.stream.tell() >= self.limit:
            self.full = True
            self.stream.write(f"... the log stops here: it reached {self.limit} bytes\n")
            self.flush()
            return
        super().emit(record)


@contextlib.contextmanager
def _meta_schedule_logs(path: Path | None) -> Iterator[None]:
    """Send MetaSchedule's logging (per-task search chatter, design spaces, statistics) to ``path`` only.

    Its loggers (``_MS_LOG``, given to every TuneContext, and ``tvm.s_tir.meta_schedule.*``, the task
    scheduler, builder, runner and cost model) stop propagating for the duration, so none of it reaches the
    run's log handlers (terminal, Prefect UI). Without ``path`` it is dropped.
    """
    handler: logging.Handler = _CappedFileHandler(path, _LOG_LIMIT) if path is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in _MS_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        handler.close()
