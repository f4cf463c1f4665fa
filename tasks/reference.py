"""Stage ``reference``: the model's output on the run's input, computed by the model's own framework.

The ground truth that the compiled model's output is checked against (stage ``check``): PyTorch for
efficientnet_lite0 and ``*.pt2``, MXNet for resnet18_v2 and MXNet export files, onnxruntime for ``*.onnx``
(``pipeline.models.reference_forward``). Stored as ``reference.npy`` in the artifact store like a build,
keyed by the model's content digest, the input's content digest, the framework's version and our code
version, so a repeated run on the same image never loads the framework again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from prefect import task

from pipeline import keys
from pipeline.errors import StoreError
from pipeline.models import ResolvedModel, reference_forward
from pipeline.store import Artifact, ArtifactStore
from tasks._cache import Built, ensure_artifact

REFERENCE_FILE = "reference.npy"


def input_digest(data: np.ndarray) -> str:
    """SHA-256 of an array's content: its dtype and shape, then its bytes in C order."""
    array = np.ascontiguousarray(data)
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}, sort_keys=True)
    h = hashlib.sha256(header.encode())
    h.update(b"\0")
    h.update(array.tobytes())
    return h.hexdigest()


def reference_key(model: ResolvedModel, data: np.ndarray) -> str:
    """The artifact key of ``model``'s reference output on ``data`` (framework version included)."""
    return keys.key_of(keys.reference_inputs(model.digest, input_digest(data), keys.framework_version(model.kind)))


def reference(model: ResolvedModel, data: np.ndarray, store_root: str, key: str, refresh: bool = False) -> Built:
    """Run ``model`` on ``data`` in its own framework and store the output (float32 ``(1, N)``) under ``key``.

    Args:
        key: :func:`reference_key` of ``model`` and ``data``.
        refresh: recompute even if a valid copy exists.

    Raises:
        InputError: ``data`` does not have the model's input shape.
        ModelError: the framework cannot load the model's files (or is not installed).
    """

    def produce(directory: Path) -> None:
        np.save(directory / REFERENCE_FILE, reference_forward(model, data), allow_pickle=False)

    inputs = {
        **keys.reference_inputs(model.digest, input_digest(data), keys.framework_version(model.kind)),
        "name": model.name,
    }
    return ensure_artifact(ArtifactStore(store_root), key, "reference", inputs, produce, refresh)


def load_reference(reference_output: Built | Artifact, store_root: str) -> np.ndarray:
    """The stored reference output, verified against its digest first.

    Raises:
        StoreError: the artifact is missing or corrupt (run again to recompute it).
    """
    artifact = reference_output.artifact if isinstance(reference_output, Built) else reference_output
    store = ArtifactStore(store_root)
    if store.get(artifact.key) is None:
        raise StoreError(f"the reference output {artifact.key} is missing or corrupt in {store.root}; run again")
    return np.load(store.file(artifact, REFERENCE_FILE), allow_pickle=False)


reference_task = task(name="reference", task_run_name="reference", retries=0)(reference)
