"""Stage ``build``: compile the Relax module for the target (the seed's ``relay.build``).

``tvm.compile`` under ``PassContext(opt_level=N)``; the compiled objects are saved with
``Executable.export_library("build.tar")``, which writes the object files for the target's architecture
without linking them (so a cross build needs no cross compiler yet). Keyed by model digest, canonical
target, opt_level, TVM version and our build code version.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from pipeline import keys
from pipeline.errors import BuildError, StoreError
from pipeline.store import Artifact, ArtifactStore
from pipeline.targets import TargetInfo
from tasks._cache import Built, ensure_artifact
from tasks.import_model import MODULE_FILE

OBJECTS_FILE = "build.tar"


def build(
    module: Artifact,
    model_digest: str,
    target: TargetInfo,
    opt_level: int,
    store_root: str,
    key: str,
    refresh: bool = False,
    tuning: Artifact | None = None,
) -> Built:
    """Compile the imported module and store the target's object files under ``key``.

    Args:
        tuning: a ``tune`` artifact whose MetaSchedule database is applied before compiling; its key is
            then part of the build key (``keys.build_inputs(..., tuning=tuning.key)``).

    Raises:
        BuildError: TVM failed to compile the module for the target.
    """
    import tvm

    store = ArtifactStore(store_root)

    def produce(directory: Path) -> None:
        if store.get(module.key) is None:
            raise StoreError(f"the imported module {module.key} vanished from the store; run again")
        mod = tvm.ir.load_json(store.file(module, MODULE_FILE).read_text())
        try:
            if tuning is not None:
                from tasks.tune import apply_tuning

                mod = apply_tuning(mod, tuning, store)
            with tvm.transform.PassContext(opt_level=opt_level):
                executable = tvm.compile(mod, target=target.tvm_target())
        except StoreError:
            raise
        except Exception as exc:
            raise BuildError(
                f"TVM failed to compile for {target.canonical} at opt_level {opt_level}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            ) from exc
        executable.export_library(str(directory / OBJECTS_FILE))

    return ensure_artifact(
        store, key, "build",
        keys.build_inputs(model_digest, target.canonical, opt_level, tuning.key if tuning is not None else None),
        produce, refresh,
    )


build_task = task(name="build", task_run_name="build", retries=0)(build)
