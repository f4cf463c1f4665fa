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
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import RemoteSession
from pipeline.device.probe import device_load, device_threads, host_load, set_threads
from pipeline.errors import RemoteRunError
from pipeline.latency import Latency, Timing, latency_of
from pipeline.results import Conditions
from tasks._live import device_of, get, session_of
from tasks.set_input import InputSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """The model's output (as fetched from the device), its latency and what it was timed under (None: not
    timed)."""

    output: np.ndarray
    latency: Latency | None
    seconds: float
    conditions: Conditions | None = None


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


def run(inputs: InputSet, timing: Timing | None = Timing()) -> RunResult:
    """Invoke ``main`` once, fetch its output, then time it as ``timing`` says (see the module docstring; None:
    not timed, e.g. each image of an accuracy run).

    Raises:
        DeviceTimeout / RemoteRunError: the device did not answer in time or failed.
    """
    session = session_of(inputs.loaded.session)
    vm = get(inputs.loaded.vm)
    device = device_of(inputs.loaded.session, inputs.loaded.device_kind)
    start = time.perf_counter()
    threads = _apply_threads(session, timing.threads) if timing is not None and timing.threads else None
    session.call("run", vm.invoke_stateful, "main")
    output = session.call("run", lambda: _single_output(vm.get_outputs("main"), session.description).numpy())
    if timing is None:
        return RunResult(np.asarray(output), None, time.perf_counter() - start)

    def measure(repeat: int) -> list[float]:
        evaluator = vm.time_evaluator("invoke_stateful", device, number=timing.number, repeat=repeat)
        return [float(s) * 1e3 for s in evaluator("main").results]

    conditions = Conditions(threads=threads or device_threads(session), threads_requested=timing.threads,
                            device=device_load(session), host=host_load())
    if timing.repeat is not None:
        samples = session.call("run", measure, timing.repeat)
    else:  # the first sample (after TVM's own warm-up call) tells how many the rest must be; it is one of them
        first = session.call("run", measure, 1)
        rest = timing.samples_for(first[0] / 1e3) - 1
        samples = first + (session.call("run", measure, rest) if rest > 0 else [])
    return RunResult(np.asarray(output), latency_of(samples, timing.number), time.perf_counter() - start, conditions)


def _apply_threads(session: RemoteSession, threads: int) -> int | None:
    """Set the device's TVM thread pool; warn when the device gives fewer threads than asked for."""
    used = set_threads(session, threads)
    if used is not None and used != threads:
        log.warning("--threads %d: %s runs %d TVM thread(s); its pool cannot grow beyond the threads it started "
                    "with (set TVM_NUM_THREADS where the device's rpc_server starts)", threads,
                    session.description, used)
    return used


run_task = task(name="run", task_run_name="run", cache_policy=NO_CACHE, persist_result=False)(run)
