"""The family index: earlier tunings to continue from.

Tunings that differ only in their budget form a *family* (:func:`family_key`); the store indexes each family
in the store's tuning index, ``<store>/.tuning/<family>.json`` (:func:`remember_tuning`; for a store in a bucket,
the bucket's object, read and written under the family's lock, which is a lease there). A larger budget continues from the largest
verified database of its family (:func:`find_base`). ``--tune-more N`` is that largest budget + N
(:func:`resolve_trials`). The index also records the family's key inputs, so that the builds of other models
find the tunings made for their target (:mod:`pipeline.tuning.shared`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.planning import keys
from pipeline.errors import StoreError, UsageError
from pipeline.store import Artifact, ArtifactStore, check_key
from pipeline.targets import TargetInfo
from pipeline.store.layout import TUNING, TUNING_DATABASE_FILES, TUNING_REPORT_FILE
from pipeline.tuning.space import tune_inputs

log = logging.getLogger("pipeline.tuning")  # one logger for the package: its lines read as one stage's

_INDEX_VERSION = 1
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class BaseTuning:
    """A tuning of the same family with fewer trials, to continue from (:func:`find_base`).

    Attributes:
        key: its artifact key. trials: its trial count. history: its ``tuning.json`` history.
        database: the verified bytes of its two database files, by file name.
    """

    key: str
    trials: int
    history: tuple[dict[str, Any], ...]
    database: dict[str, bytes]


def family_key(model_digest: str, target: TargetInfo) -> str:
    """The key of the tunings of ``model_digest`` for ``target`` that differ only in their trial count."""
    return keys.tune_family(tune_inputs(model_digest, target, 1))


def _index_path(store: ArtifactStore, family: str) -> Path:
    return store.layout.tuning_index / f"{check_key(family)}.json"


def _read_index(store: ArtifactStore, family: str) -> dict[int, str]:
    """The index's ``{trials: artifact key}``; empty when missing or unreadable (it is only a hint)."""
    try:
        data = json.loads(store.read_entry(_index_path(store, family)))
        entries = data["tunings"] if data.get("version") == _INDEX_VERSION and data.get("family") == family else {}
        return {int(trials): str(key) for trials, key in entries.items() if int(trials) > 0}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        log.warning("tune: the tuning index %s is unreadable (%s); it is rebuilt as tunings run",
                    _index_path(store, family), exc)
        return {}


def indexed_inputs(store: ArtifactStore, family: str) -> dict[str, Any] | None:
    """The key inputs of the family ``family`` as its index records them (a tuning's inputs without the budget),
    if they hash to ``family``; None for an index without them (written before they were recorded) or unreadable."""
    try:
        data = json.loads(store.read_entry(_index_path(store, family)))
        inputs = data.get("inputs") if data.get("version") == _INDEX_VERSION else None
        return inputs if isinstance(inputs, dict) and keys.key_of(inputs) == family else None
    except (OSError, ValueError, TypeError, AttributeError, StoreError):
        return None


def remember_tuning(store: ArtifactStore, inputs: dict[str, Any], key: str) -> None:
    """Add the tuning ``key`` (of key inputs ``inputs``) to its family's index ``<store>/.tuning/<family>.json``,
    which also records the family's inputs (what other models' builds look for: :mod:`pipeline.tuning.shared`).

    Written atomically under the family's lock. Never raises: without the index a larger budget starts over
    instead of continuing.
    """
    try:
        trials, family = int(inputs["trials"]), keys.tune_family(inputs)
        with store.lock(family):
            entries = _read_index(store, family)
            if entries.get(trials) == key and indexed_inputs(store, family) is not None:
                return
            entries[trials] = key
            text = json.dumps({"version": _INDEX_VERSION, "family": family,
                               "inputs": {k: v for k, v in inputs.items() if k != "trials"},
                               "tunings": {str(t): k for t, k in sorted(entries.items())}}, indent=2)
            store.write_entry(_index_path(store, family), text.encode())
    except (OSError, KeyError, ValueError, TypeError, StoreError) as exc:
        log.warning("tune: tuning %s is not indexed (%s); a larger budget will not continue from it",
                    key[:16], exc)


def family_tunings(store: ArtifactStore, inputs: dict[str, Any]) -> list[tuple[int, Artifact]]:
    """The verified tunings of the family of ``inputs`` (a tuning's key inputs), largest trial count first.

    An index entry counts only if its key is the key of the family's inputs with its trial count and the
    store's copy verifies (:meth:`ArtifactStore.get`); other entries are ignored.
    """
    family = keys.tune_family(inputs)
    found = []
    for trials, key in sorted(_read_index(store, family).items(), reverse=True):
        if key != keys.key_of({**inputs, "trials": trials}):
            log.warning("tune: the tuning index of %s names %s for %d trials, which is not that tuning's key; "
                        "ignored", family[:16], key[:16], trials)
            continue
        artifact = store.get(key)
        if artifact is not None and artifact.kind == TUNING.name:
            found.append((trials, artifact))
    return found


def find_base(store: ArtifactStore, inputs: dict[str, Any]) -> BaseTuning | None:
    """The largest verified tuning of the family of ``inputs`` with fewer trials than ``inputs["trials"]``."""
    if not isinstance(inputs.get("trials"), int):
        return None
    trials = inputs["trials"]
    for found, artifact in family_tunings(store, {k: v for k, v in inputs.items() if k != "trials"}):
        if found >= trials:
            continue
        try:
            database = {name: store.read_verified(artifact.key, name)[0] for name in TUNING_DATABASE_FILES}
            report = json.loads(store.read_verified(artifact.key, TUNING_REPORT_FILE)[0])
        except (StoreError, ValueError) as exc:
            log.warning("tune: tuning %s cannot be continued (%s); trying a smaller one", artifact.key[:16], exc)
            continue
        history = report.get("history") if isinstance(report, dict) else None
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            history = [{"trials": found, "estimated_ms": report.get("estimated_ms"), "seconds": report.get("seconds")}]
        return BaseTuning(artifact.key, found, tuple(history), database)
    return None


def resolve_trials(store: ArtifactStore, model_digest: str, target: TargetInfo, tune_trials: int,
                   tune_more: int) -> int:
    """The total trial budget of a run: ``tune_trials``, or with ``tune_more`` the family's largest + N.

    ``--tune-more N`` continues the best (largest) existing tuning of (model, target, cores, space, TVM) by
    N trials; with none, it tunes N. It is resolved when the run is planned, so the build key names the
    total.

    Raises:
        UsageError: both given, a negative count, or a total above 100000.
    """
    for name, value in (("--tune-trials", tune_trials), ("--tune-more", tune_more)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{name} must be 0 or more (got {value!r})")
    if not tune_more:
        return tune_trials
    if tune_trials:
        raise UsageError("give --tune-trials (a total) or --tune-more (trials added to the largest tuning), not both")
    inputs = {k: v for k, v in tune_inputs(model_digest, target, 1).items() if k != "trials"}
    existing = family_tunings(store, inputs)
    total = (existing[0][0] if existing else 0) + tune_more
    if total > MAX_TRIALS:
        raise UsageError(f"--tune-more {tune_more} would make {total} trials, above {MAX_TRIALS}")
    return total
