"""The stages a fleet adds: one compile chain, one reference, one pair (``flows/fleet.py`` wires them).

    compile             import-model -> [tune] -> build -> export-library (``tasks.chains.compile_chain``),
                        found in the store or produced once
    remote-build        the same, as a ``build_only`` run of a ``resnet_remote`` deployment on its work pool
    prepare-reference   the model's own output on its image (the ``reference`` stage)
    run-pair            upload -> load -> set-input -> run -> check -> postprocess -> report
                        (``tasks.chains.run_on_device``), recorded with ``fleet_run``

Each is a plain function and a thin task (no cache policy: the store is the cache, and each pair runs every
time). A pair that fails raises :class:`~pipeline.errors.PairFailed` carrying its :class:`PairResult`.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.chains import Compiled, compile_chain, preflight, run_on_device
from pipeline.device import Device
from pipeline.errors import BuildError, PairFailed, StoreError
from pipeline.fleet.plan import FleetPair, PairResult, now, one_line
from pipeline.store.ledger import new_run_id
from pipeline.planning.plan import BuildPlan
from pipeline.store import Artifact, ArtifactStore
from tasks._cache import run_cached
from tasks.check import failure_message
from tasks.reference import reference_task
from tasks.report import record_failure


def compile_build(plan: BuildPlan, store_root: str) -> Compiled:
    """The compile chain of ``plan`` (``tasks.chains.compile_chain``): found in the store or produced once."""
    return compile_chain(plan, ArtifactStore(store_root), refresh=False)


compile_task = task(name="compile", cache_policy=NO_CACHE, persist_result=False)(compile_build)


@dataclass(frozen=True)
class Reference:
    """A model's reference output in the store, and whether this run computed it (``ran``) or found it."""

    artifact: Artifact
    status: str


def prepare_reference(pair: FleetPair) -> Reference:
    """The reference output the pair's model gives on its image (the ``reference`` stage, cached by its key)."""
    req = pair.request
    assert pair.reference is not None
    artifact, status = run_cached(reference_task, req.store, pair.reference, False, model=req.model, data=req.input)
    return Reference(artifact, status)


reference_once_task = task(name="prepare-reference", cache_policy=NO_CACHE, persist_result=False)(prepare_reference)


def build_on_deployment(pair: FleetPair, deployment: str, timeout: float) -> Compiled:
    """The pair's compile chain, run as a ``build_only`` run of the ``resnet_remote`` deployment ``deployment``.

    The deployment's work pool decides where (its workers: the build machines); the run writes into this run's
    store, which those machines must share at the same path, and the library is then found here by its key and
    verified like any stored artifact.

    Raises:
        BuildError: the deployment could not be run, its run failed, or it did not finish within ``timeout`` s.
        StoreError: it finished, but the store here does not hold the library (the store is not shared).
    """
    from prefect.deployments import run_deployment

    req, plan, entry = pair.request, pair.plan, pair.model
    assert plan is not None
    what = f"{req.model.name} for {pair.device.target!r}"
    parameters = {
        "model": entry.source, "weights": entry.weights, "seed": entry.seed, "target": pair.device.target,
        "opt_level": req.opt_level, "tune_trials": req.tune_trials, "schedules": req.schedules, "build_only": True,
        "artifacts": str(req.store.root),
    }
    try:
        run = run_deployment(deployment, parameters=parameters, timeout=timeout, as_subflow=True)
    except Exception as exc:  # noqa: BLE001 - an unknown deployment, an unreachable API
        raise BuildError(f"could not run the build of {what} on deployment {deployment!r}: {one_line(exc)}") from exc
    state = run.state
    if state is None or not state.is_final():
        raise BuildError(f"the build of {what} on deployment {deployment!r} did not finish within {timeout:g} s "
                         f"(flow run {run.id}): are its work pool's workers running? (build_timeout)")
    if not state.is_completed():
        raise BuildError(f"the build of {what} on deployment {deployment!r} ended {state.name}: "
                         f"{one_line(state.message or '')} (flow run {run.id})")
    if not in_store(req.store, plan):
        raise StoreError(f"deployment {deployment!r} built {what}, but the store here ({req.store.root}) does not "
                         "hold it: the build machines and this run must share the store at the same path (docs/fleet.md)")
    compiled = compile_chain(plan, req.store, refresh=False)  # found and verified, not rebuilt
    return Compiled(compiled.module, compiled.tuning, compiled.build, compiled.library,
                    {name: "skipped" if status == "skipped" else "ran" for name, status in compiled.stages.items()})


