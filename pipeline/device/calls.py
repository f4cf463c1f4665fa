"""Bounded calls into TVM, and what TVM's errors mean.

TVM waits forever for a hung or stopped device; :func:`run_bounded` waits for a call in another thread for
a bounded time instead. The rest reads TVM's exceptions: whether one came from TVM at all, its informative
line, whether it says the connection was lost or the server's session timeout expired.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "Abandoned",
    "is_lost_connection",
    "is_session_expiry",
    "is_tvm_error",
    "run_bounded",
    "secs",
    "tvm_message",
]

T = TypeVar("T")

MESSAGE_LIMIT = 300
# What TVM says when the other end of the session went away mid-call.
LOST_SIGNS = ("kShutdown", "Broken pipe", "Connection reset", "connection reset", "Connection closed", "EOF")


class Abandoned(Exception):
    """The bounded function did not return in time; its thread was left behind."""


def run_bounded(fn: Callable[[], T], timeout: float, name: str) -> T:
    """Runs ``fn`` in a daemon thread and waits at most ``timeout`` seconds for it.

    A call blocked inside TVM cannot be interrupted; TVM releases the GIL while it waits on its socket,
    so this thread's wait ends on time and the blocked thread is abandoned.

    Raises:
        Abandoned: ``fn`` had not returned in time.
        BaseException: Whatever ``fn`` raised.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed over to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Abandoned(name)
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]


def is_tvm_error(exc: BaseException) -> bool:
    """True for an error that came out of TVM (or its sockets)."""
    # tvm_ffi marks every error that crossed the FFI, whatever Python class it was mapped to.
    return hasattr(exc, "__tvm_ffi_error__") or isinstance(exc, RuntimeError | OSError)


def tvm_message(exc: BaseException) -> str:
    """The first informative line of a TVM error (RPC errors start with a generic header line), capped."""
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.endswith("Error caught from RPC call:"):
            continue
        if len(line) > MESSAGE_LIMIT:
            line = line[: MESSAGE_LIMIT - 3] + "..."
        return line
    return type(exc).__name__


def is_lost_connection(message: str) -> bool:
    """True if a TVM error message (see :func:`tvm_message`) says the other end went away mid-call."""
    return any(sign in message for sign in LOST_SIGNS)


def is_session_expiry(exc: BaseException) -> bool:
    """True if the server ended the session because its ``session_timeout`` expired."""
    return any(cls.__name__ == "RPCSessionTimeoutError" for cls in type(exc).__mro__)


def secs(seconds: float) -> str:
    """Seconds for messages: ``"3"``, ``"2.5"``, ``"300"``."""
    return f"{seconds:.0f}" if seconds >= 10 or seconds == int(seconds) else f"{seconds:.1f}"
