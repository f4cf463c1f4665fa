"""Stage ``tune`` on a tiny real ONNX model: a real MetaSchedule tuning (a few trials), a real store, a real
TVM RPC server; the tuned build must still compute what the model's own framework computes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_onnx
from pipeline import keys
from pipeline.device import DeviceSpec, EmbeddedServer, open_session, start_tracker
from pipeline.errors import UsageError
from pipeline.models import ModelSpec, ResolvedModel, reference_forward, resolve_model
from pipeline.latency import Timing
from pipeline.plan import StageKey, plan_build
from pipeline.store import MANIFEST, Artifact, ArtifactStore
from pipeline.targets import TargetInfo, parse_target
from pipeline.tuning import DATABASE_FILES, RECORD_FILE, REPORT_FILE, SPACE, tracker_runner, tune_inputs
from tasks._live import opened
from tasks.build import build
from tasks.export_library import export_library
from tasks.import_model import import_model
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.tune import read_report, tune
from tasks.upload import upload

TRIALS = 4


def tune_key(model_digest, target, trials):
    return keys.key_of(tune_inputs(model_digest, target, trials))


def tune_stage(model, target, trials, runner="local"):
    """The plan's tune key for ``trials`` (the manifest then records where it measured)."""
    return plan_build(model, target, 3, trials, runner).tune


@dataclasses.dataclass(frozen=True)
class Tuned:
    root: Path
    model: ResolvedModel
    target: TargetInfo
    imported: Artifact
    tuning: Artifact
    built: bool


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Tuned:
    """The tiny model imported and tuned once (TRIALS trials, local runner) in a store of this module."""
    work = tmp_path_factory.mktemp("tune")
    root = work / "artifacts"
    root.mkdir()
    model = resolve_model(ModelSpec(str(make_tiny_onnx(work / "tiny.onnx"))))
    target = parse_target("llvm")
    imported = import_model(model, plan_build(model, target, 3).imported, str(root))
    result = tune(imported.artifact, target, TRIALS, tune_stage(model, target, TRIALS), str(root))
    return Tuned(root, model, target, imported.artifact, result.artifact, result.built)


def test_tune__stores_the_database_with_a_manifest(tuned):
    assert tuned.built
    store = ArtifactStore(tuned.root)
    assert store.get(tuned.tuning.key) == tuned.tuning
    assert tuned.tuning.kind == "tuning"
    assert {f.name for f in tuned.tuning.files} == {*DATABASE_FILES, REPORT_FILE}
    manifest = json.loads((store.path(tuned.tuning.key) / MANIFEST).read_text())
    inputs = manifest["inputs"]
    assert inputs["stage"] == "tune" and inputs["trials"] == TRIALS and inputs["space"] == SPACE
    assert inputs["model"] == tuned.model.digest and inputs["target"] == tuned.target.canonical
    assert inputs["runner"] == "local" and "num-cores" in inputs["tuning_target"]
    records = store.file(tuned.tuning, RECORD_FILE).read_text().splitlines()
    assert 1 <= len(records) <= TRIALS
    report = read_report(tuned.tuning, str(tuned.root))
    assert report["trials"] == TRIALS and report["seconds"] > 0 and report["runner"] == "local"
    assert report["tasks"] and all(t["name"] for t in report["tasks"])


def test_tune__second_call_reuses_the_stored_database(tuned):
    again = tune(tuned.imported, tuned.target, TRIALS, tune_stage(tuned.model, tuned.target, TRIALS), str(tuned.root))
    assert not again.built and again.seconds == 0.0
    assert again.artifact == tuned.tuning


def test_tune_key__changes_with_budget_target_and_model(tuned):
    digest, target = tuned.model.digest, tuned.target
    key = tune_key(digest, target, TRIALS)
    assert key == tuned.tuning.key == tune_key(digest, target, TRIALS)
    assert tune_key(digest, target, TRIALS + 1) != key
    assert tune_key(digest, parse_target("llvm -mcpu=znver4"), TRIALS) != key
    assert tune_key("0" * 64, target, TRIALS) != key
    assert keys.tune_inputs(digest, target.canonical, TRIALS, 2, SPACE) != keys.tune_inputs(
        digest, target.canonical, TRIALS, 4, SPACE
    )


