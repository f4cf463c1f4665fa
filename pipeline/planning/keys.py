"""Cache keys: explicit SHA-256 hashes of everything that changes a stage's output.

Never a path string, never a Prefect run id. Bump a ``*_CODE_VERSION`` whenever our own code for that
stage changes what it produces, so old artifacts stop matching.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from typing import Any

IMPORT_CODE_VERSION = "1"
BUILD_CODE_VERSION = "3"  # 2: build.tar is a plain tar (TVM gzips it); 3: kernels.json (FLOPs)
EXPORT_CODE_VERSION = "1"
TUNE_CODE_VERSION = "2"  # 2: the local runner measures on every core (pipeline/threads.py)
REFERENCE_CODE_VERSION = "1"

#: The package whose forward pass is the reference for each model kind (see ``pipeline.models.reference_forward``).
REFERENCE_FRAMEWORKS = {
    "efficientnet_lite0": "torch",
    "torch": "torch",
    "resnet18_v2": "mxnet",
    "mxnet": "mxnet",
    "onnx": "onnxruntime",
}


@lru_cache(maxsize=None)
def tvm_version() -> str:
    """The installed TVM and TVM-FFI versions (read from package metadata: no ``import tvm``)."""
    versions = []
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    return ";".join(versions)


def digest_json(obj: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def import_inputs(model_digest: str) -> dict[str, Any]:
    """What determines the imported Relax module."""
    return {"stage": "import-model", "model": model_digest, "tvm": tvm_version(), "code": IMPORT_CODE_VERSION}


def tune_family_inputs(model_digest: str, target: str, num_cores: int, space: str) -> dict[str, Any]:
    """What a tuning database depends on besides its trial budget: its *family*.

    Tunings of one family differ only in how many trials they ran, so a larger budget can continue from a
    smaller one's database (:mod:`pipeline.tuning`)."""
    return {
        "stage": "tune",
        "model": model_digest,
        "target": target,
        "num_cores": int(num_cores),
        "space": space,
        "tvm": tvm_version(),
        "code": f"import={IMPORT_CODE_VERSION},tune={TUNE_CODE_VERSION}",
    }


def tune_inputs(model_digest: str, target: str, trials: int, num_cores: int, space: str) -> dict[str, Any]:
    """What determines a tuning database: model content, canonical target, trial budget, the cores the
    schedules are made for, the schedule space searched, TVM and our code (the family and the budget)."""
    return {**tune_family_inputs(model_digest, target, num_cores, space), "trials": int(trials)}


def tune_family(inputs: dict[str, Any]) -> str:
    """The family key of a tuning's key inputs (:func:`tune_inputs`): its key without the trial budget."""
    return key_of({k: v for k, v in inputs.items() if k != "trials"})


def build_inputs(
    model_digest: str, target: str, opt_level: int, tuning: str | None = None, gpu_toolchain: str | None = None,
    schedules: str | None = None, records: list[str] | None = None,
) -> dict[str, Any]:
    """What determines a compiled build: model content, canonical target, opt_level, TVM and our code, the
    key of the tuning database it applies, for an untuned CPU build the rule-based schedules it applies
    (:func:`pipeline.tuning.rules.rules_inputs`), the keys of other tunings whose records it may draw on
    (``records``, sorted: :mod:`pipeline.tuning.shared`) and, for a GPU target, the GPU compiler (NVRTC, CUDA
    headers) that made its machine code (each absent when not used, so keys without them are unchanged)."""
    inputs = {
        "stage": "build",
        "model": model_digest,
        "target": target,
        "opt_level": int(opt_level),
        "tvm": tvm_version(),
        "code": f"import={IMPORT_CODE_VERSION},build={BUILD_CODE_VERSION}",
    }
    if tuning is not None:
        inputs["tuning"] = tuning
    if gpu_toolchain is not None:
        inputs["gpu_toolchain"] = gpu_toolchain
    if schedules is not None:
        inputs["schedules"] = schedules
    if records:
        inputs["records"] = sorted(records)
    return inputs


def export_inputs(build_key: str, toolchain: str) -> dict[str, Any]:
    """What determines the linked library: the build and the linker that links it."""
    return {"stage": "export-library", "build": build_key, "toolchain": toolchain, "code": EXPORT_CODE_VERSION}


def framework_version(kind: str) -> str:
    """The installed version of the framework that computes ``kind``'s reference output, e.g. ``torch==2.13.0``."""
    dist = REFERENCE_FRAMEWORKS.get(kind, kind)
    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return f"{dist} missing"


def reference_inputs(model_digest: str, input_digest: str, framework: str) -> dict[str, Any]:
    """What determines a reference output: the model's content, the input's content, the framework that ran it."""
    return {
        "stage": "reference",
        "model": model_digest,
        "input": input_digest,
        "framework": framework,
        "code": REFERENCE_CODE_VERSION,
    }


def input_digest(data: Any) -> str:
    """SHA-256 of an array's content: its dtype and shape, then its bytes in C order."""
    import numpy as np

    array = np.ascontiguousarray(data)
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}, sort_keys=True)
    h = hashlib.sha256(header.encode())
    h.update(b"\0")
    h.update(array.tobytes())
    return h.hexdigest()


def key_of(inputs: dict[str, Any]) -> str:
    """The artifact key of a stage's inputs."""
    return digest_json(inputs)
