"""Each stage's plain function, on a tiny real ONNX model, a real store and a real TVM RPC server."""

from __future__ import annotations


import numpy as np
import pytest

from pipeline.device import EmbeddedServer
from pipeline.latency import latency_of
from pipeline.models import ModelSpec
from pipeline.plan import plan_build
from pipeline.targets import parse_target
from tasks.build import build
from tasks.export_library import export_library
from tasks.import_model import import_model
from tasks.postprocess import postprocess, probabilities


def compile_all(model, store_root, target_text="llvm", opt_level=3):
    """The compile chain's plain functions, keyed by the plan (as the flows are)."""
    target = parse_target(target_text)
    plan = plan_build(model, target, opt_level)
    imported = import_model(model, plan.imported, str(store_root))
    built = build(imported.artifact, target, opt_level, plan.build, str(store_root))
    library = export_library(built.artifact, target, plan.toolchain, plan.library, str(store_root))
    return target, imported, built, library


@pytest.fixture(scope="module")
def server():
    with EmbeddedServer() as srv:
        yield srv


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