def test_build_inputs__tuning_is_keyed_and_absent_without_one():
    plain = keys.build_inputs("a" * 64, "llvm", 3)
    assert "tuning" not in plain
    assert plain == keys.build_inputs("a" * 64, "llvm", 3, None)
    with_db = keys.build_inputs("a" * 64, "llvm", 3, "b" * 64)
    assert with_db == {**plain, "tuning": "b" * 64}
    assert keys.key_of(with_db) != keys.key_of(plain)


@pytest.mark.parametrize(("trials", "runner", "message"), [
    (0, "local", "trial budget"),
    (-3, "local", "trial budget"),
    (4, "somewhere", "neither 'local' nor"),
    (4, "127.0.0.1/key", "not HOST:PORT"),
])
def test_tune__rejects_bad_budget_or_runner(tuned, trials, runner, message):
    with pytest.raises(UsageError, match=message):
        tune(tuned.imported, tuned.target, trials, StageKey("c" * 64, {}), str(tuned.root), runner=runner)
    assert ArtifactStore(tuned.root).get("c" * 64) is None


def test_build__with_tuning_is_keyed_apart_and_matches_reference_on_device(tuned):
    root, model, target = str(tuned.root), tuned.model, tuned.target
    plan = plan_build(model, target, 3, TRIALS)
    plain_key = keys.key_of(keys.build_inputs(model.digest, target.canonical, 3))
    tuned_key = keys.key_of(keys.build_inputs(model.digest, target.canonical, 3, tuned.tuning.key))
    assert tuned_key != plain_key and plan.build.key == tuned_key
    built = build(tuned.imported, target, 3, plan.build, root, tuning=tuned.tuning)
    assert built.built and built.artifact.inputs["tuning"] == tuned.tuning.key
    # Applying the database must not touch the stored copy (MetaSchedule's JSON database appends on queries).
    assert ArtifactStore(root).get(tuned.tuning.key) == tuned.tuning
    library = export_library(built.artifact, target, plan.toolchain, plan.library, root)
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    with EmbeddedServer() as server, open_session(DeviceSpec(), server) as session, opened(session) as ref:
        loaded = load(upload(ref, library.artifact, root, target.arch), root)
        result = run(set_input(loaded, x), Timing(repeat=2))
    np.testing.assert_allclose(result.output, reference_forward(model, x), atol=1e-4, rtol=1e-4)


def test_tune__measures_on_a_device_through_the_tracker(tuned):
    """MetaSchedule's RPC runner: candidates are measured on the server the tracker hands out."""
    tracker = start_tracker()
    device = None
    try:
        tracker.wait_ready()
        device = EmbeddedServer(tracker=tracker.spec_address, key="tune-test")
        device.wait_ready()
        runner = tracker_runner(tracker.spec_address, "tune-test")
        model, target = tuned.model, tuned.target
        result = tune(tuned.imported, target, 2, tune_stage(model, target, 2, runner), str(tuned.root), runner=runner)
    finally:
        for process in (device, tracker):
            if process is not None:
                process.stop()
    report = read_report(result.artifact, str(tuned.root))
    assert result.built and report["runner"] == runner and result.artifact.inputs["runner"] == runner
    assert any(t["best_ms"] is not None for t in report["tasks"])  # something was measured on the device


def test_tune_task__second_run_is_cached_by_prefect(tuned, prefect_api):
    from prefect import flow

    from tasks._cache import store_cache_options
    from tasks.tune import tune_task

    store = ArtifactStore(tuned.root)

    @flow
    def tune_twice() -> list[str]:
        names = []
        for _ in range(2):
            state = tune_task.with_options(**store_cache_options(store, False))(
                module=tuned.imported, target=tuned.target, trials=TRIALS,
                stage=tune_stage(tuned.model, tuned.target, TRIALS), store_root=str(store.root), return_state=True,
            )
            assert state.result().artifact == tuned.tuning
            names.append(state.name)
        return names

    assert tune_twice()[1] == "Cached"
