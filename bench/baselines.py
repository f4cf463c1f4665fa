"""ResNet-18 v2 for the engines TVM is measured against (bench section 3): the same ONNX graph and weights
that the pipeline imports, for onnxruntime, and the same architecture written in torch; ResNet-34 v2, the second
model of section 3d (built after ResNet-18's tuning, with its shared records)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def resnet_onnx(model: Any, path: Path) -> Path:
    """The same ONNX graph and weights that the pipeline imports for resnet18_v2 (MXNet -> mx2onnx)."""
    import mxnet as mx

    from pipeline.models import _mxnet

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        work = Path(tmp)
        net = _mxnet._resnet(model)
        net.hybridize()
        net(mx.nd.zeros(_mxnet.INPUT_SHAPE))
        net.export(str(work / "r"))
        return mxnet_onnx(work / "r-symbol.json", work / "r-0000.params", path)


def mxnet_onnx(symbol: Path, params_file: Path, path: Path) -> Path:
    """The same ONNX graph and weights that the pipeline imports for MXNet export files (mx2onnx)."""
    import mxnet as mx

    from pipeline.models import _mxnet

    graph = _mxnet._load_symbol_json(symbol)
    params = _mxnet._load_params(params_file)
    _mxnet._fix_gamma_to_one(graph, params)
    mx.onnx.export_model(
        mx.sym.load(str(symbol)), {k.split(":", 1)[-1]: v for k, v in params.items()},
        [_mxnet.INPUT_SHAPE], [np.float32], str(path),
    )
    # mx2onnx also lists every weight as a graph input, which makes onnxruntime treat them as variables
    # (no constant folding of BatchNorm, no prepacking): keep only the real input, as a fair baseline.
    import onnx

    graph = onnx.load(str(path))
    weights = {init.name for init in graph.graph.initializer}
    for value in [v for v in graph.graph.input if v.name in weights]:
        graph.graph.input.remove(value)
    onnx.save(graph, str(path))
    return path


def resnet34_export(directory: Path, seed: int = 0) -> Path:
    """ResNet-34 v2 of MXNet's model zoo with random weights (``resnet18_v2 --weights random``'s recipe and seed),
    exported as MXNet export files in ``directory``; returns ``resnet34_v2-symbol.json``. The same convolution
    shapes as ResNet-18 v2, more of them (3, 4, 6, 3 blocks per stage instead of 2 each)."""
    import mxnet as mx
    from mxnet.gluon.model_zoo import vision

    from pipeline.models import _mxnet

    net = vision.resnet34_v2(pretrained=False)
    _mxnet._init_random(net, seed)
    net.hybridize()
    net(mx.nd.zeros(_mxnet.INPUT_SHAPE))
    net.export(str(directory / "resnet34_v2"))
    return directory / "resnet34_v2-symbol.json"


def torch_resnet18_v2() -> Any:
    """ResNet-18 v2 (pre-activation, as in MXNet's model zoo) in torch, random weights, eval mode."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

        def forward(self, x: Any) -> Any:
            a = torch.relu(self.bn1(x))
            residual = self.down(a) if self.down is not None else x
            return self.conv2(torch.relu(self.bn2(self.conv1(a)))) + residual

    layers: list[nn.Module] = [nn.BatchNorm2d(3, affine=False), nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.BatchNorm2d(512), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval()
