"""Sessions on a device: :class:`RemoteSession` with bounded calls, :func:`open_session`, and :class:`Device`.

An ``rpc_server`` serves one session at a time: a second client waits until the first one is closed. Close
sessions explicitly (context managers). Every session asks the server for a session timeout
(:attr:`DeviceSpec.session_seconds`), so that a client that vanished does not hold the device forever.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.device.calls import (
    Abandoned,
    is_lost_connection,
    is_session_expiry,
    is_tvm_error,
    run_bounded,
    secs,
    tvm_message,
)
from pipeline.device.servers import EmbeddedServer
from pipeline.device.spec import DeviceSpec
from pipeline.device.tracker import request_server
from pipeline.errors import DeviceLost, DeviceTimeout, DeviceUnavailable, RemoteRunError, UsageError, clip

if TYPE_CHECKING:
    import tvm
    from tvm.rpc.client import RPCSession

__all__ = ["Device", "RemoteSession", "open_session"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_CLOSE_WAIT_S = 3.0


class RemoteSession:
    """An open TVM RPC session whose remote calls are bounded in time.

    Closing it also shuts down its TCP connection (when it could be identified at connect time), because
    TVM keeps a session alive while anything from it lives, and some objects leak in TVM itself: in
    apache-tvm 0.27 a tensor returned by ``VirtualMachine.get_outputs`` keeps the session open until the
    process exits, which would leave a one-session ``rpc_server`` busy for everyone else.

    Not thread-safe: use one session from one thread at a time.

    Attributes:
        description: The device as messages name it (see :meth:`DeviceSpec.describe`).
        call_timeout: Default timeout of :meth:`call`, seconds.
    """

    def __init__(
        self,
        remote: RPCSession,
        description: str,
        call_timeout: float = 300.0,
        connection: socket.socket | None = None,
    ) -> None:
        """Wraps an open session.

        Args:
            remote: The TVM session.
            description: The device, for messages.
            call_timeout: Default timeout of :meth:`call`, seconds.
            connection: A duplicate of the session's socket, shut down by :meth:`close`; owned by this object.
        """
        self._remote: RPCSession | None = remote
        self._connection = connection
        self.description = description
        self.call_timeout = call_timeout
        self._broken_by: str | None = None

    @property
    def remote(self) -> RPCSession:
        """The ``tvm.rpc.RPCSession``; call it through :meth:`call`.

        Raises:
            DeviceUnavailable: The session was closed.
        """
        if self._remote is None:
            raise DeviceUnavailable(f"The session to {self.description} is closed; open a new one.")
        return self._remote

    @property
    def broken(self) -> bool:
        """True after a call timed out; no further calls are made on a broken session."""
        return self._broken_by is not None

    @property
    def peer(self) -> tuple[str, int] | None:
        """``(host, port)`` of the server at the other end (no remote call); None if not identified or closed."""
        if self._connection is None:
            return None
        try:
            host, port = self._connection.getpeername()[:2]
        except OSError:
            return None
        return str(host), int(port)

    def call(self, what: str, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Runs ``fn(*args, **kwargs)``, a call that talks to the device, bounded in time.

        Args:
            what: What the call does, for messages (``"upload"``, ``"load"``, ``"run"``, ...).
            fn: The callable, e.g. ``session.remote.load_module`` or ``vm.invoke_stateful``.
            timeout: Seconds to wait; the session's ``call_timeout`` if None.

        Returns:
            What ``fn`` returned.

        Raises:
            DeviceTimeout: No answer within the timeout, or the server's session timeout expired. The
                session is then broken: its connection is shut down, which ends the blocked call (it cannot
                be interrupted otherwise) as soon as the device notices.
            DeviceUnavailable: The session is closed or broken by an earlier timeout.
            RemoteRunError: TVM raised an error (the device answered with one); :class:`DeviceLost` when
                the connection failed.
            Exception: Errors that did not come from TVM (e.g. a TypeError in ``fn``) pass unchanged.
        """
        if self._broken_by is not None:
            raise DeviceUnavailable(
                f"{what} on {self.description} was not tried: an earlier call ({self._broken_by}) timed out "
                "and the session was given up. Open a new session; restart the device's rpc_server if it "
                "does not answer."
            )
        self.remote  # noqa: B018 - raises DeviceUnavailable if closed
        seconds = self.call_timeout if timeout is None else timeout
        try:
            return run_bounded(functools.partial(fn, *args, **kwargs), seconds, f"tvm-rpc {what}")
        except Abandoned:
            self._give_up(what)
            raise DeviceTimeout(
                f"{what} on {self.description} did not answer within {secs(seconds)} s. The device may be "
                "hung, overloaded or cut off: check it (restart its rpc_server if needed) and retry, or "
                "allow more time with a larger call timeout if the call is just slow."
            ) from None
        except Exception as exc:
            translated = self._translate(what, exc)
            if translated is None:
                raise
            raise translated from exc

    def device(self) -> tvm.runtime.Device:
        """The remote CPU, ``remote.cpu(0)`` (a local handle: no remote call)."""
        return self.remote.cpu(0)

    def upload(self, path: str | os.PathLike[str], target_name: str | None = None) -> str:
        """Copies a local file into the session's working directory on the device.

        Args:
            path: The local file.
            target_name: Its name on the device (a plain file name); the local base name if None.

        Returns:
            The remote file name, for ``remote.load_module``.

        Raises:
            OSError: The local file cannot be read.
            UsageError: ``target_name`` is not a plain file name.
            DeviceTimeout, DeviceUnavailable, RemoteRunError: As for :meth:`call`.
        """
        name = target_name if target_name is not None else os.path.basename(os.fspath(path))
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UsageError(f"Remote file name {name!r} must be a plain file name, without directories.")
        # Read here so that a missing local file is not reported as a device error.
        data = bytearray(Path(path).read_bytes())
        self.call("upload", self.remote.upload, data, name)
        return name

    def close(self) -> None:
        """Ends the session: drops this object's reference to it and shuts its connection down.

        Idempotent; waits at most a few seconds. Modules, VMs and tensors obtained from the session are
        unusable afterwards.
        """
        remote, self._remote = self._remote, None
        if remote is not None:
            holder = [remote]
            del remote
            # The last reference runs TVM's destructor, which says goodbye to the server: not in this thread.
            releaser = threading.Thread(target=holder.clear, name="tvm-rpc close", daemon=True)
            releaser.start()
            releaser.join(_CLOSE_WAIT_S)
        self._shut_connection()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._remote is None else ("broken" if self.broken else "open")
        return f"RemoteSession({self.description!r}, {state})"

    def _translate(self, what: str, exc: Exception) -> Exception | None:
        """The pipeline's error for ``exc`` raised by a remote call; None if ``exc`` is not TVM's."""
        if is_session_expiry(exc):
            self._give_up(what)
            return DeviceTimeout(
                f"{what} on {self.description}: the server ended the session because its session timeout "
                f"expired ({tvm_message(exc)}). Everything on one session must finish within it: raise the "
                "session timeout (by default the call timeout + 60 s), or set it to 0 for none."
            )
        if not is_tvm_error(exc):
            return None
        message = tvm_message(exc)
        if is_lost_connection(message):
            return DeviceLost(f"{what} on {self.description} failed: the connection was lost ({message})")
        return RemoteRunError(f"{what} on {self.description} failed: {message}")

    def _give_up(self, what: str) -> None:
        self._broken_by = what
        self._shut_connection()

    def _shut_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()


