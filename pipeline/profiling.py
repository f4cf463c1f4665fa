"""Where the time of one inference goes: every call of the Relax VM timed on the device, grouped by kernel.

TVM 0.27's wheel has no Relax VM profiler, but its VM takes an instrument (``set_instrument``): a function called
before and after every ``Call`` instruction, in the runtime-only TVM too. The devices this project starts
register ``tvmrp.profile`` (``pipeline/device/device_side/tvmrp_device.py``), which times each call of
inferences there, where the VM lives, so no network sits inside a timing; a stock ``rpc_server`` does not, and
its runs have no profile (:data:`NOT_REGISTERED`). The device answers, per call of one inference in order, its
function's name, its arguments' shapes and the median of its times over the repetitions, and the median time of
an uninstrumented inference, timed as a run's latency is (TVM's time evaluator) in rounds that alternate with the
instrumented inferences (:class:`CallTimes`).

:func:`summarize` groups the calls into a :class:`pipeline.results.Profile`: a *kernel* is any function the VM
calls that is not one of its own builtins (``vm.builtin.*``: allocations, shape checks, tuples, reshapes), i.e.
the model's compiled kernels (and any library function the build calls); the *glue* is what an uninstrumented
inference takes beyond its kernels: the builtins and the VM's own work between calls. Each kernel's share is of
``total_ms`` (kernels + glue). Timing a call costs the instrument's own work (about a microsecond on a desktop
CPU), which each call's time includes: calls of a few microseconds are overstated, and when a model's kernels
are that short their timed sum can exceed the uninstrumented inference (the glue is then 0, and the profile
says so in its note).

FLOPs are counted where the model was built: the build stage records each compiled kernel's floating-point
operations (:func:`recording_pipeline`: TVM's own estimate over the kernels the build compiled, by the name
the VM calls them by) in the build's ``kernels.json`` (:func:`kernel_flops`); the device only times.

For the bench and other code that holds a VM: :func:`profile_vm` profiles a ``relax.VirtualMachine`` (on this
machine, or over an RPC session to a device that registers ``tvmrp.profile``) and returns the same Profile.
Only :func:`recording_pipeline` and :func:`profile_vm` of a local VM import TVM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import RemoteRunError, StoreError, clip
from pipeline.results import BuiltinTime, KernelTime, Profile

if TYPE_CHECKING:
    from pipeline.device import RemoteSession
    from pipeline.latency import Timing
    from pipeline.store import Artifact, ArtifactStore

PROFILE_FUNCTION = "tvmrp.profile"
#: Calls whose name starts so are the VM's own builtins: glue, not kernels.
BUILTIN_PREFIX = "vm."
#: The run's ``--profile`` times an instrumented inference (and as many uninstrumented ones) at least this many
#: times and for at least this long, at most for :data:`MAX_SECONDS` (as the latency's adaptive timing).
MIN_SAMPLES = 10
MIN_SECONDS = 1.0
MAX_SECONDS = 30.0
NOT_REGISTERED = ("profiling needs a device started from the bundle (or the embedded/emulated device): {device} "
                  "does not register tvmrp.profile (a stock rpc_server), so this run has no profile")
KERNELS_SCHEMA = 1
_ANSWER_LIMIT = 8 << 20  # bytes of JSON; ResNet-18's answer is ~40 kB
_CALL_LIMIT = 20_000
_NAME_LIMIT = 200
_ARG_LIMIT = 32
_DIM_LIMIT = 16
_KERNELS_LIMIT = 16 << 20
#: Kernels a profile keeps one by one (its JSON and the ledger record stay small); the rest are one entry.
MAX_KERNELS = 500


@dataclass(frozen=True)
class CallTime:
    """One call of an inference: the function's name, its tensor arguments (``1x3x224x224``, with ``:dtype``
    when not float32) and the median of its times (ms)."""

    name: str
    shapes: tuple[str, ...]
    ms: float


@dataclass(frozen=True)
class CallTimes:
    """What the device timed (``tvmrp.profile``): each call of one inference, in order; the median time of an
    uninstrumented inference (``plain_ms``) and the median wall time of an instrumented one; how many
    instrumented inferences were timed."""

    calls: tuple[CallTime, ...]
    plain_ms: float
    instrumented_ms: float
    repeat: int


def repeats_for(timing: Timing, median_ms: float) -> int:
    """How many instrumented inferences to time, for an inference of ``median_ms``: ``--repeat`` when given,
    else at least :data:`MIN_SAMPLES` and :data:`MIN_SECONDS`, at most :data:`MAX_SECONDS` of them."""
    from dataclasses import replace

    if timing.repeat is not None:
        return timing.repeat
    adaptive = replace(timing, min_samples=MIN_SAMPLES, min_seconds=MIN_SECONDS, max_seconds=MAX_SECONDS)
    return adaptive.samples_for(max(median_ms, 0.0) / 1e3)


# -- on the device ----------------------------------------------------------------------------------------------------


def profile_remote(session: RemoteSession, vm: Any, device_kind: str, repeat: int,
                   max_seconds: float = MAX_SECONDS) -> CallTimes | None:
    """Time every call of ``repeat`` inferences of the remote ``vm`` (a ``relax.VirtualMachine`` over the
    session, its input set) on the device, in one remote call bounded by the session's call timeout (the device
    stops repeating after ``max_seconds``, or half the call timeout if less).

    Returns:
        What the device timed; None when the device does not register ``tvmrp.profile`` (a stock rpc_server).

    Raises:
        RemoteRunError: the device could not profile the VM, or answered with something that is not a profile.
        DeviceTimeout, DeviceLost: as for :meth:`RemoteSession.call`.
    """
    seconds = max(0.0, min(max_seconds, session.call_timeout / 2))
    device_type = 2 if device_kind == "cuda" else 1

    def ask() -> Any:
        try:
            function = session.remote.get_function(PROFILE_FUNCTION)
        except AttributeError:  # TVM's answer for a function the server does not register
            return None
        return function(vm.module, device_type, 0, int(repeat), float(seconds))

    answer = session.call("profile", ask)
    if answer is None:
        return None
    return parse_answer(answer, session.description)


def profile_vm(vm: Any, repeat: int = 30, max_seconds: float = MAX_SECONDS, remote: Any = None,
               device_kind: str = "cpu", flops: Mapping[str, float] | None = None) -> Profile:
    """The profile of ``vm`` (a ``tvm.runtime.vm.VirtualMachine`` with its input set): for the bench and any code
    that holds a VM rather than a run.

    Args:
        vm: a VM on this machine, or (with ``remote``) on a device.
        repeat: instrumented inferences to time (and as many uninstrumented ones between them).
        max_seconds: stop repeating after this long (at least one of each is timed).
        remote: the ``tvm.rpc`` session ``vm`` lives in (a device that registers ``tvmrp.profile``); None: here.
        device_kind: ``cpu`` or ``cuda`` (a GPU is synchronised around every timed call).
        flops: each kernel's floating-point operations per call (:func:`kernel_flops`, or :func:`recording_pipeline`).

    Raises:
        RemoteRunError: the device does not register ``tvmrp.profile``, or could not profile the VM.
    """
    device_type = 2 if device_kind == "cuda" else 1
    if remote is not None:
        try:
            function = remote.get_function(PROFILE_FUNCTION)
        except AttributeError:
            raise RemoteRunError(NOT_REGISTERED.format(device="this device")) from None
        answer = function(vm.module, device_type, 0, int(repeat), float(max_seconds))
    else:
        from pipeline.device.device_side.tvmrp_device import profile_json

        answer = profile_json(vm.module, device_type, 0, int(repeat), float(max_seconds))
    return summarize(parse_answer(answer, "the device" if remote is not None else "this machine"), flops)


def parse_answer(answer: object, device: str = "the device") -> CallTimes:
    """A ``tvmrp.profile`` answer (untrusted JSON) as :class:`CallTimes`; names clipped, shapes bounded.

    Raises:
        RemoteRunError: the answer says the device could not profile (its ``error``), or is not a profile.
    """
    text = str(answer)

    def refuse(why: str) -> RemoteRunError:
        return RemoteRunError(f"{device} answered {PROFILE_FUNCTION} with {why}")

    if len(text) > _ANSWER_LIMIT:
        raise refuse(f"{len(text):,} characters (at most {_ANSWER_LIMIT:,})")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise refuse(f"something that is not JSON ({clip(text, 80)!r})") from None
    if not isinstance(data, dict):
        raise refuse("something that is not a JSON object")
    if isinstance(data.get("error"), str):
        raise RemoteRunError(f"{device} could not profile the model: {clip(_printable(data['error']), 200)}")
    calls, plain, instrumented, repeat = (data.get(k) for k in ("calls", "plain_ms", "instrumented_ms", "repeat"))
    if (not isinstance(calls, list) or len(calls) > _CALL_LIMIT or not _time(plain) or not _time(instrumented)
            or type(repeat) is not int or repeat < 1):
        raise refuse("something that is not a profile (calls, plain_ms, instrumented_ms, repeat)")
    parsed = []
    for call in calls:
        name, ms = (call.get("name"), call.get("ms")) if isinstance(call, dict) else (None, None)
        if not isinstance(name, str) or not name or not _time(ms):
            raise refuse("a call that has no name or time")
        args = call.get("args")
        shapes = tuple(s for s in (_shape(a) for a in (args if isinstance(args, list) else [])[:_ARG_LIMIT]) if s)
        parsed.append(CallTime(_printable(name)[:_NAME_LIMIT], shapes, float(ms)))
    return CallTimes(tuple(parsed), float(plain), float(instrumented), repeat)


def _printable(text: str) -> str:
    """``text`` with every character that is not printable replaced by ``?`` (names from a device)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1e9


