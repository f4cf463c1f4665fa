"""Pid files of the processes a script started, shared by scripts/stack.py and scripts/aarch64_device.py.

A record keeps the pid and the process's start time, so that a pid the kernel has since given to another
process is never taken for ours (and never signalled: :func:`pipeline.processes.stop_process_tree` checks
it too). Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import psutil

from pipeline.processes import is_alive, same_process  # the scripts put the repository on sys.path first


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
    """Write ``record`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)))
    tmp.replace(path)
