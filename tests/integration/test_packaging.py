"""``pip install .`` (not editable) gives a package that works away from the checkout.

The project is built from a copy of its sources (the checkout gets no ``build/`` or ``*.egg-info``) and
installed with ``--target`` into a temporary directory; a subprocess in another directory puts that first on
``PYTHONPATH`` (before the .venv's editable finder) and resolves the default run: the default image and the
labelled set are package data, the store root follows ``$TVMRP_ARTIFACTS`` or the per-user data directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

_CHECK = """
import json, sys
import flows.resnet_remote, pipeline, pipeline.tuning, tasks
from pipeline.labelled import load_labelled_set
from pipeline.planning.request import RunRequest, resolve
from pipeline.store import default_root

resolved = resolve(RunRequest(artifacts=sys.argv[1]))
print(json.dumps({
    "modules": [m.__file__ for m in (pipeline, pipeline.tuning, tasks, flows.resnet_remote)],
    "image": str(resolved.image), "input": list(resolved.input.shape), "store": str(resolved.store.root),
    "labelled": [str(image.path) for image in load_labelled_set()], "default_root": str(default_root()),
}))
"""


def _leftovers() -> set[Path]:
    return {*REPO.glob("build"), *REPO.glob("*.egg-info")}


def test_pip_install__the_installed_package_runs_from_anywhere(tmp_path):
    before = _leftovers()
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("pipeline", "flows", "tasks"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, timeout=120, cwd=elsewhere,
    )
    assert _leftovers() == before

    assert (target / "pipeline" / "cuda" / "stub.c").is_file()
    assert {"__init__.py", "rules.py", "search.py", "space.py"} <= {p.name for p in (target / "pipeline" / "tuning").iterdir()}
    assert (target / "pipeline" / "device" / "device_side" / "tvmrp_device.py").is_file()

    env = {k: v for k, v in os.environ.items() if k not in ("TVMRP_ARTIFACTS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), XDG_DATA_HOME=str(tmp_path / "xdg"), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", _CHECK, str(tmp_path / "store")], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])

    installed = target.resolve()
    for module in found["modules"]:  # imported from the installed copy, not the checkout
        assert Path(module).resolve().is_relative_to(installed), module
    assert Path(found["image"]) == installed / "pipeline" / "data" / "cat.png"
    assert found["input"][0] == 1
    assert Path(found["store"]) == (tmp_path / "store").resolve()
    assert len(found["labelled"]) == 5
    assert all(Path(path).resolve().is_relative_to(installed) for path in found["labelled"])
    assert Path(found["default_root"]) == (tmp_path / "xdg" / "tvmrp" / "artifacts").resolve()
