"""MXNet models: the Gluon model zoo's ResNet-18 v2 and MXNet export files, imported through ONNX.

``import mxnet`` is slow, so it only happens inside the functions that need the framework: resolving a
cached pretrained file, random weights, a ``.params`` path, or export files never imports it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import BuildError, ModelError
from pipeline.models._digest import ContentDigest
from pipeline.models._files import describe, existing_file
from pipeline.models._onnx import labels_for_classes, onnx_to_relax
from pipeline.models._types import ModelSpec, Preprocess, ResolvedModel

if TYPE_CHECKING:
    import tvm

RESNET_FORMAT_TAG = "resnet18_v2"
EXPORT_FORMAT_TAG = "mxnet-export"
INPUT_NAME = "data"
INPUT_SHAPE = (1, 3, 224, 224)
# SHA-1 of resnet18_v2 in MXNet 1.9.1's model store (gluon/model_zoo/model_store.py). Copied so that a
# cache hit is checked without `import mxnet`; a mismatch just falls back to MXNet's own download code.
RESNET18_V2_SHA1 = "a81db45fd7b7a2d12ab97cd88ef0a5ac48b8f657"
# Names the random-weights recipe of _init_random; change it when the recipe changes.
RANDOM_INIT_ID = "numpy.RandomState/lecun-normal-weights/random-bn/v1"
# First 8 bytes (little-endian uint64) of a file written by mx.nd.save / save_parameters / export.
_NDARRAY_LIST_MAGIC = 0x112
_PROBE_TIMEOUT_S = 3.0
# Ops that keep the class dimension, walked through to find the classifier's FullyConnected.
_PASS_THROUGH_OPS = {"softmax", "log_softmax", "SoftmaxActivation", "SoftmaxOutput", "Flatten", "flatten",
                     "Activation", "Dropout", "identity", "_copy", "Reshape", "reshape"}


def _mxnet_version() -> str:
    try:
        return importlib.metadata.version("mxnet")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelError(
            "resnet18_v2 and MXNet export files need MXNet: pip install --no-deps mxnet==1.9.1 (see requirements.in)"
        ) from e


def _resnet_arch_id() -> str:
    return f"mxnet.gluon.model_zoo.vision.resnet18_v2 (mxnet=={_mxnet_version()})"


def _model_store_root() -> Path:
    # Same rule as mxnet.base.data_dir(), which is read at `import mxnet` time and so cannot follow later changes.
    home = os.environ.get("MXNET_HOME") or (
        os.path.join(os.environ.get("APPDATA", ""), "mxnet") if os.name == "nt" else os.path.expanduser("~/.mxnet")
    )
    return Path(home) / "models"


def _check_params_magic(path: Path, role: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") != _NDARRAY_LIST_MAGIC:
        raise ModelError(
            f"{path} is not an MXNet parameters file ({role}); it does not start like a file written by "
            "net.save_parameters() or net.export(). Check the path, or re-save the parameters."
        )


def _weights_alternatives() -> str:
    return (
        "Use --weights random (random weights: the labels mean nothing), --weights PATH (a Gluon .params "
        "file written by net.save_parameters() for resnet18_v2), or --model efficientnet_lite0 "
        "(its pretrained weights ship with a pip package)."
    )


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server (or the proxy for it) cannot be reached within a few seconds; None if it can.

    MXNet's downloader has no timeout and retries 5 times, so without this an offline machine with a
    black-holed route hangs for minutes before it fails.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or host, proxy_parts.port or 80
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e}"
    return None


def _weights_digest(path: Path, sha1: "hashlib._Hash | None" = None) -> str:
    digest = ContentDigest(RESNET_FORMAT_TAG)
    digest.text("architecture", _resnet_arch_id())
    digest.file("weights", path, also=sha1)
    return digest.hexdigest()


def _pretrained_resnet() -> tuple[Path, str]:
    """The model store's resnet18_v2 file (downloaded by MXNet if needed) and its digest."""
    root = _model_store_root()
    path = root / f"resnet18_v2-{RESNET18_V2_SHA1[:8]}.params"
    if path.is_file():
        sha1 = hashlib.sha1()
        digest = _weights_digest(path, sha1)
        if sha1.hexdigest() == RESNET18_V2_SHA1:
            return path, digest

    from mxnet.gluon.model_zoo import model_store

    url = os.environ.get("MXNET_GLUON_REPO", model_store.apache_repo_url)
    reason = _unreachable(url)
    if reason is None:
        try:
            path = Path(model_store.get_model_file("resnet18_v2", root=str(root)))
        except Exception as e:
            reason = describe(e)
    if reason is not None:
        raise ModelError(
            f"The pretrained resnet18_v2 weights are not in MXNet's model store ({path}) and cannot be "
            f"downloaded from {url} ({reason}). {_weights_alternatives()} Or copy the file {path.name} "
            f"into {root} (or set MXNET_HOME) from a machine with internet access."
        )
    return path, _weights_digest(path)


