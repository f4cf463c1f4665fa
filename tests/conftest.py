"""Shared fixtures: a Prefect test server, a temporary artifact store, tiny real models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# No network here: keep Prefect from phoning home, for this process and every server it starts.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server (SQLite, temporary) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture
def store_root(tmp_path) -> Path:
    """An empty artifact store."""
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


def make_tiny_onnx(path: Path, seed: int = 0, classes: int = 10) -> Path:
    """A real ONNX classifier: Conv(3->4, 3x3) + Relu + GlobalAveragePool + Flatten + Gemm, input 1x3x32x32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(4).astype(np.float32),
        "fc_w": rng.standard_normal((classes, 4)).astype(np.float32),
        "fc_b": rng.standard_normal(classes).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    """A tiny ONNX classifier file (see :func:`make_tiny_onnx`)."""
    return make_tiny_onnx(tmp_path / "tiny.onnx")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m flows.resnet_remote ARGS`` in a fresh process from the repository root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.resnet_remote", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
