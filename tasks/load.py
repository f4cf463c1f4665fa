"""Stage ``load``: load the uploaded library on the device and create a Relax VM on its CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._sessions import SessionRef, live


@dataclass(frozen=True)
class Loaded:
    """The library now loaded on the device."""

    remote_name: str
    seconds: float


def load(session: SessionRef) -> Loaded:
    """``remote.load_module`` the uploaded library and wrap it in ``relax.VirtualMachine``.

    Raises:
        DeviceTimeout / RemoteRunError: the device did not load it in time or failed to.
    """
    from tvm import relax

    live_session = live(session)
    remote_name = live_session.need("remote_name", "upload")
    remote = live_session.session.remote
    start = time.perf_counter()
    library = live_session.session.call("load", remote.load_module, remote_name)
    device = live_session.session.device()
    vm = live_session.session.call("load", relax.VirtualMachine, library, device)
    live_session.state.update(library=library, vm=vm, device=device)
    return Loaded(remote_name, time.perf_counter() - start)


load_task = task(name="load", task_run_name="load", cache_policy=NO_CACHE, persist_result=False)(load)
