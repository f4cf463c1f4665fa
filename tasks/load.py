"""Stage ``load``: load the uploaded library on the device and create a Relax VM on its CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import DeviceLost, RemoteRunError, StaleDeviceCopy
from tasks._sessions import SessionRef, live


@dataclass(frozen=True)
class Loaded:
    """The library now loaded on the device."""

    remote_name: str
    seconds: float


def load(session: SessionRef) -> Loaded:
    """``remote.load_module`` the uploaded library and wrap it in ``relax.VirtualMachine``.

    Raises:
        StaleDeviceCopy: the copy the device kept from an earlier run did not load (it is forgotten).
        DeviceTimeout / RemoteRunError: the device did not load it in time or failed to.
    """
    from tvm import relax

    live_session = live(session)
    remote_name = live_session.need("remote_name", "upload")
    remote = live_session.session.remote
    cache, copy = live_session.state.get("device_cache"), live_session.state.get("device_copy")
    start = time.perf_counter()
    try:
        library = live_session.session.call("load", remote.load_module, remote_name)
    except DeviceLost:
        raise
    except RemoteRunError as exc:
        if not live_session.state.get("device_copy_reused"):
            raise
        cache.forget(live_session.session, copy)
        raise StaleDeviceCopy(
            f"the copy of the library that {session.description} kept ({remote_name}) did not load ({exc}); "
            "it is forgotten, upload it again"
        ) from exc
    device = live_session.session.device()
    vm = live_session.session.call("load", relax.VirtualMachine, library, device)
    seconds = time.perf_counter() - start
    live_session.state.update(library=library, vm=vm, device=device)
    if copy is not None and not live_session.state.get("device_copy_reused"):
        cache.settle(live_session.session, copy)  # the device holds the library loaded: its file may go
    return Loaded(remote_name, seconds)


load_task = task(name="load", task_run_name="load", cache_policy=NO_CACHE, persist_result=False)(load)