def open_session(spec: DeviceSpec, server: EmbeddedServer | None = None) -> RemoteSession:
    """Opens a session to the device ``spec`` names; every step is bounded in time.

    The session asks the server to end it after :attr:`DeviceSpec.session_seconds`.

    Args:
        spec: The device. Validated here.
        server: For kind ``local``, the embedded server to connect to (started here if it was not, then
            waited for). Ignored for the other kinds.

    Returns:
        An open session; close it (``with open_session(...) as session:``).

    Raises:
        UsageError: Invalid spec, or kind ``local`` without a server (or with one registered at a tracker).
        DeviceUnavailable: Nothing listens at host:port, no handshake within ``connect_timeout`` (server
            busy with another session, hung, or not an rpc_server), the tracker is not reachable, or it
            handed out no device for the key within ``request_timeout`` (the message lists the keys it knows).
    """
    spec.validate()
    if spec.kind == "tracker":
        return _open_via_tracker(spec)
    if spec.kind == "host":
        assert spec.host is not None and spec.port is not None
        return _open_direct(spec.host, spec.port, spec, spec.describe())
    if server is None:
        raise UsageError(
            "No device given: pass --host/--port of an rpc_server or --tracker/--key, or start an "
            "embedded server (EmbeddedServer) and pass it to open_session."
        )
    if server.tracker is not None:
        raise UsageError(
            f"The embedded server registers with tracker {server.tracker}: open the session with "
            f"DeviceSpec(tracker={server.tracker!r}, key={server.key!r})."
        )
    host, port = server.wait_ready()
    return _open_direct(host, port, spec, spec.describe(server))


