"""Models: resolving names and MXNet files imports no framework (checked in a fresh interpreter).

The other model and image tests: tests/unit/test_models.py; the real demo models: tests/system/test_models_real.py.
"""

from __future__ import annotations

import subprocess
import sys

from support import REPO

# ``tiny_models`` (one tiny model of each kind, for the module): tests/conftest.py.


def test_resolve_model__imports_no_framework_for_names_and_mxnet_files(tiny_models: dict[str, str]) -> None:
    script = (
        "import sys\n"
        "from pipeline.models import ModelSpec, resolve_model\n"
        "resolve_model(ModelSpec('efficientnet_lite0'))\n"
        "resolve_model(ModelSpec('resnet18_v2', weights='random'))\n"
        f"resolve_model(ModelSpec({tiny_models['mxnet']!r}))\n"
        "heavy = sorted({'torch', 'mxnet', 'tvm', 'onnx'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
