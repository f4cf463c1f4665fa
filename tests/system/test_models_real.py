"""The real demo models (EfficientNet-Lite0, ResNet-18 v2) imported into Relax and checked against their
frameworks (system tier: the demo's own weights, ~10 s each)."""

from __future__ import annotations

import numpy as np
import pytest
from support import run_tvm as _run_tvm

from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.models import ModelSpec, reference_forward, resolve_model

TOLERANCE = 1e-4


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
