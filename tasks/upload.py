"""Stage ``upload``: make the exported library available on the device, unless the device already keeps it.

The device is asked for its architecture first, and a library built for another one is refused before
anything is sent. The library's bytes are checked against the digest in its manifest right before sending,
so a copy corrupted on disk is never uploaded. With a device cache (:mod:`pipeline.device_cache`) the
library goes to a directory the device keeps between sessions, and a later run that finds the same digest
there (under a marker this client authenticated) sends nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import device_triple, probe
from pipeline.device_cache import DeviceCache, Placement, cache_secret, place
from pipeline.errors import ArchMismatch, StoreError
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import normalise_arch
from tasks._live import SessionRef, session_of
from tasks.progress import while_waiting
from tasks.export_library import LIBRARY_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Uploaded:
    """The library on the device, ready for the ``load`` stage.

    Attributes:
        session: the session it was placed through.
        library: the library artifact (its bytes are read again if a kept copy must be replaced).
        placement: where it is on the device, its size, the seconds this stage took, whether it was sent.
        device_cache: the device directory that keeps libraries (None: the session's own directory).
    """

    session: SessionRef
    library: Artifact
    placement: Placement
    device_cache: str | None = None
    device_identity: str = "unknown"
    """What the device reported about itself (its LLVM triple; its GPU's compute capability)."""
    device_kind: str = "cpu"
    """Where the model runs on the device: ``cpu`` or ``cuda``."""

    @property
    def remote_name(self) -> str:
        return self.placement.remote_name

    @property
    def bytes(self) -> int:
        return self.placement.bytes

    @property
    def reused(self) -> bool:
        return self.placement.reused


def open_cache(device_cache: str | None, store_root: str) -> DeviceCache | None:
    """The device cache of a run (its markers are authenticated with the store's secret), or None."""
    return None if device_cache is None else DeviceCache(device_cache, cache_secret(store_root))


def verified_library(library: Artifact, store_root: str) -> tuple[bytearray, str]:
    """The library's bytes and sha256, read once and checked against its manifest in the store.

    Raises:
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
    """
    try:
        data, sha256 = ArtifactStore(store_root).read_verified(library.key, LIBRARY_FILE)
    except StoreError as exc:
        raise StoreError(f"{exc}; it was not uploaded. Run again to rebuild it") from exc
    return bytearray(data), sha256


def check_gpu(session: SessionRef, gpu_arch: str) -> str:
    """Refuse a library built for the GPU architecture ``gpu_arch`` (``sm_90``) unless the device has that GPU.

    A cubin runs on GPUs of its major compute capability and the same or a higher minor one; an ``sm_90a``
    cubin on compute capability 9.0 only.

    Returns:
        The device's compute capability, e.g. ``"9.0"``.

    Raises:
        ArchMismatch: the device has no CUDA GPU (or its rpc_server was started without TVM's CUDA runtime),
            or a GPU of another compute capability (nothing is uploaded).
    """
    remote = session_of(session)
    info = probe(remote)
    if not info.has_cuda or not info.compute_version:
        raise ArchMismatch(
            f"the library is built for a CUDA GPU ({gpu_arch}) but {session.description} has no CUDA GPU that its "
            "TVM can use: pick a GPU device, or start its rpc_server with TVM's CUDA runtime (scripts/device-bundle "
            "--cuda makes a device that does); to run on this device's CPU, build for an llvm target"
        )
    major, _, minor = info.compute_version.partition(".")
    wanted = gpu_arch.removeprefix("sm_")
    exact = wanted.endswith(("a", "f"))
    w_major, w_minor = wanted.rstrip("af")[:-1], wanted.rstrip("af")[-1:]
    if major != w_major or (int(minor or 0) != int(w_minor) if exact else int(minor or 0) < int(w_minor)):
        raise ArchMismatch(
            f"the library is built for {gpu_arch} but the GPU of {session.description} has compute capability "
            f"{info.compute_version} (sm_{major}{minor}): build for it with --target \"cuda -arch=sm_{major}{minor}\""
        )
    return info.compute_version


def check_arch(session: SessionRef, target_arch: str) -> str | None:
    """Refuse a library built for ``target_arch`` when the device reports another architecture.

    Returns:
        The device's LLVM triple, if it can tell.

    Raises:
        ArchMismatch: the device is another architecture (nothing is uploaded).
    """
    triple = device_triple(session_of(session))
    device_arch = normalise_arch(triple.split("-")[0]) if triple else None
    if device_arch and device_arch != target_arch:
        suggestion = f"llvm -mtriple={device_arch}-linux-gnu" + (" -mattr=+neon" if device_arch == "aarch64" else "")
        raise ArchMismatch(
            f"the library is built for {target_arch} but {session.description} is {device_arch} ({triple}): "
            f"build for the device with --target \"{suggestion}\" or pick a {target_arch} device"
        )
    return triple


def upload(
    session: SessionRef,
    library: Artifact,
    store_root: str,
    target_arch: str,
    device_cache: str | None = None,
    reuse: bool = True,
    gpu_arch: str | None = None,
) -> Uploaded:
    """Verify ``library`` (built for ``target_arch``) and make it available on the device behind ``session``.

    Args:
        device_cache: Directory on the device that keeps libraries between runs (None: the session's own).
        reuse: Use a copy the device cache already holds instead of uploading (False: upload anyway).
        gpu_arch: The GPU architecture of a CUDA library (``sm_90``); the model then runs on the device's GPU.

    Raises:
        ArchMismatch: the device reports another architecture than the library's (nothing is uploaded).
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
        DeviceTimeout / RemoteRunError: the upload did not finish in time or failed.
    """
    triple = check_arch(session, target_arch)
    gpu = check_gpu(session, gpu_arch) if gpu_arch else None
    identity = (triple or "unknown") + (f", cuda {gpu} ({gpu_arch})" if gpu else "")
    data, sha256 = verified_library(library, store_root)
    with while_waiting(f"upload-{library.key[:16]}", f"upload of the library ({len(data) / 1e6:.1f} MB) to "
                       f"{session.description}"):
        placement = place(session_of(session), open_cache(device_cache, store_root), data, sha256, reuse=reuse,
                          session_name=f"tvmrp-{library.key[:16]}.so")
    return Uploaded(session, library, placement, device_cache, identity, "cuda" if gpu_arch else "cpu")


upload_task = task(name="upload", task_run_name="upload", cache_policy=NO_CACHE, persist_result=False)(upload)
