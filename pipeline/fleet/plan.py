"""A fleet: every model on every device in one run, resolved and planned; and what the run gave.

The fleet file and its validation are :mod:`pipeline.fleet.spec` (``docs/fleet.md`` describes every key).
From its :class:`~pipeline.fleet.spec.FleetSpec`:

* :func:`resolve_fleet`: the models (``pipeline.models.resolve_model``), targets
  (``pipeline.targets.parse_target``), images and store, resolved up front like one run's
  (``pipeline.planning.request.resolve``); a bad one is a UsageError naming its entry and line.
* the plan: every (device, model) pair as the :class:`~pipeline.planning.request.ResolvedRequest` of a
  ``resnet_remote`` run, with the keys of its compile chain (``pipeline.planning.plan.plan_build``): pairs with
  equal keys share one build.

The results: :class:`PairResult` per pair, :class:`FleetSummary` for the run, and their renderings (the
terminal table, the ``--json`` object, the rows and markdown of the Prefect artifacts). A failed run or pair
is :class:`~pipeline.errors.FleetFailed` or :class:`~pipeline.errors.PairFailed`, carrying these results.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import PipelineError, UsageError, clip
from pipeline.fleet.spec import FleetDevice, FleetModel, FleetSpec, Where, on_line

if TYPE_CHECKING:
    import numpy as np

    from pipeline.models import ResolvedModel
    from pipeline.planning.plan import BuildPlan, StageKey
    from pipeline.planning.request import ResolvedRequest
    from pipeline.store import ArtifactStore
    from pipeline.targets import TargetInfo


# -- resolved and planned -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetPair:
    """One (device, model) pair, resolved and planned like one ``resnet_remote`` run.

    Attributes:
        label: the model's name in the table (its name; its path when two models share a name).
        request: the run as ``pipeline.planning.request.resolve`` would give it.
        plan: the keys of its compile chain; None when planning failed (``unplanned`` says why: a missing
            cross compiler fails the pairs of that target, not the fleet).
        reference: the key of the model's reference output (None with ``check: false``).
    """

    device: FleetDevice
    model: FleetModel
    label: str
    request: ResolvedRequest
    plan: BuildPlan | None
    reference: StageKey | None
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
                found.setdefault(pair.plan.library.key, pair)
        return found

    def references(self) -> dict[str, FleetPair]:
        """The distinct reference outputs to compute (by key), each with the first pair that needs it."""
        found: dict[str, FleetPair] = {}
        for pair in self.pairs:
            if pair.reference is not None and pair.plan is not None:
                found.setdefault(pair.reference.key, pair)
        return found


def resolve_fleet(spec: FleetSpec, artifacts: str | None = None) -> ResolvedFleet:
    """Resolve the models, targets, images and store of ``spec`` and plan every pair.

    Cheap: models are located and digested, targets parsed, images read; nothing is compiled and no
    device is contacted.

    Args:
        artifacts: the store directory (None: ``$TVMRP_ARTIFACTS`` or ``artifacts/``).

    Raises:
        UsageError: a model, target or image is bad (the message names its entry and line), or the store
            cannot be used.
    """
    from pipeline.latency import Timing
    from pipeline.planning.plan import plan_reference
    from pipeline.planning.request import LOCAL_RUNNER, ResolvedRequest
    from pipeline.store import ArtifactStore
    from pipeline.thresholds import thresholds_for

    where = Where(spec.source)
    store = ArtifactStore(artifacts)
    store.check_root()
    targets = _targets(spec, where)
    models = _models(spec, where)
    labels = _labels([(m.entry, m.model) for m in models])
    plans = _plans(spec, targets, models, store.root)
    thresholds = thresholds_for("float32", spec.max_abs_diff)
    timing = Timing(number=spec.number, repeat=spec.repeat)
    pairs = []
    for device in spec.devices:
        target = targets[device.target]
        for index, (entry, model, image, data) in enumerate(models):
            planned = plans[(index, target.canonical)]
            planned_trials = spec.tune_trials if isinstance(planned, PipelineError) else planned.tune_trials
            request = ResolvedRequest(
                model=model, target=target, opt_level=spec.opt_level, device=device.spec, image=image, input=data,
                store=store, timing=timing, refresh=False, device_retries=spec.device_retries,
                allow_version_skew=spec.allow_version_skew, check=spec.check,
                thresholds=thresholds, tune_trials=planned_trials, build_only=False, tune_runner=LOCAL_RUNNER,
                device_cache=None,  # a remote device keeps nothing by default, as for resnet_remote
                schedules=spec.schedules,
            )
            plan = None if isinstance(planned, PipelineError) else planned
            pairs.append(FleetPair(
                device=device, model=entry, label=labels[index], request=request, plan=plan,
                reference=plan_reference(model, data) if spec.check else None,
                unplanned=one_line(planned) if isinstance(planned, PipelineError) else None,
            ))
    return ResolvedFleet(spec, store, tuple(pairs))


class _Model(NamedTuple):
    """A model of the fleet, resolved, with its image read."""

    entry: FleetModel
    model: ResolvedModel
    image: Path
    data: np.ndarray


def _targets(spec: FleetSpec, where: Where) -> dict[str, TargetInfo]:
    """Each distinct target of the fleet, parsed; a bad one is a UsageError naming its device and line."""
    from pipeline.targets import parse_target

    targets: dict[str, TargetInfo] = {}
    for i, device in enumerate(spec.devices):
        if device.target not in targets:
            try:
                targets[device.target] = parse_target(device.target)
            except UsageError as exc:
                raise where.error(device.line, f"devices[{i}].target ({device.name})", str(exc)) from None
    return targets


def _models(spec: FleetSpec, where: Where) -> list[_Model]:
    """Each model of the fleet, resolved, with its image read; a bad one is a UsageError naming its entry and line,
    and so is a model listed twice under other names (the same content and image)."""
    from pipeline.image import DEFAULT_IMAGE, load_image
    from pipeline.models import ModelSpec, resolve_model

    models: list[_Model] = []
    for i, entry in enumerate(spec.models):
        try:
            model = resolve_model(ModelSpec(source=entry.source, weights=entry.weights, seed=entry.seed))
            image = Path(entry.image) if entry.image else DEFAULT_IMAGE
            models.append(_Model(entry, model, image, load_image(image, model.preprocess, model.input_shape)))
        except UsageError as exc:
            raise where.error(entry.line, f"models[{i}] ({clip(entry.source, 80)})", str(exc)) from None
    _check_distinct_digests(models, where)
    return models


def _plans(spec: FleetSpec, targets: dict[str, TargetInfo],
           models: list[_Model], store_root: Path) -> dict[tuple[int, str], BuildPlan | PipelineError]:
    """The compile chain of each (model index, canonical target), planned once; the error where planning failed
    (e.g. no cross compiler: those pairs fail, the others run)."""
    from pipeline.planning.plan import plan_build
    from pipeline.planning.request import LOCAL_RUNNER
    from pipeline.tuning import resolve_trials

    plans: dict[tuple[int, str], BuildPlan | PipelineError] = {}
    for device in spec.devices:
        target = targets[device.target]
        for index, m in enumerate(models):
            if (index, target.canonical) not in plans:
                try:
                    trials = resolve_trials(store_root, m.model.digest, target, spec.tune_trials, spec.tune_more)
                    plans[(index, target.canonical)] = plan_build(m.model, target, spec.opt_level, trials,
                                                                  LOCAL_RUNNER, spec.schedules)
                except PipelineError as exc:
                    plans[(index, target.canonical)] = exc
    return plans


def _check_distinct_digests(models: list[_Model], where: Where) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, (entry, model, image, _) in enumerate(models):
        ident = (model.digest, str(image.resolve()))
        if ident in seen:
            j = seen[ident]
            raise where.error(entry.line, f"models[{i}]",
                              f"the same model (same content) and image as models[{j}]"
                              f"{on_line(models[j][0].line)}; list each model once")
        seen[ident] = i


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


# -- results ------------------------------------------------------------------------------------------


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error's first line, capped: what the table and JSON show (the ledger keeps the whole message)."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return clip(first or type(exc).__name__, limit)


def now() -> str:
    """The current UTC time, to the millisecond (pairs' start and end: the device sessions' overlap shows)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class PairResult:
    """What one (device, model) pair of a fleet run gave.

    Attributes:
        status: ``passed`` or ``failed``.
        latency_ms: mean, median, p90, p99, min, max, std, cv (None: it did not get to run).
        check: the check's figures (None: not checked, or it did not get that far).
        regression: the verdict against this pair's earlier runs (``pipeline.latency.Verdict``).
        error: why it failed, one line.
        error_type: the error's class (``DeviceUnavailable``, ``CheckFailed``, ``BuildError``...).
        run_id: its record in the run ledger.
        started, finished, seconds: when its device stages ran, and how long (None: they did not start).
    """

    device: str
    model: str
    target: str
    target_canonical: str
    status: str
    latency_ms: dict[str, float] | None
    check: dict[str, Any] | None
    regression: dict[str, Any] | None
    error: str | None
    error_type: str | None
    build_key: str | None
    run_id: str
    device_address: str
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BuildCounts:
    """The distinct compile chains of a fleet run: produced now, found in the store, or failed."""

    ran: int = 0
    cached: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FleetSummary:
    """A fleet run: every pair's result (device by device, in the file's order) and its builds."""

    fleet_run: str
    source: str
    results: tuple[PairResult, ...]
    builds: BuildCounts
    seconds: float
    flow_run_id: str | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds of each phase: ``resolve``, ``compile`` (builds and references), ``devices`` (every pair)."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> tuple[PairResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "fleet_run": self.fleet_run, "flow_run_id": self.flow_run_id, "fleet_file": self.source,
            "passed": sum(r.passed for r in self.results), "failed": len(self.failed), "seconds": self.seconds,
            "phases": dict(self.phases),
            "results": [r.as_json() for r in self.results], "builds": self.builds.as_json(),
        }


