"""Stage ``tune``: MetaSchedule tuning of the imported module for the target, cached like ``build``.

The search itself, the schedule space and why it was chosen are in :mod:`pipeline.tuning`. This stage
stores the tuning database (MetaSchedule's two JSON files) and ``tuning.json`` (tuning time, tasks, trials,
best measured latency per task) as an artifact of kind ``tuning`` under the plan's key; ``build`` applies it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from pipeline.errors import BuildError, StoreError
from pipeline.plan import StageKey
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import TargetInfo
from pipeline.tuning import DATABASE_FILES, LOCAL_RUNNER, REPORT_FILE, check_request, run_tuning, tuning_num_cores
from tasks._cache import Built, ensure_artifact
from tasks.import_model import MODULE_FILE


def tune(
    module: Artifact,
    target: TargetInfo,
    trials: int,
    stage: StageKey,
    store_root: str,
    refresh: bool = False,
    runner: str = LOCAL_RUNNER,
) -> Built:
    """Tune the imported module for ``target`` with ``trials`` measurements; store the database under ``stage.key``.

    Args:
        module: the ``import-model`` artifact (``module.json``).
        trials: the trial budget (1 or more; 0 means no tuning: do not call this stage).
        stage: the plan's ``tune`` key.
        runner: ``"local"`` (measure here) or ``"TRACKER_HOST:PORT/KEY"`` (measure on a device from a TVM
            tracker through MetaSchedule's RPC runner).

    Returns:
        The ``tuning`` artifact: ``database_workload.json``, ``database_tuning_record.json``, ``tuning.json``.

    Raises:
        UsageError: bad ``trials`` or ``runner``.
        BuildError: tuning failed.
    """
    check_request(trials, runner)
    import tvm

    store = ArtifactStore(store_root)

    def produce(directory: Path) -> None:
        if store.get(module.key) is None:
            raise StoreError(f"the imported module {module.key} vanished from the store; run again")
        mod = tvm.ir.load_json(store.file(module, MODULE_FILE).read_text())
        with tempfile.TemporaryDirectory(prefix="tvmrp-tune-") as work:
            report = run_tuning(mod, target, trials, Path(work), runner, tuning_num_cores(target))
            for name in DATABASE_FILES:
                source = Path(work) / name
                if not source.exists():
                    raise BuildError(f"MetaSchedule wrote no {name}: no task could be tuned for {target.canonical}")
                shutil.copyfile(source, directory / name)
        (directory / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True))

    return ensure_artifact(store, stage, "tuning", produce, refresh)


def read_report(tuning: Artifact, store_root: str) -> dict[str, Any]:
    """The ``tuning.json`` of a tuning artifact (tuning time, tasks, trials, estimated latency)."""
    return json.loads(ArtifactStore(store_root).file(tuning, REPORT_FILE).read_text())


tune_task = task(name="tune", task_run_name="tune", retries=0)(tune)
