"""Stage ``upload``: send the exported library to the device, unless the device already keeps it.

The library's bytes are checked against the digest in its manifest right before sending, so a copy
corrupted on disk is never uploaded. With a device cache (:mod:`pipeline.device_cache`) the library goes to
a directory the device keeps between sessions, and a later run that finds the same digest there sends
nothing; without one it goes to the session's directory under a name that carries the artifact key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import device_triple
from pipeline.device_cache import DeviceCache
from pipeline.errors import ArchMismatch, DeviceLost, RemoteRunError, StoreError
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import normalise_arch
from tasks._sessions import SessionRef, live
from tasks.export_library import LIBRARY_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Uploaded:
    """The library on the device: its remote name, its size, the seconds this stage took, whether it was sent."""

    remote_name: str
    bytes: int
    seconds: float
    reused: bool = False
    """The device already held this library (same digest): nothing was sent."""

    @property
    def mb_per_s(self) -> float | None:
        if self.reused:
            return None
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "seconds": self.seconds, "mb_per_s": self.mb_per_s, "reused": self.reused,
                "remote_name": self.remote_name}


def upload(
    session: SessionRef,
    library: Artifact,
    store_root: str,
    target_arch: str,
    device_cache: str | None = None,
    reuse: bool = True,
) -> Uploaded:
    """Verify and upload ``library`` (built for ``target_arch``) to the device behind ``session``.

    Args:
        device_cache: Directory on the device that keeps libraries between runs (None: the session's own).
        reuse: Load a copy the device cache already holds instead of uploading (False: upload anyway).

    Raises:
        ArchMismatch: the device reports another architecture than the library's (nothing is uploaded).
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
        DeviceTimeout / RemoteRunError: the upload did not finish in time or failed.
    """
    live_session = live(session)
    remote = live_session.session
    triple = device_triple(remote)
    device_arch = normalise_arch(triple.split("-")[0]) if triple else None
    if device_arch and device_arch != target_arch:
        suggestion = f"llvm -mtriple={device_arch}-linux-gnu" + (" -mattr=+neon" if device_arch == "aarch64" else "")
        raise ArchMismatch(
            f"the library is built for {target_arch} but {session.description} is {device_arch} ({triple}): "
            f"build for the device with --target \"{suggestion}\" or pick a {target_arch} device"
        )
    store = ArtifactStore(store_root)
    data, sha256 = _verified_bytes(store, library)
    start = time.perf_counter()
    if device_cache is not None:
        cache = DeviceCache(device_cache)
        copy = cache.find(remote, sha256, len(data)) if reuse else None
        reused = copy is not None
        if copy is None:
            try:
                copy = cache.put(remote, data, sha256)
            except DeviceLost:
                raise
            except RemoteRunError as exc:
                log.warning("cannot write the device cache %s on %s (%s): uploading into the session's directory; "
                            "give --device-cache an existing writable directory on the device, or off",
                            device_cache, session.description, exc)
        if copy is not None:
            remote_name = cache.path(copy.file)
            live_session.state.update(remote_name=remote_name, device_cache=cache, device_copy=copy,
                                      device_copy_reused=reused)
            return Uploaded(remote_name, len(data), time.perf_counter() - start, reused)
    remote_name = f"tvmrp-{library.key[:16]}.so"
    remote.call("upload", remote.remote.upload, data, remote_name)
    seconds = time.perf_counter() - start
    live_session.state["remote_name"] = remote_name
    return Uploaded(remote_name, len(data), seconds)


def _verified_bytes(store: ArtifactStore, library: Artifact) -> tuple[bytearray, str]:
    """The library's bytes and sha256, read once and checked against its manifest in the store."""
    try:
        data, sha256 = store.read_verified(library.key, LIBRARY_FILE)
    except StoreError as exc:
        raise StoreError(f"{exc}; it was not uploaded. Run again to rebuild it") from exc
    return bytearray(data), sha256


upload_task = task(name="upload", task_run_name="upload", cache_policy=NO_CACHE, persist_result=False)(upload)
