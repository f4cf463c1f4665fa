"""Live device objects behind small handles.

A live RPC session, a loaded module, a VM or a remote tensor cannot be a Prefect task parameter (Prefect
would try to hash or inspect it, prefect#16042), and none may outlive its session. So the flow opens a
session with :func:`opened`, which yields a :class:`SessionRef`; a device stage that creates a live object
keeps it with :func:`keep` and returns the :class:`LiveRef` inside its typed result; the next stage takes
that result as its argument and resolves the ref with :func:`get`.

What a stage produced is its return value: the registry only owns the live objects, one entry per open
session, and drops them all when the session closes. It is thread-safe, so stages of two devices' sessions
can run at the same time (the fleet runs them side by side).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.device import RemoteSession
from pipeline.errors import DeviceError


@dataclass(frozen=True)
class SessionRef:
    """A handle on an open session: what the first device stage receives."""

    id: str
    description: str


@dataclass(frozen=True)
class LiveRef:
    """A handle on a live object of a session (a VM, a remote tensor), valid while the session is open."""

    session: SessionRef
    id: str
    what: str


@dataclass
class _Open:
    session: RemoteSession
    objects: dict[str, Any]


_LOCK = threading.Lock()
_OPEN: dict[str, _Open] = {}


@contextlib.contextmanager
def opened(session: RemoteSession) -> Iterator[SessionRef]:
    """Register ``session`` for the duration of the block; on exit close it, then drop its live objects.

    Closing first matters when the block ends early (an interrupt, a timeout): TVM's destructor of a remote
    object asks the device to free it and waits while the device is still busy with the interrupted call;
    with the connection shut, dropping them is immediate.
    """
    ref = SessionRef(uuid.uuid4().hex, session.description)
    with _LOCK:
        _OPEN[ref.id] = _Open(session, {})
    try:
        yield ref
    finally:
        session.close()
        with _LOCK:
            _OPEN.pop(ref.id, None)


def _entry(ref: SessionRef) -> _Open:
    with _LOCK:
        entry = _OPEN.get(ref.id)
    if entry is None:
        raise DeviceError(f"the session to {ref.description} is closed: open a new one and run the stages again")
    return entry


def session_of(ref: SessionRef) -> RemoteSession:
    """The open session behind ``ref``.

    Raises:
        DeviceError: the session is closed.
    """
    return _entry(ref).session


def device_of(ref: SessionRef, kind: str) -> Any:
    """The device ``kind`` (``cpu`` or ``cuda``) of the session ``ref``: a local handle, no remote call."""
    remote = session_of(ref).remote
    return remote.cuda(0) if kind == "cuda" else remote.cpu(0)


def keep(ref: SessionRef, obj: Any, what: str) -> LiveRef:
    """Keep ``obj`` (created on the session ``ref``) until the session closes; return its handle."""
    live = LiveRef(ref, uuid.uuid4().hex, what)
    entry = _entry(ref)
    with _LOCK:
        entry.objects[live.id] = obj
    return live


def get(live: LiveRef) -> Any:
    """The live object behind ``live``.

    Raises:
        DeviceError: its session is closed.
    """
    entry = _entry(live.session)
    with _LOCK:
        return entry.objects[live.id]
