"""Preparing a module for MetaSchedule, and applying a tuning database to it for the build.

Tuning and :func:`apply_tuning` both start from :func:`prepare`, so the database's workloads match the
kernels. Applying a database replays each task's schedule on every kernel of the task (:func:`_unappliable`):
on EfficientNet-Lite0 one convolution whose epilogue ends in the next layer's padding rejects it, and is
left unscheduled instead of failing the build.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import BuildError, clip
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import RECORD_FILE, TUNING_DATABASE_FILES, WORKLOAD_FILE
from pipeline.tuning.space import TuningSpace

if TYPE_CHECKING:
    import tvm

log = logging.getLogger("pipeline.tuning")  # one logger for the package: its lines read as one stage's


def prepare(mod: tvm.IRModule, target: tvm.target.Target, space: TuningSpace) -> tvm.IRModule:
    """The module as MetaSchedule sees it: the passes of TVM's ``static_shape_tuning`` pipeline before tuning.

    Tuning and :func:`apply_tuning` both start from this, so the database's workloads match the kernels.
    """
    import tvm
    from tvm import relax

    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
    ]
    if space.layout != "NCHW":
        # The image stays NCHW at the model's interface; one layout_transform at each end of the graph.
        passes.append(relax.transform.ConvertLayout({"relax.nn.conv2d": [space.layout, "OHWI"]}))
    passes.append(relax.pipeline.zero_pipeline())
    if space.prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _finish(mod: tvm.IRModule, target: tvm.target.Target, database_dir: Path, space: TuningSpace,
            aside_out: list[Any] | None = None) -> tvm.IRModule:
    """Apply the database in ``database_dir`` to a prepared module (then the weight prepacking); the kernels
    built unscheduled because their task's schedule does not replay on them are added to ``aside_out``."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(
        path_workload=str(database_dir / WORKLOAD_FILE), path_tuning_record=str(database_dir / RECORD_FILE),
        module_equality=space.equality,
    )
    with target, database:
        # Kernels whose task's schedule does not replay on them are set aside, built unscheduled, and put back.
        aside = _unappliable(mod, target, database)
        if aside_out is not None:
            aside_out.extend(aside)
        kept = mod.clone() if aside else mod
        for gv in aside:
            del kept[gv]
        scheduled = relax.transform.MetaScheduleApplyDatabase()(kept)
        for gv in aside:
            scheduled[gv] = mod[gv]
        if not space.prepack:
            return scheduled
        # Constant weights: the layout rewrite is folded into new constants at build time.
        passes = [
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ]
        return tvm.transform.Sequential(passes)(scheduled)


def _unappliable(mod: tvm.IRModule, target: tvm.target.Target, database: Any) -> list[Any]:
    """The kernels of ``mod`` on which the schedule of their task fails to replay.

    With ``anchor-block`` equality a task's schedule is replayed on every kernel with the same main block
    (``ScheduleUsingAnchorTrace``), and TVM's ``MetaScheduleApplyDatabase`` fails the whole build when one
    replay fails: EfficientNet-Lite0's convolutions whose fused epilogue ends in the next layer's padding
    reject the ``reverse-compute-inline`` of a schedule found on the same convolution without it. Those
    kernels are returned (and logged) so the build leaves just them unscheduled.
    """
    import tvm
    import tvm_ffi
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    aside = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        query = normalize(func)
        record = database.query_tuning_record(query, target, gv.name_hint)
        if record is None or tvm_ffi.structural_equal(query, record.workload.mod):
            continue  # no schedule, or the very kernel the schedule was found on
        try:
            schedule_using_anchor_trace(Schedule(query, debug_mask=0), record.trace, target)
        except Exception as exc:  # noqa: BLE001 - any failure to replay leaves the kernel unscheduled
            log.warning("build: kernel %s does not take its task's schedule (%s); it is built unscheduled",
                        gv.name_hint, clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
            aside.append(gv)
    return aside


def apply_tuning(mod: tvm.IRModule, tuning: Artifact, store: ArtifactStore) -> tvm.IRModule:
    """The imported ``mod`` with the schedules of the ``tuning`` artifact applied (what ``build`` compiles).

    The database files are read once, verified against the tuning's authenticated manifest, and written to a
    working directory: MetaSchedule's JSON database appends to its files when it is queried, and the stored
    copy must stay byte-identical to its manifest.

    Raises:
        StoreError: the tuning artifact is missing, corrupt or does not authenticate (the next run tunes again).
        BuildError: the tuning does not apply to the module (it names the tuning, not the compiler).
    """
    database = {name: store.read_verified(tuning.key, name)[0] for name in TUNING_DATABASE_FILES}
    import tvm

    try:
        inputs = tuning.inputs
        space = TuningSpace.from_options(inputs.get("space_options", {}))
        target = tvm.target.Target(json.loads(inputs["tuning_target"]))
        with tempfile.TemporaryDirectory(prefix="tvmrp-apply-") as work:
            for name, data in database.items():
                (Path(work) / name).write_bytes(data)
            return _finish(prepare(mod, target, space), target, Path(work), space)
    except Exception as exc:  # noqa: BLE001 - whatever TVM raises on a database it cannot replay
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BuildError(
            f"the tuning {tuning.key[:16]} (MetaSchedule's database) could not be applied to the model: "
            f"{clip(first)}. The tuning is at fault, not the compiler: remove {store.path(tuning.key)} to tune again"
        ) from exc
