"""A fleet: every model on every device in one run, resolved and planned like single runs.

The fleet file and its validation are :mod:`pipeline.fleet.spec` (``docs/fleet.md`` describes every key). From
its :class:`~pipeline.fleet.spec.FleetSpec`, :func:`resolve_fleet` makes every (device, model) pair the
:class:`~pipeline.planning.request.RunRequest` that ``python -m flows.resnet_remote`` would be given for it
(``FleetSpec.request``), resolves it with the same :func:`~pipeline.planning.request.resolve` and plans it with
the same :func:`~pipeline.planning.plan.plan_run`: pairs with equal keys share one build. Models, targets and
images are resolved once each, and a bad one is a UsageError naming its entry and line. What the run gives is
:mod:`pipeline.results` (``PairResult``, ``FleetSummary``), rendered by :mod:`pipeline.views.fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError, UsageError, clip, one_line
from pipeline.fleet.spec import FleetDevice, FleetModel, FleetSpec, Where, on_line

if TYPE_CHECKING:
    from pipeline.models import ResolvedModel
    from pipeline.planning.plan import RunPlan
    from pipeline.planning.request import ResolvedRequest, Resolutions
    from pipeline.store import ArtifactStore


@dataclass(frozen=True)
class FleetPair:
    """One (device, model) pair, resolved and planned like one ``resnet_remote`` run.

    Attributes:
        label: the model's name in the table (its name; its path when two models share a name).
        request: the run as ``pipeline.planning.request.resolve`` gives it.
        plan: its plan (compile chain and reference keys); None when planning failed (``unplanned`` says why: a
            missing cross compiler fails the pairs of that target, not the fleet).
    """

    device: FleetDevice
    model: FleetModel
    label: str
    request: ResolvedRequest
    plan: RunPlan | None
    unplanned: str | None = None

    @property
    def name(self) -> str:
        return f"{self.label} on {self.device.name}"


@dataclass(frozen=True)
class ResolvedFleet:
    """A fleet resolved up front: its store and every pair, device by device, in the file's order."""

    spec: FleetSpec
    store: ArtifactStore
    pairs: tuple[FleetPair, ...]

    def builds(self) -> dict[str, FleetPair]:
        """The distinct compile chains (by library key), each with the first pair that needs it (its ``plan``)."""
        found: dict[str, FleetPair] = {}
        for pair in self.pairs:
            if pair.plan is not None:
                found.setdefault(pair.plan.build.library.key, pair)
        return found

    def references(self) -> dict[str, FleetPair]:
        """The distinct reference outputs to compute (by key), each with the first pair that needs it."""
        found: dict[str, FleetPair] = {}
        for pair in self.pairs:
            if pair.plan is not None and pair.plan.reference is not None:
                found.setdefault(pair.plan.reference.key, pair)
        return found


def resolve_fleet(spec: FleetSpec, artifacts: str | None = None) -> ResolvedFleet:
    """Resolve and plan every pair of ``spec``: each one's request through ``resolve``, then ``plan_run``.

    Cheap: models are located and digested, targets parsed, images read; nothing is compiled and no
    device is contacted.

    Args:
        artifacts: the store (``--artifacts``; None: the fleet file's ``artifacts``, else ``$TVMRP_ARTIFACTS``, else
            ``artifacts/``).

    Raises:
        UsageError: a model, target or image is bad (the message names its entry and line), or the store
            cannot be used.
    """
    from dataclasses import replace

    from pipeline.planning.plan import plan_run
    from pipeline.planning.request import Resolutions, resolve

    where = Where(spec.source)
    found = Resolutions()
    artifacts = artifacts if artifacts is not None else spec.shared.artifacts
    shared = replace(spec.shared, artifacts=artifacts)
    _check_targets(spec, where)
    models = _models(spec, found, where)
    labels = _labels([(entry, model) for entry, model in models])
    pairs = []
    for device in spec.devices:
        for index, (entry, model) in enumerate(models):
            request = replace(shared, **device.fields, **entry.fields)
            resolved = resolve(request, found)
            try:
                plan, unplanned = plan_run(resolved), None
            except PipelineError as exc:  # e.g. no cross compiler: the pairs of that target fail, the others run
                plan, unplanned = None, one_line(exc)
            pairs.append(FleetPair(device=device, model=entry, label=labels[index], request=resolved, plan=plan,
                                   unplanned=unplanned))
    return ResolvedFleet(spec, found.store(artifacts), tuple(pairs))


def _check_targets(spec: FleetSpec, where: Where) -> None:
    """Each distinct target of the fleet, parsed; a bad one is a UsageError naming its device and line."""
    from pipeline.targets import parse_target

    checked: set[str] = set()
    for i, device in enumerate(spec.devices):
        if device.target not in checked:
            try:
                parse_target(device.target)
            except UsageError as exc:
                raise where.error(device.line, f"devices[{i}].target ({device.name})", str(exc)) from None
            checked.add(device.target)


def _models(spec: FleetSpec, found: Resolutions, where: Where) -> list[tuple[FleetModel, ResolvedModel]]:
    """Each model of the fleet, resolved, with its image read; a bad one is a UsageError naming its entry and line,
    and so is a model listed twice under other names (the same content and image)."""
    from pipeline.image import DEFAULT_IMAGE
    from pipeline.models import ModelSpec

    models: list[tuple[FleetModel, ResolvedModel]] = []
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(spec.models):
        try:
            model = found.model(ModelSpec(source=entry.source, weights=entry.weights, seed=entry.seed))
            image = Path(entry.image) if entry.image else DEFAULT_IMAGE
            found.input(image, model)
        except UsageError as exc:
            raise where.error(entry.line, f"models[{i}] ({clip(entry.source, 80)})", str(exc)) from None
        ident = (model.digest, str(image.resolve()))
        if ident in seen:
            j = seen[ident]
            raise where.error(entry.line, f"models[{i}]", f"the same model (same content) and image as models[{j}]"
                                                          f"{on_line(spec.models[j].line)}; list each model once")
        seen[ident] = i
        models.append((entry, model))
    return models


def _labels(models: list[tuple[FleetModel, Any]]) -> list[str]:
    """Each model's name in the table: its name, else its path, else its path and image (whichever is unique)."""
    names = [model.name for _, model in models]
    labels = []
    for (entry, model), name in zip(models, names):
        if names.count(name) == 1:
            labels.append(name)
        elif [e.source for e, _ in models].count(entry.source) == 1:
            labels.append(entry.source)
        else:
            labels.append(f"{entry.source} ({Path(entry.image).name if entry.image else 'default image'}"
                          f"{', ' + entry.weights if entry.weights != 'pretrained' else ''}, seed {entry.seed})")
    return labels
