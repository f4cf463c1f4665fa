"""Stage ``upload``: send the exported library to the device.

The library's digest is verified against its manifest right before sending, so a copy corrupted on disk
is never uploaded. The remote file name carries the artifact key, so libraries never overwrite each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import device_triple
from pipeline.errors import ArchMismatch, StoreError
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import normalise_arch
from tasks._sessions import SessionRef, live
from tasks.export_library import LIBRARY_FILE


@dataclass(frozen=True)
class Uploaded:
    """What was uploaded: the remote file name, its size and how long it took."""

    remote_name: str
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def upload(session: SessionRef, library: Artifact, store_root: str, target_arch: str) -> Uploaded:
    """Verify and upload ``library`` (built for ``target_arch``) to the device behind ``session``.

    Raises:
        ArchMismatch: the device reports another architecture than the library's (nothing is uploaded).
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
        DeviceTimeout / RemoteRunError: the upload did not finish in time or failed.
    """
    live_session = live(session)
    triple = device_triple(live_session.session)
    device_arch = normalise_arch(triple.split("-")[0]) if triple else None
    if device_arch and device_arch != target_arch:
        suggestion = f"llvm -mtriple={device_arch}-linux-gnu" + (" -mattr=+neon" if device_arch == "aarch64" else "")
        raise ArchMismatch(
            f"the library is built for {target_arch} but {session.description} is {device_arch} ({triple}): "
            f"build for the device with --target \"{suggestion}\" or pick a {target_arch} device"
        )
    store = ArtifactStore(store_root)
    if store.get(library.key) is None:
        raise StoreError(f"library {library.key} is missing or corrupt in {store.root}; it was not uploaded. Run again to rebuild it")
    path = store.file(library, LIBRARY_FILE)
    remote_name = f"tvmrp-{library.key[:16]}.so"
    start = time.perf_counter()
    live_session.session.upload(path, remote_name)
    seconds = time.perf_counter() - start
    live_session.state["remote_name"] = remote_name
    return Uploaded(remote_name, path.stat().st_size, seconds)


upload_task = task(name="upload", task_run_name="upload", cache_policy=NO_CACHE, persist_result=False)(upload)
