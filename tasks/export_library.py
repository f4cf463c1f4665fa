"""Stage ``export-library``: link the build's object files into a shared library for the device.

Links with the host's ``g++`` when the target architecture is the host's, else with the matching cross
compiler (``aarch64-linux-gnu-gcc`` for aarch64...). Keyed (by the plan) by the build key, the linker's
identity and our export code version.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from prefect import task

from pipeline.errors import ExportError, StoreError
from pipeline.planning.plan import StageKey
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import LIBRARY, LIBRARY_FILE, OBJECTS_FILE
from pipeline.targets import TargetInfo, Toolchain
from tasks._cache import Built, ensure_artifact


def export_library(
    build: Artifact,
    target: TargetInfo,
    toolchain: Toolchain,
    stage: StageKey,
    store: ArtifactStore,
    refresh: bool = False,
) -> Built:
    """Link ``build`` into ``model.so`` with ``toolchain`` and store it under ``stage.key`` (``plan.library``).

    Raises:
        ExportError: the linker failed.
    """
    from tvm.support import cc

    def produce(directory: Path) -> None:
        if store.get(build.key) is None:
            raise StoreError(f"the build {build.key} vanished from the store; run again")
        with tempfile.TemporaryDirectory(prefix="export-") as work:
            with tarfile.open(store.file(build, OBJECTS_FILE)) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and "/" not in m.name and ".." not in m.name]
                tar.extractall(work, members=members)
            objects = sorted(str(Path(work) / m.name) for m in members)
            try:
                cc.create_shared(str(directory / LIBRARY_FILE), objects, cc=toolchain.compiler)
            except Exception as exc:
                raise ExportError(
                    f"linking the library for {target.triple} with {toolchain.compiler} failed: "
                    f"{str(exc).strip()[-500:]}"
                ) from exc

    return ensure_artifact(store, stage, LIBRARY, produce, refresh)


export_library_task = task(name="export-library", task_run_name="export-library", retries=0)(export_library)
