"""pipeline/planning/plan.py: every cached stage's key is computed once, and is the key its artifact is stored under."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.chains import compile_chain, run_plain
from pipeline.planning import keys
from pipeline.errors import BuildError
from pipeline.planning.plan import plan_build, plan_reference
from pipeline.store import MANIFEST, ArtifactStore
from pipeline.targets import parse_target
from tasks.build import build
from tasks.reference import reference


# ``model`` (the tiny ONNX classifier, resolved): tests/conftest.py.


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
    built = reference(model, x, ref, ArtifactStore(store_root))
    assert built.artifact.key == ref.key and built.artifact.inputs == ref.manifest


def test_build__refuses_a_tuning_its_plan_does_not_name(model, store_root):
    target = parse_target("llvm")
    plan = plan_build(model, target, 3)
    compiled = compile_chain(plan, ArtifactStore(store_root), refresh=False, run=run_plain)
    with pytest.raises(BuildError, match="does not name the tuning"):
        build(compiled.module, target, 3, plan.build, ArtifactStore(store_root), tuning=compiled.library)
