"""The stage chains every run shares, from its plan.

    import-model -> [tune] -> build -> export-library      compile_chain (cached by the plan's keys)
    upload -> load -> (set-input -> run) per input          device_chain (one session; run again on a fresh
      [-> check]                                            session when the device is lost or its kept copy
                                                            of the library fails)
    device start -> [preflight] -> prepare -> device_chain -> postprocess -> report
                                                            run_one: one model on one device, every failure
                                                            recorded in the ledger with the plan

A single run (``flows.resnet_remote``), each pair of a fleet (``tasks.fleet``) and the accuracy tool
(``flows.accuracy``: compile_chain and device_chain, over many inputs) go through these. The compile chain
takes how to run a stage: :func:`tasks._cache.run_cached` (a Prefect task with the store-backed cache) or
:func:`run_plain` (the plain function: the bench).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.cuda.builder import library_gpu_code
from pipeline.device import Device
from pipeline.errors import DeviceError, DeviceLost, KeptCopyFailed, StoreError, one_line
from pipeline.latency import Timing
from pipeline.planning.plan import BuildPlan, RunPlan, StageKey
from pipeline.planning.request import DevicePolicy
from pipeline.profiling import kernel_flops, summarize
from pipeline.results import (
    COMPILE_STAGES,
    BuildSummary,
    CheckResult,
    DeviceFacts,
    DeviceOutcome,
    RunStamp,
    RunSummary,
    TuningSources,
    Upload,
)
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.fs import real_directory
from pipeline.store.layout import LIBRARY_FILE, TUNING_SOURCES_FILE
from pipeline.targets import TargetInfo
from pipeline.tuning.shared import parse_sources
from tasks._cache import run_cached
from tasks._live import opened
from tasks.build import build_task
from tasks.check import check_task
from tasks.export_library import export_library_task
from tasks.import_model import import_model_task
from tasks.load import Loaded, load_task
from tasks.postprocess import postprocess_task
from tasks.reference import load_reference, reference_task
from tasks.report import record_failure, report_task
from tasks.run import RunResult, run_task
from tasks.set_input import set_input_task
from tasks.tune import read_summary, tune_task
from tasks.upload import forget_kept, inspect_device, upload_task

log = logging.getLogger(__name__)

StageRunner = Callable[..., tuple[Artifact, str]]


def run_plain(stage_task: Any, store: ArtifactStore, stage: StageKey, refresh: bool, **params: Any) -> tuple[Artifact, str]:
    """Run a cached stage's plain function (no Prefect): same contract as :func:`run_cached`."""
    built = stage_task.fn(**params, stage=stage, store=store, refresh=refresh)
    return built.artifact, "ran" if built.built else "cached"


# -- compiling ------------------------------------------------------------------------------------------------------


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
                                 opt_level=plan.opt_level, tuning=tuning, shared=plan.shared)
    library, stages["export-library"] = run(export_library_task, store, plan.library, refresh, build=build,
                                            target=plan.target, toolchain=plan.toolchain)
    return Compiled(module, tuning, build, library, stages)


UNTUNED_NOTE = (
    "untuned build: TVM 0.27's default CPU pipeline applies no schedules, so this latency is far above what the CPU "
    "can do; the rule-based schedules (--schedules rules, the default) or tuning (--tune-trials N, -mcpu=native) "
    "are much faster (docs/performance.md)"
)
RULES_NOTE = (
    "untuned build: each kernel has one schedule from MetaSchedule's rules, chosen without measuring; tuning "
    "(--tune-trials N, -mcpu=native) is far faster still (docs/performance.md)"
)
_NOTES = {"tuned": (), "rules": (RULES_NOTE,), "tvm-default": (UNTUNED_NOTE,)}


def tuning_sources(plan: BuildPlan, build: Artifact, store: ArtifactStore) -> TuningSources | None:
    """Which tunings scheduled how many kernels of ``build``, for a build that shares the store's tuning records
    (its ``tuning_sources.json``, verified); None for another build, or when the file is missing or not valid
    (logged)."""
    if not plan.shared:
        return None
    try:
        sources = parse_sources(store.read_verified(build.key, TUNING_SOURCES_FILE)[0])
    except StoreError as exc:
        sources, why = None, str(exc)
    else:
        why = "it is not valid"
    if sources is None:
        log.warning("build %s: which tunings scheduled its kernels is unknown (%s)", build.key[:16], why)
    return sources


