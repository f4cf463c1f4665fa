"""pipeline/planning/plan.py: every cached stage's key is computed once, and is the key its artifact is stored under."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.planning import keys
from pipeline.errors import UsageError
from pipeline.planning.plan import plan_build, plan_reference
from pipeline.targets import parse_target


# ``model`` (the tiny ONNX classifier, resolved): tests/conftest.py.


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


def test_plan__an_untuned_cpu_build_names_its_rule_based_schedules(model):
    llvm = parse_target("llvm")
    rules, none = plan_build(model, llvm, 3), plan_build(model, llvm, 3, schedules="none")
    assert rules.schedules == rules.applied == "rules" and rules.build.inputs["schedules"].startswith("rules-v")
    assert none.schedules is None and none.applied == "tvm-default" and "schedules" not in none.build.inputs
    assert rules.build.key != none.build.key and rules.library.key != none.library.key
    assert none.build.inputs == keys.build_inputs(model.digest, llvm.canonical, 3)  # keys of before stay valid
    # The schedules are made for a number of cores: another count is another build.
    four = plan_build(model, parse_target('{"kind": "llvm", "num-cores": 4}'), 3)
    assert "cores=4" in four.build.inputs["schedules"]
    # A tuned build applies its database, not the rules.
    tuned = plan_build(model, llvm, 3, tune_trials=8)
    assert tuned.applied == "tuned" and tuned.schedules is None and "schedules" not in tuned.build.inputs


def test_plan__refuses_unknown_schedules(model):
    with pytest.raises(UsageError, match="rules or none"):
        plan_build(model, parse_target("llvm"), 3, schedules="fast")