def _shape(arg: Any) -> str | None:
    """``[[1, 3, 224, 224], "float32"]`` -> ``1x3x224x224`` (``:dtype`` when not float32); None for anything
    else (a non-tensor argument)."""
    if not (isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], list) and isinstance(arg[1], str)):
        return None
    dims, dtype = arg
    if len(dims) > _DIM_LIMIT or not all(type(d) is int and 0 <= d < 1 << 40 for d in dims):
        return None
    text = "x".join(map(str, dims)) or "scalar"
    return text if dtype == "float32" else f"{text}:{_printable(dtype)[:16]}"


# -- grouping ---------------------------------------------------------------------------------------------------------


def is_builtin(name: str) -> bool:
    """Whether a called function is one of the VM's own builtins (glue) rather than a kernel."""
    return name.startswith(BUILTIN_PREFIX)


def summarize(times: CallTimes, flops: Mapping[str, float] | None = None) -> Profile:
    """Group the calls of one inference by kernel (name; its shapes are those of its first call), slowest first,
    and the builtins by name; the glue is the uninstrumented inference's time beyond the kernels.

    Args:
        flops: floating-point operations per call of each kernel, by name (:func:`kernel_flops`); None: unknown.
    """
    kernels: dict[str, list[Any]] = {}
    builtins: dict[str, list[Any]] = {}
    for call in times.calls:
        group = builtins if is_builtin(call.name) else kernels
        entry = group.setdefault(call.name, [0, 0.0, call.shapes])
        entry[0] += 1
        entry[1] += call.ms
    kernels_ms = sum(entry[1] for entry in kernels.values())
    glue_ms = max(0.0, times.plain_ms - kernels_ms)
    total_ms = kernels_ms + glue_ms
    note = None
    if kernels_ms > times.plain_ms * 1.02:
        note = (f"the kernels' timed calls add up to {kernels_ms:.4g} ms, more than an uninstrumented inference "
                f"({times.plain_ms:.4g} ms): calls this short are overstated by the instrument's own cost")
    rows = []
    for name, (calls, ms, shapes) in kernels.items():
        per_call = (flops or {}).get(name)
        total_flops = per_call * calls if per_call is not None else None
        rows.append(KernelTime(
            name=name, calls=calls, ms=ms, share=ms / total_ms if total_ms > 0 else 0.0, shapes=shapes,
            flops=total_flops,
            gflop_per_s=total_flops / (ms / 1e3) / 1e9 if total_flops and ms > 0 else None,
        ))
    rows.sort(key=lambda k: (-k.ms, k.name))
    if len(rows) > MAX_KERNELS:
        rest = rows[MAX_KERNELS - 1:]
        ms = sum(k.ms for k in rest)
        rows = [*rows[:MAX_KERNELS - 1], KernelTime(f"({len(rest)} more kernels)", sum(k.calls for k in rest), ms,
                                                     ms / total_ms if total_ms > 0 else 0.0)]
    glue = sorted((BuiltinTime(name, calls, ms) for name, (calls, ms, _) in builtins.items()),
                  key=lambda b: (-b.ms, b.name))
    return Profile(kernels=tuple(rows), glue_ms=glue_ms, total_ms=total_ms, kernels_ms=kernels_ms,
                   measured_ms=times.plain_ms, instrumented_ms=times.instrumented_ms, repeat=times.repeat,
                   builtins=tuple(glue), flops_known=flops is not None, note=note)


