"""What a device can tell about itself over an open session: :func:`probe` and :func:`device_triple`.

Every question is one bounded remote call (:meth:`RemoteSession.call`). What a server cannot answer is None,
never an error: a runtime-only server (``TVM_USE_RUNTIME_LIB=1``, or a device with only ``libtvm_runtime``)
registers none of the compiler's functions, and a CPU-only one has no CUDA device API. Measured with
apache-tvm 0.27 on x86-64, no GPU: a full server tells the triple, the LLVM version and ``has_cuda=False``;
a runtime-only one only ``has_cuda=False``; neither registers a function that reports TVM's version
(``support.GetLibInfo`` is gone from 0.27, see ``tvm/support/libinfo.py``) or the machine's host name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.device.session import RemoteSession
from pipeline.errors import DeviceLost, RemoteRunError

if TYPE_CHECKING:
    from tvm.rpc.client import RPCSession

__all__ = ["DeviceInfo", "device_triple", "probe"]

# Global functions of a full TVM runtime that report the triple LLVM would build for on that machine.
_TRIPLE_FUNCTIONS = (
    "target.llvm_get_system_triple",
    "tvm.codegen.llvm.GetProcessTriple",
    "tvm.codegen.llvm.GetDefaultTargetTriple",
)
_LLVM_VERSION_FUNCTION = "target.llvm_version_major"
# Build information of TVM builds that still register it (older releases, source builds).
_LIB_INFO_FUNCTION = "support.GetLibInfo"
_NOT_FOUND = "NOT-FOUND"


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What :func:`probe` learnt about a device; each field None when the device could not tell.

    Attributes:
        triple: The LLVM target triple of the device, e.g. ``"x86_64-conda-linux-gnu"`` (full TVM only).
        llvm_version: The major version of the LLVM in the device's TVM (full TVM only).
        tvm_version: The device's TVM version, or ``"git <hash>"`` of its build, where its TVM registers
            ``support.GetLibInfo`` (not the 0.27 wheels).
        has_cuda: Whether the device has a CUDA GPU TVM can use (False also when its TVM lacks CUDA).
        compute_version: The GPU's compute capability, e.g. ``"8.0"``, when ``has_cuda``.
        address: ``"HOST:PORT"`` of the server at the other end of the session (for a tracker, the server
            it handed out); no remote call.
    """

    triple: str | None = None
    llvm_version: int | None = None
    tvm_version: str | None = None
    has_cuda: bool | None = None
    compute_version: str | None = None
    address: str | None = None


def probe(session: RemoteSession) -> DeviceInfo:
    """Asks the device what it is; a handful of small remote calls, each bounded by the session's timeout.

    Returns:
        What the device told; None for each thing it could not tell.

    Raises:
        DeviceTimeout, DeviceUnavailable, DeviceLost: As for :meth:`RemoteSession.call` (a device that
            answers with an error is not one of these: that field is None).
    """
    remote = session.remote
    has_cuda = _ask(session, "probe cuda", lambda: bool(remote.cuda(0).exist))
    compute = _ask(session, "probe compute version", lambda: remote.cuda(0).compute_version) if has_cuda else None
    llvm = _ask(session, "probe llvm version", _calling(remote, _LLVM_VERSION_FUNCTION))
    peer = session.peer
    return DeviceInfo(
        triple=_tolerant(lambda: device_triple(session)),
        llvm_version=None if llvm is None else int(llvm),
        tvm_version=_ask(session, "probe tvm version", lambda: _version_from_lib_info(remote)),
        has_cuda=has_cuda,
        compute_version=None if compute is None else str(compute),
        address=None if peer is None else f"{peer[0]}:{peer[1]}",
    )


def device_triple(session: RemoteSession) -> str | None:
    """The LLVM target triple of the device, e.g. ``"x86_64-conda-linux-gnu"``, if its server can tell.

    A server running the full ``tvm`` package answers (``target.llvm_get_system_triple`` and two
    ``tvm.codegen.llvm`` fallbacks); a runtime-only server has none of these functions.

    Returns:
        The triple, or None if the server registers none of the functions.

    Raises:
        DeviceTimeout, DeviceUnavailable, RemoteRunError: As for :meth:`RemoteSession.call`.
    """

    def lookup(remote: RPCSession) -> str | None:
        for name in _TRIPLE_FUNCTIONS:
            function = _function(remote, name)
            triple = "" if function is None else str(function()).strip()
            if triple:
                return triple
        return None

    return session.call("device_triple", lookup, session.remote)


def _ask(session: RemoteSession, what: str, question: Callable[[], Any]) -> Any:
    """``session.call(what, question)``; None when the device answers with an error (not when it is lost)."""
    return _tolerant(lambda: session.call(what, question))


def _tolerant(ask: Callable[[], Any]) -> Any:
    try:
        return ask()
    except DeviceLost:
        raise
    except RemoteRunError:
        return None


def _calling(remote: RPCSession, name: str) -> Callable[[], Any]:
    """A question: the result of the remote global function ``name``, or None if the server lacks it."""

    def question() -> Any:
        function = _function(remote, name)
        return None if function is None else function()

    return question


def _function(remote: RPCSession, name: str) -> Any:
    try:
        return remote.get_function(name)
    except AttributeError:  # TVM's answer for a function the server does not register
        return None


def _version_from_lib_info(remote: RPCSession) -> str | None:
    function = _function(remote, _LIB_INFO_FUNCTION)
    if function is None:
        return None
    try:
        info = {str(key): str(value) for key, value in dict(function()).items()}
    except (TypeError, ValueError):  # not the map of strings it is documented to be
        return None
    for key in ("TVM_VERSION", "VERSION"):
        if info.get(key, _NOT_FOUND) != _NOT_FOUND:
            return info[key][:100]
    commit = info.get("GIT_COMMIT_HASH", _NOT_FOUND)
    return None if commit == _NOT_FOUND else f"git {commit[:40]}"