remote_build_task = task(name="remote-build", cache_policy=NO_CACHE, persist_result=False)(build_on_deployment)


def in_store(store: ArtifactStore, plan: BuildPlan) -> bool:
    """Every artifact of ``plan``'s compile chain is in the store, verified."""
    stages = (plan.imported, plan.tune, plan.build, plan.library)
    return all(store.get(stage.key) is not None for stage in stages if stage is not None)


def run_pair(pair: FleetPair, compiled: Compiled, reference: Reference | None, fleet_run: str) -> PairResult:
    """Run one model on one device: upload -> load -> set-input -> run -> check -> postprocess -> report.

    The run is recorded in the ledger (``report``; ``record_failure`` when it did not get as far as a
    summary), with ``fleet_run``.

    Raises:
        PairFailed: the pair failed (device, check...); it carries the pair's result, its message is the
            error's line.
    """
    req = pair.request
    run_id, ledger_started = new_run_id(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    started, clock = now(), time.perf_counter()
    try:
        assert pair.plan is not None
        with Device(req.device) as device:
            if req.target.device == "cuda":
                preflight(device, req.target, req.allow_version_skew)
            summary = run_on_device(req, pair.plan, compiled, device,
                                    (reference.artifact, reference.status) if reference is not None else None,
                                    run_id, ledger_started, fleet_run=fleet_run)
    except Exception as exc:  # noqa: BLE001 - every failure is this pair's alone
        record_failure(req, run_id, ledger_started, exc, fleet_run=fleet_run)
        raise PairFailed(_failed(pair, run_id, exc, started, time.perf_counter() - clock)) from exc
    checked = summary.check
    failed = checked is not None and not checked.passed
    result = _result(
        pair, run_id, status="failed" if failed else "passed", latency_ms=summary.latency.as_dict(),
        check=checked.as_dict() if checked is not None else None,
        regression=summary.regression.as_dict() if summary.regression else None,
        error=one_line(failure_message(checked, req.model.name)) if failed and checked is not None else None,
        error_type="CheckFailed" if failed else None, build_key=summary.build_key, started=started,
        finished=now(), seconds=round(time.perf_counter() - clock, 3),
    )
    if failed:
        raise PairFailed(result)
    return result


pair_task = task(name="run-pair", cache_policy=NO_CACHE, persist_result=False)(run_pair)


def not_run(pair: FleetPair, exc: BaseException, fleet_run: str) -> PairResult:
    """Record and return the failure of a pair that never reached its device (its build failed, say)."""
    run_id = new_run_id()
    record_failure(pair.request, run_id, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), exc,
                   fleet_run=fleet_run)
    return _failed(pair, run_id, exc)


def _failed(pair: FleetPair, run_id: str, exc: BaseException, started: str | None = None,
            seconds: float | None = None) -> PairResult:
    """The result of a pair that failed before it had figures."""
    return _result(
        pair, run_id, status="failed", latency_ms=None, check=None, regression=None, error=one_line(exc, 600),
        error_type=type(exc).__name__, build_key=pair.plan.build.key if pair.plan else None, started=started,
        finished=now() if started else None, seconds=round(seconds, 3) if seconds is not None else None,
    )


def _result(pair: FleetPair, run_id: str, **figures: Any) -> PairResult:
    """The pair's :class:`PairResult`: who and where from the pair, ``figures`` the rest."""
    req = pair.request
    return PairResult(device=pair.device.name, model=pair.label, target=pair.device.target,
                      target_canonical=req.target.canonical, run_id=run_id, device_address=req.device.describe(),
                      **figures)