def resolve_resnet(spec: ModelSpec) -> ResolvedModel:
    """Resolves resnet18_v2 with pretrained, random or user-given weights (see ``pipeline.models``)."""
    notes: tuple[str, ...] = ()
    if spec.weights == "random":
        # Random weights are a pure function of these fields: numpy's RandomState stream is frozen across
        # numpy versions, and the parameter order/shapes come from the model zoo code of this MXNet version.
        random_digest = ContentDigest(RESNET_FORMAT_TAG)
        random_digest.text("architecture", _resnet_arch_id())
        random_digest.text("weights", "random")
        random_digest.text("init", RANDOM_INIT_ID)
        random_digest.text("seed", str(int(spec.seed)))
        digest = random_digest.hexdigest()
        files: tuple[str, ...] = ()
        notes = (f"random weights (seed {spec.seed}): the predicted labels mean nothing",)
    elif spec.weights == "pretrained":
        path, digest = _pretrained_resnet()
        files = (str(path),)
    else:
        if not os.path.exists(os.path.expanduser(spec.weights)):
            raise ModelError(
                f"resnet18_v2 weights file not found: {os.path.abspath(os.path.expanduser(spec.weights))}. "
                "--weights takes 'pretrained', 'random', or the path of a Gluon .params file."
            )
        path = existing_file(spec.weights, "resnet18_v2 weights file")
        _check_params_magic(path, "resnet18_v2 weights")
        digest = _weights_digest(path)
        files = (str(path),)
    return ResolvedModel(
        spec=spec,
        name="resnet18_v2",
        kind="resnet18_v2",
        digest=digest,
        files=files,
        input_name=INPUT_NAME,
        input_shape=INPUT_SHAPE,
        preprocess=Preprocess(),
        labels="imagenet1k",
        notes=notes,
    )


def _params_beside(prefix: str) -> Path:
    expected = Path(f"{prefix}-0000.params")
    if expected.is_file():
        return existing_file(expected, "MXNet parameters file")
    others = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}-[0-9][0-9][0-9][0-9].params"))
    if len(others) == 1:
        return existing_file(others[0], "MXNet parameters file")
    found = f" (found {', '.join(p.name for p in others)}: keep only one epoch beside it)" if others else ""
    raise ModelError(
        f"MXNet parameters file not found: {os.path.abspath(expected)}{found}. net.export(PREFIX) writes "
        "PREFIX-symbol.json and PREFIX-0000.params: put both in the same folder."
    )


def _load_symbol_json(path: Path) -> dict[str, Any]:
    try:
        graph = json.loads(path.read_text())
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or not graph.get("heads"):
            raise ValueError("no 'nodes' or 'heads'")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(
            f"{path} is not an MXNet symbol file ({describe(e)}). Give the PREFIX-symbol.json written by net.export()."
        ) from e
    return graph


def _attrs(node: dict[str, Any]) -> dict[str, str]:
    # The key changed over MXNet versions.
    return node.get("attrs") or node.get("attr") or node.get("param") or {}


