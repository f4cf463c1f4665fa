"""Tiny models built in code, written as the files users give the pipeline (ONNX, .pt2, MXNet export).

Each builder takes a ``seed`` (different seeds give different weights, hence different file bytes) and
writes into a directory the test owns. The networks are a few conv layers and a classifier with 10 outputs,
small enough to import and compile in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
SMALL_SHAPE = (1, 3, 32, 32)
MXNET_SHAPE = (1, 3, 224, 224)  # MXNet export files are fed 224x224 (the symbol has no input shape)


def write_onnx(
    path: Path, seed: int = 0, batch: int | str = 1, height: int | str = 32, classes: int = NUM_CLASSES
) -> Path:
    """Conv-BN-ReLU-Conv(stride 2)-ReLU-GlobalAveragePool-Flatten-Gemm, opset 18, input ``input``.

    ``batch``/``height`` given as strings become symbolic (dynamic) dims.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)

    def init(name: str, *shape: int, scale: float = 0.3, offset: float = 0.0) -> onnx.TensorProto:
        return numpy_helper.from_array((offset + scale * rng.randn(*shape)).astype(np.float32), name)

    initializers = [
        init("w1", 8, 3, 3, 3), init("b1", 8),
        init("gamma", 8, scale=0.2, offset=1.0), init("beta", 8, scale=0.1),
        init("mean", 8, scale=0.1), numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "var"),
        init("w2", 16, 8, 3, 3, scale=0.2), init("b2", 16),
        init("wfc", classes, 16), init("bfc", classes),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _tiny_torch(seed: int, classes: int):  # -> torch.nn.Module
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, classes)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.conv1(image)))
            x = torch.relu(self.conv2(x))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(seed)
    net = Tiny()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def write_pt2(path: Path, seed: int = 0, dynamic_batch: bool = False, classes: int = NUM_CLASSES) -> Path:
    """The tiny network through ``torch.export.export`` + ``torch.export.save``; input ``image``."""
    import torch

    example = (torch.randn(2 if dynamic_batch else 1, *SMALL_SHAPE[1:]),)
    dynamic = {"image": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    program = torch.export.export(_tiny_torch(seed, classes), example, dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    return path


def write_mxnet(prefix: Path, seed: int = 0, classes: int = NUM_CLASSES) -> tuple[Path, Path]:
    """A Gluon HybridSequential exported as ``PREFIX-symbol.json`` + ``PREFIX-0000.params``.

    Like ResNet v2, it starts with a BatchNorm with ``scale=False`` (fix_gamma) whose stored gamma is
    random: MXNet ignores it, a naive ONNX conversion would not.
    """
    import mxnet as mx
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(
        nn.BatchNorm(scale=False, center=False),
        nn.Conv2D(8, 3, padding=1),
        nn.BatchNorm(),
        nn.Activation("relu"),
        nn.MaxPool2D(2),
        nn.Conv2D(16, 3, strides=2, padding=1),
        nn.Activation("relu"),
        nn.GlobalAvgPool2D(),
        nn.Flatten(),
        nn.Dense(classes),
    )
    net.initialize()
    net(mx.nd.zeros(MXNET_SHAPE))
    rng = np.random.RandomState(seed)
    for name, param in net.collect_params().items():
        if name.endswith(("gamma", "running_var")):
            data = rng.uniform(0.5, 1.5, param.shape)
        else:
            data = rng.normal(0.0, 0.3, param.shape)
        param.set_data(mx.nd.array(data.astype(np.float32)))
    net.hybridize()
    net(mx.nd.zeros(MXNET_SHAPE))
    net.export(str(prefix))
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")


# Each writer puts a tiny model (weights from ``seed``) into ``folder`` and returns the source string.
def onnx_source(folder: Path, seed: int) -> str:
    return str(write_onnx(folder / "tiny.onnx", seed=seed))


def pt2_source(folder: Path, seed: int) -> str:
    return str(write_pt2(folder / "tiny.pt2", seed=seed))


def mxnet_source(folder: Path, seed: int) -> str:
    symbol, _ = write_mxnet(folder / "tiny", seed=seed)
    return str(symbol)


#: A writer per kind of model file, by kind (the keys of conftest's ``tiny_models``).
SOURCES: dict[str, Callable[[Path, int], str]] = {"onnx": onnx_source, "torch": pt2_source, "mxnet": mxnet_source}