def build_summary(plan: BuildPlan, compiled: Compiled, store: ArtifactStore) -> BuildSummary:
    """What the compile chain of ``plan`` gave (``compiled``), as the report shows it."""
    model, library = plan.model, store.file(compiled.library, LIBRARY_FILE)
    notes = _NOTES[plan.applied] if plan.target.device == "cpu" else ()
    return BuildSummary(
        model=model.name, model_digest=model.digest,
        weights=model.spec.weights if model.kind == "resnet18_v2" else None, target=plan.target.canonical,
        opt_level=plan.opt_level, tune_trials=plan.tune_trials, schedules=plan.applied,
        tuning_key=plan.tune.key if plan.tune else None, import_key=plan.imported.key, build_key=plan.build.key,
        library_key=plan.library.key, artifact=str(library), library_bytes=compiled.library.size,
        gpu_code=library_gpu_code(library) if plan.target.device == "cuda" else None,
        stages={name: compiled.stages.get(name, "skipped") for name in COMPILE_STAGES},
        tuning=read_summary(compiled.tuning, store) if compiled.tuning is not None else None,
        notes=(*model.notes, *notes), tuning_sources=tuning_sources(plan, compiled.build, store),
    )


@dataclass(frozen=True)
class Reference:
    """A model's reference output in the store, and whether this run computed it (``ran``) or found it."""

    artifact: Artifact
    status: str


@dataclass(frozen=True)
class Prepared:
    """What a run needs before its device stages: its compile chain and its reference output (None: no check)."""

    compiled: Compiled
    reference: Reference | None


def prepare_here(plan: RunPlan, run: StageRunner = run_cached) -> Prepared:
    """The compile chain and the reference output of ``plan``, found in the store or produced here."""
    req = plan.request
    compiled = compile_chain(plan.build, req.store, req.refresh, run)
    reference = None
    if plan.reference is not None:  # the framework's output, found or computed before the device is held
        reference = Reference(*run(reference_task, req.store, plan.reference, req.refresh, model=req.model,
                                   data=req.input))
    return Prepared(compiled, reference)


# -- the device -------------------------------------------------------------------------------------------------------


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
class DeviceJob:
    """What the device chain runs: one library, its inputs, how to time them and how to treat the device.

    Attributes:
        inputs: set and run one after another on the loaded library; the first is timed as ``timing`` says.
        timing: None: no input is timed (each runs once).
        profile: after timing the first input, time every call of its inference (``--profile``).
    """

    library: Artifact
    target: TargetInfo
    inputs: tuple[np.ndarray, ...]
    timing: Timing | None
    policy: DevicePolicy
    profile: bool = False


@dataclass(frozen=True)
class OnDevice:
    """What the device chain produced: the loaded library (with its placement), each input's result, and the
    first output's check (None: not checked)."""

    loaded: Loaded
    results: tuple[RunResult, ...]
    device: str
    identity: str
    """What the device reports about itself (part of the run's series)."""
    checked: CheckResult | None = None


def usable_device_cache(device: Device, store: ArtifactStore, device_cache: str | None,
                        device_says: bool = False) -> str | None:
    """``device_cache`` once its secret (and, for the embedded server, its directory in the store) exist; None
    with a warning when the store cannot hold them (a read-only store: the run uploads every time). With
    ``device_says`` and no ``device_cache``, ``""`` once the secret exists: the device may name a directory."""
    if device_cache is None and not device_says:
        return None
    try:
        store.device_cache_secret()
        if device.spec.kind == "local":
            real_directory(store.layout.device_cache, 0o700)
    except (OSError, StoreError) as exc:
        log.warning("the device cache is off for this run: %s", exc)
        return None
    return "" if device_cache is None else device_cache


