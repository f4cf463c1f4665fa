"""The stages a fleet adds: one compile chain, one reference, one pair (``flows/fleet.py`` wires them).

    compile             import-model -> [tune] -> build -> export-library (``tasks.chains.compile_chain``),
                        found in the store or produced once
    remote-build        the same, as a ``build_only`` run of a ``resnet_remote`` deployment on its work pool
    prepare-reference   the model's own output on its image (the ``reference`` stage)
    run-pair            one model on one device (``tasks.chains.run_one``) with what the compile phase
                        prepared, recorded with ``fleet_run``

Each is a plain function and a thin task (no cache policy: the store is the cache, and each pair runs every
time). A pair that fails raises :class:`~pipeline.errors.PairFailed` carrying its :class:`PairResult`.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import BuildError, PairFailed, StoreError, one_line
from pipeline.fleet.plan import FleetPair
from pipeline.planning.plan import BuildPlan
from pipeline.results import PairResult, RunStamp, RunSummary, utc_now
from pipeline.store import ArtifactStore
from tasks._cache import run_cached
from tasks.chains import Compiled, Prepared, Reference, compile_chain, run_one
from tasks.check import failure_message
from tasks.reference import reference_task
from tasks.report import record_failure


def compile_build(plan: BuildPlan, store: ArtifactStore) -> Compiled:
    """The compile chain of ``plan`` (``tasks.chains.compile_chain``): found in the store or produced once."""
    return compile_chain(plan, store, refresh=False)


compile_task = task(name="compile", cache_policy=NO_CACHE, persist_result=False)(compile_build)


def prepare_reference(pair: FleetPair) -> Reference:
    """The reference output the pair's model gives on its image (the ``reference`` stage, cached by its key)."""
    assert pair.plan is not None and pair.plan.reference is not None
    req = pair.request
    return Reference(*run_cached(reference_task, req.store, pair.plan.reference, False, model=req.model,
                                 data=req.input))


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

    req, entry = pair.request, pair.model
    assert pair.plan is not None
    plan = pair.plan.build
    what = f"{req.model.name} for {pair.device.target!r}"
    parameters = {
        "model": entry.source, "weights": entry.weights, "seed": entry.seed, "target": pair.device.target,
        "opt_level": req.opt_level, "tune_trials": req.tune_trials, "schedules": req.schedules,
        "shared_tunings": req.shared_tunings, "build_only": True,
        "artifacts": req.store.location,
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
        raise StoreError(f"deployment {deployment!r} built {what}, but the store here ({req.store.location}) does not "
                         "hold it: the build machines and this run must share the store (one s3:// URL, or one path on "
                         "a shared file system) and hold the same store key (TVMRP_STORE_KEY_FILE; docs/fleet.md)")
    compiled = compile_chain(plan, req.store, refresh=False)  # found and verified, not rebuilt
    return Compiled(compiled.module, compiled.tuning, compiled.build, compiled.library,
                    {name: "skipped" if status == "skipped" else "ran" for name, status in compiled.stages.items()})


remote_build_task = task(name="remote-build", cache_policy=NO_CACHE, persist_result=False)(build_on_deployment)


def in_store(store: ArtifactStore, plan: BuildPlan) -> bool:
    """Every artifact of ``plan``'s compile chain is in the store, verified."""
    stages = (plan.imported, plan.tune, plan.build, plan.library)
    return all(store.get(stage.key) is not None for stage in stages if stage is not None)


def run_pair(pair: FleetPair, prepared: Prepared, fleet_run: str) -> PairResult:
    """Run one model on one device with what the compile phase ``prepared`` (``tasks.chains.run_one``).

    The run is recorded in the ledger with ``fleet_run`` (by ``run_one``, also when it fails).

    Raises:
        PairFailed: the pair failed (device, check...); it carries the pair's result, its message is the
            error's line.
    """
    assert pair.plan is not None
    stamp, started, clock = RunStamp.new(), utc_now("milliseconds"), time.perf_counter()
    try:
        summary = run_one(pair.plan, stamp, lambda: prepared, fleet_run=fleet_run)
    except Exception as exc:  # noqa: BLE001 - every failure is this pair's alone
        raise PairFailed(_failed(pair, stamp.id, exc, started, time.perf_counter() - clock)) from exc
    result = _result(pair, stamp.id, summary, started, time.perf_counter() - clock)
    if not result.passed:
        raise PairFailed(result)
    return result


pair_task = task(name="run-pair", cache_policy=NO_CACHE, persist_result=False)(run_pair)


def not_run(pair: FleetPair, exc: BaseException, fleet_run: str) -> PairResult:
    """Record and return the failure of a pair that never reached its device (its build failed, say)."""
    stamp = RunStamp.new()
    record_failure(pair.request, pair.plan, stamp, exc, fleet_run=fleet_run)
    return _failed(pair, stamp.id, exc)


def _result(pair: FleetPair, run_id: str, summary: RunSummary, started: str, seconds: float) -> PairResult:
    """The result of a pair that got as far as a summary (its check may have failed)."""
    check = summary.check
    failed = check is not None and not check.passed
    return PairResult(
        device=pair.device.name, model=pair.label, target=pair.device.target,
        target_canonical=pair.request.target.canonical, device_address=pair.request.device.describe(),
        run_id=run_id, summary=summary,
        error=one_line(failure_message(check, pair.request.model.name)) if failed and check is not None else None,
        error_type="CheckFailed" if failed else None, build_key=summary.build.build_key, started=started,
        finished=utc_now("milliseconds"), seconds=round(seconds, 3),
    )


def _failed(pair: FleetPair, run_id: str, exc: BaseException, started: str | None = None,
            seconds: float | None = None) -> PairResult:
    """The result of a pair that failed before it had figures."""
    return PairResult(
        device=pair.device.name, model=pair.label, target=pair.device.target,
        target_canonical=pair.request.target.canonical, device_address=pair.request.device.describe(),
        run_id=run_id, error=one_line(exc, 600), error_type=type(exc).__name__,
        build_key=pair.plan.build.build.key if pair.plan else None, started=started,
        finished=utc_now("milliseconds") if started else None, seconds=round(seconds, 3) if seconds is not None else None,
    )
