"""Stage ``build``: compile the Relax module for the target (TVM 0.27's ``tvm.compile``; "relay-build" in issues).

``tvm.compile`` under ``PassContext(opt_level=N)``; the compiled objects are saved with
``Executable.export_library("build.tar", fcompile=write_tar)``, which writes the object files for the target's
architecture into a plain tar without linking them (so a cross build needs no cross compiler yet). TVM's own
``.tar`` export gzips them (``tar -czf``): a large share of a build's time, for weights that hardly
compress, and the export stage then paid again to inflate them (measurements:
docs/performance.md#reading-the-benchmarks). Keyed (by the plan) by model digest, canonical target,
opt_level, TVM version, our build code version and the tuning's key; an untuned CPU build applies schedules
from MetaSchedule's rules without search (:mod:`pipeline.tuning.rules`: several times faster than TVM's
unscheduled default, for a longer build and no measurement; measurements:
docs/performance.md#the-untuned-default-rule-based-schedules), and its key names them. A CPU build that applies
MetaSchedule's schedules also applies the best records of the store's other tunings for the same target to the
kernels its own schedules leave (:mod:`pipeline.tuning.shared`; ``--shared-tunings``), and its key names those
tunings.

A CUDA target is compiled by :func:`pipeline.cuda.builder.compile_cuda` in a subprocess that makes TVM's CUDA
runtime load on this GPU-less machine, so the kernels are compiled to GPU machine code (cubin) here, once
per build key, instead of by every device at every load; the GPU compiler's identity is then part of the key.

A CPU build also records what its kernels compute, in ``kernels.json`` (each kernel's FLOPs per call, counted by
TVM over the kernels it compiled: :func:`pipeline.profiling.recording_pipeline`; the code compiled is the same),
which ``--profile`` reports as GFLOP/s (``BUILD_CODE_VERSION`` 3 on).
"""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path

from prefect import task

from pipeline.errors import BuildError, StoreError
from pipeline.planning.plan import StageKey
from pipeline.profiling import kernels_json, recording_pipeline
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import BUILD, KERNELS_FILE, MODULE_FILE, OBJECTS_FILE, TUNING_SOURCES_FILE
from pipeline.targets import TargetInfo
from pipeline.tuning.shared import SharedTuning
from tasks._cache import Built, ensure_artifact

# TVM's compiler is not safe for two compiles at once in one process (two threads fail with "nested op_tag
# is not allowed"); builds of one process take turns, builds of several processes (the store's lock keeps them
# apart per key) run side by side.
_COMPILE_LOCK = threading.Lock()


def write_tar(output: str, files: list[str], **_: object) -> None:
    """``fcompile`` for ``export_library``: put the object files, uncompressed, into the tar ``output``."""
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            tar.add(name, arcname=os.path.basename(name), recursive=False)


write_tar.output_format = "tar"  # type: ignore[attr-defined]


def build(
    module: Artifact,
    target: TargetInfo,
    opt_level: int,
    stage: StageKey,
    store: ArtifactStore,
    refresh: bool = False,
    tuning: Artifact | None = None,
    shared: tuple[SharedTuning, ...] = (),
) -> Built:
    """Compile the imported module and store the target's object files under ``stage.key`` (``plan.build``).

    An untuned CPU build whose plan names ``schedules`` applies MetaSchedule's rules without search
    (:func:`pipeline.tuning.rules.schedule_with_rules`); otherwise TVM's default pipeline compiles the module.

    Args:
        tuning: a ``tune`` artifact whose MetaSchedule database is applied before compiling; its key is
            part of the build key (the plan's ``build`` of a tuned run).
        shared: the store's tunings whose records the build applies where its own schedules leave a kernel
            (``plan.shared``; their keys are the build key's ``records``): the build then also stores
            ``tuning_sources.json``, which tunings scheduled how many kernels
            (:func:`pipeline.tuning.shared.apply_shared`).

    Raises:
        BuildError: TVM failed to compile the module for the target.
    """
    from pipeline.lean_import import compiler_tvm

    def produce(directory: Path) -> None:
        tvm = compiler_tvm()  # tvm.relax executed before the module is loaded (pipeline/lean_import.py)
        if target.device == "cuda":  # GPU machine code, compiled here once (pipeline/cuda/builder.py)
            from pipeline.cuda.builder import compile_cuda

            compile_cuda(store.file(module, MODULE_FILE), target.canonical, opt_level, directory)
            return
        # Read once and checked against the authenticated manifest: what TVM parses is what was verified.
        text, _ = store.read_verified(module.key, MODULE_FILE)
        mod = tvm.ir.load_json(text.decode())
        try:
            with _COMPILE_LOCK:  # applying schedules compiles too (constant folding)
                if shared:
                    from pipeline.tuning.shared import apply_shared, sources_json

                    mod, sources = apply_shared(mod, target, store, tuning, shared, rules="schedules" in stage.inputs,
                                                own_model=str(module.inputs.get("name") or ""))
                    (directory / TUNING_SOURCES_FILE).write_bytes(sources_json(sources))
                elif tuning is not None:
                    from pipeline.tuning import apply_tuning

                    mod = apply_tuning(mod, tuning, store)
                elif "schedules" in stage.inputs:
                    from pipeline.tuning.rules import schedule_with_rules

                    mod = schedule_with_rules(mod, target)
                flops: dict[str, float] = {}
                with tvm.transform.PassContext(opt_level=opt_level):
                    executable = tvm.compile(mod, target=target.tvm_target(), relax_pipeline=recording_pipeline(flops))
        except (StoreError, BuildError):
            raise
        except Exception as exc:
            raise BuildError(
                f"TVM failed to compile for {target.canonical} at opt_level {opt_level}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            ) from exc
        executable.export_library(str(directory / OBJECTS_FILE), fcompile=write_tar)
        (directory / KERNELS_FILE).write_bytes(kernels_json(flops))

    if (tuning is not None) != ("tuning" in stage.inputs) or (tuning is not None and stage.inputs["tuning"] != tuning.key):
        raise BuildError(f"the build plan {stage.key[:16]} does not name the tuning it is given; plan the build again")
    if stage.inputs.get("records", []) != sorted(t.key for t in shared):
        raise BuildError(f"the build plan {stage.key[:16]} does not name the shared tunings it is given; plan the "
                         "build again")
    return ensure_artifact(store, stage, BUILD, produce, refresh)


build_task = task(name="build", task_run_name="build", retries=0)(build)
