"""Paths of a store opened without following links out of it.

A store may be writable by others (a shared store, a team's), so a symbolic link planted among its entries
(``<root>/.tmp`` pointing elsewhere, a dangling link where a lock file will be created) must not make a run
create or write files outside the store, nor read one as an artifact. Every directory the store creates under its root is checked with
:func:`real_directory`, and files in it are opened with ``O_NOFOLLOW`` (:func:`open_new`, :func:`read_bytes`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pipeline.errors import StoreError, clip

_FOLLOWED = (errno.ELOOP, errno.EMLINK)  # what O_NOFOLLOW answers for a symbolic link (EMLINK on some BSDs)


def refuse_link(path: Path, what: str = "the artifact store's entry") -> StoreError:
    """The error for a symbolic link where the store expects a file or directory of its own."""
    return StoreError(
        f"{what} {clip(path)} is a symbolic link: the store never follows links out of itself. Remove it "
        f"(the next run recreates what is needed)"
    )


def real_directory(path: Path, mode: int = 0o777) -> Path:
    """``path`` as a directory of its own (created with ``mode`` and its missing parents): not a symbolic link.

    Raises:
        StoreError: ``path`` is a symbolic link (dangling or not) or something other than a directory.
        OSError: it cannot be created (read-only, disk full...): callers say which store.
    """
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a dangling link or a file: told apart below
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise refuse_link(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"the artifact store's entry {clip(path)} is not a directory: remove it")
    return path


def open_new(path: Path, flags: int = os.O_RDWR, mode: int = 0o644) -> int:
    """A descriptor of the file ``path`` (created if missing) that is never a symbolic link's target.

    Raises:
        StoreError: ``path`` is a symbolic link.
        OSError: anything else (callers say which store).
    """
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _FOLLOWED:
            raise refuse_link(path, "the store's file") from None
        raise


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), opened without following a link.

    Raises:
        OSError: missing, unreadable, a symbolic link (``ELOOP``), or not a regular file (``EINVAL``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read() if limit is None else f.read(limit)
