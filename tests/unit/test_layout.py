"""The house's own rules, checked on the code: the store travels as a value and one module declares its layout;
a run's parameters have one schema."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re

import pytest

from support import REPO


def _functions(package: str):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        module = importlib.import_module(info.name)
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__:
                yield fn


@pytest.mark.parametrize("package", ["tasks", "flows"])
def test_tasks_and_flows__take_the_store_as_a_value_never_its_path(package):
    """No function of tasks/ or flows/ takes a ``store_root``: stages get the ``ArtifactStore`` itself."""
    offenders = [f"{fn.__module__}.{fn.__qualname__}" for fn in _functions(package)
                 if "store_root" in inspect.signature(fn).parameters]
    assert not offenders


#: The entries of a store's root: only pipeline/store/layout.py names them.
_ENTRIES = re.compile(r"""["']\.(runs|tuning|keys|device|locks|tmp|trash)["']""")


def test_store_layout__declared_in_one_module():
    sources = [p for p in (REPO / "pipeline").rglob("*.py")] + list((REPO / "tasks").glob("*.py")) + \
        list((REPO / "flows").glob("*.py"))
    naming = sorted(str(p.relative_to(REPO)) for p in sources if _ENTRIES.search(p.read_text()))
    assert naming == ["pipeline/store/layout.py"]


def test_store_layout__artifact_file_names_declared_once():
    """Each artifact file name is assigned as a constant in one module only."""
    names = ("module.json", "build.tar", "kernels.json", "model.so", "reference.npy", "tuning.json", "tuning.log",
             "database_workload.json", "database_tuning_record.json")
    owners: dict[str, list[str]] = {name: [] for name in names}
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tasks").glob("*.py"), *(REPO / "flows").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in owners:
                owners[node.value.value].append(str(path.relative_to(REPO)))
    assert owners == {name: ["pipeline/store/layout.py"] for name in names}


def test_run_parameters__the_fleet_and_accuracy_options_are_request_fields():
    """The fleet file's shared/device/model keys and the accuracy tool's options are RunRequest's fields."""
    from flows.accuracy import OPTIONS
    from pipeline.fleet.spec import DEVICE_KEYS, FLEET_ONLY_KEYS, MODEL_KEYS, TOP_KEYS
    from pipeline.planning.request import RunRequest

    fields = {f.name for f in dataclasses.fields(RunRequest)}
    assert set(OPTIONS) <= fields and set(MODEL_KEYS) <= fields
    assert set(TOP_KEYS) - set(FLEET_ONLY_KEYS) <= fields and set(DEVICE_KEYS) - {"name"} <= fields


def test_run_parameters__one_rule_for_the_command_line_and_the_fleet_file():
    from pipeline.errors import UsageError
    from pipeline.fleet.spec import parse_fleet
    from pipeline.planning.request import RunRequest, check_request

    with pytest.raises(UsageError, match=r"^--device-retries must be a whole number from 0 to 10 \(got 11\)$"):
        check_request(RunRequest(device_retries=11))
    text = "devices: [{host: h, port: 1}]\nmodels: [efficientnet_lite0]\ndevice_retries: 11\n"
    with pytest.raises(UsageError, match=r"^fleet.yaml:3: device_retries: must be a whole number from 0 to 10, not 11$"):
        parse_fleet(text)
