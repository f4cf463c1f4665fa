"""What the three cached stages share: the Prefect cache policy and the build-once-per-key helper.

Correctness lives in the artifact store, not in Prefect: a stage's result is an :class:`Artifact` reference
whose files are verified by digest before use, and :func:`ensure_artifact` builds a key at most once across
processes (store lock). Prefect's cache, keyed by the same explicit key, lets a run skip the task entirely
(the UI shows it ``Cached``); the flow asks Prefect to refresh whenever the store copy is missing or corrupt,
because Prefect would otherwise return a reference to files that are gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CacheKeyFnPolicy

from pipeline.store import Artifact, ArtifactStore


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


def _explicit_key(_ctx: Any, parameters: dict[str, Any]) -> str:
    return parameters["key"]


def store_cache_options(store: ArtifactStore, refresh: bool) -> dict[str, Any]:
    """``Task.with_options`` arguments that key a stage by its explicit ``key`` parameter.

    Records and results live in the store (``<root>/.prefect``), so every run and worker that shares the
    store shares the cache. Concurrent runs of one key are serialised by the store's own lock in
    :func:`ensure_artifact`, not by Prefect's SERIALIZABLE isolation: Prefect's FileSystemLockManager writes
    lock files without expiry, so a run killed mid-build would leave every later run waiting forever, while
    the store's ``flock`` is released by the kernel when its holder dies.
    """
    return {
        "cache_policy": CacheKeyFnPolicy(cache_key_fn=_explicit_key),
        "result_storage": Path(store.prefect_dir / "results"),
        "persist_result": True,
        "refresh_cache": refresh,
    }


def ensure_artifact(
    store: ArtifactStore,
    key: str,
    kind: str,
    inputs: dict[str, Any],
    produce: Callable[[Path], None],
    refresh: bool = False,
) -> Built:
    """Return the verified artifact ``key``, producing it (once across processes) if needed.

    Args:
        refresh: rebuild even if a valid copy exists.
    """
    start = time.perf_counter()
    artifact, produced = store.ensure(key, kind, produce, inputs, refresh)
    return Built(artifact, built=produced, seconds=time.perf_counter() - start if produced else 0.0)
