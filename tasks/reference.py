"""Stage ``reference``: the model's output on the run's input, computed by the model's own framework.

The ground truth that the compiled model's output is checked against (stage ``check``): PyTorch for
efficientnet_lite0 and ``*.pt2``, MXNet for resnet18_v2 and MXNet export files, onnxruntime for ``*.onnx``
(``pipeline.models.reference_forward``). Stored as ``reference.npy`` in the artifact store like a build,
keyed by the model's content digest, the input's content digest, the framework's version and our code
version (``pipeline.planning.plan.plan_reference``), so a repeated run on the same image never loads the framework
again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from pipeline.errors import StoreError
from pipeline.models import ResolvedModel, reference_forward
from pipeline.planning.plan import StageKey
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import REFERENCE, REFERENCE_FILE
from tasks._cache import Built, ensure_artifact


def reference(model: ResolvedModel, data: np.ndarray, stage: StageKey, store: ArtifactStore, refresh: bool = False) -> Built:
    """Run ``model`` on ``data`` in its own framework and store the output (float32 ``(1, N)``) under ``stage.key``.

    Args:
        stage: ``plan_reference(model, data)``.
        refresh: recompute even if a valid copy exists.

    Raises:
        InputError: ``data`` does not have the model's input shape.
        ModelError: the framework cannot load the model's files (or is not installed).
    """

    def produce(directory: Path) -> None:
        np.save(directory / REFERENCE_FILE, reference_forward(model, data), allow_pickle=False)

    return ensure_artifact(store, stage, REFERENCE, produce, refresh)


def load_reference(artifact: Artifact, store: ArtifactStore) -> np.ndarray:
    """The stored reference output, verified against its digest first (never unpickled).

    Raises:
        StoreError: the artifact is missing or corrupt (run again to recompute it).
    """
    if store.get(artifact.key) is None:
        raise StoreError(f"the reference output {artifact.key} is missing or corrupt in {store.location}; run again")
    return np.load(store.file(artifact, REFERENCE_FILE), allow_pickle=False)


reference_task = task(name="reference", task_run_name="reference", retries=0)(reference)
