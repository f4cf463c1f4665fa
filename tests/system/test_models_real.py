"""The real demo models (EfficientNet-Lite0, ResNet-18 v2) imported into Relax and checked against their
frameworks (system tier: the demo's own weights, ~10 s each)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from fixtures_models import write_mxnet, write_onnx, write_pt2

from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.models import (
    ModelSpec,
    ResolvedModel,
    import_model,
    reference_forward,
    resolve_model,
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


# --- resolve_model: shapes ----------------------------------------------------------------------------


# --- import_model vs the framework --------------------------------------------------------------------


# --- errors -------------------------------------------------------------------------------------------


# --- labels -------------------------------------------------------------------------------------------


# --- images -------------------------------------------------------------------------------------------


# --- the demo models ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_model__resnet18_v2_random_matches_mxnet() -> None:
    model = resolve_model(ModelSpec("resnet18_v2", weights="random", seed=0))
    x = load_image(DEFAULT_IMAGE, model.preprocess, model.input_shape)
    np.testing.assert_allclose(_run_tvm(model, x), reference_forward(model, x), atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_import_model__efficientnet_lite0_matches_torch() -> None:
    model = resolve_model(ModelSpec("efficientnet_lite0"))
    x = load_image(DEFAULT_IMAGE, model.preprocess, model.input_shape)
    expected = reference_forward(model, x)
    np.testing.assert_allclose(_run_tvm(model, x), expected, atol=TOLERANCE, rtol=0)