def device_chain(
    device: Device, store: ArtifactStore, job: DeviceJob, check: Callable[[np.ndarray], CheckResult] | None = None
) -> OnDevice:
    """upload -> load -> (set-input -> run) per input [-> check of the first output], on a fresh session; the
    one place that runs it again.

    Runs again, on a fresh session and with a fresh upload:
      - once, when the library copy the device kept fails (its size or digest on the device is not what was
        sent, it does not load, or its output fails ``check``): the copy is forgotten first;
      - up to ``job.policy.retries`` times when the device is lost (a kept copy is not trusted to have
        survived; the embedded device is restarted). If such a retry fails otherwise (no device free, a
        timeout), the error names the loss that caused it.

    Args:
        check: compares the first input's output with the reference (the run's check stage); a failure is
            returned in ``checked`` (the caller decides), except for a kept copy, which is forgotten and replaced.
    """
    policy, target = job.policy, job.target
    device_cache = usable_device_cache(device, store, policy.device_cache, policy.device_says)
    device_says = device_cache == ""
    device_cache = device_cache or None
    attempt, reuse, lost = 1, True, None
    while True:
        try:
            with device.session() as session, opened(session) as ref:
                uploaded = upload_task(ref, job.library, store, target.arch, device_cache, reuse, target.gpu_arch,
                                       policy.allow_version_skew, device_says)
                loaded = load_task(uploaded, store)
                results = tuple(run_task(set_input_task(loaded, data), job.timing if i == 0 else None,
                                         job.profile and i == 0 and job.timing is not None)
                                for i, data in enumerate(job.inputs))
                checked = check(results[0].output) if check is not None else None
                if checked is not None and not checked.passed and uploaded.reused:
                    forget_kept(uploaded, store)
                    raise KeptCopyFailed(
                        f"the output of the library copy that {ref.description} kept ({uploaded.remote_name}) failed "
                        f"the check ({checked.reason}): it is forgotten and removed"
                    )
                return OnDevice(loaded, results, ref.description, uploaded.device_identity, checked)
        except KeptCopyFailed as exc:
            if not reuse:
                raise  # only a kept copy fails so, and the run after one uploads
            reuse = False
            log.warning("%s; uploading the library again on a fresh session", exc)
        except DeviceLost as exc:
            lost = lost or exc
            if attempt > policy.retries:
                raise DeviceLost(
                    f"{exc}. Gave up after {attempt} attempt(s): check that the device is up and stable "
                    f"(or allow more with --device-retries)"
                ) from exc
            attempt, reuse = attempt + 1, False
            log.warning("device lost (%s); retrying on a fresh session (attempt %d of %d)", exc, attempt,
                        policy.retries + 1)
            device.recover()
        except DeviceError as exc:
            if lost is None:
                raise
            # The retry's own failure (no device free, a timeout) is not why the run failed: the loss is.
            raise DeviceLost(f"{lost}; retrying on a fresh session then failed: {one_line(exc)}") from exc


# -- one model on one device ----------------------------------------------------------------------------------------


def run_one(plan: RunPlan, stamp: RunStamp, prepare: Callable[[], Prepared], fleet_run: str | None = None) -> RunSummary:
    """One model on one device: start the device, [preflight a GPU device], ``prepare`` (compile and reference,
    or find what a fleet prepared), then the device chain, check, postprocess and report (judged against the
    lineage, recorded in the ledger with ``fleet_run``).

    Every failure is recorded in the ledger with ``plan``'s keys before it is raised. A failed check is not
    raised: the summary says so (``summary.passed``) and the caller decides.
    """
    req = plan.request
    store = req.store
    try:
        with Device(req.device) as device:  # the embedded server starts now and imports TVM while we compile
            if req.target.device == "cuda":
                preflight(device, req.target, req.policy.allow_version_skew)  # before a compile of many seconds
            prepared = prepare()
            job = DeviceJob(prepared.compiled.library, req.target, (req.input,), req.timing, req.policy, req.profile)
            check = None
            if prepared.reference is not None:
                reference = load_reference(prepared.reference.artifact, store)
                check = functools.partial(check_task, reference=reference, thresholds=req.thresholds)
            on = device_chain(device, store, job, check)
        result = on.results[0]
        stages = {"reference": prepared.reference.status if prepared.reference else "skipped",
                  "upload": "ran", "load": "ran", "set-input": "ran", "run": "ran"}
        checked = on.checked
        if checked is not None:
            stages["check"] = "ran"
        assert result.latency is not None  # the first input is timed
        prediction = postprocess_task(req.model, result.output, result.latency)
        stages["postprocess"] = "ran"
        placement = on.loaded.placement
        load_s = on.loaded.load_seconds
        facts = DeviceFacts(load_ms=load_s * 1e3 if load_s is not None else None,
                            first_inference_ms=result.first_inference_ms,
                            peak_memory_bytes=result.peak_memory_bytes, library_bytes=placement.bytes)
        profile = None
        if result.calls is not None:
            profile = summarize(result.calls, kernel_flops(store, prepared.compiled.build))
        outcome = DeviceOutcome(
            device=on.device, device_identity=on.identity, image=str(req.image),
            input_shape=tuple(req.model.input_shape), stages=stages, top5=prediction.top, latency=result.latency,
            upload=Upload(placement.remote_name, placement.bytes, placement.seconds, placement.reused),
            check=checked, name=req.device_name, conditions=result.conditions, facts=facts, profile=profile,
            notes=result.notes,
        )
        summary = RunSummary(stamp, build_summary(plan.build, prepared.compiled, store), outcome)
        return report_task(summary, store, fleet_run=fleet_run, gate=req.fail_on_regression)
    except (Exception, KeyboardInterrupt) as exc:
        record_failure(req, plan, stamp, exc, fleet_run=fleet_run)
        raise