TABLE_COLUMNS = ("device", "model", "status", "median ms", "p90 ms", "check", "change", "error")


def _ms(latency: dict[str, float] | None, name: str) -> str:
    return "-" if not latency else f"{latency[name]:.4g}"


def _check_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    return "passed" if check.get("passed") else "FAILED"


def change_text(regression: dict[str, Any] | None) -> str:
    """The table's ``change`` cell: ``+3.1%``, ``REGRESSION +12.0%``, ``first run`` or ``-``."""
    if regression is None:
        return "-"
    if regression.get("change") is None:
        return "first run"
    text = f"{regression['change'] * 100:+.1f}%"
    return f"REGRESSION {text}" if regression.get("regression") else text


def table_rows(summary: FleetSummary) -> list[dict[str, Any]]:
    """One row per pair with the table's columns (the Prefect table artifact)."""
    return [
        {"device": r.device, "model": r.model, "status": r.status, "median ms": _ms(r.latency_ms, "median"),
         "p90 ms": _ms(r.latency_ms, "p90"), "check": _check_text(r.check), "change": change_text(r.regression),
         "error": r.error or ""}
        for r in summary.results
    ]


def _headline(summary: FleetSummary) -> str:
    devices = len({r.device for r in summary.results})
    models = len({r.model for r in summary.results})
    passed = sum(r.passed for r in summary.results)
    return (f"{devices} device(s) x {models} model(s): {passed} passed, {len(summary.failed)} failed in "
            f"{summary.seconds:.1f} s")


