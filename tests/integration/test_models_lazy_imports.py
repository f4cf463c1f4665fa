"""Models and images: resolve (digests, errors), import into Relax vs the framework, preprocessing.

Tiny models are built in code (tests/fixtures_models.py); the real demo models run in the tests marked slow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fixtures_models import write_mxnet, write_onnx, write_pt2

from pipeline.models import (
    ResolvedModel,
    import_model,
)

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def _run_tvm(model: ResolvedModel, x: np.ndarray) -> np.ndarray:
    """import_model -> tvm.compile for plain llvm -> Relax VM on the CPU."""
    import tvm
    from tvm import relax

    mod = import_model(model)
    params = mod["main"].params
    assert len(params) == 1
    assert [int(d) for d in params[0].ty.shape] == list(model.input_shape)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _random_input(model: ResolvedModel, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*model.input_shape).astype(np.float32)


# Each writer puts a tiny model (weights from ``seed``) into ``folder`` and returns the source string.
def _onnx_source(folder: Path, seed: int) -> str:
    return str(write_onnx(folder / "tiny.onnx", seed=seed))


def _pt2_source(folder: Path, seed: int) -> str:
    return str(write_pt2(folder / "tiny.pt2", seed=seed))


def _mxnet_source(folder: Path, seed: int) -> str:
    symbol, _ = write_mxnet(folder / "tiny", seed=seed)
    return str(symbol)


SOURCES: dict[str, Callable[[Path, int], str]] = {"onnx": _onnx_source, "torch": _pt2_source, "mxnet": _mxnet_source}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny model of each kind (seed 0), written once for the module."""
    folder = tmp_path_factory.mktemp("tiny")
    return {kind: write(folder, 0) for kind, write in SOURCES.items()}


# --- resolve_model: digests ---------------------------------------------------------------------------


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


# --- resolve_model: shapes ----------------------------------------------------------------------------


# --- import_model vs the framework --------------------------------------------------------------------


# --- errors -------------------------------------------------------------------------------------------


# --- labels -------------------------------------------------------------------------------------------


# --- images -------------------------------------------------------------------------------------------


# --- the demo models ----------------------------------------------------------------------------------
