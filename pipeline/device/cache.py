"""Libraries kept on the device between runs, so that an unchanged library is not uploaded again.

TVM's stock ``rpc_server`` deletes its session directory when a session ends, but an upload whose name is
an absolute path is written there and kept. The server offers upload, download and remove: no listing, no
rename, no checksum, and its upload does not report a failed write (a full disk leaves a short file and no
error). The cache is built from those three calls alone:

- a library is uploaded under a fresh, unguessable name, ``tvmrp-<128 random bits>.so``, and never written
  again, so no run can load a file while another rewrites it, and nobody can plant a file under a name a
  later run will use;
- only once that upload has returned, and the device has shown that the file holds what was sent (below),
  does a *marker* name it: ``tvmrp-slot-<i>.json`` holds the library's sha256, size, file name, upload time
  and an HMAC-SHA256 of all of these and the directory, keyed by a secret that never leaves this client's
  artifact store (``ArtifactStore.device_cache_secret``: ``<store>/.keys/device-cache.key``, mode 0600). The
  marker is read back after it is written: one cut short is a full disk (the library copy and the marker are
  removed, no earlier marker is touched). A run killed mid-upload leaves no marker, so its partial file is
  never loaded; a marker that does not authenticate (forged, copied from another directory, damaged) is
  ignored and removed where the device lets us;
- a run looks its library's sha256 up in the few (:data:`SLOTS`) markers, one small download each;
- a new library takes the slot that held the same digest, else a free slot, else the oldest slot written
  more than :data:`GRACE_S` ago, and removes the file that slot named. A slot younger than that is never
  taken, not even by the same digest: the run that wrote it may not have loaded its copy yet (two runs of
  one library that both found nothing upload it twice), unless the caller does not trust that copy (a retry
  after a lost device or a failed kept copy). When no slot can be taken, nothing is evicted and this run's
  copy is not kept;
- after loading, a run whose marker was overwritten by a concurrent run removes its own (already loaded)
  copy, so racing runs leave no unreferenced file behind.

What the device shows of a file: a device this project starts (the embedded server, a device bundle, the
emulated aarch64 device) registers ``tvmrp.file_info`` (:func:`pipeline.device.probe.file_info`), which tells
a file's size and SHA-256. Every upload is compared with what was sent before anything names or loads it, and
a kept copy is compared again right before it is loaded: a copy overwritten, truncated or swapped on the
device is caught, also with ``--no-check``. A stock server cannot tell either without sending the whole file
back, so there a kept copy is trusted as its authenticated marker describes it, a load that fails because the
file is short is reported as a full disk, and a kept copy whose output fails the run's check is forgotten (the
device chain, ``tasks.chains.device_chain``, then uploads it again). A file replaced between its check and
its load (a few milliseconds) is not caught: the directory must be writable by the rpc_server's user only.

The protocol has one front door used by the ``upload`` and ``load`` stages: :func:`place` finds the kept
copy or uploads, :func:`load_placed` checks and loads it; a kept copy that fails its check, does not load,
or whose VM cannot be created, is forgotten and :class:`~pipeline.errors.KeptCopyFailed` raised, and the
device chain runs again with a fresh upload (the one place that retries).

Trust (docs/security.md): the device runs whatever library it loads. Someone who can write the cache
directory on the device cannot make a run load their file (their markers do not authenticate, they cannot
guess the next file name, and on a device that tells a file's digest a replaced file is caught before it
loads), but on a stock server, in a directory without the sticky bit, they could replace a file we kept
(between runs, after its marker was written): use a directory only the device's rpc_server user can write.
The default for devices other than the embedded one is therefore ``off``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

from pipeline.device import RemoteSession
from pipeline.device.probe import FileInfo, file_info
from pipeline.errors import DeviceDiskFull, DeviceLost, KeptCopyFailed, RemoteRunError, UsageError, clip

log = logging.getLogger(__name__)

T = TypeVar("T")

SLOTS = 4
"""Libraries kept per device directory (ResNet-18: 4 x 47 MB)."""

GRACE_S = 600.0
"""A slot written less than this many seconds ago is not evicted: a concurrent run may be loading it."""

_MARKER = "tvmrp-slot-{}.json"
_FORMAT = 2
_MARKER_LIMIT = 4096  # bytes of a marker read back; ours are ~250
_HEX = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"tvmrp-[0-9a-f]{32}\.so")
#: What a stock server's upload is checked with (it cannot tell a file's size): one page, written after the library.
PROBE_BYTES = b"tvmrp upload check\n" * 216  # 4,104 bytes: more than a page
# What the dynamic loader says of a library file cut short (by a full disk: TVM's upload ignores a failed write).
_SHORT_SIGNS = ("file too short", "past end of file", "unexpected end of file", "ELF file's phentsize")


def check_directory(directory: str) -> str:
    """``directory`` if it is an absolute POSIX path (a directory on the device), else UsageError."""
    if not isinstance(directory, str) or not directory.startswith("/") or "\\" in directory or "\0" in directory:
        raise UsageError(f"--device-cache must be an absolute directory on the device, auto or off (got {clip(repr(directory))})")
    return directory


@dataclass(frozen=True)
class DeviceCopy:
    """A library copy on the device, as an authenticated slot marker records it."""

    slot: int
    sha256: str
    size: int
    file: str
    """Base name of the copy in the cache directory."""
    time: float
    """When it was uploaded (the uploading host's clock, seconds since the epoch)."""


@dataclass(frozen=True)
class DeviceCache:
    """A directory on the device that keeps uploaded libraries between sessions.

    Args:
        directory: Absolute path *on the device*; it must exist there (the server cannot create directories).
        secret: The client's key that authenticates the markers (``ArtifactStore.device_cache_secret``).
        slots: How many libraries it keeps.
    """

    directory: str
    secret: bytes = field(repr=False)
    slots: int = SLOTS

    def __post_init__(self) -> None:
        check_directory(self.directory)
        if not 1 <= self.slots <= 64:
            raise UsageError(f"a device cache keeps 1-64 libraries (got {self.slots})")

    def path(self, name: str) -> str:
        """The device path of ``name`` in the cache directory."""
        return posixpath.join(self.directory, name)

    def copies(self, session: RemoteSession) -> list[DeviceCopy | None]:
        """What each slot holds: None for an empty slot or a marker that does not authenticate."""
        return [self._read_slot(session, slot) for slot in range(self.slots)]

    def find(self, session: RemoteSession, sha256: str, size: int) -> DeviceCopy | None:
        """The kept copy of the library with digest ``sha256`` and ``size`` bytes, if the device keeps one."""
        for copy in self.copies(session):
            if copy is not None and copy.sha256 == sha256 and copy.size == size:
                return copy
        return None

    def put(
        self, session: RemoteSession, data: bytes | bytearray, sha256: str | None = None, *, replace_kept: bool = False
    ) -> DeviceCopy:
        """Upload ``data`` under a fresh name, then record it in a slot (when one can be taken).

        Args:
            sha256: The digest of ``data`` when the caller has checked it already.
            replace_kept: Take the slot of a kept copy of the same library even if it is young (the caller
                does not trust that copy, e.g. after a lost device); by default a young one is left alone.

        Returns:
            The new copy (slot -1 when it is not kept); load it, then call :meth:`settle`.

        Raises:
            DeviceDiskFull: The directory's disk is full (the device holds fewer bytes than were sent, or a
                check file or the marker came back cut short): nothing of this upload is left and the markers
                are as they were.
            RemoteRunError: The directory cannot be written on the device, or the upload arrived changed.
            DeviceTimeout, DeviceLost: As for :meth:`RemoteSession.call`.
        """
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        name = f"tvmrp-{secrets.token_hex(16)}.so"
        session.call("upload", session.remote.upload, _as_bytearray(data), self.path(name))
        try:
            check_written(session, self.path(name), len(data), sha256, where=self.directory,
                          hint="free space there, or give --device-cache a directory on another disk")
        except RemoteRunError:
            self._remove(session, name)
            raise
        now = time.time()
        slot, replaced = self._choose_slot(session, sha256, now, replace_kept)
        copy = DeviceCopy(slot if slot is not None else -1, sha256, len(data), name, now)
        if slot is None:
            log.info("device cache %s: no slot was free or older than %.0f s (or a concurrent run has just kept the "
                     "same library); this copy is not kept", self.directory, GRACE_S)
            return copy
        marker, marker_name = self._marker(copy), _MARKER.format(slot)
        _, refused = _call(session, session.remote.upload, bytearray(marker), self.path(marker_name))
        if refused is not None:
            log.warning("device cache %s: cannot record the upload (%s); this copy is not kept", self.directory, refused)
            return replace(copy, slot=-1)
        back, refused = _call(session, session.remote.download, self.path(marker_name))
        if refused is not None:  # removed meanwhile (by a client with another secret sharing the directory)
            log.warning("device cache %s: the marker of this upload vanished (%s); this copy is not kept",
                        self.directory, refused)
            return replace(copy, slot=-1)
        back = bytes(back)
        if back != marker and marker.startswith(back):
            # Cut short (a concurrent run's marker would differ, not be a prefix): the disk is full. Remove what
            # this upload wrote, then put back the marker it overwrote (the room is there again).
            for leftover in (marker_name, name):
                self._remove(session, leftover)
            if replaced is not None:
                self._restore(session, replaced)
            raise DeviceDiskFull(_disk_full(
                session, self.directory, f"the slot marker written after the library came back with {len(back)} of "
                f"its {len(marker)} bytes", None, "free space there, or give --device-cache a directory on another disk",
            ))
        if replaced is not None and replaced.file != name:
            self._remove(session, replaced.file)
        return copy

    def check(self, session: RemoteSession, copy: DeviceCopy) -> str | None:
        """What is wrong with the kept ``copy`` on the device, or None when it holds what its marker says (or the
        device cannot tell: a stock rpc_server).

        Raises:
            DeviceTimeout, DeviceLost, RemoteRunError: As for :meth:`RemoteSession.call`.
        """
        return _file_problem(session, self.path(copy.file), copy.size, copy.sha256)[0]

    def settle(self, session: RemoteSession, copy: DeviceCopy) -> bool:
        """After ``copy`` (from :meth:`put`) is loaded: remove it unless its slot still names it.

        The server has the library loaded (mapped), so removing the file does not disturb it.

        Returns:
            Whether the copy is kept for later runs.
        """
        kept = copy.slot >= 0 and self._read_slot(session, copy.slot) == copy
        if not kept:
            self._remove(session, copy.file)
        return kept

    def forget(self, session: RemoteSession, copy: DeviceCopy) -> None:
        """Drop ``copy`` (one that would not load): its marker, if it still names it, and its file."""
        if copy.slot >= 0 and self._read_slot(session, copy.slot) == copy:
            self._remove(session, _MARKER.format(copy.slot))
        self._remove(session, copy.file)

    def _mac(self, record: dict[str, Any]) -> str:
        message = json.dumps({**record, "directory": self.directory}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self.secret, message.encode(), hashlib.sha256).hexdigest()

    def _marker(self, copy: DeviceCopy) -> bytes:
        record = {"format": _FORMAT, "sha256": copy.sha256, "bytes": copy.size, "file": copy.file, "time": copy.time}
        return json.dumps({**record, "mac": self._mac(record)}, sort_keys=True).encode()

    def _parse(self, raw: bytes, slot: int) -> DeviceCopy | None:
        """The copy an authenticated marker names; None for anything else (partly written, forged, not ours)."""
        if len(raw) > _MARKER_LIMIT:
            return None
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict) or set(record) != {"format", "sha256", "bytes", "file", "time", "mac"}:
            return None
        mac, sha256, size, name, when = (record[k] for k in ("mac", "sha256", "bytes", "file", "time"))
        valid = (
            record["format"] == _FORMAT
            and isinstance(mac, str) and _HEX.fullmatch(mac) is not None
            and isinstance(sha256, str) and _HEX.fullmatch(sha256) is not None
            and isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 1 << 48
            and isinstance(name, str) and _FILE.fullmatch(name) is not None
            and ((isinstance(when, int) and not isinstance(when, bool) and abs(when) < 2**53)
                 or (isinstance(when, float) and math.isfinite(when)))
        )
        if not valid:
            return None
        body = {k: v for k, v in record.items() if k != "mac"}
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        return DeviceCopy(slot, sha256, size, name, float(when))

    def _choose_slot(
        self, session: RemoteSession, sha256: str, now: float, replace_kept: bool
    ) -> tuple[int | None, DeviceCopy | None]:
        copies = self.copies(session)
        for slot, copy in enumerate(copies):
            if copy is not None and copy.sha256 == sha256:
                # A young one may be a concurrent run's, not loaded yet: leave it unless the caller distrusts it.
                return (slot, copy) if replace_kept or copy.time < now - GRACE_S else (None, None)
        for slot, copy in enumerate(copies):
            if copy is None:
                return slot, None
        oldest = min((c for c in copies if c is not None and c.time < now - GRACE_S), key=lambda c: c.time, default=None)
        return (oldest.slot, oldest) if oldest is not None else (None, None)

    def _read_slot(self, session: RemoteSession, slot: int) -> DeviceCopy | None:
        raw, refused = _call(session, session.remote.download, self.path(_MARKER.format(slot)))
        if refused is not None:
            return None  # no marker
        copy = self._parse(bytes(raw), slot)
        if copy is None and len(raw):
            log.warning("device cache %s: slot %d holds a marker this client did not write; it is ignored",
                        self.directory, slot)
            self._remove(session, _MARKER.format(slot))
        return copy

    def _restore(self, session: RemoteSession, copy: DeviceCopy) -> None:
        """Write ``copy``'s marker again (after a failed write destroyed it); if that fails too, drop its file."""
        marker, marker_name = self._marker(copy), _MARKER.format(copy.slot)
        _, refused = _call(session, session.remote.upload, bytearray(marker), self.path(marker_name))
        back, _ = (None, None) if refused is not None else _call(session, session.remote.download, self.path(marker_name))
        if back is None or bytes(back) != marker:
            self._remove(session, marker_name)
            self._remove(session, copy.file)

    def _remove(self, session: RemoteSession, name: str) -> None:
        _, refused = _call(session, session.remote.remove, self.path(name))
        if refused is not None:
            log.info("device cache %s: cannot remove %s (%s)", self.directory, name, refused)


