"""What the cached stages share: the store-backed build-once helper and a Prefect cache that never unpickles.

Correctness lives in the artifact store, not in Prefect: a stage's result is an :class:`Artifact` reference
whose files are verified by digest before use, and :func:`ensure_artifact` builds a key at most once across
processes (store lock). Prefect's cache, keyed by the same explicit key (the plan's :class:`StageKey`), lets
a run skip the task entirely (the UI shows it ``Cached``); :func:`run_cached` asks Prefect to refresh
whenever the store copy is missing or corrupt, because Prefect would otherwise return a reference to files
that are gone, and it uses an artifact only as the store's own verified manifest describes it.

The store is untrusted input (it may be shared between machines and users), and a Prefect cache record
names the serializer that reads it back: Prefect reads a record with whatever serializer the record's own
metadata names, and its default, cloudpickle, would execute whatever a planted record holds. So the records
are not kept in the store but in a directory of this user's (:func:`records_dir`:
``~/.cache/tvmrp/prefect-results/<store id>``, mode 0700, checked to be ours and private before every use),
they are written by :class:`ArtifactRefSerializer` (plain JSON: the artifact's key, kind, files and inputs),
and before a stage runs, its record is screened (:func:`screen_record`): a record that is not exactly one of
ours (one JSON object whose metadata names our serializer and whose result is our JSON for that key) is
removed before Prefect reads it, and the stage runs again. When that directory is not private, Prefect's
cache is not used at all and the store alone decides (stages then show ``Completed`` in the UI, ``cached`` in
the report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.serializers import Serializer
from pydantic import Field

from pipeline.errors import PipelineError, StoreError
from pipeline.planning.plan import StageKey
from pipeline.store import Artifact, ArtifactStore, FileEntry
from pipeline.store.layout import ArtifactKind

log = logging.getLogger(__name__)

SERIALIZER_TYPE = "tvmrp-artifact-ref"


@dataclass(frozen=True)
class Built:
    """The result of a cached stage.

    Attributes:
        artifact: reference to the verified artifact.
        built: True if this call produced it, False if a valid copy was already in the store.
        seconds: wall time of producing it (0 when reused).
    """

    artifact: Artifact
    built: bool
    seconds: float


# -- Prefect's cache records: JSON only, in a private directory ---------------------------------------------------------------


def _built_to_json(built: Built) -> dict[str, Any]:
    a = built.artifact
    return {
        "key": a.key, "kind": a.kind, "inputs": a.inputs, "built": bool(built.built), "seconds": float(built.seconds),
        "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in a.files], "mac": a.mac,
    }


_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_RECORD = 1 << 20
_FIELDS = {"key", "kind", "inputs", "built", "seconds", "files"}


def _built_from_json(data: Any) -> Built:
    """The :class:`Built` a record holds; ValueError unless it has exactly the shape and types we write (the
    manifest's ``mac`` included, or left out by a record written before artifacts were authenticated)."""
    if not isinstance(data, dict) or set(data) not in (_FIELDS, _FIELDS | {"mac"}):
        raise ValueError("not an artifact reference")
    key, kind, inputs, built, seconds, files = (data[k] for k in ("key", "kind", "inputs", "built", "seconds", "files"))
    mac = data.get("mac", "")
    if not (isinstance(key, str) and _HEX64.fullmatch(key) and isinstance(kind, str) and isinstance(inputs, dict)
            and isinstance(built, bool) and _is_number(seconds) and isinstance(files, list)
            and isinstance(mac, str) and (mac == "" or _HEX64.fullmatch(mac))):
        raise ValueError("bad fields")
    entries = []
    for f in files:
        if not (isinstance(f, dict) and set(f) == {"name", "sha256", "size"} and isinstance(f["name"], str)
                and isinstance(f["sha256"], str) and _HEX64.fullmatch(f["sha256"])
                and isinstance(f["size"], int) and not isinstance(f["size"], bool) and f["size"] >= 0):
            raise ValueError("bad file list")
        entries.append(FileEntry(f["name"], f["sha256"], f["size"]))
    return Built(Artifact(key, kind, tuple(entries), dict(inputs), mac), built, float(seconds))


def _is_number(value: Any) -> bool:
    """A JSON number a float holds: finite, not a bool, not an integer too large for a float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


class ArtifactRefSerializer(Serializer):
    """Prefect serializer of a cached stage's result: the :class:`Built` reference as plain JSON."""

    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Built | BaseException) -> bytes:
        if isinstance(obj, BaseException):  # the result of a failed stage: kept as text, never cached
            return json.dumps({"error": type(obj).__name__, "message": str(obj)[:2000]}).encode()
        return json.dumps(_built_to_json(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> Built | PipelineError:
        if len(blob) > _MAX_RECORD:
            raise ValueError("a cache record larger than 1 MiB is not ours")
        try:
            data = json.loads(blob)
        except RecursionError:
            raise ValueError("a cache record nested too deeply is not ours") from None
        if isinstance(data, dict) and set(data) == {"error", "message"}:
            return PipelineError(f"{data['error']}: {data['message']}")
        return _built_from_json(data)


def records_dir(store: ArtifactStore) -> Path | None:
    """This user's private directory of Prefect cache records for ``store``; None when it is not private.

    ``$TVMRP_PREFECT_RESULTS`` overrides the parent directory (default ``$XDG_CACHE_HOME`` or ``~/.cache``,
    then ``tvmrp/prefect-results``).
    """
    base = os.environ.get("TVMRP_PREFECT_RESULTS") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvmrp" / "prefect-results"
    )
    directory = Path(base).expanduser() / hashlib.sha256(str(store.root).encode()).hexdigest()[:16]
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (directory, directory.parent):
            info = path.stat()
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                raise PermissionError(f"{path} is writable by other users or not owned by this user")
    except OSError as exc:
        log.warning("Prefect's cache is not used for %s (%s): the stages look their artifacts up in the store",
                    store.root, exc)
        return None
    return directory


def _is_ours(blob: bytes, key: str) -> bool:
    """Whether ``blob`` is a record Prefect wrote for ``key`` with :class:`ArtifactRefSerializer` (read as JSON
    only: nothing in it is unpickled or imported)."""
    try:
        record = json.loads(blob)
    except (ValueError, RecursionError):
        return False
    if not isinstance(record, dict) or set(record) != {"metadata", "result"}:
        return False
    metadata, result = record["metadata"], record["result"]
    if not (isinstance(metadata, dict) and metadata.get("serializer") == {"type": SERIALIZER_TYPE}
            and metadata.get("storage_block_id") is None and isinstance(result, str)):
        return False
    try:
        built = ArtifactRefSerializer().loads(result.encode())
    except (ValueError, RecursionError):
        return False
    return isinstance(built, PipelineError) or built.artifact.key == key


def screen_record(directory: Path, key: str) -> bool:
    """Remove Prefect's record of ``key`` in ``directory`` unless it is one of ours, before Prefect reads it.

    Prefect keeps a task's cache record in one file named by its cache key (``{"metadata": ..., "result":
    ...}``) and reads its result back with the serializer that the record's own metadata names. A record that
    names another serializer (a pickle), or is not exactly the JSON we write for ``key``, a link or not a file,
    is removed unread; the stage then runs (and finds its artifact in the store if a valid one is there).

    Returns:
        False when a foreign record is there and cannot be removed: run the stage without Prefect's cache.
    """
    path = directory / key
    try:
        info = path.lstat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if stat.S_ISREG(info.st_mode) and info.st_size <= 2 * _MAX_RECORD:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if _is_ours(f.read(2 * _MAX_RECORD + 1), key):
                    return True
        except OSError:
            pass
    try:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        log.warning("Prefect's cache record %s is not one of this project's and cannot be removed (%s): the stage "
                    "runs without Prefect's cache", path, exc.strerror or exc)
        return False
    log.warning("removed Prefect's cache record %s: it is not one of this project's (JSON) records, so it was not "
                "read; the stage runs again", path)
    return True


def _explicit_key(_ctx: Any, parameters: dict[str, Any]) -> str:
    return parameters["stage"].key


def store_cache_options(store: ArtifactStore, refresh: bool, key: str) -> dict[str, Any]:
    """``Task.with_options`` arguments that key a stage by its plan's ``stage`` parameter.

    Records live in this user's private :func:`records_dir`, so every run and worker of this user on this
    machine shares the cache. Concurrent runs of one key are serialised by the store's own lock in
    :func:`ensure_artifact`, not by Prefect's SERIALIZABLE isolation: Prefect's FileSystemLockManager writes
    lock files without expiry, so a run killed mid-build would leave every later run waiting forever, while
    the store's ``flock`` is released by the kernel when its holder dies.

    Args:
        key: the stage's key (the plan's): its record is screened first (:func:`screen_record`).
    """
    directory = records_dir(store)
    if directory is None or not screen_record(directory, key):
        return {"cache_policy": NO_CACHE, "persist_result": False}
    return {
        "cache_policy": CacheKeyFnPolicy(cache_key_fn=_explicit_key),
        "result_storage": directory,
        "result_serializer": ArtifactRefSerializer(),
        "persist_result": True,
        "refresh_cache": refresh,
    }


def run_cached(stage_task: Any, store: ArtifactStore, stage: StageKey, refresh: bool, **params: Any) -> tuple[Artifact, str]:
    """Run a cached stage task; return its verified artifact and ``"cached"`` or ``"ran"``.

    Prefect's record of the stage is screened before Prefect reads it (:func:`screen_record`: only our JSON
    records are read), and Prefect is asked to refresh it whenever the store's copy is missing or fails
    verification, so a cached reference to deleted, corrupted or unauthenticated files is never returned.
    The artifact returned is always the store's own, as its authenticated manifest describes it: a record
    only lets Prefect skip the task.
    """
    stale = refresh or store.get(stage.key) is None
    state = stage_task.with_options(**store_cache_options(store, stale, stage.key))(
        **params, stage=stage, store=store, refresh=refresh, return_state=True
    )
    built: Built = state.result()  # raises the stage's exception if it failed
    artifact = store.get(stage.key)
    if artifact is None or artifact.key != stage.key:
        raise StoreError(f"the artifact {stage.key} vanished from the store {store.location} during the run; run again")
    return artifact, "cached" if state.name == "Cached" or not built.built else "ran"


def ensure_artifact(
    store: ArtifactStore, stage: StageKey, kind: ArtifactKind, produce: Callable[[Path], None], refresh: bool = False
) -> Built:
    """Return the verified artifact of ``stage``, producing it (once across processes) if needed.

    The manifest records ``stage.manifest``: the inputs the key hashes, then the extras.

    Args:
        refresh: rebuild even if a valid copy exists.
    """
    start = time.perf_counter()
    artifact, produced = store.ensure(stage.key, kind, produce, stage.manifest, refresh)
    return Built(artifact, built=produced, seconds=time.perf_counter() - start if produced else 0.0)
