"""Tuning records shared across models, with a real MetaSchedule tuning: two tiny ONNX models share their
convolution (and the layout transforms and pooling around it) but not their classifier; the first is tuned, and
the build of the second applies the first's records to the kernels they share, with outputs that still match
onnxruntime. (Which tunings are found, the key and the report without a tuning run:
tests/unit/test_sharing_plan.py.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from support import make_tiny_onnx, run_cli
from pipeline.errors import BuildError
from pipeline.models import reference_forward
from pipeline.planning import keys
from pipeline.planning.plan import RunPlan, plan_run
from pipeline.planning.request import ResolvedRequest, RunRequest, resolve
from pipeline.results import BuildSummary
from pipeline.store import ArtifactStore
from pipeline.store.layout import LIBRARY_FILE
from tasks.chains import build_summary, compile_chain, run_plain

TRIALS = 6  # the tiny model has 5 tasks in the NHWC space: each measured at least once


@dataclasses.dataclass(frozen=True)
class Shared:
    root: Path
    a: Path
    b: Path
    tuning: str


def _request(model: Path, root: Path, **options) -> ResolvedRequest:
    return resolve(RunRequest(model=str(model), artifacts=str(root), build_only=True, **options))


def _built(req: ResolvedRequest) -> tuple[RunPlan, BuildSummary]:
    plan = plan_run(req)
    return plan, build_summary(plan.build, compile_chain(plan.build, req.store, False, run=run_plain), req.store)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    """Model A (10 classes) tuned with TRIALS trials in a store of this module; model B (another seed, 5 classes)
    not built yet."""
    work = tmp_path_factory.mktemp("shared")
    root = work / "artifacts"
    root.mkdir()
    a, b = make_tiny_onnx(work / "a.onnx", seed=0, classes=10), make_tiny_onnx(work / "b.onnx", seed=1, classes=5)
    plan, summary = _built(_request(a, root, tune_trials=TRIALS))
    assert summary.tuning_sources is None  # its own tuning only: nothing else in the store
    return Shared(root, a, b, plan.build.tune.key)


def _copy(shared: Shared, tmp_path: Path) -> Path:
    """A copy of the module's store, for a test that adds a tuning or removes one."""
    shutil.copytree(shared.root, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy"


def _outputs_match_the_reference(req: ResolvedRequest, summary: BuildSummary) -> None:
    import tvm
    from tvm import relax

    library = ArtifactStore(req.store.location).path(summary.library_key) / LIBRARY_FILE
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    x = np.random.default_rng(3).standard_normal(req.model.input_shape).astype(np.float32)
    output = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(output, reference_forward(req.model, x), atol=1e-4, rtol=1e-4)


def test_build__an_untuned_model_applies_the_records_it_shares_with_another_models_tuning(shared):
    on = _request(shared.b, shared.root)
    assert [t.key for t in on.shared] == [shared.tuning] and on.shared[0].model == "a.onnx"
    plan, summary = _built(on)
    sources = summary.tuning_sources
    assert plan.build.build.inputs["records"] == [shared.tuning]
    # The convolution, the pooling and the layout transforms come from A's tuning; B's classifier (5 classes,
    # A's has 10) has no record there and takes the rules' schedule.
    assert sources is not None and sources.kernels == 5 and sources.considered == 1
    (source,) = sources.tunings
    assert (source.tuning, source.model, source.trials, source.own) == (shared.tuning, "a.onnx", TRIALS, False)
    assert source.kernels == 4 and sources.rules == 1 and sources.unscheduled == 0
    _outputs_match_the_reference(on, summary)

    off = _request(shared.b, shared.root, shared_tunings="off")
    off_plan, off_summary = _built(off)
    assert off.shared == () and off_summary.tuning_sources is None
    assert off_plan.build.build.key != plan.build.build.key
    # Without sharing the key is the one of before sharing existed.
    assert off_plan.build.build.inputs == keys.build_inputs(on.model.digest, on.target.canonical, 3,
                                                            schedules=off_plan.build.build.inputs["schedules"])
    _outputs_match_the_reference(off, off_summary)


def test_build__a_models_own_tuning_wins_and_shared_records_fill_the_kernels_it_left(shared, tmp_path):
    """B tuned with 2 trials measures 2 of its 5 tasks; A's records schedule the others it shares."""
    req = _request(shared.b, _copy(shared, tmp_path), tune_trials=2)
    plan, summary = _built(req)
    sources = summary.tuning_sources
    assert plan.build.shared and sources is not None
    own, *others = sources.tunings
    assert own.own and own.tuning == plan.build.tune.key and own.trials == 2 and own.model == "b.onnx"
    assert [o.tuning for o in others] == [shared.tuning]
    assert own.kernels >= 1 and others[0].kernels >= 1 and sources.rules == 0
    assert own.kernels + others[0].kernels + sources.unscheduled == sources.kernels == 5
    _outputs_match_the_reference(req, summary)


def test_build__a_shared_tuning_gone_since_planning_fails_the_build_and_the_next_plan_leaves_it_out(shared, tmp_path):
    req = _request(shared.b, _copy(shared, tmp_path), opt_level=2)
    plan = plan_run(req)
    assert plan.build.shared
    req.store.discard(shared.tuning)
    with pytest.raises(BuildError, match="tuning .* of a.onnx, whose records the build plan shares, is no longer"):
        compile_chain(plan.build, req.store, False, run=run_plain)
    assert _request(shared.b, tmp_path / "copy", opt_level=2).shared == ()


def test_cli__the_json_and_the_report_say_which_tunings_scheduled_how_many_kernels(shared, prefect_api):
    env = {"PREFECT_API_URL": prefect_api}
    proc = run_cli("--model", str(shared.b), "--artifacts", str(shared.root), "--build-only", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tuning_sources"]["tunings"] == [
        {"tuning": shared.tuning, "model": "a.onnx", "trials": TRIALS, "kernels": 4, "own": False}]
    assert out["tuning_sources"]["rules"] == 1 and out["schedules"] == "rules"
    proc = run_cli("--model", str(shared.b), "--artifacts", str(shared.root), "--build-only", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Records    5 kernels: 4 from the tuning of a.onnx {shared.tuning[:16]} ({TRIALS} trials), 1 from the " \
           "rules" in proc.stdout


def test_shared_tunings__in_a_bucket_another_machine_finds_the_same_tunings(s3_store, tmp_path):
    """The tuning index lives in the bucket: a machine that never saw the tunings plans the same records (each
    tuning fetched and verified into its own copy of the store)."""
    from pipeline.store.layout import RECORD_FILE, TUNING_REPORT_FILE, WORKLOAD_FILE
    from pipeline.targets import parse_target
    from pipeline.tuning import remember_tuning, tune_inputs
    from pipeline.tuning.shared import shared_tunings

    here, llvm = ArtifactStore(s3_store.url), parse_target("llvm")
    here.check_root()
    made = []
    for digest, trials in (("a" * 64, 4), ("a" * 64, 8), ("b" * 64, 4)):
        inputs = tune_inputs(digest, llvm, trials)
        key = keys.key_of(inputs)
        here.put(key, "tuning", lambda d: [(d / n).write_text("") for n in (WORKLOAD_FILE, RECORD_FILE,
                                                                           TUNING_REPORT_FILE)], inputs)
        remember_tuning(here, inputs, key)
        made.append(key)
    found = shared_tunings(here, llvm)
    assert sorted(t.key for t in found) == sorted(made[1:])
    there = ArtifactStore(s3_store.url, cache=tmp_path / "there")
    assert not there.path(made[1]).exists()
    assert shared_tunings(there, llvm) == found and there.get(made[1]) is not None