def _num_classes(graph: dict[str, Any]) -> int | None:
    nodes = graph["nodes"]
    node = nodes[graph["heads"][0][0]]
    while node.get("op") in _PASS_THROUGH_OPS and node.get("inputs"):
        node = nodes[node["inputs"][0][0]]
    if node.get("op") == "FullyConnected":
        try:
            return int(_attrs(node).get("num_hidden", ""))
        except ValueError:
            return None
    return None


def resolve_export(spec: ModelSpec, source: str) -> ResolvedModel:
    """Resolves MXNet export files given as ``PREFIX-symbol.json`` or ``PREFIX``: digest of both files."""
    prefix = source[: -len("-symbol.json")] if source.endswith("-symbol.json") else source
    symbol = existing_file(f"{prefix}-symbol.json", "MXNet symbol file")
    params = _params_beside(os.path.abspath(os.path.expanduser(prefix)))
    if spec.weights != "pretrained":
        raise ModelError(f"--weights applies to resnet18_v2 only; {symbol} has its weights in {params.name}.")
    _mxnet_version()  # fails early, with what to install, where MXNet is missing
    graph = _load_symbol_json(symbol)
    if len(graph["heads"]) != 1:
        raise ModelError(f"{symbol} has {len(graph['heads'])} outputs; only single-output classifiers are supported.")
    if not any(n.get("op") == "null" and n.get("name") == INPUT_NAME for n in graph["nodes"]):
        raise ModelError(f"{symbol} has no input named {INPUT_NAME!r}; export a Gluon network whose input is 'data'.")
    _check_params_magic(params, f"weights of {symbol.name}")

    digest = ContentDigest(EXPORT_FORMAT_TAG)
    digest.file("symbol", symbol)
    digest.file("params", params)
    return ResolvedModel(
        spec=spec,
        name=symbol.name,
        kind="mxnet",
        digest=digest.hexdigest(),
        files=(str(symbol), str(params)),
        input_name=INPUT_NAME,
        input_shape=INPUT_SHAPE,
        preprocess=Preprocess(),
        labels=labels_for_classes(_num_classes(graph)),
    )


def _init_random(net: Any, seed: int) -> None:
    """Fills every parameter from ``numpy.random.RandomState(seed)`` (recipe named by RANDOM_INIT_ID).

    Weights ~ N(0, 1/fan_in): with He's 2/fan_in the pre-activation residual stream grows block by block
    and the logits reach ~500, where float32 rounding alone differs between frameworks by > 1e-4.
    BatchNorm statistics are random too, so that a wrong BatchNorm conversion shows in the output.
    """
    import mxnet as mx

    net.initialize(mx.init.Zero())
    net(mx.nd.zeros(INPUT_SHAPE))  # materializes the deferred shapes
    rng = np.random.RandomState(seed)
    for name, param in net.collect_params().items():
        shape = param.shape
        if name.endswith("weight"):
            data = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
        elif name.endswith(("gamma", "running_var")):
            data = rng.uniform(0.5, 1.5, shape)
        else:  # beta, running_mean, bias
            data = rng.normal(0.0, 0.1, shape)
        param.set_data(mx.nd.array(data.astype(np.float32)))


def _resnet(model: ResolvedModel) -> Any:
    """The Gluon resnet18_v2 with the model's weights, on CPU."""
    import mxnet as mx
    from mxnet.gluon.model_zoo import vision

    net = vision.resnet18_v2(pretrained=False)
    if model.spec.weights == "random":
        _init_random(net, model.spec.seed)
        return net
    path = model.files[0]
    try:
        net.load_parameters(path, ctx=mx.cpu())
    except Exception as e:  # MXNetError for bad bytes, AssertionError for other networks' parameters
        raise ModelError(
            f"{path} does not hold resnet18_v2 parameters ({describe(e)}). Give a file written by "
            "net.save_parameters() of mxnet.gluon.model_zoo.vision.resnet18_v2, or use --weights random."
        ) from e
    return net


