"""What a device can tell about itself over an open session: :func:`probe`, :func:`device_triple`, and the
checks built on it: :func:`device_arch`, :func:`check_versions`; and what a run is timed under:
:func:`set_threads` (the device's TVM thread pool), :func:`device_threads`, :func:`device_load`, :func:`host_load`.

Every question is one bounded remote call (:meth:`RemoteSession.call`). What a server cannot answer is None,
never an error: a runtime-only server (``TVM_USE_RUNTIME_LIB=1``, or a device with only ``libtvm_runtime``)
registers none of the compiler's functions, and a CPU-only one has no CUDA device API. Measured with
apache-tvm 0.27 on x86-64, no GPU: a stock full server tells the triple, the LLVM version and
``has_cuda=False``; a stock runtime-only one only ``has_cuda=False``; neither registers a function that
reports TVM's version (``support.GetLibInfo`` is gone from 0.27, see ``tvm/support/libinfo.py``) or the
machine's host name.

The devices this project sets up (a device bundle, the emulated aarch64 device, the embedded server) also
register ``tvmrp.device_info`` (``pipeline/device/device_side/tvmrp_device.py``): a JSON object with the
machine, the GNU triple of the device's Python, the host name and the TVM, tvm-ffi and Python versions.
:func:`probe` asks it first; its answer is untrusted data, parsed and clipped, never executed. They also
register ``tvmrp.file_info`` (:func:`file_info`): the size and SHA-256 of a file on the device, which a stock
server cannot tell without sending the whole file back; ``tvmrp.device_load`` (load averages, the CPUs the
session may run on): :func:`device_load`; ``tvmrp.device_memory`` (the session process's peak resident memory):
:func:`device_memory`; and ``tvmrp.profile`` (every call of an inference timed: :mod:`pipeline.profiling`).

The thread pool: TVM's ``runtime.config_threadpool(mode, n)`` and ``runtime.NumThreads`` are registered by
every TVM runtime, stock servers included. The pool is per process (each RPC session runs in its own) and
never grows beyond what the process started with (``TVM_NUM_THREADS``, which the devices this project starts
set to the physical cores, :mod:`pipeline.threads`; else half the logical CPUs on x86-64), so :func:`set_threads` answers what the device then uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pipeline.device.session import RemoteSession
from pipeline.errors import DeviceLost, RemoteRunError, VersionSkew, clip
from pipeline.results import Load
from pipeline.targets import normalise_arch

if TYPE_CHECKING:
    from tvm.rpc.client import RPCSession

__all__ = [
    "DeviceInfo",
    "FileInfo",
    "check_versions",
    "device_arch",
    "device_load",
    "device_memory",
    "device_threads",
    "device_triple",
    "file_info",
    "host_load",
    "local_tvm_version",
    "parse_device_info",
    "parse_load",
    "probe",
    "set_threads",
]

logger = logging.getLogger(__name__)

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
#: Registered by the devices this project sets up (``pipeline/device/device_side/tvmrp_device.py``).
DEVICE_INFO_FUNCTION = "tvmrp.device_info"
DEVICE_LOAD_FUNCTION = "tvmrp.device_load"
DEVICE_MEMORY_FUNCTION = "tvmrp.device_memory"
_CONFIG_THREADPOOL = "runtime.config_threadpool"
_NUM_THREADS = "runtime.NumThreads"
_AFFINITY_BIG = 1  # TVM's ThreadGroup::kBig: the pool's default mode (all cores of the highest frequency)
_MAX_CPUS = 4096
_DEVICE_INFO_LIMIT = 1 << 16  # bytes of JSON; the real answer is ~300
#: Registered by the same devices: the size and SHA-256 of a file on the device.
FILE_INFO_FUNCTION = "tvmrp.file_info"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELD_LIMIT = 100  # characters kept of each reported string


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What :func:`probe` learnt about a device; each field None when the device could not tell.

    Attributes:
        triple: The LLVM target triple of the device, e.g. ``"x86_64-conda-linux-gnu"`` (full TVM); else, on a
            device that reports ``tvmrp.device_info``, the GNU triple its Python was built for, e.g.
            ``"aarch64-unknown-linux-gnu"`` (enough to tell the architecture).
        llvm_version: The major version of the LLVM in the device's TVM (full TVM only).
        tvm_version: The device's TVM version, e.g. ``"0.27.0.post1"`` (``tvmrp.device_info``), or of TVM
            builds that register ``support.GetLibInfo`` (not the 0.27 wheels) their version or ``"git <hash>"``.
        has_cuda: Whether the device has a CUDA GPU TVM can use (False also when its TVM lacks CUDA).
        compute_version: The GPU's compute capability, e.g. ``"8.0"``, when ``has_cuda``.
        address: ``"HOST:PORT"`` of the server at the other end of the session (for a tracker, the server
            it handed out); no remote call.
        machine: ``platform.machine()`` of the device, e.g. ``"aarch64"`` (``tvmrp.device_info``).
        hostname: The device's host name (``tvmrp.device_info``).
        tvm_ffi_version: The device's apache-tvm-ffi version (``tvmrp.device_info``).
        python_version: The device's Python version (``tvmrp.device_info``).
        bundle: The name of the device bundle it was started from, e.g. ``"tvmrp-device-cp311-aarch64"``
            (``tvmrp.device_info``; None also for a device not started from a bundle).
        library_cache: The directory where the device keeps uploaded libraries between sessions (a device
            bundle's, the stack's device; ``tvmrp.device_info``): an absolute path, or None.
    """

    triple: str | None = None
    llvm_version: int | None = None
    tvm_version: str | None = None
    has_cuda: bool | None = None
    compute_version: str | None = None
    address: str | None = None
    machine: str | None = None
    hostname: str | None = None
    tvm_ffi_version: str | None = None
    python_version: str | None = None
    bundle: str | None = None
    library_cache: str | None = None


