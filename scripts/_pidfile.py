"""Pid files of the processes a script started, shared by scripts/stack.py and scripts/aarch64_device.py.

A record keeps the pid and the process's start time, so that a pid the kernel has since given to another
process is never taken for ours (and never signalled). Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import psutil


@dataclasses.dataclass(frozen=True)
class PidRecord:
    """A process a script started: enough to find it again and never to hit another."""

    name: str
    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process, or None when it is gone or its pid now belongs to another process."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


R = TypeVar("R", bound=PidRecord)


def read_record(cls: type[R], path: Path) -> R | None:
    """The record in ``path``, or None if it is missing or unreadable."""
    try:
        return cls(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(path: Path, record: PidRecord) -> None:
    """Write ``record`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)))
    tmp.replace(path)
