"""Stage ``run``: run ``main`` on the device, fetch its output, and time it with ``time_evaluator``.

Uses ``invoke_stateful`` + ``get_outputs`` (TVM's documented path over RPC; a remote ``vm["main"](...)``
fails for some models, apache/tvm#18108). Timing is device-side (``time_evaluator`` runs the loop on the
device, after a warm-up call of its own): with ``--repeat N`` exactly N samples; adaptive (no ``--repeat``), a
first sample estimates the cost of one, then the rest of what :class:`pipeline.latency.Timing` asks for. Each
sample is a separate measurement, summarised by :func:`pipeline.latency.latency_of` (mean, median, p90, p99,
min, max, std, CV). With ``--repeat N`` the model runs N + 2 times (the invocation whose output is fetched,
TVM's warm-up call, N samples), as a plain script does; adaptive timing costs one more warm-up call.

With ``--threads N`` the device's TVM thread pool is set before the first invocation
(:func:`pipeline.device.probe.set_threads`). Right before timing, the run notes what it is timed under
(:class:`pipeline.results.Conditions`): the pool's threads, the device's load (devices that tell it) and this
host's.

Besides the latency the stage notes the first (cold) inference's time, as this client times that remote call,
and after everything the peak resident memory of the device's session process (devices that tell it). With
``profile`` it then times every call of inferences on the device (:func:`pipeline.profiling.profile_remote`:
:func:`pipeline.profiling.repeats_for` of them, at most 30 s); when the device cannot (a stock rpc_server) or
could not profile the model, the result's ``notes`` say why and the run goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import RemoteSession
from pipeline.device.probe import device_load, device_memory, device_threads, host_load, set_threads
from pipeline.errors import DeviceLost, RemoteRunError, one_line
from pipeline.latency import Latency, Timing, latency_of
from pipeline.profiling import NOT_REGISTERED, CallTimes, profile_remote, repeats_for
from pipeline.results import Conditions
from tasks._live import device_of, get, session_of
from tasks.set_input import InputSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """The model's output (as fetched from the device), its latency and what it was timed under (None: not
    timed).

    Attributes:
        first_inference_ms: the first invocation's time, as this client timed the remote call.
        peak_memory_bytes: the device session's peak resident memory after the run (None: it cannot tell, or
            the run was not timed).
        calls: every call of an inference timed on the device (``profile``; None without, or when the device
            cannot: ``notes`` says so).
    """

    output: np.ndarray
    latency: Latency | None
    seconds: float
    conditions: Conditions | None = None
    first_inference_ms: float | None = None
    peak_memory_bytes: int | None = None
    calls: CallTimes | None = None
    notes: tuple[str, ...] = ()


def _single_output(outputs: object, description: str) -> object:
    """The one tensor ``main`` returned (Relax functions imported from torch return a 1-tuple)."""
    while not hasattr(outputs, "numpy") and hasattr(outputs, "__getitem__"):
        count = len(outputs)  # type: ignore[arg-type]
        if count != 1:
            raise RemoteRunError(
                f"run on {description}: the model returned {count} outputs; the pipeline takes one (the logits)"
            )
        outputs = outputs[0]  # type: ignore[index]
    return outputs


def run(inputs: InputSet, timing: Timing | None = Timing(), profile: bool = False) -> RunResult:
    """Invoke ``main`` once, fetch its output, then time it as ``timing`` says (see the module docstring; None:
    not timed, e.g. each image of an accuracy run) and, with ``profile``, time each of its calls on the device.

    Raises:
        DeviceTimeout / RemoteRunError: the device did not answer in time or failed (a profile that fails is a
            note, unless the device was lost).
    """
    session = session_of(inputs.loaded.session)
    vm = get(inputs.loaded.vm)
    device = device_of(inputs.loaded.session, inputs.loaded.device_kind)
    start = time.perf_counter()
    threads = _apply_threads(session, timing.threads) if timing is not None and timing.threads else None
    first = time.perf_counter()
    session.call("run", vm.invoke_stateful, "main")
    first_ms = (time.perf_counter() - first) * 1e3
    output = session.call("run", lambda: _single_output(vm.get_outputs("main"), session.description).numpy())
    if timing is None:
        return RunResult(np.asarray(output), None, time.perf_counter() - start, first_inference_ms=first_ms)

    def measure(repeat: int) -> list[float]:
        evaluator = vm.time_evaluator("invoke_stateful", device, number=timing.number, repeat=repeat)
        return [float(s) * 1e3 for s in evaluator("main").results]

    conditions = Conditions(threads=threads or device_threads(session), threads_requested=timing.threads,
                            device=device_load(session), host=host_load())
    if timing.repeat is not None:
        samples = session.call("run", measure, timing.repeat)
    else:  # the first sample (after TVM's own warm-up call) tells how many the rest must be; it is one of them
        first_sample = session.call("run", measure, 1)
        rest = timing.samples_for(first_sample[0] / 1e3) - 1
        samples = first_sample + (session.call("run", measure, rest) if rest > 0 else [])
    latency = latency_of(samples, timing.number)
    calls, notes = (_profile(session, vm, inputs.loaded.device_kind, repeats_for(timing, latency.median))
                    if profile else (None, ()))
    return RunResult(np.asarray(output), latency, time.perf_counter() - start, conditions, first_ms,
                     device_memory(session), calls, notes)


def _profile(session: RemoteSession, vm: object, device_kind: str,
             repeat: int) -> tuple[CallTimes | None, tuple[str, ...]]:
    """What the device timed of every call, or None and why not: a device that cannot profile (a stock
    rpc_server) or could not profile this model is said in a note, and the run goes on; a lost device is not."""
    try:
        calls = profile_remote(session, vm, device_kind, repeat)
    except DeviceLost:
        raise
    except RemoteRunError as exc:
        note = f"no profile: {one_line(exc)}"
    else:
        if calls is not None:
            return calls, ()
        note = NOT_REGISTERED.format(device=session.description)
    log.warning("--profile: %s", note)
    return None, (note,)


def _apply_threads(session: RemoteSession, threads: int) -> int | None:
    """Set the device's TVM thread pool; warn when the device gives fewer threads than asked for."""
    used = set_threads(session, threads)
    if used is not None and used != threads:
        log.warning("--threads %d: %s runs %d TVM thread(s); its pool cannot grow beyond the threads it started "
                    "with (set TVM_NUM_THREADS where the device's rpc_server starts)", threads,
                    session.description, used)
    return used


run_task = task(name="run", task_run_name="run", cache_policy=NO_CACHE, persist_result=False)(run)
