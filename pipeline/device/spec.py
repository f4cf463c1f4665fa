"""Where the device is and how long to wait for it: :class:`DeviceSpec`, validated where the flow starts."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from pipeline.errors import UsageError, clip

__all__ = ["SESSION_MARGIN_S", "DeviceSpec", "check_port", "check_seconds", "split_host_port"]

# A session may last its slowest call plus this much (connect, small calls, closing) by default.
SESSION_MARGIN_S = 60.0


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Where the device is and how long to wait for it.

    Exactly one of three kinds (see :attr:`kind`): nothing set (``local``: a server we start), ``host`` +
    ``port`` (a running ``rpc_server``), or ``tracker`` (``"HOST:PORT"``) + ``key``.

    Attributes:
        host: Address of a running ``rpc_server``.
        port: Its port.
        tracker: ``"HOST:PORT"`` of an RPC tracker.
        key: The device key registered with the tracker.
        connect_timeout: Seconds to open a session directly (or to reach the tracker).
        request_timeout: Seconds to wait for the tracker to hand out a device for ``key``.
        call_timeout: Seconds any single remote call may take (upload, load, set_input, run, ...).
        session_timeout: Seconds the whole session may last, enforced by the device's ``rpc_server``
            (TVM's ``session_timeout``): when it expires the server ends the session process, answers the
            client with ``RPCSessionTimeoutError`` and takes the next client. Everything done on one
            session (upload, load, set_input, run, ...) must finish within it. It is also what frees the
            device when the client vanished without closing (killed, network cut): without it the server
            keeps serving the dead session, and a one-session server refuses everyone else, for as long as
            the operating system keeps the connection open (minutes to hours). None (the default) means
            ``call_timeout + 60``; 0 means never (the old TVM default). See :attr:`session_seconds`.
    """

    host: str | None = None
    port: int | None = None
    tracker: str | None = None
    key: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    call_timeout: float = 300.0
    session_timeout: float | None = None

    @property
    def kind(self) -> str:
        """``"tracker"`` if a tracker is set, else ``"host"`` if a host is set, else ``"local"``."""
        if self.tracker is not None:
            return "tracker"
        if self.host is not None:
            return "host"
        return "local"

    @property
    def session_seconds(self) -> float:
        """The session timeout passed to TVM: :attr:`session_timeout`, or ``call_timeout + 60`` if None."""
        if self.session_timeout is None:
            return float(self.call_timeout) + SESSION_MARGIN_S
        return float(self.session_timeout)

    @property
    def tracker_address(self) -> tuple[str, int]:
        """``(host, port)`` of :attr:`tracker`.

        Raises:
            UsageError: No tracker is set, or it is not ``HOST:PORT``.
        """
        if self.tracker is None:
            raise UsageError("No tracker given: pass --tracker HOST:PORT together with --key KEY.")
        return split_host_port(self.tracker)

    def validate(self) -> None:
        """Checks that the spec names one kind of device completely and that its numbers make sense.

        Raises:
            UsageError: Host without port (or port without host), tracker not ``HOST:PORT``, tracker
                without key (or key without tracker), both host and tracker, a port outside 1-65535, a
                timeout that is not a positive finite number (``session_timeout`` may be 0 or None).
        """
        self._validate_host()
        self._validate_tracker()
        for name in ("connect_timeout", "request_timeout", "call_timeout"):
            check_seconds(name, getattr(self, name), allow_zero=False)
        if self.session_timeout is not None:
            check_seconds("session_timeout", self.session_timeout, allow_zero=True)

    def describe(self, server: Any = None) -> str:
        """A short name of the device for messages.

        Args:
            server: For kind ``local``, the embedded server, whose address is then included.

        Returns:
            ``"embedded 127.0.0.1:PORT"`` (or ``"embedded rpc_server"`` without a server),
            ``"HOST:PORT"``, or ``"tracker HOST:PORT key=KEY"``.
        """
        if self.kind == "tracker":
            return f"tracker {self.tracker} key={self.key}"
        if self.kind == "host":
            return f"{self.host}:{self.port}"
        if server is None:
            return "embedded rpc_server"
        host, port = server.address
        return f"embedded {host}:{port}"

    def _validate_host(self) -> None:
        if self.host is not None and self.tracker is not None:
            raise UsageError(
                f"Both --host {self.host} and --tracker {self.tracker} given: use --host/--port for a "
                "server you reach directly, or --tracker/--key to get one from a tracker, not both."
            )
        if self.host is not None:
            if not str(self.host).strip():
                raise UsageError("--host is empty: give the address of the rpc_server, e.g. --host 192.168.1.20.")
            if self.port is None:
                raise UsageError(
                    f"--host {self.host} needs --port: the port its rpc_server listens on (often 9090)."
                )
        elif self.port is not None:
            raise UsageError(f"--port {self.port} needs --host: the address of the rpc_server.")
        if self.port is not None:
            check_port(self.port, "--port")

    def _validate_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker_address  # noqa: B018 - raises UsageError if malformed
            if not self.key:
                raise UsageError(
                    f"--tracker {self.tracker} needs --key: the device key the servers registered with "
                    f"(python -m tvm.exec.query_rpc_tracker --host HOST --port PORT lists them)."
                )
        elif self.key is not None:
            raise UsageError(f"--key {self.key} needs --tracker HOST:PORT: keys are looked up at a tracker.")


def split_host_port(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9190"`` for IPv6) as ``(host, port)``.

    HOST is a name or an address: printable, without whitespace or brackets (but those around an IPv6
    address); PORT is a whole number from 1 to 65535 in ASCII digits. Spaces around either are ignored.

    Raises:
        UsageError: Not ``HOST:PORT``, or the port is outside 1-65535 (the text is echoed clipped).
    """
    text = str(text)
    host, sep, port_text = text.rpartition(":")
    host, port_text = host.strip(), port_text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not _is_host(host) or not _DIGITS.fullmatch(port_text):
        raise UsageError(f"Tracker address {clip(text)!r} is not HOST:PORT; give e.g. --tracker 127.0.0.1:9190.")
    port = int(port_text) if len(port_text) <= 9 else None  # int() refuses over 4300 digits
    if port is None or not 1 <= port <= 65535:
        raise UsageError(
            f"port of tracker {clip(text)!r} must be a whole number from 1 to 65535, not {clip(port_text, 20)}."
        )
    return host, port


_DIGITS = re.compile(r"[0-9]+")


def _is_host(host: str) -> bool:
    return bool(host) and host.isprintable() and not any(c.isspace() or c in "[]" for c in host)


def check_port(port: Any, what: str) -> None:
    """Raises UsageError naming ``what`` unless ``port`` is a whole number from 1 to 65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        try:
            shown = clip(repr(port), 40)
        except ValueError:  # an int of more than 4300 digits has no repr
            shown = f"a number of {port.bit_length()} bits"
        raise UsageError(f"{what} must be a whole number from 1 to 65535, not {shown}.")


def check_seconds(name: str, value: Any, *, allow_zero: bool) -> None:
    """Raises UsageError naming ``name`` unless ``value`` is a finite number of seconds (> 0, or >= 0)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = "0 or more" if allow_zero else "more than 0"
        raise UsageError(f"{name} must be a number of seconds, {bound}, not {value!r}.")