def probe(session: RemoteSession) -> DeviceInfo:
    """Asks the device what it is; a handful of small remote calls, each bounded by the session's timeout.

    Returns:
        What the device told; None for each thing it could not tell.

    Raises:
        DeviceTimeout, DeviceUnavailable, DeviceLost: As for :meth:`RemoteSession.call` (a device that
            answers with an error is not one of these: that field is None).
    """
    remote = session.remote
    identity = _tolerant(lambda: _identity(session)) or {}
    has_cuda = _ask(session, "probe cuda", lambda: bool(remote.cuda(0).exist))
    compute = _ask(session, "probe compute version", lambda: remote.cuda(0).compute_version) if has_cuda else None
    llvm = _ask(session, "probe llvm version", _calling(remote, _LLVM_VERSION_FUNCTION))
    triple = _ask(session, "device_triple", lambda: _compiler_triple(remote)) or identity.get("triple")
    tvm_version = identity.get("tvm") or _ask(session, "probe tvm version", lambda: _version_from_lib_info(remote))
    peer = session.peer
    return DeviceInfo(
        triple=triple,
        llvm_version=None if llvm is None else int(llvm),
        tvm_version=tvm_version,
        has_cuda=has_cuda,
        compute_version=None if compute is None else str(compute),
        address=None if peer is None else f"{peer[0]}:{peer[1]}",
        machine=identity.get("machine"),
        hostname=identity.get("hostname"),
        tvm_ffi_version=identity.get("tvm_ffi"),
        python_version=identity.get("python"),
        bundle=identity.get("bundle"),
        library_cache=identity.get("library_cache"),
    )


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A file on the device as ``tvmrp.file_info`` describes it.

    Attributes:
        size: its length in bytes; None when it cannot be read (``error`` says why).
        sha256: the SHA-256 of its bytes (hex); None when it cannot be read.
        free: bytes free on its file system (None: not told).
        error: why it cannot be read (missing, not a regular file), clipped; None when it can.
    """

    size: int | None
    sha256: str | None
    free: int | None = None
    error: str | None = None


def file_info(session: RemoteSession, path: str) -> FileInfo | None:
    """The size and SHA-256 of the file ``path`` on the device (relative: in the session's directory), as the
    device's ``tvmrp.file_info`` tells them; one bounded call (the device reads the whole file).

    Returns:
        What the device told; None when it does not register the function (a stock ``rpc_server``).

    Raises:
        RemoteRunError: the device answered with something that is not such a description.
        DeviceTimeout, DeviceUnavailable, DeviceLost: As for :meth:`RemoteSession.call`.
    """
    answer = session.call("file check", _calling(session.remote, FILE_INFO_FUNCTION, path))
    if answer is None:
        return None
    info = parse_file_info(answer)
    if info is None:
        raise RemoteRunError(
            f"{session.description} answered {FILE_INFO_FUNCTION} with something that does not describe a file "
            f"({clip(str(answer), 80)!r})"
        )
    return info


def untrusted_object(answer: object, function: str) -> dict[str, Any] | None:
    """A device's answer to ``function`` (untrusted JSON of at most 64 KiB) as a dict; None when it is longer,
    not JSON, nested too deep for the parser, or not an object."""
    text = str(answer)
    if len(text) > _DEVICE_INFO_LIMIT:
        logger.debug("ignoring a %d-character answer of %s", len(text), function)
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def parse_file_info(answer: object) -> FileInfo | None:
    """A ``tvmrp.file_info`` answer (untrusted JSON) as a :class:`FileInfo`; None when it is not one."""
    data = untrusted_object(answer, FILE_INFO_FUNCTION)
    if data is None:
        return None

    def count(key: str) -> int | None:
        value = data.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62 else None

    free = count("free")
    error = data.get("error")
    if isinstance(error, str) and error:
        return FileInfo(None, None, free, "".join(ch for ch in error if ch.isprintable())[:_FIELD_LIMIT] or "error")
    size, sha256 = count("size"), data.get("sha256")
    if size is None or not isinstance(sha256, str) or _HEX64.fullmatch(sha256) is None:
        return None
    return FileInfo(size, sha256, free)


def device_triple(session: RemoteSession) -> str | None:
    """The target triple of the device, e.g. ``"x86_64-conda-linux-gnu"``, if its server can tell.

    A server running the full ``tvm`` package answers with LLVM's (``target.llvm_get_system_triple`` and two
    ``tvm.codegen.llvm`` fallbacks); a runtime-only server has none of these functions, and then a device
    that registers ``tvmrp.device_info`` answers with the GNU triple its Python was built for
    (``aarch64-unknown-linux-gnu``): the architecture is right, the vendor part may differ from LLVM's.

    Returns:
        The triple, or None if the server can tell neither.

    Raises:
        DeviceTimeout, DeviceUnavailable, RemoteRunError: As for :meth:`RemoteSession.call`.
    """
    triple = session.call("device_triple", _compiler_triple, session.remote)
    if triple:
        return triple
    return (_identity(session) or {}).get("triple")


def device_arch(info: DeviceInfo) -> str | None:
    """The device's architecture, normalised like :func:`pipeline.targets.normalise_arch` (``x86_64``,
    ``aarch64``), from its triple, else from its ``machine``; None when it told neither.

    The triple comes first: a 32-bit ARM Python on a 64-bit kernel reports ``machine`` ``aarch64`` but can
    only load ``arm`` libraries, and its triple says so.
    """
    if info.triple:
        return normalise_arch(info.triple.split("-")[0])
    if info.machine:
        return normalise_arch(info.machine)
    return None


def local_tvm_version() -> str | None:
    """The TVM version this machine builds with: the installed ``apache-tvm`` distribution (no ``import tvm``),
    else ``tvm.__version__`` of an already imported ``tvm``; None if neither."""
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        module = sys.modules.get("tvm")
        version = getattr(module, "__version__", None) if module is not None else None
        return None if version is None else str(version)


def check_versions(
    info: DeviceInfo, ours: str | None = None, allow_skew: bool = False, device: str | None = None
) -> str | None:
    """Compare the device's TVM version with ours at session start.

    The rule: the same version is fine; another patch version (``0.27.0`` vs ``0.27.1``; a ``.postN``,
    pre-release or local suffix counts as a patch difference) gives a warning; another major or minor version
    is refused, unless ``allow_skew``, which turns the refusal into a warning. A device that does not tell its
    version (a stock ``rpc_server``) passes silently (a debug log line): nothing can be checked. Also warns
    when both sides report different apache-tvm-ffi versions (client and device should run the same FFI).

    Args:
        info: What :func:`probe` learnt about the device.
        ours: This machine's TVM version (default: :func:`local_tvm_version`).
        allow_skew: Warn instead of refusing another major or minor version (``--allow-version-skew``).
        device: How to name the device in messages (default: its address or host name).

    Returns:
        A warning to show the user, or None when there is nothing to say.

    Raises:
        VersionSkew: The device runs another major or minor version of TVM and ``allow_skew`` is False.
    """
    ours = local_tvm_version() if ours is None else ours
    theirs = info.tvm_version
    name = device or info.address or info.hostname or "the device"
    if not theirs or not ours:
        logger.debug("TVM versions not compared: %s reports %s, this machine has %s", name, theirs, ours)
        return None
    notes = []
    ffi_note = _ffi_note(info, name)
    relation = _version_relation(theirs, ours)
    if relation == "minor":
        message = (
            f"{name} runs TVM {theirs} but this machine builds with TVM {ours}: across minor versions libraries "
            f"and the RPC protocol may not match. Install apache-tvm=={ours} on the device (scripts/device-bundle "
            "packs a matching device), or pass --allow-version-skew to run anyway"
        )
        if not allow_skew:
            raise VersionSkew(message + (f". Also: {ffi_note}" if ffi_note else ""), theirs, ours)
        notes.append(f"{name} runs TVM {theirs}, this machine {ours}: another minor version, run anyway as "
                     "--allow-version-skew asks")
    elif relation == "patch":
        notes.append(f"{name} runs TVM {theirs}, this machine {ours}: another patch version, which should work; "
                     f"install apache-tvm=={ours} on the device to be sure")
    elif relation == "unknown":
        notes.append(f"{name} reports TVM version {theirs!r}, which cannot be compared with this machine's {ours}")
    if ffi_note:
        notes.append(ffi_note)
    return "; ".join(notes) or None


def _version_relation(theirs: str, ours: str) -> str:
    """``"same"``, ``"patch"`` (same major.minor), ``"minor"`` (another major or minor) or ``"unknown"``."""
    from packaging.version import InvalidVersion, Version

    try:
        a, b = Version(theirs), Version(ours)
    except InvalidVersion:
        return "same" if theirs.strip() == ours.strip() else "unknown"
    if a == b:
        return "same"
    return "patch" if (a.release + (0, 0))[:2] == (b.release + (0, 0))[:2] else "minor"


def _ffi_note(info: DeviceInfo, name: str) -> str | None:
    try:
        ours = metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        return None
    theirs = info.tvm_ffi_version
    if not theirs or _version_relation(theirs, ours) == "same":
        return None
    return f"{name} runs apache-tvm-ffi {theirs}, this machine {ours} (client and device should run the same FFI)"


def _compiler_triple(remote: RPCSession) -> str | None:
    for name in _TRIPLE_FUNCTIONS:
        function = _function(remote, name)
        triple = "" if function is None else str(function()).strip()
        if triple:
            return triple[:_FIELD_LIMIT]
    return None


def _identity(session: RemoteSession) -> dict[str, Any] | None:
    """What ``tvmrp.device_info`` answers, parsed and clipped; None when the device does not register it."""
    answer = session.call("probe device info", _calling(session.remote, DEVICE_INFO_FUNCTION))
    return None if answer is None else parse_device_info(answer)


def parse_device_info(answer: object) -> dict[str, Any] | None:
    """The fields of a ``tvmrp.device_info`` answer (untrusted JSON): strings clipped, wrong types dropped.

    Returns:
        ``machine``, ``triple``, ``hostname``, ``python``, ``tvm``, ``tvm_ffi``, ``bundle`` (str or None),
        ``cuda``, ``runtime_only`` (bool or None) and ``library_cache`` (an absolute POSIX path of at most 1024
        printable characters, else None); None when the answer is not a JSON object.
    """
    data = untrusted_object(answer, DEVICE_INFO_FUNCTION)
    if data is None:
        return None
    fields: dict[str, Any] = {}
    for key in ("machine", "triple", "hostname", "python", "tvm", "tvm_ffi", "bundle"):
        value = data.get(key)
        text = "".join(ch for ch in str(value) if ch.isprintable()).strip()[:_FIELD_LIMIT] if value else ""
        fields[key] = text if isinstance(value, (str, int, float)) and text else None
    for key in ("cuda", "runtime_only"):
        fields[key] = data.get(key) if isinstance(data.get(key), bool) else None
    cache = data.get("library_cache")
    fields["library_cache"] = cache if (
        isinstance(cache, str) and cache.startswith("/") and len(cache) <= 1024 and cache.isprintable()
        and "/../" not in f"{cache}/") else None
    return fields


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


def _calling(remote: RPCSession, name: str, *args: Any) -> Callable[[], Any]:
    """A question: the result of the remote global function ``name(*args)``, or None if the server lacks it."""

    def question() -> Any:
        function = _function(remote, name)
        return None if function is None else function(*args)

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


# -- what a run is timed under ---------------------------------------------------------------------------------------


def set_threads(session: RemoteSession, threads: int) -> int | None:
    """Set the device's TVM thread pool to ``threads`` for this session's process; return what it then uses
    (None: it cannot tell).

    Raises:
        RemoteRunError: the device has no ``runtime.config_threadpool`` or refused it.
        DeviceTimeout, DeviceLost: as for :meth:`RemoteSession.call`.
    """
    remote = session.remote

    def configure() -> None:
        function = _function(remote, _CONFIG_THREADPOOL)
        if function is None:
            raise RemoteRunError(f"{session.description} cannot set its TVM thread pool (no {_CONFIG_THREADPOOL})")
        function(_AFFINITY_BIG, int(threads))

    session.call("set threads", configure)
    return device_threads(session)


def device_threads(session: RemoteSession) -> int | None:
    """The threads of the device's TVM thread pool in this session's process (``runtime.NumThreads``)."""
    answer = _ask(session, "probe threads", _calling(session.remote, _NUM_THREADS))
    return answer if isinstance(answer, int) and not isinstance(answer, bool) and answer > 0 else None


def device_load(session: RemoteSession) -> Load | None:
    """How busy the device is (``tvmrp.device_load``); None from a device that does not register it."""
    answer = _ask(session, "probe load", _calling(session.remote, DEVICE_LOAD_FUNCTION))
    return None if answer is None else parse_load(answer)


def device_memory(session: RemoteSession) -> int | None:
    """The peak resident memory (bytes) of the device's session process so far (``tvmrp.device_memory``: Linux
    ``VmHWM``); None from a device that cannot tell (a stock rpc_server, a system without ``/proc``)."""
    answer = _ask(session, "probe memory", _calling(session.remote, DEVICE_MEMORY_FUNCTION))
    return None if answer is None else parse_memory(answer)


def parse_memory(answer: object) -> int | None:
    """The ``peak_rss_bytes`` of a ``tvmrp.device_memory`` answer (untrusted JSON); None when it has none."""
    data = untrusted_object(answer, DEVICE_MEMORY_FUNCTION)
    peak = data.get("peak_rss_bytes") if data is not None else None
    return peak if type(peak) is int and 0 < peak < 1 << 50 else None


def host_load() -> Load:
    """How busy this machine is, as :func:`device_load` tells it of a device."""
    from pipeline.device.device_side.tvmrp_device import load

    return parse_load(json.dumps(load())) or Load()


def parse_load(answer: object) -> Load | None:
    """A ``tvmrp.device_load`` answer (untrusted JSON) as a :class:`Load`: wrong types and values dropped."""
    data = untrusted_object(answer, DEVICE_LOAD_FUNCTION)
    if data is None:
        return None

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1e6

    loadavg = data.get("loadavg")
    affinity = data.get("affinity")
    cpus = data.get("cpus")
    return Load(
        loadavg=tuple(round(float(x), 2) for x in loadavg)  # type: ignore[arg-type]
        if isinstance(loadavg, list) and len(loadavg) == 3 and all(number(x) for x in loadavg) else None,
        affinity=tuple(affinity) if isinstance(affinity, list) and len(affinity) <= _MAX_CPUS
        and all(type(x) is int and 0 <= x < _MAX_CPUS for x in affinity) else None,
        cpus=cpus if type(cpus) is int and 0 < cpus <= _MAX_CPUS else None,
    )
