"""ONNX files: resolve (parse the graph's signature), import to Relax, run with onnxruntime."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline.errors import BuildError, ModelError, clip
from pipeline.models._digest import ContentDigest
from pipeline.models._files import describe, existing_file
from pipeline.models._types import ModelSpec, Preprocess, ResolvedModel

if TYPE_CHECKING:
    import onnx
    import tvm

FORMAT_TAG = "onnx"


def _load_proto(path: Path, *, external_data: bool) -> "onnx.ModelProto":
    """The parsed model.

    Raises:
        ModelError: The file is empty, does not parse, or parses (protobuf accepts many byte strings) into
            something without an ONNX graph.
    """
    import onnx

    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty (0 bytes), not an ONNX model. Check the path; re-export the model.")
    try:
        model = onnx.load(str(path), load_external_data=external_data)
    except Exception as e:  # protobuf DecodeError, missing external data, ...: all mean a bad file
        raise ModelError(
            f"{path} is not a readable ONNX model ({describe(e)}). "
            "Check that it is the right file and re-export it if it is damaged."
        ) from e
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(
            f"{path} is not an ONNX model: it parses, but holds no graph nodes. "
            "Check that it is the right file and re-export it if it is damaged."
        )
    return model


# Bytes per value in ``raw_data`` of each ONNX tensor type with a whole number of bytes (onnx.TensorProto.DataType).
_RAW_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
              17: 1, 18: 1, 19: 1, 20: 1}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_COMPLEX = (14, 15)  # two numbers per value in float_data / double_data


def _check_initializers(model: "onnx.ModelProto", path: Path) -> None:
    """Raises ModelError for a weight stored in the file that holds another amount of data than its shape
    declares: TVM's importer would fail with a confusing message, or first allocate what the shape asks (a file
    of 1 KB can declare a 2 GB weight). Weights in external files are checked when those are read."""
    from onnx.external_data_helper import uses_external_data

    for tensor in model.graph.initializer:
        if uses_external_data(tensor) or tensor.data_type not in _RAW_BYTES:
            continue  # external, or a type of 4-bit or variable size (strings)
        size = _RAW_BYTES[tensor.data_type]
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data)
        else:
            numbers = sum(len(getattr(tensor, name)) for name in _TYPED_FIELDS)
            held = numbers // (2 if tensor.data_type in _COMPLEX else 1) * size
        wanted = math.prod(tensor.dims) * size if all(d >= 0 for d in tensor.dims) else -1
        if held != wanted:
            shape = "x".join(str(d) for d in tensor.dims) or "scalar"
            declared = f"{wanted:,} bytes" if wanted >= 0 else "a negative size"
            raise ModelError(
                f"ONNX model {path} is damaged: its weight {clip(tensor.name, 60)!r} declares shape {clip(shape, 60)} "
                f"({declared}) but the file holds {held:,} bytes of it. Re-export the model, or copy it again if "
                "it was cut short."
            )


def _external_files(model: "onnx.ModelProto", path: Path) -> list[tuple[str, Path]]:
    """The (location as written in the model, absolute path) of every external-data file, sorted."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    locations = {
        ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)
    }
    return [(loc, existing_file(path.parent / loc, f"External data of {path.name}")) for loc in sorted(locations)]


def _graph_input(model: "onnx.ModelProto", path: Path) -> Any:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = clip(", ".join(i.name for i in inputs) or "none")
        raise ModelError(
            f"ONNX model {path} has {len(inputs)} inputs ({names}); only single-input image "
            "classifiers are supported. Export the model with one NCHW image input."
        )
    return inputs[0]


