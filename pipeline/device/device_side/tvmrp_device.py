"""Device side: makes a TVM RPC device tell who it is (the global function ``tvmrp.device_info``), what a file it
holds is (``tvmrp.file_info``), how busy it is (``tvmrp.device_load``), how much memory its session took
(``tvmrp.device_memory``), and where an inference's time goes (``tvmrp.profile``: every call of the Relax VM
timed where the VM lives).

A stock TVM 0.27 ``rpc_server`` registers no function that reports TVM's version (``support.GetLibInfo`` is
gone), and a runtime-only one (what a device bundle serves) not even the architecture (the triple functions
live in the compiler library). The devices this project sets up (``scripts/device-bundle``, the emulated
aarch64 device, the pipeline's embedded server) put this module's directory on the server's ``PYTHONPATH``;
its ``sitecustomize`` calls :func:`install` in every Python process of the device: the server, its
``popen_worker`` (a fresh interpreter) and each session (forked, or spawned with ``--no-fork``).

:func:`install` costs nothing until ``tvm_ffi`` is imported: a one-shot import hook registers the functions
right after ``tvm_ffi`` has loaded (a Python that never imports TVM never loads it; under qemu that import
alone takes ~10 s). Each answers a JSON object (:func:`describe`, :func:`describe_file`, :func:`load`,
:func:`memory`, :func:`profile`), read by the client's ``pipeline.device.probe`` and ``pipeline.profiling``.
``tvmrp.file_info`` exists because TVM's server offers no way to see what an upload wrote (its ``upload``
ignores a failed write: a full disk leaves a short file and no error): the client compares the size and SHA-256
of a library on the device with what it sent before loading it. It tells nothing a client could not already
learn with the server's ``download``. ``tvmrp.profile`` runs only the VM the client passes it, with the input
the client set. Standard library and ``tvm_ffi`` only; nothing here may break the interpreter, so every step is
guarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import sys

FUNCTION = "tvmrp.device_info"
FILE_FUNCTION = "tvmrp.file_info"
#: Set (to 1) by a device bundle's start-device.sh, which restarts the server when it exits: see
#: :func:`exit_when_the_listener_dies`.
SUPERVISED_ENV = "TVMRP_DEVICE_SUPERVISED"
#: The exit code of a server process whose listening thread died.
LISTENER_DIED = 70
LOAD_FUNCTION = "tvmrp.device_load"
PROFILE_FUNCTION = "tvmrp.profile"
MEMORY_FUNCTION = "tvmrp.device_memory"
#: Version of the JSON layout :func:`describe` answers; a client ignores fields it does not know.
SCHEMA = 1
#: The environment variable that names the device bundle's directory (set by its start-device.sh).
BUNDLE_ENV = "TVMRP_DEVICE_BUNDLE"
#: The environment variable that names the directory where this device keeps uploaded libraries between
#: sessions (set by a bundle's start-device.sh and the stack's device): reported as ``library_cache``.
LIBRARY_CACHE_ENV = "TVMRP_DEVICE_LIBRARY_CACHE"
_BUNDLE_FILE_LIMIT = 1 << 16


def describe() -> dict:
    """Who this device is, as plain data (never raises; an unknown field is None).

    Keys: ``schema``; ``machine`` (``platform.machine()``); ``triple`` (the GNU triple this Python was built
    for, ``sysconfig``'s ``HOST_GNU_TYPE``, e.g. ``aarch64-unknown-linux-gnu``; not LLVM's, which needs the
    compiler library); ``system``; ``hostname``; ``python``; ``tvm`` and ``tvm_ffi`` (the versions loaded in
    this process, else the installed ones, else the bundle's); ``runtime_only`` (TVM loaded without its
    compiler library); ``bundle`` (the bundle's name, or None when not started from one); ``cuda`` (the
    bundle's CUDA flag); ``library_cache`` (the directory this device keeps uploaded libraries in between
    sessions, :func:`library_cache`, or None).
    """
    bundle = _bundle()
    return {
        "schema": SCHEMA,
        "machine": _guarded(platform.machine),
        "triple": _guarded(_host_triple),
        "system": _guarded(platform.system),
        "hostname": _guarded(_hostname),
        "python": _guarded(platform.python_version),
        "tvm": _guarded(lambda: _version("tvm", "apache-tvm")) or bundle.get("tvm"),
        "tvm_ffi": _guarded(lambda: _version("tvm_ffi", "apache-tvm-ffi")),
        "runtime_only": _guarded(_runtime_only),
        "bundle": bundle.get("name"),
        "cuda": bundle.get("cuda"),
        "library_cache": _guarded(library_cache),
    }


def library_cache():
    """The directory named by ``$TVMRP_DEVICE_LIBRARY_CACHE`` if it is fit to keep libraries in: an absolute
    path to a directory (not a link) of this process's user that nobody else may write; else None. (A client
    loads a kept library only under a marker it authenticated, but a file others may replace is no place to
    keep one: docs/security.md.)"""
    path = os.environ.get(LIBRARY_CACHE_ENV, "")
    if not path or not os.path.isabs(path):
        return None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return os.path.normpath(path)


def device_info() -> str:
    """:func:`describe` as JSON: the body of the global function ``tvmrp.device_info``."""
    return json.dumps(describe(), sort_keys=True)


def describe_file(path: str) -> dict:
    """What the regular file at ``path`` is, as plain data (never raises).

    A relative ``path`` is taken in the session's directory (TVM's ``tvm.rpc.server.workpath``), as the
    server's ``upload`` and ``load_module`` take it. Keys: ``schema``; ``path`` (absolute); ``size`` (bytes) and
    ``sha256`` (hex) of the file; ``free`` (bytes free to this user on its file system, or None); or instead of
    size and digest ``error`` (why the file cannot be read: missing, not a regular file...).
    """
    answer: dict = {"schema": SCHEMA, "path": str(path)}
    try:
        full = _session_path(str(path))
        answer["path"] = full
        answer["free"] = _guarded(lambda: _free_bytes(os.path.dirname(full) or "/"))
        digest = hashlib.sha256()
        # O_NONBLOCK: a FIFO put in the file's place must not hang the session (no effect on a regular file).
        with os.fdopen(os.open(full, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return {**answer, "error": "not a regular file"}
            size = 0
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return {**answer, "size": size, "sha256": digest.hexdigest()}
    except OSError as exc:  # the path is in the answer already
        return {**answer, "error": str(exc.strerror or type(exc).__name__)[:200]}
    except Exception as exc:  # noqa: BLE001 - the answer says what went wrong
        return {**answer, "error": f"{type(exc).__name__}: {exc}"[:200]}


def file_info(path: str) -> str:
    """:func:`describe_file` as JSON: the body of the global function ``tvmrp.file_info``."""
    return json.dumps(describe_file(path), sort_keys=True)


def exit_when_the_listener_dies() -> None:
    """Under a supervisor (``$TVMRP_DEVICE_SUPERVISED``): end this process when TVM's server loop thread dies.

    TVM 0.27's ``rpc_server`` serves in a thread of its ``popen_worker`` (``rpc/server.py``: ``_listen_loop``).
    When a session's process exits with an error (killed, crashed), that thread raises and dies, while the
    process lives on with its port bound: new clients hang and a tracker no longer lists it, for good. Exiting
    instead (:data:`LISTENER_DIED`) ends the server's main process too, and the supervisor starts a fresh one.
    Never raises.
    """
    try:
        import threading

        if os.environ.get(SUPERVISED_ENV) != "1":
            return
        previous = threading.excepthook

        def hook(args) -> None:
            try:
                previous(args)
            finally:
                thread = getattr(args, "thread", None)
                if thread is not None and "_listen_loop" in str(getattr(thread, "name", "")):
                    sys.stderr.flush()
                    os._exit(LISTENER_DIED)

        threading.excepthook = hook
    except Exception:  # noqa: BLE001 - the device must start whatever happens here
        pass


def load() -> dict:
    """How busy this machine is, as seen from the calling process (never raises; an unknown field is None).

    Keys: ``loadavg`` (the 1, 5 and 15 minute load averages), ``affinity`` (the CPUs this process may run on,
    ``sched_getaffinity``), ``cpus`` (``os.cpu_count()``). The client uses it for its own host too.
    """
    return {
        "loadavg": _guarded(lambda: [round(x, 2) for x in os.getloadavg()]),
        "affinity": _guarded(lambda: sorted(os.sched_getaffinity(0))),
        "cpus": _guarded(os.cpu_count),
    }


def device_load() -> str:
    """:func:`load` as JSON: the body of the global function ``tvmrp.device_load``."""
    return json.dumps(load(), sort_keys=True)


def memory() -> dict:
    """This process's memory, as Linux tells it in ``/proc/self/status`` (never raises; an unknown field is
    None): ``peak_rss_bytes`` (``VmHWM``, the largest resident set so far) and ``rss_bytes`` (``VmRSS``).

    The session's process holds the Python interpreter, TVM's runtime and the model: its peak is what the
    device needs in all. (Under qemu-user these are the emulator's figures, the guest's memory included.)
    """
    fields = {"VmHWM": None, "VmRSS": None}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                name, _, value = line.partition(":")
                parts = value.split()
                if name in fields and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except Exception:  # noqa: BLE001 - not Linux, or no /proc: the device cannot tell
        pass
    return {"peak_rss_bytes": fields["VmHWM"], "rss_bytes": fields["VmRSS"]}


def device_memory() -> str:
    """:func:`memory` as JSON: the body of the global function ``tvmrp.device_memory``."""
    return json.dumps(memory(), sort_keys=True)


#: Most calls one inference may make for :func:`profile` to keep (ResNet-18: ~200).
PROFILE_CALL_LIMIT = 20_000
#: :func:`profile` alternates uninstrumented and instrumented inferences in this many rounds (load that comes
#: and goes weighs on both alike; each round of the time evaluator costs one warm-up inference).
PROFILE_ROUNDS = 10
_CPU = 1  # DLPack's kDLCPU


def profile(vm, device_type: int, device_id: int, repeat: int, max_seconds: float) -> dict:
    """Time every call one inference of the Relax VM ``vm`` makes (its kernels and the VM's builtins).

    Where the VM lives, so that no network sits inside a timing. ``vm`` is the VM module (what
    ``relax.VirtualMachine(...).module`` is on the client: an RPC argument arrives here as the module itself)
    with its input set (``set_input``). One inference first records each call's function name and arguments.
    Then, in :data:`PROFILE_ROUNDS` rounds (fewer once ``max_seconds`` have passed, at least one), ``repeat``
    uninstrumented inferences in all are timed as a run's latency is (TVM's time evaluator: a C++ loop after a
    warm-up call; a Python loop where the runtime lacks it), and as many inferences whose every call is timed by
    the VM's instrument (``set_instrument``: a function called before and after each ``Call`` instruction). On a
    GPU (``device_type`` other than CPU) the device is synchronised before each clock reading. The instrument is
    removed afterwards, also on error.

    Returns:
        ``schema``; ``repeat`` (instrumented inferences timed); ``calls`` (one inference's calls in order:
        ``name``, ``args`` (``[shape, dtype]`` of each tensor argument, else the argument's type name) and
        ``ms``, the median of its times); ``plain_ms`` (the median time of an uninstrumented inference);
        ``instrumented_ms`` (the median wall time of an instrumented one); or ``error`` (why not).
    """
    import struct
    from time import perf_counter_ns as clock

    import tvm_ffi

    invoke = vm.get_function("invoke_stateful")
    set_instrument = vm.get_function("set_instrument")
    evaluator = tvm_ffi.get_global_func("runtime.RPCTimeEvaluator", allow_missing=True)
    if int(device_type) == _CPU:
        def sync():
            return None
    else:
        stream_sync = tvm_ffi.get_global_func("runtime.Device_StreamSync")
        device = tvm_ffi.device(int(device_type), int(device_id))

        def sync():
            stream_sync(device, 0)

    def uninstrumented(count):
        """``count`` uninstrumented inferences' times (ns)."""
        if evaluator is not None:
            blob = evaluator(vm, "invoke_stateful", int(device_type), int(device_id), 1, count, 0, 100, 0, 1, 0,
                             "")("main")
            return [seconds * 1e9 for seconds in struct.unpack("@" + "d" * count, bytes(blob))]
        times = []
        for _ in range(count):
            sync()
            start = clock()
            invoke("main")
            sync()
            times.append(clock() - start)
        return times

    names, times, started = [], [], [0]

    def timing(func, name, before, ret, *args):
        if before:
            names.append(name)
            sync()
            started[0] = clock()
        else:
            sync()
            times.append(clock() - started[0])
        return 0

    first = []

    def recording(func, name, before, ret, *args):
        if before:
            first.append({"name": str(name), "args": [_argument(a) for a in args]})
        return 0

    try:
        set_instrument(recording)
        invoke("main")
        if len(first) > PROFILE_CALL_LIMIT:
            return {"schema": SCHEMA, "error": f"one inference makes {len(first)} calls (at most "
                                                f"{PROFILE_CALL_LIMIT} are profiled)"}
        plain, instrumented, per_call = [], [], [[] for _ in first]
        deadline = clock() + max(0.0, float(max_seconds)) * 1e9
        repeat = max(1, int(repeat))
        chunk = -(-repeat // PROFILE_ROUNDS)
        while len(instrumented) < repeat and (not instrumented or clock() < deadline):
            count = min(chunk, repeat - len(instrumented))
            set_instrument(None)
            plain += uninstrumented(count)
            set_instrument(timing)
            for _ in range(count):
                names.clear()
                times.clear()
                start = clock()
                invoke("main")
                instrumented.append(clock() - start)
                if len(times) != len(first) or any(n != c["name"] for n, c in zip(names, first)):
                    return {"schema": SCHEMA,
                            "error": "the calls of an inference differ from one inference to the next"}
                for slot, t in zip(per_call, times):
                    slot.append(t)
    finally:
        set_instrument(None)
    for call, slot in zip(first, per_call):
        call["ms"] = _median(slot) / 1e6
    return {"schema": SCHEMA, "repeat": len(instrumented), "calls": first, "plain_ms": _median(plain) / 1e6,
            "instrumented_ms": _median(instrumented) / 1e6}


def profile_json(vm, device_type: int, device_id: int, repeat: int, max_seconds: float) -> str:
    """:func:`profile` as JSON: the body of the global function ``tvmrp.profile``. An error is the answer's
    ``error``, not an exception (the VM is left without an instrument either way)."""
    try:
        answer = profile(vm, device_type, device_id, repeat, max_seconds)
    except Exception as exc:  # noqa: BLE001 - the answer says what went wrong
        answer = {"schema": SCHEMA, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return json.dumps(answer, sort_keys=True)


def _argument(value):
    """A call's argument as plain data: ``[shape, dtype]`` of a tensor, else its type's name."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        try:
            return [[int(d) for d in shape], str(value.dtype)]
        except Exception:  # noqa: BLE001
            pass
    return type(value).__name__


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def install() -> None:
    """Registers ``tvmrp.device_info``, ``tvmrp.file_info``, ``tvmrp.device_load``, ``tvmrp.device_memory`` and
    ``tvmrp.profile`` now if ``tvm_ffi`` is loaded, else right after its import; under a supervisor,
    :func:`exit_when_the_listener_dies`. Never raises."""
    exit_when_the_listener_dies()
    try:
        module = sys.modules.get("tvm_ffi")
        if module is not None:
            _register(module)
        elif not any(isinstance(finder, _AfterTvmFfi) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterTvmFfi())
    except Exception:  # noqa: BLE001 - the device must start whatever happens here
        pass


def _register(module) -> None:
    for name, function in ((FUNCTION, device_info), (FILE_FUNCTION, file_info), (LOAD_FUNCTION, device_load),
                           (PROFILE_FUNCTION, profile_json), (MEMORY_FUNCTION, device_memory)):
        try:
            module.register_global_func(name, function, override=True)
        except Exception:  # noqa: BLE001
            pass


def _session_path(path: str) -> str:
    """``path`` as the server's ``upload`` and ``load_module`` read it: a relative one in the session's directory."""
    if os.path.isabs(path):
        return path
    workpath = sys.modules["tvm_ffi"].get_global_func("tvm.rpc.server.workpath", allow_missing=True)
    return str(workpath(path)) if workpath is not None else os.path.abspath(path)


def _free_bytes(directory: str) -> int:
    info = os.statvfs(directory)
    return int(info.f_bavail * info.f_frsize)


class _AfterTvmFfi:
    """A one-shot import hook: lets the other finders find ``tvm_ffi``, runs :func:`_register` after it loaded.

    The loader is wrapped only for the duration of ``exec_module``: the module sees its own loader
    (``__loader__``, ``__spec__.loader``) while it runs and afterwards.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tvm_ffi":
            return None
        try:
            for finder in list(sys.meta_path):
                find = None if finder is self else getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find is not None else None
                if spec is not None:
                    break
            else:
                return None  # not installed: the import fails as it would without us
            # Found: this hook is done. (The import system stops iterating sys.meta_path once we return a spec,
            # so removing ourselves from the list it iterates skips nothing.)
            sys.meta_path.remove(self)
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
        except Exception:  # noqa: BLE001 - leave the import to the normal machinery
            return None


class _RegisteringLoader:
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register(module)


def _guarded(ask):
    try:
        value = ask()
    except Exception:  # noqa: BLE001
        return None
    return value if value not in ("", None) else None


def _host_triple():
    import sysconfig

    return sysconfig.get_config_var("HOST_GNU_TYPE")


def _hostname():
    import socket

    return socket.gethostname()


def _version(module_name: str, dist: str):
    """The version of ``module_name`` loaded in this process, else of the installed distribution ``dist``."""
    module = sys.modules.get(module_name)
    version = getattr(module, "__version__", None) if module is not None else None
    if version:
        return str(version)
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _runtime_only():
    base = sys.modules.get("tvm.base")
    return None if base is None else bool(getattr(base, "_RUNTIME_ONLY", False))


def _bundle() -> dict:
    """``bundle.json`` of the bundle this device was started from (``$TVMRP_DEVICE_BUNDLE``), or {}."""
    root = os.environ.get(BUNDLE_ENV)
    if not root:
        return {}
    try:
        with open(os.path.join(root, "bundle.json"), "rb") as f:
            data = json.loads(f.read(_BUNDLE_FILE_LIMIT).decode("utf-8"))
    except Exception:  # noqa: BLE001
        return {"name": os.path.basename(root.rstrip("/")) or None}
    if not isinstance(data, dict):
        return {}
    return {
        "name": str(data.get("name") or os.path.basename(root.rstrip("/"))),
        "tvm": None if data.get("tvm") is None else str(data["tvm"]),
        "cuda": bool(data.get("cuda")),
    }
