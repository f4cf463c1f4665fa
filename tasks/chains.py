"""The stage chains the flows and the fleet's tasks share: compile (cached) and device (always), from the plan.

    import-model -> [tune] -> build -> export-library          compile_chain (cached by the plan's keys)
    upload -> load -> set-input -> run                          device_chain (one session, retried when lost)
    device_chain -> check -> postprocess -> report               run_on_device (one model on one device)

Both take how to run a stage: :func:`tasks._cache.run_cached` (a Prefect task with the store-backed cache:
the flows) or :func:`run_plain` (the plain function: the accuracy tool, the bench).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.device import Device
from pipeline.device.cache import cache_secret
from pipeline.errors import DeviceLost, StoreError
from pipeline.latency import Timing
from pipeline.planning.plan import BuildPlan, StageKey
from pipeline.planning.request import ResolvedRequest
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import TargetInfo
from tasks._cache import run_cached
from tasks.check import check_task
from tasks.export_library import LIBRARY_FILE
from tasks.postprocess import postprocess_task
from tasks.reference import load_reference
from tasks.report import RunSummary, report_task
from tasks._live import opened
from tasks.build import build_task
from tasks.export_library import export_library_task
from tasks.import_model import import_model_task
from tasks.load import Loaded, load_task
from tasks.run import RunResult, run_task
from tasks.set_input import set_input_task
from tasks.tune import read_summary, tune_task
from tasks.upload import inspect_device, upload_task

log = logging.getLogger(__name__)

StageRunner = Callable[..., tuple[Artifact, str]]


def run_plain(stage_task: Any, store: ArtifactStore, stage: StageKey, refresh: bool, **params: Any) -> tuple[Artifact, str]:
    """Run a cached stage's plain function (no Prefect): same contract as :func:`run_cached`."""
    built = stage_task.fn(**params, stage=stage, store_root=str(store.root), refresh=refresh)
    return built.artifact, "ran" if built.built else "cached"


@dataclass(frozen=True)
class Compiled:
    """The compile chain's artifacts and what each stage did (``ran``/``cached``)."""

    module: Artifact
    tuning: Artifact | None
    build: Artifact
    library: Artifact
    stages: dict[str, str]


def compile_chain(plan: BuildPlan, store: ArtifactStore, refresh: bool, run: StageRunner = run_cached) -> Compiled:
    """import-model -> [tune] -> build -> export-library, each found in the store or produced once."""
    stages: dict[str, str] = {}
    module, stages["import-model"] = run(import_model_task, store, plan.imported, refresh, model=plan.model)
    tuning = None
    if plan.tune is not None:
        # --refresh does not retune (minutes to hours); a missing or corrupt tuning is still redone.
        tuning, stages["tune"] = run(tune_task, store, plan.tune, False, module=module, target=plan.target,
                                     trials=plan.tune_trials, runner=plan.tune.extra["runner"])
    build, stages["build"] = run(build_task, store, plan.build, refresh, module=module, target=plan.target,
                                 opt_level=plan.opt_level, tuning=tuning)
    library, stages["export-library"] = run(export_library_task, store, plan.library, refresh, build=build,
                                            target=plan.target, toolchain=plan.toolchain)
    return Compiled(module, tuning, build, library, stages)


def preflight(device: Device, target: TargetInfo, allow_version_skew: bool = False) -> None:
    """Ask the device, before anything is compiled, whether it can run what the target builds (for a CUDA
    target: before a compile of many seconds; the upload stage asks again).

    Raises:
        VersionSkew: it runs another minor TVM version.
        ArchMismatch: another architecture, no CUDA GPU, or one of another compute capability.
    """
    with device.session() as session, opened(session) as ref:
        inspect_device(ref, target.arch, target.gpu_arch, allow_version_skew)


@dataclass(frozen=True)
class OnDevice:
    """What the device chain produced: the loaded library (with its placement) and the run's result."""

    loaded: Loaded
    result: RunResult
    device: str
    identity: str
    """What the device reports about itself (part of the run's series)."""


def usable_device_cache(device: Device, store: ArtifactStore, device_cache: str | None) -> str | None:
    """``device_cache`` once its secret (and, for the embedded server, its directory in the store) exist; None
    with a warning when the store cannot hold them (a read-only store: the run uploads every time)."""
    if device_cache is None:
        return None
    try:
        cache_secret(store.root)
        if device.spec.kind == "local":
            Path(device_cache).mkdir(mode=0o700, parents=True, exist_ok=True)  # the embedded server's, in the store
    except (OSError, StoreError) as exc:
        log.warning("the device cache is off for this run: %s", exc)
        return None
    return device_cache


