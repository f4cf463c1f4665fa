"""Stage ``tune``: MetaSchedule tuning of the imported module for the target, cached like ``build``.

The search itself, the schedule space and why it was chosen are in :mod:`pipeline.tuning`. This stage
stores the tuning database (MetaSchedule's two JSON files), ``tuning.json`` (tuning time, tasks, trials
reused and new, best measured latency per task, the estimate's history, convergence) and ``tuning.log``
(MetaSchedule's own log, kept out of the run's logs) as an artifact of kind ``tuning`` under the plan's
key; ``build`` applies it.

A budget larger than an existing tuning of the same family (model, target, cores, space, TVM, code)
continues from the largest such database, found through the store's tuning index
(:func:`pipeline.tuning.find_base`), and measures only the difference. Progress (tasks, trials, the best
estimate so far) shows from the start of the stage through :class:`tasks.progress.Progress`.

An interrupted tuning (Ctrl-C, SIGTERM) keeps what it measured: stored and indexed as a tuning of that many
trials (:func:`keep_measured`), so that ``--tune-more N`` (or a larger ``--tune-trials``) continues from it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from pipeline.errors import BuildError
from pipeline.planning.plan import StageKey
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import TargetInfo
from pipeline.store.layout import MODULE_FILE, TUNING, TUNING_DATABASE_FILES, TUNING_LOG_FILE, TUNING_REPORT_FILE
from pipeline.tuning.result import checked_summary
from pipeline.tuning import (
    LOCAL_RUNNER,
    TuningInterrupted,
    TuningReport,
    check_request,
    find_base,
    remember_tuning,
    run_tuning,
    tuning_num_cores,
)
from tasks._cache import Built, ensure_artifact
from tasks.progress import Progress

log = logging.getLogger(__name__)

PROGRESS_KEY = "tuning-progress"


def tune(
    module: Artifact,
    target: TargetInfo,
    trials: int,
    stage: StageKey,
    store: ArtifactStore,
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
        The ``tuning`` artifact: ``database_workload.json``, ``database_tuning_record.json``, ``tuning.json``,
        ``tuning.log``. When the store holds a tuning of the same family with fewer trials, the largest is
        continued: ``tuning.json`` then records ``trials_reused`` and ``trials_new``.

    Raises:
        UsageError: bad ``trials`` or ``runner``.
        BuildError: tuning failed.
        KeyboardInterrupt: SIGINT or SIGTERM while tuning (MetaSchedule's workers are ended; the trials measured
            so far are stored as a tuning of that many trials, :func:`keep_measured`).
    """
    check_request(trials, runner)

    def produce(directory: Path) -> None:
        base = find_base(store, stage.inputs)
        name = str(module.inputs.get("name") or "the model")
        what = f"tuning {name} ({trials} trials{f', {base.trials} reused' if base is not None else ''})"
        with Progress(PROGRESS_KEY, what) as progress:  # before importing TVM: shows within a second
            from pipeline.lean_import import compiler_tvm

            tvm = compiler_tvm()  # tvm.relax executed before the module is loaded (pipeline/lean_import.py)

            # Read once and checked against the authenticated manifest: what TVM parses is what was verified.
            text, _ = store.read_verified(module.key, MODULE_FILE)
            mod = tvm.ir.load_json(text.decode())
            with tempfile.TemporaryDirectory(prefix="tvmrp-tune-") as work:
                try:
                    report = run_tuning(mod, target, trials, Path(work), runner, tuning_num_cores(target),
                                        base=base, progress=progress.update, log_file=directory / TUNING_LOG_FILE)
                except TuningInterrupted as interrupted:
                    if interrupted.partial is not None:
                        keep_measured(store, stage, interrupted.partial, Path(work), directory / TUNING_LOG_FILE)
                    raise
                for file_name in TUNING_DATABASE_FILES:
                    source = Path(work) / file_name
                    if not source.exists():
                        raise BuildError(
                            f"MetaSchedule wrote no {file_name}: no task could be tuned for {target.canonical}"
                        )
                    shutil.copyfile(source, directory / file_name)
            (directory / TUNING_REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True))

    built = ensure_artifact(store, stage, TUNING, produce, refresh)
    remember_tuning(store, stage.inputs, built.artifact.key)  # also a tuning made before the index existed
    return built


def keep_measured(store: ArtifactStore, stage: StageKey, report: TuningReport, work: Path, log_file: Path) -> None:
    """Store what an interrupted tuning measured (its database in ``work``, ``report.trials`` trials) as the tuning
    of that many trials of ``stage``'s family, and index it, so that a larger budget continues from it. Never
    raises: without it the next run measures those trials again."""
    kept = StageKey.of({**stage.inputs, "trials": report.trials}, **stage.extra)

    def produce(directory: Path) -> None:
        for file_name in TUNING_DATABASE_FILES:
            shutil.copyfile(work / file_name, directory / file_name)
        if log_file.is_file():
            shutil.copyfile(log_file, directory / TUNING_LOG_FILE)
        else:
            (directory / TUNING_LOG_FILE).write_text("")
        (directory / TUNING_REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True))

    try:
        built = ensure_artifact(store, kept, TUNING, produce)
        remember_tuning(store, kept.inputs, built.artifact.key)
    except Exception as exc:  # noqa: BLE001 - the interrupt is what the run reports
        log.warning("tune: the %d trials measured before the interrupt could not be kept: %s", report.trials_new, exc)
        return
    log.warning("tune: interrupted after %d of %d new trials: kept as a tuning of %d trials (%s); --tune-more N "
                "continues from it", report.trials_new, (report.interrupted_budget or report.trials) - report.trials_reused,
                report.trials, built.artifact.key[:16])


def read_report(tuning: Artifact, store: ArtifactStore) -> dict[str, Any]:
    """The ``tuning.json`` of a tuning artifact (tuning time, tasks, trials reused and new, estimated latency,
    history, converged), read once and verified against the tuning's authenticated manifest.

    Raises:
        StoreError: the file fails verification. ValueError: it is not JSON.
    """
    return json.loads(store.read_verified(tuning.key, TUNING_REPORT_FILE)[0])


def read_summary(tuning: Artifact, store: ArtifactStore) -> dict[str, Any]:
    """What a run reports about its tuning (the ``tuning`` object of ``--json``): ``tuning.json`` without the
    per-task list, with the defaults of a tuning stored before tunings could continue, every figure checked
    (:func:`pipeline.tuning.result.checked_summary`: a figure out of range is None, never shown)."""
    try:
        report = read_report(tuning, store)
    except ValueError:
        report = {}
    trials = tuning.inputs.get("trials")
    trials = trials if isinstance(trials, int) and not isinstance(trials, bool) and trials > 0 else 0
    return {"key": tuning.key, **checked_summary(report, trials)}


tune_task = task(name="tune", task_run_name="tune", retries=0)(tune)
