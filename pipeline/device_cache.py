"""Libraries kept on the device between runs, so that an unchanged library is not uploaded again.

TVM's stock ``rpc_server`` deletes its session directory when a session ends, but an upload whose name is
an absolute path is written there and kept. The server offers upload, download and remove: no listing, no
rename, no checksum. The cache is built from those three calls alone:

- a library is uploaded under a name of its own, ``tvmrp-<sha256[:16]>-<nonce>.so``, and never written
  again, so no run can load a file while another rewrites it;
- only once that upload has returned (the server has written the whole file) does a *marker* name it:
  ``tvmrp-slot-<i>.json`` holds the library's sha256, size, file name and upload time. A run killed
  mid-upload leaves no marker, so its partial file is never loaded;
- a run looks its library's sha256 up in the few (:data:`SLOTS`) markers, one small download each;
- a new library takes the slot that held the same digest, else a free slot, else the oldest slot written
  more than :data:`GRACE_S` ago, and removes the file that slot named. When every slot is younger, nothing
  is evicted and this run's copy is not kept;
- after loading, a run whose marker was overwritten by a concurrent run removes its own (already loaded)
  copy, so racing runs leave no unreferenced file behind;
- a copy that fails to load anyway (removed on the device, a racing eviction) raises
  :class:`~pipeline.errors.StaleDeviceCopy`, and the flow uploads again.

Trust: whoever can write the directory on the device can make a run load their code. Anyone who can reach
an ``rpc_server`` can run code on it anyway; on a device shared with other users, use a private directory
or turn the cache off (``--device-cache DIR|off``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.device import RemoteSession
from pipeline.errors import DeviceLost, RemoteRunError, UsageError

log = logging.getLogger(__name__)

SLOTS = 4
"""Libraries kept per device directory (ResNet-18: 4 x 47 MB)."""

GRACE_S = 600.0
"""A slot written less than this many seconds ago is not evicted: a concurrent run may be loading it."""

_MARKER = "tvmrp-slot-{}.json"
_FORMAT = 1
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DeviceCopy:
    """A library copy on the device, as a slot's marker records it."""

    slot: int
    sha256: str
    size: int
    file: str
    """Base name of the copy in the cache directory."""
    time: float
    """When it was uploaded (the uploading host's clock, seconds since the epoch)."""

    def as_json(self) -> bytes:
        record = {"format": _FORMAT, "sha256": self.sha256, "bytes": self.size, "file": self.file, "time": self.time}
        return json.dumps(record, sort_keys=True).encode()


