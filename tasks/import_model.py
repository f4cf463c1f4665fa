"""Stage ``import-model``: load the model with its framework and convert it to a Relax IRModule.

The module (weights bound as constants) is saved with ``tvm.ir.save_json`` as ``module.json`` in the
artifact store under the plan's key (the model's content digest, the TVM version and our import code version).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from pipeline.errors import BuildError, PipelineError
from pipeline.models import ResolvedModel, import_model as to_relax
from pipeline.planning.plan import StageKey
from pipeline.store import ArtifactStore
from pipeline.store.layout import MODULE_FILE, RELAX_IR
from tasks._cache import Built, ensure_artifact

log = logging.getLogger(__name__)


def import_model(model: ResolvedModel, stage: StageKey, store: ArtifactStore, refresh: bool = False) -> Built:
    """Import ``model`` into Relax and store it under ``stage.key`` (``plan.imported``).

    Raises:
        ModelError: the model file is corrupt or cannot be loaded by its framework.
        BuildError: the framework loaded it but TVM's frontend could not convert it.
    """
    import tvm

    def produce(directory: Path) -> None:
        try:
            module = to_relax(model)
        except PipelineError:
            raise
        except Exception as exc:  # frontend errors come in many types
            raise BuildError(f"TVM could not import {model.name}: {str(exc).strip().splitlines()[0]}") from exc
        (directory / MODULE_FILE).write_text(tvm.ir.save_json(module))

    return ensure_artifact(store, stage, RELAX_IR, produce, refresh)


import_model_task = task(name="import-model", task_run_name="import-model", retries=0)(import_model)
