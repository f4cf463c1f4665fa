"""Live device sessions, referenced by small handles.

A live RPC session cannot be a Prefect task parameter (Prefect would try to hash or inspect it), so the
flow opens the session, registers it here and passes the :class:`SessionRef` to the device stages. The
registry is per process: the device stages run in the flow's process.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.device import RemoteSession
from pipeline.errors import DeviceError


@dataclass(frozen=True)
class SessionRef:
    """A handle on a live session: what device stages receive."""

    id: str
    description: str


@dataclass
class LiveSession:
    """A session and what the device stages have put on it so far."""

    session: RemoteSession
    state: dict[str, Any] = field(default_factory=dict)

    def need(self, name: str, stage: str) -> Any:
        """The value ``name`` a previous stage left, or a DeviceError naming the stage that must run first."""
        if name not in self.state:
            raise DeviceError(f"no {name} on {self.session.description}: run the {stage} stage first")
        return self.state[name]


_LIVE: dict[str, LiveSession] = {}


@contextlib.contextmanager
def registered(session: RemoteSession) -> Iterator[SessionRef]:
    """Register ``session`` for the duration of the block."""
    ref = SessionRef(uuid.uuid4().hex, session.description)
    _LIVE[ref.id] = LiveSession(session)
    try:
        yield ref
    finally:
        _LIVE.pop(ref.id, None)


def live(ref: SessionRef) -> LiveSession:
    """The live session behind ``ref``."""
    try:
        return _LIVE[ref.id]
    except KeyError:
        raise DeviceError(f"the session to {ref.description} is closed") from None
