"""Stage ``run``: run ``main`` on the device, fetch its output, and time it with ``time_evaluator``.

Uses ``invoke_stateful`` + ``get_outputs`` (TVM's documented path over RPC; a remote ``vm["main"](...)``
fails for some models, apache/tvm#18108).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import UsageError
from tasks._sessions import SessionRef, live


@dataclass(frozen=True)
class Latency:
    """Latency statistics of one inference, in milliseconds, over ``repeat`` measurements of ``number`` runs."""

    mean: float
    median: float
    min: float
    max: float
    std: float
    number: int
    repeat: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "median": self.median, "min": self.min, "max": self.max, "std": self.std}


@dataclass(frozen=True)
class RunResult:
    """The model's first output (as fetched from the device) and its latency."""

    output: np.ndarray
    latency: Latency
    seconds: float


def _first_tensor(outputs: object) -> object:
    # Relax functions imported from torch return a tuple; ONNX ones return the tensor itself.
    while not hasattr(outputs, "numpy") and hasattr(outputs, "__getitem__") and len(outputs) > 0:  # type: ignore[arg-type]
        outputs = outputs[0]  # type: ignore[index]
    return outputs


def run(session: SessionRef, number: int = 1, repeat: int = 5) -> RunResult:
    """Invoke ``main`` once, fetch its output, then time ``repeat`` x ``number`` invocations.

    Raises:
        UsageError: number or repeat below 1.
        DeviceTimeout / RemoteRunError: the device did not answer in time or failed.
    """
    if number < 1 or repeat < 1:
        raise UsageError(f"--number and --repeat must be at least 1 (got {number}, {repeat})")
    live_session = live(session)
    vm = live_session.need("vm", "load")
    live_session.need("input", "set-input")
    call = live_session.session.call
    start = time.perf_counter()
    call("run", vm.invoke_stateful, "main")
    output = call("run", lambda: _first_tensor(vm.get_outputs("main")).numpy())
    device = live_session.state["device"]
    timing = call("run", lambda: vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)("main"))
    latency = Latency(
        mean=timing.mean * 1e3, median=timing.median * 1e3, min=timing.min * 1e3, max=timing.max * 1e3,
        std=timing.std * 1e3, number=number, repeat=repeat,
    )
    return RunResult(np.asarray(output), latency, time.perf_counter() - start)


run_task = task(name="run", task_run_name="run", cache_policy=NO_CACHE, persist_result=False)(run)
