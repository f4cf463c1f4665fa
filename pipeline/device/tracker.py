"""The RPC tracker, spoken to with TVM's own protocol helpers, every exchange bounded in time.

``TrackerSession.request`` of TVM waits forever for an unknown key, retries a refused tracker for 60 s and
does not tell which server it handed out; :func:`request_server` does none of that. :func:`tracker_summary`
is what ``python -m tvm.exec.query_rpc_tracker`` shows; :func:`known_keys` turns it into a sentence for a
key that got no device.
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import struct
from typing import Any

from pipeline.device.calls import secs
from pipeline.errors import DeviceUnavailable

__all__ = ["ServerGrant", "known_keys", "request_server", "tracker_summary"]

_SUMMARY_LIMIT_S = 5.0


@dataclasses.dataclass(frozen=True)
class ServerGrant:
    """A server the tracker handed out for a key: connect to ``host:port`` with ``matchkey``."""

    host: str
    port: int
    matchkey: str


def tracker_summary(host: str, port: int, timeout: float) -> dict[str, Any]:
    """The tracker's summary: ``queue_info`` {key: {free, pending}} and ``server_info`` [{key, addr}].

    A server registered under key K is listed in ``server_info`` with ``key == "server:K"`` and
    ``addr == [host, port]``.

    Raises:
        DeviceUnavailable: The tracker is not reachable or gave no summary within ``timeout``.
    """
    from tvm.rpc import base

    try:
        answer = _exchange(host, port, [base.TrackerCode.SUMMARY], timeout, timeout)
    except TimeoutError:
        raise DeviceUnavailable(f"RPC tracker {host}:{port} gave no summary within {secs(timeout)} s.") from None
    if not (isinstance(answer, list) and len(answer) == 2 and answer[0] == base.TrackerCode.SUCCESS):
        raise DeviceUnavailable(f"RPC tracker {host}:{port} answered a summary request with {answer!r}.")
    return dict(answer[1])


def request_server(host: str, port: int, key: str, connect_timeout: float, request_timeout: float) -> ServerGrant:
    """Asks the tracker at ``host:port`` for a free server registered under ``key``.

    Args:
        connect_timeout: Seconds to reach the tracker and complete its handshake.
        request_timeout: Seconds to wait for a free server of ``key``.

    Raises:
        DeviceUnavailable: The tracker is not reachable or misbehaves, or it handed out no server within
            ``request_timeout`` (the message lists the keys it knows, see :func:`known_keys`).
    """
    from tvm.rpc import base

    try:
        answer = _exchange(host, port, [base.TrackerCode.REQUEST, key, "", 1], connect_timeout, request_timeout)
    except TimeoutError:
        raise DeviceUnavailable(
            f"Tracker {host}:{port} handed out no device for key {key!r} within "
            f"{secs(request_timeout)} s. {known_keys(host, port, key, connect_timeout)}"
        ) from None
    if not (isinstance(answer, list) and len(answer) == 2 and answer[0] == base.TrackerCode.SUCCESS):
        raise DeviceUnavailable(f"Tracker {host}:{port} answered the request for key {key!r} with {answer!r}.")
    server_host, server_port, matchkey = answer[1]
    return ServerGrant(str(server_host), int(server_port), str(matchkey))


def known_keys(host: str, port: int, key: str, timeout: float) -> str:
    """A sentence on the keys the tracker knows, to explain why ``key`` got no device."""
    try:
        summary = tracker_summary(host, port, min(timeout, _SUMMARY_LIMIT_S))
    except DeviceUnavailable as exc:
        return f"Its keys could not be listed ({exc})."
    servers = collections.Counter(
        str(info.get("key", "")).removeprefix("server:") for info in summary.get("server_info", [])
    )
    free = {name: int(info.get("free", 0)) for name, info in summary.get("queue_info", {}).items()}
    known = sorted(set(servers) | {name for name, count in free.items() if count})
    listing = ", ".join(f"{name} ({servers.get(name, 0)} server(s), {free.get(name, 0)} free)" for name in known)
    register = f"python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
    if key in known:
        return (
            f"Key {key!r} has {servers.get(key, 0)} server(s), all busy; retry later or allow a longer request "
            f"timeout. Keys it knows: {listing}."
        )
    if not known:
        return f"No device is registered with it. Register one ({register}) or fix --tracker."
    return f"Keys it knows: {listing}. Fix --key, or register a device under {key!r} ({register})."


def _exchange(host: str, port: int, message: list[Any], connect_timeout: float, answer_timeout: float) -> Any:
    """Sends one message to a TVM RPC tracker and returns its answer.

    Raises:
        DeviceUnavailable: The tracker is not reachable or does not complete the handshake within
            ``connect_timeout``, is not a tracker, or drops the connection.
        TimeoutError: It gave no answer within ``answer_timeout``.
    """
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise DeviceUnavailable(
            f"RPC tracker {host}:{port} is not reachable ({exc}); start it "
            f"(python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}) or fix --tracker."
        ) from exc
    with sock:
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        except OSError as exc:
            raise DeviceUnavailable(
                f"{host}:{port} accepted the connection but did not complete the RPC tracker handshake "
                f"({exc}); check that it is a TVM rpc_tracker, or fix --tracker."
            ) from exc
        if magic != base.RPC_TRACKER_MAGIC:
            raise DeviceUnavailable(f"{host}:{port} is not a TVM RPC tracker; fix --tracker.")
        try:
            base.sendjson(sock, message)
            sock.settimeout(answer_timeout)
            return base.recvjson(sock)
        except TimeoutError:
            raise
        except (OSError, ValueError) as exc:
            raise DeviceUnavailable(f"RPC tracker {host}:{port} dropped the connection ({exc}); check it.") from exc
