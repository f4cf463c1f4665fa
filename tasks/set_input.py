"""Stage ``set-input``: copy the preprocessed image to the device and bind it to ``main``'s input."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._sessions import SessionRef, live


@dataclass(frozen=True)
class InputSet:
    """The input now bound on the device."""

    shape: tuple[int, ...]
    dtype: str
    seconds: float


def set_input(session: SessionRef, data: np.ndarray) -> InputSet:
    """Send ``data`` to the device and ``vm.set_input("main", ...)`` it.

    Raises:
        DeviceTimeout / RemoteRunError: the device did not accept the input in time.
    """
    import tvm

    live_session = live(session)
    vm = live_session.need("vm", "load")
    start = time.perf_counter()
    remote_input = live_session.session.call(
        "set-input", tvm.runtime.tensor, np.ascontiguousarray(data), live_session.state["device"]
    )
    live_session.session.call("set-input", vm.set_input, "main", remote_input)
    live_session.state["input"] = remote_input
    return InputSet(tuple(data.shape), str(data.dtype), time.perf_counter() - start)


set_input_task = task(name="set-input", task_run_name="set-input", cache_policy=NO_CACHE, persist_result=False)(set_input)
