"""Stage ``load``: load the uploaded library on the device and create a Relax VM on its CPU or GPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import RemoteSession
from pipeline.device.cache import Placement, load_placed
from pipeline.errors import RemoteRunError
from pipeline.store import ArtifactStore
from tasks._live import LiveRef, SessionRef, device_of, keep, session_of
from tasks.upload import Uploaded, open_cache


@dataclass(frozen=True)
class Loaded:
    """The library loaded on the device, with a Relax VM over it: what ``set-input`` and ``run`` use.

    Attributes:
        session: the session it lives in.
        vm: handle on the ``relax.VirtualMachine``.
        placement: where the library was loaded from.
        seconds: wall time of this stage (a kept copy's check included).
        load_seconds: of that, loading the library and creating its VM (two remote calls): the device's load time.
    """

    session: SessionRef
    vm: LiveRef
    placement: Placement
    seconds: float
    device_kind: str = "cpu"
    """Where the VM runs: ``cpu`` or ``cuda``."""
    load_seconds: float | None = None

    @property
    def remote_name(self) -> str:
        return self.placement.remote_name


def _vm_loader(session: RemoteSession, device: Any, took: list[float]) -> Any:
    """A function that loads a device path and returns its Relax VM on ``device`` (appending the seconds that
    took to ``took``); any refusal is a RemoteRunError."""
    from tvm.runtime.vm import VirtualMachine  # also in a runtime-only TVM (tvm.relax is not)

    def load_vm(remote_name: str) -> Any:
        start = time.perf_counter()
        library = session.call("load", session.remote.load_module, remote_name)
        try:
            vm = session.call("load", VirtualMachine, library, device)
        except (AttributeError, TypeError, ValueError) as exc:  # e.g. "Module has no function 'vm_load_executable'"
            raise RemoteRunError(
                f"load on {session.description} failed: {remote_name} is not a TVM Relax library ({exc})"
            ) from exc
        took.append(time.perf_counter() - start)
        return vm

    return load_vm


def load(uploaded: Uploaded, store: ArtifactStore) -> Loaded:
    """``remote.load_module`` the uploaded library and wrap it in ``relax.VirtualMachine``.

    A copy the device kept from an earlier run is first compared with what its marker says (size and SHA-256,
    on a device that tells them: :func:`pipeline.device.cache.load_placed`).

    Raises:
        KeptCopyFailed: the kept copy failed that check, did not load or is not a Relax library: it is
            forgotten (the device chain uploads the library again).
        DeviceTimeout / RemoteRunError: the device did not load it in time or failed to.
    """
    session = session_of(uploaded.session)
    start = time.perf_counter()
    device = device_of(uploaded.session, uploaded.device_kind)
    took: list[float] = []
    vm, placement = load_placed(
        session, open_cache(uploaded.device_cache, store), uploaded.placement, _vm_loader(session, device, took)
    )
    return Loaded(uploaded.session, keep(uploaded.session, vm, "vm"), placement, time.perf_counter() - start,
                  uploaded.device_kind, took[-1] if took else None)


load_task = task(name="load", task_run_name="load", cache_policy=NO_CACHE, persist_result=False)(load)