# -- FLOPs, where the model is built ---------------------------------------------------------------------------------


def recording_pipeline(into: dict[str, float]) -> Any:
    """TVM's default Relax pipeline for a CPU target (what ``tvm.compile`` runs by default), followed by a pass
    that changes nothing and records in ``into`` each kernel's floating-point operations per call, by the name the
    VM calls it by (TVM's ``estimate_tir_flops``; a kernel it cannot estimate is left out). The compiled code is
    the same as without it."""
    import tvm
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops

    @tvm.transform.module_pass(opt_level=0, name="tvmrp.RecordKernelFlops")
    def record(mod: Any, _context: Any) -> Any:
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                try:
                    into[gv.name_hint] = float(estimate_tir_flops(tvm.IRModule({gv: func})))
                except Exception:  # noqa: BLE001 - a kernel TVM cannot count is left out (its FLOPs: unknown)
                    continue
        return mod

    return tvm.transform.Sequential([relax.get_pipeline("default"), record])


def kernels_json(flops: Mapping[str, float]) -> bytes:
    """The build's ``kernels.json``: ``{"schema": 1, "kernels": {name: {"flops": n}}}``."""
    return json.dumps({"schema": KERNELS_SCHEMA, "kernels": {name: {"flops": value} for name, value in
                                                              sorted(flops.items())}}, indent=0).encode()


def parse_kernels(data: bytes) -> dict[str, float] | None:
    """A ``kernels.json`` (read from the store, so untrusted even once verified) as FLOPs by kernel name; None when
    it is not one."""
    if len(data) > _KERNELS_LIMIT:
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    kernels = parsed.get("kernels") if isinstance(parsed, dict) and parsed.get("schema") == KERNELS_SCHEMA else None
    if not isinstance(kernels, dict):
        return None
    return {str(name)[:_NAME_LIMIT]: float(entry["flops"]) for name, entry in kernels.items()
            if isinstance(entry, dict) and _count(entry.get("flops"))}


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def kernel_flops(store: ArtifactStore, build: Artifact) -> dict[str, float] | None:
    """The FLOPs per call of each kernel of ``build`` (its ``kernels.json``); None when the build has none (a GPU
    build) or it cannot be read."""
    from pipeline.store.layout import KERNELS_FILE

    if not any(entry.name == KERNELS_FILE for entry in build.files):
        return None
    try:
        data, _ = store.read_verified(build.key, KERNELS_FILE)
    except StoreError:
        return None
    return parse_kernels(data)
