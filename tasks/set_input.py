"""Stage ``set-input``: copy the preprocessed image to the device and bind it to ``main``'s input."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._live import LiveRef, device_of, get, keep, session_of
from tasks.load import Loaded


@dataclass(frozen=True)
class InputSet:
    """The input bound on the device's VM: what ``run`` runs.

    Attributes:
        loaded: the VM it is bound to.
        tensor: handle on the remote input tensor (kept alive while the VM uses it).
    """

    loaded: Loaded
    tensor: LiveRef
    shape: tuple[int, ...]
    dtype: str
    seconds: float


def set_input(loaded: Loaded, data: np.ndarray) -> InputSet:
    """Send ``data`` to the device and ``vm.set_input("main", ...)`` it.

    Raises:
        DeviceTimeout / RemoteRunError: the device did not accept the input in time.
    """
    import tvm

    session = session_of(loaded.session)
    vm = get(loaded.vm)
    start = time.perf_counter()
    device = device_of(loaded.session, loaded.device_kind)
    remote_input = session.call("set-input", tvm.runtime.tensor, np.ascontiguousarray(data), device)
    session.call("set-input", vm.set_input, "main", remote_input)
    tensor = keep(loaded.session, remote_input, "input")
    return InputSet(loaded, tensor, tuple(data.shape), str(data.dtype), time.perf_counter() - start)


set_input_task = task(name="set-input", task_run_name="set-input", cache_policy=NO_CACHE, persist_result=False)(set_input)