def _open_direct(
    host: str, port: int, spec: DeviceSpec, description: str, matchkey: str = ""
) -> RemoteSession:
    """``rpc.connect`` bounded by ``spec.connect_timeout``; ``matchkey`` is the one a tracker handed out."""
    from tvm import rpc

    before = _open_fds()

    def connect() -> RPCSession:
        return rpc.connect(host, port, matchkey, session_timeout=spec.session_seconds)

    try:
        remote = run_bounded(connect, spec.connect_timeout, f"tvm-rpc connect {host}:{port}")
    except Abandoned:
        raise DeviceUnavailable(
            f"{host}:{port} accepted the connection but gave no RPC handshake within "
            f"{secs(spec.connect_timeout)} s: its rpc_server is busy with another session, hung, or it is "
            "not a TVM rpc_server. Close other sessions or restart the server there."
        ) from None
    except Exception as exc:
        if not is_tvm_error(exc):
            raise
        raise _connect_error(host, port, exc) from exc
    connection = _new_connection(before, host, port)
    if connection is None:
        logger.info("session to %s: its socket was not identified; close() relies on TVM alone", description)
    logger.info("session opened to %s (session timeout %s s)", description, secs(spec.session_seconds))
    return RemoteSession(remote, description, spec.call_timeout, connection)


def _connect_error(host: str, port: int, exc: BaseException) -> DeviceUnavailable:
    message = tvm_message(exc)
    if "Connect to" in message and "failed" in message:
        return DeviceUnavailable(
            f"Nothing accepts connections at {host}:{port}. Start an rpc_server there "
            f"(python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}) or fix --host/--port."
        )
    if any(sign in message for sign in _TVM_HANDSHAKE_REFUSALS):
        return DeviceUnavailable(
            f"Cannot open a session to the rpc_server at {host}:{port}: {message}. If that server registers "
            "with a tracker, connect through --tracker/--key instead."
        )
    # Anything else went wrong inside TVM's handshake, on bytes the other end sent (TVM then says things like
    # "basic_string::_M_replace_aux" or "is not TVM RPC server"): that program does not speak TVM RPC.
    return DeviceUnavailable(
        f"{host}:{port} accepted the connection but is not a TVM RPC server: its answer to the handshake made no "
        f"sense ({clip(message, 120)}). Check --host/--port: another program listens there."
    )


# What TVM's handshake says when a real rpc_server (or tracker-registered one) refuses the session.
_TVM_HANDSHAKE_REFUSALS = ("cannot find server that matches key", "server already have key")


