"""pipeline/plan.py: every cached stage's key is computed once, and is the key its artifact is stored under."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.chains import compile_chain, run_plain
from pipeline import keys
from pipeline.errors import BuildError
from pipeline.models import ModelSpec, resolve_model
from pipeline.plan import plan_build, plan_reference
from pipeline.store import MANIFEST, ArtifactStore
from pipeline.targets import parse_target
from tasks.build import build
from tasks.reference import reference

pytestmark = pytest.mark.unit


@pytest.fixture
def model(tiny_onnx):
    return resolve_model(ModelSpec(str(tiny_onnx)))


def test_plan__each_key_is_the_hash_of_its_inputs(model):
    plan = plan_build(model, parse_target("llvm"), 3)
    for stage in (plan.imported, plan.build, plan.library):
        assert stage.key == keys.key_of(stage.inputs)
    assert plan.tune is None and "tuning" not in plan.build.inputs
    assert plan.library.inputs["build"] == plan.build.key  # the chain: export names the build it links
    assert plan.build.inputs["model"] == plan.imported.inputs["model"] == model.digest


def test_plan__what_changes_a_key_and_what_does_not(model):
    llvm = parse_target("llvm")
    base = plan_build(model, llvm, 3)
    opt2 = plan_build(model, llvm, 2)
    assert opt2.imported.key == base.imported.key and opt2.build.key != base.build.key
    assert opt2.library.key != base.library.key
    tuned = plan_build(model, llvm, 3, tune_trials=8)
    assert tuned.tune is not None and tuned.build.inputs["tuning"] == tuned.tune.key
    assert tuned.build.key != base.build.key
    # Where tuning measures is recorded, not hashed: the target says what the schedules are for.
    elsewhere = plan_build(model, llvm, 3, tune_trials=8, tune_runner="127.0.0.1:9190/rpi4")
    assert elsewhere.tune.key == tuned.tune.key and elsewhere.tune.extra["runner"] != tuned.tune.extra["runner"]
    assert plan_build(model, llvm, 3) == base  # planning twice gives the same plan


def test_plan__reference_key_follows_the_input(model):
    x = np.zeros(model.input_shape, np.float32)
    a, b = plan_reference(model, x), plan_reference(model, x + 1)
    assert a.key != b.key and a.key == plan_reference(model, x.copy()).key
    assert a.key == keys.key_of(a.inputs) and a.inputs["input"] == keys.input_digest(x)


def test_stored_manifests__hold_the_keys_and_inputs_the_plan_computed(model, store_root):
    target = parse_target("llvm")
    plan = plan_build(model, target, 3)
    store = ArtifactStore(store_root)
    compiled = compile_chain(plan, store, refresh=False, run=run_plain)
    for stage, artifact in ((plan.imported, compiled.module), (plan.build, compiled.build),
                            (plan.library, compiled.library)):
        manifest = json.loads((store.path(stage.key) / MANIFEST).read_text())
        assert artifact.key == stage.key == manifest["key"]
        assert keys.key_of({k: manifest["inputs"][k] for k in stage.inputs}) == stage.key
        assert manifest["inputs"] == stage.manifest
    x = np.zeros(model.input_shape, np.float32)
    ref = plan_reference(model, x)
    built = reference(model, x, ref, str(store_root))
    assert built.artifact.key == ref.key and built.artifact.inputs == ref.manifest


def test_build__refuses_a_tuning_its_plan_does_not_name(model, store_root):
    target = parse_target("llvm")
    plan = plan_build(model, target, 3)
    compiled = compile_chain(plan, ArtifactStore(store_root), refresh=False, run=run_plain)
    with pytest.raises(BuildError, match="does not name the tuning"):
        build(compiled.module, target, 3, plan.build, str(store_root), tuning=compiled.library)
