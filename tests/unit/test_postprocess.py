"""Stage ``postprocess``: top-5 from the logits, probabilities. (The other stages' plain functions, on a real
store and a real TVM RPC server: tests/integration/test_stages.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.latency import latency_of
from pipeline.models import ModelSpec
from tasks.postprocess import postprocess, probabilities


def test_postprocess__top5_from_logits():
    from pipeline.models import Preprocess, ResolvedModel

    model = ResolvedModel(
        spec=ModelSpec("x.onnx"), name="x.onnx", kind="onnx", digest="0" * 64, files=(), input_name="data",
        input_shape=(1, 3, 32, 32), preprocess=Preprocess(), labels="index",
    )
    logits = np.array([[0.0, 5.0, 1.0, 3.0, 2.0, 4.0, -1.0]], dtype=np.float32)
    lat = latency_of([1.0, 0.5, 1.5, 1.0, 1.0], 1)
    pred = postprocess(model, logits, lat)
    assert [t.index for t in pred.top] == [1, 5, 3, 4, 2]
    assert pred.top[0].label == "class 1"
    assert abs(sum(probabilities(logits)) - 1.0) < 1e-9
    assert pred.top[0].prob == pytest.approx(np.exp(5) / np.exp(logits[0].astype(np.float64)).sum())


def test_probabilities__keeps_a_probability_vector():
    probs = np.array([[0.1, 0.7, 0.2]])
    np.testing.assert_allclose(probabilities(probs), probs[0])
