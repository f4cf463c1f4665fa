"""Stage ``upload``: make the exported library available on the device, unless the device already keeps it.

The device is asked what it is first (its TVM version, architecture and GPU), and a library it could not run
is refused before anything is sent. The library's bytes are checked against the digest in its manifest right before sending,
so a copy corrupted on disk is never uploaded. With a device cache (:mod:`pipeline.device.cache`) the
library goes to a directory the device keeps between sessions, and a later run that finds the same digest
there (under a marker this client authenticated) sends nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.device import DeviceInfo, probe
from pipeline.device.probe import check_versions, device_arch
from pipeline.device.cache import DeviceCache, Placement, place
from pipeline.errors import ArchMismatch, StoreError
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import LIBRARY_FILE
from tasks._live import SessionRef, session_of
from tasks.progress import while_waiting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Uploaded:
    """The library on the device, ready for the ``load`` stage.

    Attributes:
        session: the session it was placed through.
        library: the library artifact.
        placement: where it is on the device, its size, the seconds this stage took, whether it was sent.
        device_cache: the device directory that keeps libraries (None: the session's own directory).
    """

    session: SessionRef
    library: Artifact
    placement: Placement
    device_cache: str | None = None
    device_identity: str = "unknown"
    """What the device reported about itself (:func:`inspect_device`): part of the run's series."""
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


def open_cache(device_cache: str | None, store: ArtifactStore) -> DeviceCache | None:
    """The device cache of a run (its markers are authenticated with the store's secret), or None."""
    return None if device_cache is None else DeviceCache(device_cache, store.device_cache_secret())


def verified_library(library: Artifact, store: ArtifactStore) -> tuple[bytearray, str]:
    """The library's bytes and sha256, read once and checked against its manifest in the store.

    Raises:
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
    """
    try:
        data, sha256 = store.read_verified(library.key, LIBRARY_FILE)
    except StoreError as exc:
        raise StoreError(f"{exc}; it was not uploaded. Run again to rebuild it") from exc
    return bytearray(data), sha256


def inspect_device(
    session: SessionRef, target_arch: str, gpu_arch: str | None = None, allow_version_skew: bool = False
) -> str:
    """Ask the device what it is (:func:`pipeline.device.probe`, once) and refuse what could not run there.

    Checks, in order: its TVM version against ours (another minor version is refused unless
    ``allow_version_skew``; another patch version warns), its architecture against the library's, and for a
    CUDA library (``gpu_arch``) its GPU.

    Returns:
        The device's identity for the run's series: its triple (or machine), TVM version, host name and GPU,
        where it told them.

    Raises:
        VersionSkew: the device runs another major or minor TVM version.
        ArchMismatch: another architecture, no CUDA GPU, or a GPU of another compute capability (nothing is
            uploaded).
    """
    return _inspect(session, target_arch, gpu_arch, allow_version_skew)[0]


def _inspect(
    session: SessionRef, target_arch: str, gpu_arch: str | None, allow_version_skew: bool
) -> tuple[str, DeviceInfo]:
    """:func:`inspect_device`, and what the device told (:class:`DeviceInfo`)."""
    info = probe(session_of(session))
    warning = check_versions(info, allow_skew=allow_version_skew, device=session.description)
    if warning:
        log.warning("%s", warning)
    _check_arch(info, session, target_arch)
    gpu = _check_gpu(info, session, gpu_arch) if gpu_arch else None
    parts = [info.triple or info.machine or "unknown"]
    parts += [f"tvm {info.tvm_version}"] if info.tvm_version else []
    parts += [f"host {info.hostname}"] if info.hostname else []
    parts += [f"cuda {gpu} ({gpu_arch})"] if gpu else []
    return ", ".join(parts), info


def _check_arch(info: DeviceInfo, session: SessionRef, target_arch: str) -> None:
    device = device_arch(info)
    if device and device != target_arch:
        suggestion = f"llvm -mtriple={device}-linux-gnu" + (" -mattr=+neon" if device == "aarch64" else "")
        raise ArchMismatch(
            f"the library is built for {target_arch} but {session.description} is {device} "
            f"({info.triple or info.machine}): build for the device with --target \"{suggestion}\" or pick a "
            f"{target_arch} device"
        )


def _check_gpu(info: DeviceInfo, session: SessionRef, gpu_arch: str) -> str:
    """The device's compute capability, if a cubin for ``gpu_arch`` runs on it: of the same major capability,
    the same or a higher minor one (an ``sm_90a``/``f`` cubin: exactly 9.0)."""
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


def upload(
    session: SessionRef,
    library: Artifact,
    store: ArtifactStore,
    target_arch: str,
    device_cache: str | None = None,
    reuse: bool = True,
    gpu_arch: str | None = None,
    allow_version_skew: bool = False,
    device_says: bool = False,
) -> Uploaded:
    """Verify ``library`` (built for ``target_arch``) and make it available on the device behind ``session``.

    Args:
        device_cache: Directory on the device that keeps libraries between runs (None: the session's own,
            unless ``device_says``).
        device_says: With no ``device_cache``, use the directory the device reports keeping libraries in
            (``tvmrp.device_info``'s ``library_cache``: a device bundle, the stack's device), if any.
        reuse: Use a copy the device cache already holds instead of uploading (False: upload anyway).
        gpu_arch: The GPU architecture of a CUDA library (``sm_90``); the model then runs on the device's GPU.
        allow_version_skew: Use a device that runs another minor TVM version (a warning instead of a refusal).

    Raises:
        VersionSkew: the device runs another major or minor TVM version (nothing is uploaded).
        ArchMismatch: the device reports another architecture than the library's (nothing is uploaded).
        StoreError: the library on disk no longer matches its digest (it is not uploaded).
        DeviceTimeout / RemoteRunError: the upload did not finish in time or failed.
    """
    identity, info = _inspect(session, target_arch, gpu_arch, allow_version_skew)
    if device_cache is None and device_says and info.library_cache:
        device_cache = info.library_cache
        log.info("%s keeps libraries in %s: a library it keeps is not sent again", session.description,
                 device_cache)
    data, sha256 = verified_library(library, store)
    with while_waiting(f"upload-{library.key[:16]}", f"upload of the library ({len(data) / 1e6:.1f} MB) to "
                       f"{session.description}"):
        placement = place(session_of(session), open_cache(device_cache, store), data, sha256, reuse=reuse,
                          session_name=f"tvmrp-{library.key[:16]}.so")
    return Uploaded(session, library, placement, device_cache, identity, "cuda" if gpu_arch else "cpu")


def forget_kept(uploaded: Uploaded, store: ArtifactStore) -> None:
    """Forget the copy the device kept that ``uploaded`` reused (its output failed the check): its marker and file
    are removed, so no later run loads it. Nothing for a fresh upload."""
    cache = open_cache(uploaded.device_cache, store)
    if cache is not None and uploaded.reused and uploaded.placement.copy is not None:
        cache.forget(session_of(uploaded.session), uploaded.placement.copy)


upload_task = task(name="upload", task_run_name="upload", cache_policy=NO_CACHE, persist_result=False)(upload)