def device_chain(
    device: Device, library: Artifact, store: ArtifactStore, target: TargetInfo, data: np.ndarray, timing: Timing,
    device_cache: str | None, retries: int, allow_version_skew: bool = False,
) -> OnDevice:
    """upload -> load -> set-input -> run on a fresh session; retried (only here) when the device is lost.

    After a lost device the retry uploads again (a kept copy is not trusted to have survived) and the
    embedded device is restarted.
    """
    device_cache = usable_device_cache(device, store, device_cache)
    attempt, reuse = 1, True
    while True:
        try:
            with device.session() as session, opened(session) as ref:
                uploaded = upload_task(ref, library, str(store.root), target.arch, device_cache, reuse, target.gpu_arch,
                                       allow_version_skew)
                loaded = load_task(uploaded, str(store.root))
                result = run_task(set_input_task(loaded, data), timing)
                return OnDevice(loaded, result, ref.description, uploaded.device_identity)
        except DeviceLost as exc:
            if attempt > retries:
                raise DeviceLost(
                    f"{exc}. Gave up after {attempt} attempt(s): check that the device is up and stable "
                    f"(or allow more with --device-retries)"
                ) from exc
            attempt, reuse = attempt + 1, False
            log.warning("device lost (%s); retrying on a fresh session (attempt %d of %d)", exc, attempt, retries + 1)
            device.recover()


UNTUNED_NOTE = (
    "untuned build: TVM 0.27's default CPU pipeline applies no tuned schedules, so this latency is far above what "
    "the CPU can do (ResNet-18 v2 on the 2-core bench machine: 1424 ms untuned; tuned with -mcpu=native 39 ms after "
    "256 trials, 34 ms after 1024; 18 ms with onnxruntime; see bench/RESULTS.md)"
)
RULES_NOTE = (
    "untuned build: each kernel has one schedule from MetaSchedule's rules, chosen without measuring; tuning "
    "(--tune-trials N, -mcpu=native) is far faster still (ResNet-18 v2 on the 2-core bench machine: ~280-340 ms "
    "with the rules, ~1450 ms without; 38 ms after 256 trials, 36 ms after 4096; 18-20 ms with onnxruntime; see "
    "bench/RESULTS.md)"
)

STAGES = (
    "import-model", "tune", "build", "export-library", "reference", "upload", "load", "set-input", "run", "check",
    "postprocess",
)


def run_on_device(
    req: ResolvedRequest, build: BuildPlan, compiled: Compiled, device: Device, reference: tuple[Artifact, str] | None,
    run_id: str, started: str, fleet_run: str | None = None,
) -> RunSummary:
    """One model on one device: the device chain, then check (against ``reference``: its artifact and stage
    status), postprocess and report (judged against its series, recorded in the ledger with ``fleet_run``).

    Returns:
        The judged summary; a failed check is in ``summary.check`` (the caller decides to raise).
    """
    root = str(req.store.root)
    on = device_chain(device, compiled.library, req.store, req.target, req.input, req.timing, req.device_cache,
                      req.device_retries, req.allow_version_skew)
    stages = {name: "skipped" for name in STAGES} | compiled.stages
    stages.update({"upload": "ran", "load": "ran", "set-input": "ran", "run": "ran"})
    checked = None
    if reference is not None:
        artifact, stages["reference"] = reference
        checked = check_task(on.result.output, load_reference(artifact, root), req.thresholds)
        stages["check"] = "ran"
    prediction = postprocess_task(req.model, on.result.output, on.result.latency)
    stages["postprocess"] = "ran"
    model = req.model
    summary = RunSummary(
        run_id=run_id, started=started, model=model.name, model_digest=model.digest,
        weights=model.spec.weights if model.kind == "resnet18_v2" else None, target=req.target.canonical,
        opt_level=req.opt_level, tune_trials=req.tune_trials, tuning_key=build.tune.key if build.tune else None,
        import_key=build.imported.key, build_key=build.build.key, library_key=build.library.key,
        artifact=str(req.store.file(compiled.library, LIBRARY_FILE)), device=on.device, device_identity=on.identity,
        image=str(req.image), input_shape=tuple(model.input_shape), stages=stages, top5=prediction.top,
        latency=on.result.latency, upload=on.loaded.placement, check=checked,
        notes=(*model.notes, *{"tuned": [], "rules": [RULES_NOTE]}.get(build.applied, [UNTUNED_NOTE])),
        tuning=read_summary(compiled.tuning, root) if compiled.tuning is not None else None,
        schedules=build.applied,
    )
    failed = checked is not None and not checked.passed
    return report_task(summary, root, status="failed" if failed else "passed",
                       error="check failed" if failed else None, fleet_run=fleet_run)