# -- the protocol: place, then load ------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The library on the device: where it is and how it got there.

    Attributes:
        remote_name: what ``load_module`` takes (a device path, or a name in the session's directory).
        bytes: the library's size.
        seconds: the time of finding or uploading it.
        reused: the device already held it (nothing was sent).
        copy: the cache entry it is (None: uploaded into the session's directory).
    """

    remote_name: str
    bytes: int
    seconds: float
    reused: bool
    copy: DeviceCopy | None = None


def place(
    session: RemoteSession, cache: DeviceCache | None, data: bytes | bytearray, sha256: str, *,
    reuse: bool = True, session_name: str,
) -> Placement:
    """Make the library ``data`` (digest ``sha256``, checked by the caller) available on the device.

    With a cache: its kept copy if ``reuse`` and it has one, else a fresh upload into it; a cache directory
    the device refuses to write falls back, with a warning, to the session's directory, under ``session_name``
    (a full disk does not: the user must free space; for the embedded device it is the store's disk). A fresh
    upload is compared with ``data`` (:func:`check_written`); a kept copy is checked by :func:`load_placed`.

    Raises:
        DeviceDiskFull: the upload was cut short (nothing of it is left, no marker was touched).
        DeviceTimeout, DeviceLost, RemoteRunError: the upload failed.
    """
    start = time.perf_counter()
    if cache is not None:
        copy = cache.find(session, sha256, len(data)) if reuse else None
        if copy is not None:
            return Placement(cache.path(copy.file), len(data), time.perf_counter() - start, True, copy)
        try:
            copy = cache.put(session, data, sha256, replace_kept=not reuse)
            return Placement(cache.path(copy.file), len(data), time.perf_counter() - start, False, copy)
        except (DeviceLost, DeviceDiskFull):
            raise
        except RemoteRunError as exc:
            log.warning("cannot write the device cache %s on %s (%s): uploading into the session's directory; "
                        "give --device-cache an existing writable directory on the device, or off",
                        cache.directory, session.description, exc)
    session.call("upload", session.remote.upload, _as_bytearray(data), session_name)
    try:
        check_written(session, session_name, len(data), sha256, where="the session's directory",
                      hint="free space there (TVM's rpc_server writes a session's files under its temporary directory)")
    except RemoteRunError:
        _call(session, session.remote.remove, session_name)
        raise
    return Placement(session_name, len(data), time.perf_counter() - start, False)


def load_placed(
    session: RemoteSession, cache: DeviceCache | None, placement: Placement, load: Callable[[str], T],
) -> tuple[T, Placement]:
    """Check a kept copy, then ``load(placement.remote_name)``; settle a fresh copy.

    Args:
        load: loads a device path and returns what the caller needs (module, VM); raises RemoteRunError
            when the device refuses it.

    Returns:
        What ``load`` returned and the placement.

    Raises:
        KeptCopyFailed: the kept copy is not what its marker says (on a device that tells), or it did not
            load: it is forgotten (marker and file removed); upload again.
        DeviceDiskFull: a fresh upload did not load because the file is short (a stock server, which cannot tell).
        RemoteRunError: loading a fresh upload failed.
        DeviceTimeout, DeviceLost: As for :meth:`RemoteSession.call`.
    """
    kept = placement.copy if placement.reused and cache is not None else None
    if kept is not None and cache is not None:
        problem = cache.check(session, kept)
        if problem is not None:
            cache.forget(session, kept)
            raise KeptCopyFailed(
                f"the copy of the library that {session.description} kept ({placement.remote_name}) {problem}: "
                "it was not loaded, and is forgotten and removed"
            )
    try:
        loaded = load(placement.remote_name)
    except DeviceLost:
        raise
    except RemoteRunError as exc:
        if placement.copy is not None and cache is not None:
            cache.forget(session, placement.copy)  # a marker never names a copy known not to load
        if kept is not None:
            raise KeptCopyFailed(
                f"the copy of the library that {session.description} kept ({placement.remote_name}) did not load "
                f"({clip(exc)}): it is forgotten and removed"
            ) from exc
        if any(sign in str(exc) for sign in _SHORT_SIGNS):
            raise DeviceDiskFull(_disk_full(
                session, posixpath.dirname(placement.remote_name) or "the session's directory",
                f"the library loaded from {placement.remote_name} is shorter than the {placement.bytes:,} bytes "
                f"sent ({clip(exc, 120)})", None, "free space there",
            )) from exc
        raise
    if placement.copy is not None and not placement.reused and cache is not None:
        cache.settle(session, placement.copy)  # the device holds the library loaded: its file may go
    return loaded, placement


def check_written(session: RemoteSession, path: str, size: int, sha256: str, *, where: str, hint: str) -> bool:
    """Whether the device showed that ``path`` holds the ``size`` bytes with digest ``sha256`` just uploaded.

    A device that tells a file's size and digest (``tvmrp.file_info``) is asked. A stock rpc_server cannot tell
    them, so a small check file (:data:`PROBE_BYTES`) is written next to ``path``, read back and removed: TVM's
    upload ignores a failed write, and a disk too full for the library leaves that file short too. Then False
    (not checked: the library itself may still be short if space was freed in between).

    Raises:
        DeviceDiskFull: it holds fewer bytes (the disk holding ``where`` is full), or the check file came back
            short. The caller removes the file.
        RemoteRunError: it holds other bytes, or cannot be read. The caller removes the file.
        DeviceTimeout, DeviceLost: As for :meth:`RemoteSession.call`.
    """
    problem, info = _file_problem(session, path, size, sha256)
    if info is None:
        probe_path, probe = f"{path}.check", bytearray(PROBE_BYTES)
        _, refused = _call(session, session.remote.upload, probe, probe_path)
        back, _ = (None, None) if refused is not None else _call(session, session.remote.download, probe_path)
        _call(session, session.remote.remove, probe_path)
        if back is not None and len(back) < len(probe):
            raise DeviceDiskFull(_disk_full(
                session, where, f"a {len(probe):,}-byte check file written right after the library came back with "
                f"{len(back):,} bytes", None, hint,
            ))
        return False
    if problem is None:
        return True
    if info.size is not None and info.size < size:
        raise DeviceDiskFull(_disk_full(session, where, f"{posixpath.basename(path)} {problem}", info.free, hint))
    raise RemoteRunError(f"the library uploaded to {session.description} as {path} {problem}: {hint}")


def _file_problem(session: RemoteSession, path: str, size: int, sha256: str) -> tuple[str | None, FileInfo | None]:
    """What is wrong with ``path`` on the device against ``size`` and ``sha256`` (None: nothing, or the device
    cannot tell), and what the device told (a FileInfo, or None from a stock rpc_server)."""
    info = file_info(session, path)
    if info is None:
        return None, None
    if info.error is not None or info.size is None:
        return f"cannot be read there ({info.error})", info
    if info.size < size:
        return f"holds {info.size:,} of the {size:,} bytes sent", info
    if info.size != size:
        return f"holds {info.size:,} bytes, not the {size:,} sent", info
    if info.sha256 != sha256:
        return "has the size sent but another SHA-256 than the library's", info
    return None, info


def _disk_full(session: RemoteSession, where: str, evidence: str, free: int | None, hint: str) -> str:
    """The one line that says the device's disk is full."""
    room = "" if free is None else f", {free:,} bytes free"
    return (f"the disk of {session.description} that holds {where} is full ({evidence}{room}; TVM's upload does not "
            f"report a failed write): {hint}")


def _call(session: RemoteSession, fn: Callable[..., Any], *args: Any) -> tuple[Any, RemoteRunError | None]:
    """``session.call`` for the cache's own calls: the device's refusal is returned, a lost device raised."""
    try:
        return session.call("device cache", fn, *args), None
    except DeviceLost:
        raise
    except RemoteRunError as exc:
        return None, exc


def _as_bytearray(data: bytes | bytearray) -> bytearray:
    # TVM's RPC sends a bytearray as bytes; a bytes object would be sent as a string.
    return data if isinstance(data, bytearray) else bytearray(data)