def _load_params(path: Path) -> dict[str, Any]:
    import mxnet as mx

    try:
        params = mx.nd.load(str(path))
    except Exception as e:
        raise ModelError(
            f"{path} is not a readable MXNet parameters file ({describe(e)}). Re-export the model with net.export()."
        ) from e
    if not isinstance(params, dict):
        raise ModelError(f"{path} holds an unnamed array list, not named parameters; re-export with net.export().")
    return params


def _fix_gamma_to_one(graph: dict[str, Any], params: dict[str, Any]) -> None:
    """Sets to 1 the gamma of every BatchNorm with fix_gamma (MXNet's default), as MXNet itself treats it.

    mx2onnx copies the stored gamma instead, which changes the output whenever that gamma is not 1.
    """
    import mxnet as mx

    nodes = graph["nodes"]
    fixed = {
        nodes[n["inputs"][1][0]]["name"]
        for n in nodes
        if n.get("op") == "BatchNorm"
        and len(n.get("inputs", [])) > 1
        and _attrs(n).get("fix_gamma", "True").lower() in ("true", "1")
    }
    for key, value in params.items():
        if key.split(":", 1)[-1] in fixed:
            params[key] = mx.nd.ones(value.shape, dtype=value.dtype)


def _export_to_relax(symbol: Path, params_path: Path, where: str, work: Path) -> "tvm.IRModule":
    """MXNet export files -> ONNX (in ``work``) -> Relax."""
    import mxnet as mx
    import onnx

    graph = _load_symbol_json(symbol)
    params = _load_params(params_path)
    _fix_gamma_to_one(graph, params)
    try:
        sym = mx.sym.load(str(symbol))
    except Exception as e:
        raise ModelError(f"MXNet cannot load the symbol file {symbol} ({describe(e)}). Re-export the model.") from e
    onnx_path = work / "model.onnx"
    try:
        # Objects, not paths: given paths, mx2onnx loads PREFIX-EPOCH.params named after the symbol file,
        # whatever params path it is given, so the fixed gammas would be silently ignored.
        mx.onnx.export_model(
            sym, {k.split(":", 1)[-1]: v for k, v in params.items()}, [INPUT_SHAPE], [np.float32], str(onnx_path)
        )
    except Exception as e:
        raise BuildError(
            f"MXNet could not convert {where} to ONNX ({describe(e)}): it uses an operator mx2onnx does not "
            "support. Export the network to ONNX yourself and pass the .onnx file."
        ) from e
    return onnx_to_relax(onnx.load(str(onnx_path)), INPUT_NAME, INPUT_SHAPE, Path(where))


def import_model(model: ResolvedModel) -> "tvm.IRModule":
    """resnet18_v2 or MXNet export files -> ONNX -> Relax, through a temporary directory."""
    import mxnet as mx

    with tempfile.TemporaryDirectory(prefix="pipeline-mxnet-") as tmp:
        work = Path(tmp)
        if model.kind == "resnet18_v2":
            net = _resnet(model)
            net.hybridize()
            net(mx.nd.zeros(INPUT_SHAPE))  # export needs one traced call
            net.export(str(work / "resnet18_v2"))
            symbol, params = work / "resnet18_v2-symbol.json", work / "resnet18_v2-0000.params"
            return _export_to_relax(symbol, params, "resnet18_v2", work)
        return _export_to_relax(Path(model.files[0]), Path(model.files[1]), model.files[0], work)


def forward(model: ResolvedModel, x: np.ndarray) -> np.ndarray:
    """Runs the model with MXNet on CPU."""
    import mxnet as mx

    if model.kind == "resnet18_v2":
        block = _resnet(model)
    else:
        symbol, params = model.files
        try:
            with warnings.catch_warnings():
                # "Cannot decide type for data": the input's type is only known at the first call.
                warnings.simplefilter("ignore", UserWarning)
                block = mx.gluon.nn.SymbolBlock.imports(symbol, [INPUT_NAME], params, ctx=mx.cpu())
        except Exception as e:
            raise ModelError(
                f"MXNet cannot load {symbol} with {params} ({describe(e)}). Check both files; re-export if damaged."
            ) from e
    out = block(mx.nd.array(x, dtype=np.float32))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.asnumpy().astype(np.float32)