@dataclass(frozen=True)
class DeviceCache:
    """A directory on the device that keeps uploaded libraries between sessions.

    Args:
        directory: Absolute path *on the device*; it must exist there (the server cannot create directories).
        slots: How many libraries it keeps.
    """

    directory: str
    slots: int = SLOTS

    def __post_init__(self) -> None:
        if not self.directory.startswith("/") or "\\" in self.directory:
            raise UsageError(f"--device-cache must be an absolute directory on the device, or off (got {self.directory!r})")
        if not 1 <= self.slots <= 64:
            raise UsageError(f"a device cache keeps 1-64 libraries (got {self.slots})")

    def path(self, name: str) -> str:
        """The device path of ``name`` in the cache directory."""
        return posixpath.join(self.directory, name)

    def copies(self, session: RemoteSession) -> list[DeviceCopy | None]:
        """What each slot holds: None for an empty slot or an unreadable marker (a write in progress)."""
        return [self._read_slot(session, slot) for slot in range(self.slots)]

    def find(self, session: RemoteSession, sha256: str, size: int) -> DeviceCopy | None:
        """The complete copy of the library with digest ``sha256`` and ``size`` bytes, if the device keeps one."""
        for copy in self.copies(session):
            if copy is not None and copy.sha256 == sha256 and copy.size == size:
                return copy
        return None

    def put(self, session: RemoteSession, data: bytes | bytearray, sha256: str | None = None) -> DeviceCopy:
        """Upload ``data`` under a fresh name, then record it in a slot (when one can be taken).

        Args:
            sha256: The digest of ``data`` when the caller has checked it already.

        Returns:
            The new copy; load it, then call :meth:`settle`.

        Raises:
            RemoteRunError: The directory cannot be written on the device (nothing was uploaded).
            DeviceTimeout, DeviceLost: As for :meth:`RemoteSession.call`.
        """
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        name = f"tvmrp-{sha256[:16]}-{uuid.uuid4().hex[:12]}.so"
        session.call("upload", session.remote.upload, _as_bytearray(data), self.path(name))
        now = time.time()
        slot, replaced = self._choose_slot(session, sha256, now)
        copy = DeviceCopy(slot if slot is not None else -1, sha256, len(data), name, now)
        if slot is None:
            log.info("device cache %s: all %d slots were written in the last %.0f s; this copy is not kept",
                     self.directory, self.slots, GRACE_S)
            return copy
        _, refused = _call(session, session.remote.upload, bytearray(copy.as_json()), self.path(_MARKER.format(slot)))
        if refused is not None:
            log.warning("device cache %s: cannot record the upload (%s); this copy is not kept", self.directory, refused)
            return copy
        if replaced is not None and replaced.file != name:
            self._remove(session, replaced.file)
        return copy

    def settle(self, session: RemoteSession, copy: DeviceCopy) -> bool:
        """After ``copy`` (from :meth:`put`) is loaded: remove it unless its slot still names it.

        A concurrent run may have taken the same slot, and a copy that no marker names would never be
        removed. The server has the library loaded (mapped), so removing the file does not disturb it.

        Returns:
            Whether the copy is kept for later runs.
        """
        kept = copy.slot >= 0 and self._read_slot(session, copy.slot) == copy
        if not kept:
            self._remove(session, copy.file)
        return kept

    def forget(self, session: RemoteSession, copy: DeviceCopy) -> None:
        """Drop ``copy`` (one that would not load): its marker, if it still names it, and its file."""
        if self._read_slot(session, copy.slot) == copy:
            self._remove(session, _MARKER.format(copy.slot))
        self._remove(session, copy.file)

    def _choose_slot(self, session: RemoteSession, sha256: str, now: float) -> tuple[int | None, DeviceCopy | None]:
        copies = self.copies(session)
        for slot, copy in enumerate(copies):
            if copy is not None and copy.sha256 == sha256:
                return slot, copy
        for slot, copy in enumerate(copies):
            if copy is None:
                return slot, None
        oldest = min((c for c in copies if c is not None and c.time < now - GRACE_S), key=lambda c: c.time, default=None)
        return (oldest.slot, oldest) if oldest is not None else (None, None)

    def _read_slot(self, session: RemoteSession, slot: int) -> DeviceCopy | None:
        raw, refused = _call(session, session.remote.download, self.path(_MARKER.format(slot)))
        return None if refused is not None else _parse(bytes(raw), slot)  # refused: no marker

    def _remove(self, session: RemoteSession, name: str) -> None:
        _, refused = _call(session, session.remote.remove, self.path(name))
        if refused is not None:
            log.warning("device cache %s: cannot remove %s (%s)", self.directory, name, refused)


def _call(session: RemoteSession, fn: Callable[..., Any], *args: Any) -> tuple[Any, RemoteRunError | None]:
    """``session.call`` for the cache's own calls: the device's refusal is returned, a lost device raised."""
    try:
        return session.call("device cache", fn, *args), None
    except DeviceLost:
        raise
    except RemoteRunError as exc:
        return None, exc


def _parse(raw: bytes, slot: int) -> DeviceCopy | None:
    try:
        record = json.loads(raw)
        copy = DeviceCopy(slot, str(record["sha256"]), int(record["bytes"]), str(record["file"]), float(record["time"]))
    except (ValueError, KeyError, TypeError):
        return None  # partly written, or not ours
    valid = (
        record.get("format") == _FORMAT
        and _HEX.fullmatch(copy.sha256) is not None
        and re.fullmatch(rf"tvmrp-{copy.sha256[:16]}-[0-9a-f]{{12}}\.so", copy.file) is not None
    )
    return copy if valid else None


def _as_bytearray(data: bytes | bytearray) -> bytearray:
    # TVM's RPC sends a bytearray as bytes; a bytes object would be sent as a string.
    return data if isinstance(data, bytearray) else bytearray(data)