def _dims(value_info: Any) -> list[int | None]:
    """Static dims of a tensor value, None for each dynamic one."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in value_info.type.tensor_type.shape.dim
    ]


class _InputSignature(NamedTuple):
    name: str
    shape: tuple[int, ...]
    notes: tuple[str, ...]


def _input_signature(model: "onnx.ModelProto", path: Path) -> _InputSignature:
    """The single input's name, its static shape (a dynamic batch becomes 1), and notes about it.

    Raises:
        ModelError: Several inputs, a non-float32 or non-NCHW input, or dynamic non-batch dims.
    """
    import onnx

    inp = _graph_input(model, path)
    tensor_type = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"Input {inp.name!r} of ONNX model {path} is not a float32 tensor; export it as float32.")
    dims = _dims(inp)
    notes: tuple[str, ...] = ()
    if len(dims) == 4 and dims[0] is None:
        dims[0] = 1
        notes = (f"dynamic batch dimension of input {inp.name!r} fixed to 1",)
    if len(dims) != 4 or None in dims:
        shown = "x".join("?" if d is None else str(d) for d in dims)
        raise ModelError(
            f"Input {inp.name!r} of ONNX model {path} has shape {shown}; a static NCHW shape is needed "
            "(only the batch may be dynamic). Re-export the model with a static input shape, e.g. 1x3x224x224."
        )
    return _InputSignature(inp.name, tuple(int(d) for d in dims), notes)  # type: ignore[arg-type]


def check_image_input(shape: tuple[int, ...], where: str) -> None:
    """Raises ModelError unless ``shape`` is (1, 3, H, W): one RGB image."""
    if len(shape) != 4 or shape[0] != 1 or shape[1] != 3:
        raise ModelError(
            f"{where} takes input of shape {shape}; the pipeline feeds one RGB image, shape (1, 3, H, W). "
            "Export the model with batch 1 and 3 channels."
        )


def _single_output(model: "onnx.ModelProto", path: Path) -> Any:
    """The graph's one output (the logits).

    Raises:
        ModelError: The graph has no output, or several: the pipeline takes one logits output and does
            not guess which of several it is.
    """
    outputs = list(model.graph.output)
    if len(outputs) != 1:
        names = clip(", ".join(o.name for o in outputs) or "none")
        raise ModelError(
            f"ONNX model {path} has {len(outputs)} outputs ({names}); the pipeline takes exactly one output, "
            "the logits, and does not guess which one that is. Re-export the model with only its logits output."
        )
    return outputs[0]


def labels_for_classes(num_classes: int | None) -> str:
    """``"imagenet1k"`` for 1000 outputs, else ``"index"``."""
    return "imagenet1k" if num_classes == 1000 else "index"


def resolve(spec: ModelSpec, path: Path) -> ResolvedModel:
    """Resolves an ``*.onnx`` file: reads its signature and digests it with its external data.

    Raises:
        ModelError: Empty or unreadable file, not exactly one float32 NCHW input, dynamic non-batch dims,
            or not exactly one output (the logits).
    """
    path = existing_file(path, "ONNX model")
    if spec.weights != "pretrained":
        raise ModelError(f"--weights applies to resnet18_v2 only; {path} carries its own weights.")
    model = _load_proto(path, external_data=False)
    _check_initializers(model, path)
    name, shape, notes = _input_signature(model, path)
    check_image_input(shape, f"ONNX model {path}")
    logits = _dims(_single_output(model, path))
    num_classes = logits[1] if len(logits) == 2 else None

    digest = ContentDigest(FORMAT_TAG)
    digest.file("model", path)
    files = [str(path)]
    for location, data_path in _external_files(model, path):
        digest.file(f"external:{location}", data_path)
        files.append(str(data_path))
    return ResolvedModel(
        spec=spec,
        name=path.name,
        kind="onnx",
        digest=digest.hexdigest(),
        files=tuple(files),
        input_name=name,
        input_shape=shape,
        preprocess=Preprocess.for_shape(shape[2], shape[3]),
        labels=labels_for_classes(num_classes),
        notes=notes,
    )


def onnx_to_relax(
    model: "onnx.ModelProto", input_name: str, input_shape: tuple[int, ...], path: Path
) -> "tvm.IRModule":
    """Converts a loaded ONNX model to Relax with its weights bound as constants.

    Raises:
        BuildError: TVM's ONNX frontend cannot convert the (valid) model; the message names ``path``.
    """
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model, shape_dict={input_name: list(input_shape)}, keep_params_in_input=False)
    except Exception as e:
        raise BuildError(
            f"TVM could not import {path} to Relax ({describe(e)}). "
            "The model loads, but uses an operator or attribute TVM's ONNX frontend does not support: "
            "re-export it with standard ONNX operators (opset 18 is known to work)."
        ) from e


def import_model(model: ResolvedModel) -> "tvm.IRModule":
    """Loads the ONNX file (with external data) and converts it to Relax."""
    path = Path(model.files[0])
    proto = _load_proto(path, external_data=True)
    return onnx_to_relax(proto, model.input_name, model.input_shape, path)


def forward(model: ResolvedModel, x: np.ndarray) -> np.ndarray:
    """Runs the file with onnxruntime on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # mx2onnx lists initializers as inputs: ort warns once per weight
    path = model.files[0]
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(
            f"onnxruntime cannot load {path} ({describe(e)}). Check the file; re-export it if damaged."
        ) from e
    return session.run(None, {model.input_name: x})[0]
