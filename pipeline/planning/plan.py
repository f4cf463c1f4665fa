"""Plan a run once: every cached stage's artifact key and manifest inputs, computed from the validated request.

The cached stages (import-model -> tune -> build -> export-library, and reference) never compute a key
themselves: they receive a :class:`StageKey` from the plan and record its inputs in the artifact's
manifest. So the key a run looks up is, by construction, the key its artifact is stored under, and the
flow, the fleet, the accuracy tool, the bench and the tests all share one chain of keys.

    import-model  key_of(model digest, TVM, import code)
    tune          key_of(model digest, canonical target, trials, cores, schedule space, TVM, code)
    build         key_of(model digest, canonical target, opt_level, TVM, code [, tune key | rule-based schedules]
                         [, the keys of the store's other tunings it shares records of])
    export        key_of(build key, linker identity, export code)
    reference     key_of(model digest, input digest, framework version, code)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.planning import keys
from pipeline.errors import UsageError
from pipeline.models import ResolvedModel
from pipeline.planning.request import DEFAULT_SCHEDULES, SCHEDULES
from pipeline.targets import TargetInfo, Toolchain, toolchain_for

if TYPE_CHECKING:
    from pipeline.planning.request import ResolvedRequest
    from pipeline.tuning.shared import SharedTuning


@dataclass(frozen=True)
class StageKey:
    """A cached stage's artifact key and what its manifest records.

    Attributes:
        key: the artifact key, ``keys.key_of(inputs)``.
        inputs: what the key hashes: everything that changes the stage's output.
        extra: recorded in the manifest beside ``inputs`` but not hashed (names, where tuning measured...).
    """

    key: str
    inputs: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: dict[str, Any], **extra: Any) -> StageKey:
        return cls(keys.key_of(inputs), inputs, extra)

    @property
    def manifest(self) -> dict[str, Any]:
        """The ``inputs`` of the artifact's manifest: the hashed inputs, then the extras."""
        return {**self.inputs, **self.extra}


@dataclass(frozen=True)
class BuildPlan:
    """The compile chain of one (model, target, opt_level, tuning budget): import -> [tune] -> build -> export.

    Attributes:
        tune: None when ``tune_trials`` is 0 (no tuning; the build key then has no tuning part).
        toolchain: the linker of the library (a missing cross compiler fails at planning, before compiling).
        shared: the store's other tunings whose records the build applies to the kernels its own schedules
            leave (:mod:`pipeline.tuning.shared`; their keys are the build key's ``records``); () for none.
    """

    model: ResolvedModel
    target: TargetInfo
    opt_level: int
    tune_trials: int
    toolchain: Toolchain
    imported: StageKey
    tune: StageKey | None
    build: StageKey
    library: StageKey
    shared: tuple[SharedTuning, ...] = ()

    @property
    def schedules(self) -> str | None:
        """What the build applies to a CPU target without tuning: ``"rules"`` (schedules from MetaSchedule's
        rules, no search; :mod:`pipeline.tuning.rules`) when its key names them, else None (TVM's default
        pipeline: a tuned build, a GPU target, or ``schedules="none"`` asked for)."""
        return "rules" if "schedules" in self.build.inputs else None

    @property
    def applied(self) -> str:
        """The schedules the build applies, as reports name them: ``tuned``, ``rules`` or ``tvm-default``
        (TVM's default pipeline: no schedules on a CPU, TVM's GPU schedules on a GPU)."""
        return "tuned" if self.tune is not None else self.schedules or "tvm-default"


def plan_build(
    model: ResolvedModel, target: TargetInfo, opt_level: int, tune_trials: int = 0, tune_runner: str = "local",
    schedules: str = DEFAULT_SCHEDULES, shared: tuple[SharedTuning, ...] = (),
) -> BuildPlan:
    """The keys of the compile chain.

    Args:
        tune_trials: the tuning's total budget (0: no tuning). ``--tune-more N`` is resolved to a total before
            planning (:func:`pipeline.tuning.resolve_trials`), so the tune and build keys name the total; the
            tune stage then continues from the largest tuning of the same family, found in the store.
        tune_runner: where tuning measures (recorded in the tuning manifest, not hashed).
        schedules: ``"rules"`` (default) or ``"none"``: what an untuned CPU build applies.
        shared: the store's tunings the build may share records of (``ResolvedRequest.shared``:
            :func:`pipeline.tuning.shared.shared_tunings`). Only a CPU build that applies MetaSchedule's
            schedules (tuned, or the rules) shares them: ``schedules="none"`` is TVM's own pipeline.

    Raises:
        ExportError: the target needs a cross compiler that is not installed.
        CudaToolchainMissing: a CUDA target, and the ``cuda`` extra (NVRTC) is not installed.
    """
    toolchain = toolchain_for(target)
    if schedules not in SCHEDULES:
        raise UsageError(f"schedules must be rules or none (got {schedules!r})")
    imported = StageKey.of(keys.import_inputs(model.digest), name=model.name)
    tune = None
    if tune_trials > 0:
        from pipeline import tuning

        tune = StageKey.of(
            tuning.tune_inputs(model.digest, target, tune_trials), name=model.name,
            **tuning.tune_manifest_extra(target, tune_runner),
        )
    gpu_toolchain = None
    if target.device == "cuda":
        from pipeline.cuda.builder import cuda_toolchain

        gpu_toolchain = cuda_toolchain().identity  # missing NVRTC fails here, before anything is compiled
    rules = None
    if schedules == "rules" and tune is None and target.device == "cpu":
        from pipeline.tuning.rules import rules_inputs

        rules = rules_inputs(target)
    if target.device != "cpu" or (tune is None and rules is None):
        shared = ()
    elif tune is not None:
        shared = tuple(t for t in shared if t.model_digest != model.digest)  # its own tuning applies
    build = StageKey.of(keys.build_inputs(
        model.digest, target.canonical, opt_level, tune.key if tune is not None else None, gpu_toolchain, rules,
        [t.key for t in shared],
    ))
    library = StageKey.of(keys.export_inputs(build.key, toolchain.identity))
    return BuildPlan(model, target, opt_level, tune_trials, toolchain, imported, tune, build, library,
                     tuple(sorted(shared, key=lambda t: t.key)))


def plan_reference(model: ResolvedModel, data: np.ndarray) -> StageKey:
    """The key of ``model``'s reference output on ``data`` (its framework's version included)."""
    inputs = keys.reference_inputs(model.digest, keys.input_digest(data), keys.framework_version(model.kind))
    return StageKey.of(inputs, name=model.name)


@dataclass(frozen=True)
class RunPlan:
    """A validated request and everything its run looks up in the store: the compile chain and the reference
    (None without the check). One model on one device runs from this (``tasks.chains.run_one``)."""

    request: ResolvedRequest
    build: BuildPlan
    reference: StageKey | None


def plan_run(req: ResolvedRequest) -> RunPlan:
    """The plan of a validated request.

    Raises:
        ExportError, CudaToolchainMissing: as :func:`plan_build`.
    """
    build = plan_build(req.model, req.target, req.opt_level, req.tune_trials, req.tune_runner, req.schedules,
                       req.shared)
    return RunPlan(req, build, plan_reference(req.model, req.input) if req.check and not req.build_only else None)
