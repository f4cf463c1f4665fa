"""Tuning records shared across models: a build applies the best schedule any tuning in the store measured for
each of its kernels, whichever model the tuning was made for.

Models share kernels: ResNet-18 and ResNet-34 have the same convolution shapes, and two variants of one network
differ in a few layers only. MetaSchedule keys a record by its *workload*, the kernel as a TIR function, compared
structurally (with the ``anchor-block`` equality of the schedule space, by the kernel's main block: a convolution
with another fused epilogue is the same task), never by the model it came from. So the records of every tuning
for the same target, cores, schedule space, TVM and code (the *family inputs* but the model,
:func:`pipeline.planning.keys.tune_family_inputs`) apply to any model's kernels of the same shapes.

When planned (:func:`shared_tunings` when the request is resolved, before anything is imported): every family
of tunings the store's tuning index lists with those inputs, each by its largest tuning that verifies (a larger
budget continues the smaller, so it holds all of its records), except the build's own family when it is tuned
(its own tuning applies). Their keys, sorted, are the build key's ``records`` input, so the build key changes
when the records it may apply change; a store without such tunings, ``--shared-tunings off``, a GPU target and
``--schedules none`` keep the key of a build without them.

When built (:func:`apply_shared`): each kernel of the prepared module takes the record of the build's own
tuning when it has one, else the best (lowest mean measured time) record of the shared tunings for its workload,
else, in an untuned build, one schedule from MetaSchedule's rules (:mod:`pipeline.tuning.rules`, drawn exactly
as without shared records). A kernel whose record does not replay on it is built unscheduled, as with a
tuning of its own (:func:`pipeline.tuning.apply._unappliable`). What scheduled how many kernels is stored with
the build (:class:`pipeline.results.TuningSources`) and shown by the run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import BuildError, StoreError, clip
from pipeline.results import TuningSource, TuningSources
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import RECORD_FILE, TUNING_DATABASE_FILES, WORKLOAD_FILE
from pipeline.targets import TargetInfo
from pipeline.tuning.family import family_tunings, indexed_inputs
from pipeline.tuning.space import TuningSpace, space_for, tune_inputs, tuning_num_cores, tuning_target

if TYPE_CHECKING:
    import tvm

log = logging.getLogger("pipeline.tuning")

_FAMILY_FILE = re.compile(r"[0-9a-f]{64}\.json")
_MAX_NAME = 100


@dataclass(frozen=True)
class SharedTuning:
    """A tuning of the store whose records a build may apply (:func:`shared_tunings`).

    Attributes:
        key: its artifact key (part of the build key). model: the name of the model it tuned (its manifest's).
        model_digest: that model's digest. trials: its budget.
    """

    key: str
    model: str
    model_digest: str
    trials: int


def _model_name(artifact: Artifact, digest: str) -> str:
    name = artifact.inputs.get("name")
    return clip(name, _MAX_NAME) if isinstance(name, str) and name.strip() else f"model {digest[:16]}"


def shared_tunings(store: ArtifactStore, target: TargetInfo) -> tuple[SharedTuning, ...]:
    """The tunings of the store for ``target`` (its canonical form, cores, schedule space, TVM and code), one per
    family (model): the family's largest tuning that verifies. Sorted by key. (A tuned build leaves its own
    model's out: :func:`pipeline.planning.plan.plan_build`.)

    Read from the tuning index: one listing and two small reads per family (in a bucket, of its objects), then
    each chosen tuning verified (in a bucket, fetched once into this machine's copy). A family whose index was
    written before it recorded the family's inputs is not found until it is tuned (or its tuning found) again.
    Never raises: without the index a build applies only its own schedules.
    """
    if target.device != "cpu":
        return ()
    want = {k: v for k, v in tune_inputs("0" * 64, target, 1).items() if k not in ("model", "trials")}
    found = []
    try:
        names = sorted(store.shared_names(store.layout.tuning_index))
    except (OSError, StoreError) as exc:
        log.warning("plan: the tuning index of %s cannot be listed (%s); no shared tuning records", store, exc)
        return ()
    for name in names:
        if not _FAMILY_FILE.fullmatch(name):
            continue
        inputs = indexed_inputs(store, name[: -len(".json")])
        if inputs is None or any(inputs.get(k) != v for k, v in want.items()):
            continue
        if not isinstance(inputs.get("model"), str):
            continue
        try:
            tunings = family_tunings(store, inputs)
        except (OSError, StoreError) as exc:
            log.warning("plan: the tunings of family %s cannot be read (%s); not shared", name[:16], exc)
            continue
        if tunings:
            trials, artifact = tunings[0]
            digest = inputs["model"]
            found.append(SharedTuning(artifact.key, _model_name(artifact, digest), digest, trials))
    return tuple(sorted(found, key=lambda t: t.key))


# -- the build --------------------------------------------------------------------------------------------------------


def _read_database(store: ArtifactStore, tuning: str) -> dict[str, bytes]:
    """The two database files of the tuning ``tuning``, verified (StoreError: missing or corrupt)."""
    return {name: store.read_verified(tuning, name)[0] for name in TUNING_DATABASE_FILES}


def _read_shared(store: ArtifactStore, tuning: SharedTuning) -> dict[str, bytes]:
    try:
        return _read_database(store, tuning.key)
    except StoreError as exc:
        raise BuildError(
            f"the tuning {tuning.key[:16]} of {tuning.model}, whose records the build plan shares, is no longer in the "
            f"store or fails verification ({exc}); run again: the plan then leaves it out"
        ) from exc


def _open(database: dict[str, bytes], directory: Path, space: TuningSpace) -> Any:
    """A JSON database of a copy of ``database`` in ``directory`` (queries append to its files)."""
    from tvm.s_tir import meta_schedule as ms

    directory.mkdir()
    for name, data in database.items():
        (directory / name).write_bytes(data)
    return ms.database.JSONDatabase(path_workload=str(directory / WORKLOAD_FILE),
                                    path_tuning_record=str(directory / RECORD_FILE), module_equality=space.equality)


def _mean_secs(record: Any) -> float:
    times = [float(t.value) for t in record.run_secs or () if t is not None and float(t.value) < 1e10]
    return sum(times) / len(times) if times else math.inf


def apply_shared(
    mod: tvm.IRModule, target: TargetInfo, store: ArtifactStore, tuning: Artifact | None,
    shared: Sequence[SharedTuning], rules: bool, own_model: str = "",
) -> tuple[tvm.IRModule, TuningSources]:
    """``mod`` (as imported) with, on each kernel, its own tuning's record, else the best shared record for its
    workload, else (``rules``) a schedule from MetaSchedule's rules; ready to compile.

    Args:
        tuning: the build's own tuning (None: an untuned build). shared: the tunings the plan names.
        own_model: the model's name, for the own tuning's entry in the sources.

    Returns:
        The scheduled module and which tunings scheduled how many kernels.

    Raises:
        StoreError: the build's own tuning is missing or corrupt (as :func:`pipeline.tuning.apply_tuning`).
        BuildError: a shared tuning the plan names is gone or corrupt, or the records do not apply to the module.
    """
    own = _read_database(store, tuning.key) if tuning is not None else None
    databases = [_read_shared(store, t) for t in shared]
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning.apply import _finish, prepare
    from pipeline.tuning.rules import commit_rule_schedules

    if tuning is not None:  # as the tuning was made (apply_tuning): the same space and target, cores included
        space = TuningSpace.from_options(tuning.inputs.get("space_options", {}))
        tvm_target = tvm.target.Target(json.loads(tuning.inputs["tuning_target"]))
    else:
        space, tvm_target = space_for(target), tuning_target(target, tuning_num_cores(target))
    try:
        prepared = prepare(mod, tvm_target, space)
        normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
        with tempfile.TemporaryDirectory(prefix="tvmrp-shared-") as work:
            own_db = _open(own, Path(work) / "own", space) if own is not None else None
            shared_dbs = [_open(db, Path(work) / f"shared{i}", space) for i, db in enumerate(databases)]
            merged_dir = Path(work) / "merged"
            merged = _open({}, merged_dir, space)
            queries = {gv.name_hint: normalize(func) for gv, func in prepared.functions.items()
                       if isinstance(func, tvm.tirx.PrimFunc)}
            chosen: dict[str, int] = {}  # kernel -> where its record came from: an index in ``shared``, or -1: own
            for name, query in queries.items():
                source, record = -1, own_db.query_tuning_record(query, tvm_target, name) if own_db else None
                if record is None:
                    for i, db in enumerate(shared_dbs):
                        found = db.query_tuning_record(query, tvm_target, name)
                        if found is not None and (record is None or _mean_secs(found) < _mean_secs(record)):
                            source, record = i, found
                if record is None:
                    continue
                chosen[name] = source
                if not merged.has_workload(query):  # one record per task: its kernels share it
                    workload = merged.commit_workload(record.workload.mod)
                    merged.commit_tuning_record(ms.database.TuningRecord(
                        record.trace, workload, record.run_secs, record.target, record.args_info))
            ruled = set()
            if rules:
                commit_rule_schedules(prepared, target, tvm_target, space, merged)
                ruled = {name for name, query in queries.items() if name not in chosen and merged.has_workload(query)}
            aside: list[Any] = []
            scheduled = _finish(prepared, tvm_target, merged_dir, space, aside)
    except BuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever TVM raises on records it cannot replay
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BuildError(
            f"the tuning records shared with this build ({', '.join(t.key[:16] for t in shared)}) could not be "
            f"applied to the model: {clip(first)}. Build with --shared-tunings off to leave them out"
        ) from exc
    left = {gv.name_hint for gv in aside}  # built unscheduled: the record does not replay on them
    counts = [0] * (len(shared) + 1)  # by source; the last one (index -1) the build's own tuning
    for name, source in chosen.items():
        if name not in left:
            counts[source] += 1
    sources = []
    if tuning is not None:
        sources.append(TuningSource(tuning.key, own_model or _model_name(tuning, str(tuning.inputs.get("model"))),
                                    int(tuning.inputs.get("trials", 0)), counts[-1], own=True))
    sources += sorted((TuningSource(t.key, t.model, t.trials, counts[i]) for i, t in enumerate(shared) if counts[i]),
                      key=lambda s: (-s.kernels, s.tuning))
    log.info("build: %d kernels: %s%s", len(queries),
             ", ".join(f"{s.kernels} from {'its own tuning' if s.own else 'the tuning of ' + s.model} "
                       f"({s.tuning[:16]})" for s in sources) or "none from a tuning",
             f", {len(ruled - left)} from the rules" if rules else "")
    return scheduled, TuningSources(len(queries), len(ruled - left), tuple(sources), len(shared))


def sources_json(sources: TuningSources) -> bytes:
    """The stored form of ``sources`` (a build artifact's ``tuning_sources.json``)."""
    return json.dumps(sources.as_dict(), indent=2, sort_keys=True).encode()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**7 else None


def parse_sources(data: bytes) -> TuningSources | None:
    """The :class:`TuningSources` of a build's ``tuning_sources.json`` (read from the store: every field checked,
    names clipped); None when it is not one."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("tunings"), list):
        return None
    kernels, rules, considered = _count(raw.get("kernels")), _count(raw.get("rules")), _count(raw.get("considered"))
    if kernels is None or rules is None or considered is None:
        return None
    tunings = []
    for item in raw["tunings"][:1000]:
        if not isinstance(item, dict):
            return None
        key, model = item.get("tuning"), item.get("model")
        trials, count = _count(item.get("trials")), _count(item.get("kernels"))
        if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key) and isinstance(model, str)
                and trials is not None and count is not None):
            return None
        tunings.append(TuningSource(key, clip(model, _MAX_NAME), trials, count, own=item.get("own") is True))
    return TuningSources(kernels, rules, tuple(tunings), considered)