def format_text(summary: FleetSummary) -> str:
    """The terminal report: a headline, the builds, then the device x model table."""
    rows = [{k: (v.upper() if k == "status" and v == "failed" else v) for k, v in row.items()}
            for row in table_rows(summary)]
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in TABLE_COLUMNS[:-1]}
    numeric = {"median ms", "p90 ms"}

    def line(cells: dict[str, Any]) -> str:
        parts = [str(cells[c]).rjust(widths[c]) if c in numeric else str(cells[c]).ljust(widths[c])
                 for c in TABLE_COLUMNS[:-1]]
        return "  ".join(parts + [str(cells["error"])]).rstrip()

    b = summary.builds
    lines = [
        f"Fleet      {summary.source}: {_headline(summary)}  (fleet run {summary.fleet_run})",
        f"Builds     {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else ""),
        "",
        line({c: c for c in TABLE_COLUMNS}),
        *(line(row) for row in rows),
    ]
    return "\n".join(lines)


def format_markdown(summary: FleetSummary) -> str:
    """The markdown summary of a fleet run (a Prefect markdown artifact)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    b = summary.builds
    lines = [
        f"# Fleet {cell(summary.source)}", "",
        f"{_headline(summary)}. Builds: {b.ran} ran, {b.cached} cached" + (f", {b.failed} failed" if b.failed else "")
        + f". Fleet run `{summary.fleet_run}`.", "",
        "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in table_rows(summary):
        if row["status"] == "failed":
            row = {**row, "status": "**failed**"}
        lines.append("| " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