def _open_fds() -> set[tuple[int, int, int]]:
    """The open descriptors as ``(fd, st_dev, st_ino)``: a descriptor number closed and reused for another file
    (a socket garbage-collected while ``rpc.connect`` ran, say) counts as new."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = {int(name) for name in os.listdir(directory)}
        except (OSError, ValueError):
            continue
        # The descriptor listdir itself used is closed now, and fstat drops it.
        return {identity for fd in listed if (identity := _identity(fd)) is not None}
    return set()


def _identity(fd: int) -> tuple[int, int, int] | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return fd, info.st_dev, info.st_ino


def _new_connection(before: set[tuple[int, int, int]], host: str, port: int) -> socket.socket | None:
    """A duplicate of the one TCP socket opened since ``before`` that is connected to host:port.

    TVM does not expose the socket of a session; the descriptors opened during ``rpc.connect`` do (by number
    and inode: the number may be one that was closed meanwhile). None if there is not exactly one (another
    thread connecting to the same server at the same moment): a socket that might not be ours is never touched.
    """
    try:
        peers = {info[4][:2] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    found: list[socket.socket] = []
    for fd, _, _ in _open_fds() - before:
        sock = _socket_of(fd)
        if sock is None:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[:2] in peers:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    if len(found) == 1:
        return found[0]
    for sock in found:
        sock.close()
    return None


def _socket_of(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of ``fd``, or None if ``fd`` is gone or not a socket."""
    try:
        duplicate = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None


def _open_via_tracker(spec: DeviceSpec) -> RemoteSession:
    """Asks the tracker for a device of ``spec.key`` (:func:`request_server`), then connects to it."""
    host, port = spec.tracker_address
    key = str(spec.key)
    grant = request_server(host, port, key, spec.connect_timeout, spec.request_timeout)
    try:
        return _open_direct(grant.host, grant.port, spec, spec.describe(), grant.matchkey)
    except DeviceUnavailable as exc:
        raise DeviceUnavailable(
            f"Tracker {host}:{port} handed out {grant.host}:{grant.port} for key {key!r}, but: {exc} "
            "(a server behind NAT must register with rpc_server --custom-addr)."
        ) from exc


_PRESTARTED: list[EmbeddedServer] = []


def prestart_embedded_server() -> EmbeddedServer:
    """Start an embedded server now, for the next ``Device`` of kind ``local`` in this process to adopt.

    A command line calls this first thing, so that the server's start-up (its ``import tvm``) overlaps the
    command's own imports and Prefect's start instead of following them. Stopped at exit if nobody adopts it.
    """
    server = EmbeddedServer()
    server.start()
    _PRESTARTED.append(server)
    atexit.register(server.stop)
    return server


class Device:
    """The device of one run: opens sessions to it and, for the embedded device, owns its server.

    For kind ``local`` the embedded server is started on entry (so its start-up overlaps compilation; or one
    :func:`prestart_embedded_server` started earlier is adopted) and stopped on exit, also on failure; :meth:`recover` replaces it with a fresh one after it died or its
    listener broke (TVM leaves the port bound with a dead listener when a session is killed). For the other
    kinds :meth:`recover` does nothing: the next session simply reconnects.
    """

    def __init__(self, spec: DeviceSpec) -> None:
        spec.validate()
        self.spec = spec
        self.server: EmbeddedServer | None = None

    def __enter__(self) -> Device:
        if self.spec.kind == "local":
            self.server = _PRESTARTED.pop() if _PRESTARTED else EmbeddedServer()
            self.server.start()  # does nothing for a prestarted one
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.stop()

    def session(self) -> RemoteSession:
        """A new session (see :func:`open_session`)."""
        return open_session(self.spec, self.server)

    def recover(self) -> None:
        """Get ready for a fresh session after the device was lost: restart the embedded server."""
        if self.server is not None:
            logger.warning("restarting the embedded rpc_server (%s)", self.spec.describe(self.server))
            self.server.stop()
            self.server = EmbeddedServer()
            self.server.start()
