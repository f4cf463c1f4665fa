"""Stages ``reference`` and ``check``, and the accuracy mode: TVM's output proven against the source framework.

The check on real compiled output, run on a real TVM RPC server, for every model source; a library built from
other weights failing it; the accuracy command on the labelled image set. (The comparison itself and the
cached reference: tests/unit/test_check.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from support import make_tiny_onnx
from fixtures_models import write_mxnet, write_onnx, write_pt2
from pipeline.device import DeviceSpec, open_session
from pipeline.errors import CheckFailed
from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.labelled import load_labelled_set
from pipeline.models import ModelSpec, resolve_model
from pipeline.store import ArtifactStore
from pipeline.latency import Timing
from pipeline.planning.plan import plan_reference
from tasks._live import opened
from pipeline.results import CheckResult
from pipeline.store.layout import LIBRARY_FILE
from pipeline.thresholds import thresholds_for
from tasks.check import check, raise_if_failed
from tasks.load import load
from tasks.reference import load_reference, reference
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload
from support import compile_all

FP32 = thresholds_for("float32")


# -- check on real compiled output, on a real device (``server``: tests/integration/conftest.py) ------


def device_output(server, store_root, target, library, x) -> np.ndarray:
    with open_session(DeviceSpec(), server) as session, opened(session) as ref:
        loaded = load(upload(ref, library.artifact, ArtifactStore(store_root), target.arch), ArtifactStore(store_root))
        return run(set_input(loaded, x), Timing(repeat=1)).output


def compiled_check(model, store_root, server, x, thresholds=FP32) -> CheckResult:
    target, _, _, library = compile_all(model, store_root)
    expected = reference(model, x, plan_reference(model, x), ArtifactStore(store_root))
    output = device_output(server, store_root, target, library, x)
    return check(output, load_reference(expected.artifact, ArtifactStore(store_root)), thresholds)


def _write_model(source: str, directory: Path, seed: int = 0) -> str:
    if source == "onnx-tiny":
        return str(make_tiny_onnx(directory / "tiny.onnx", seed=seed))
    if source == "onnx":
        return str(write_onnx(directory / "net.onnx", seed=seed))
    if source == "pt2":
        return str(write_pt2(directory / "net.pt2", seed=seed))
    return str(write_mxnet(directory / "net", seed=seed)[0])


@pytest.mark.parametrize("source", ["onnx-tiny", "onnx", "pt2", "mxnet"])
def test_check__passes_on_compiled_output_for_every_model_file_source(source, tmp_path, store_root, server):
    model = resolve_model(ModelSpec(_write_model(source, tmp_path)))
    x = np.random.default_rng(7).standard_normal(model.input_shape).astype(np.float32)
    result = compiled_check(model, store_root, server, x)
    assert result.passed, result.reason
    assert result.top5_match and result.max_abs_diff <= 1e-4 and result.cosine > 0.999999


def test_check__fails_for_a_library_built_from_different_weights(tmp_path, store_root, server):
    """The seed-1 model compiled and run; the seed-0 model's reference: what a wrong library would give."""
    right = resolve_model(ModelSpec(str(make_tiny_onnx(tmp_path / "right.onnx", seed=0))))
    wrong = resolve_model(ModelSpec(str(make_tiny_onnx(tmp_path / "wrong.onnx", seed=1))))
    x = np.random.default_rng(3).standard_normal(right.input_shape).astype(np.float32)
    target, _, _, library = compile_all(wrong, store_root)
    output = device_output(server, store_root, target, library, x)
    expected = load_reference(reference(right, x, plan_reference(right, x), ArtifactStore(store_root)).artifact, ArtifactStore(store_root))
    result = check(output, expected, FP32)
    assert not result.passed and result.max_abs_diff > 1e-2
    with pytest.raises(CheckFailed) as caught:
        raise_if_failed(result, right.name)
    assert caught.value.exit_code == 1
    message = str(caught.value)
    assert f"the output of {right.name} differs from its framework's" in message
    assert "max abs diff" in message and "> 0.0001" in message and "--no-check" in message


# -- the real models (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """One store for the real models: each compiles once for the module (the accuracy test reuses it)."""
    return tmp_path_factory.mktemp("check-artifacts")


@pytest.mark.slow
@pytest.mark.parametrize("source, weights", [("efficientnet_lite0", "pretrained"), ("resnet18_v2", "random")])
def test_check__passes_on_the_real_models(source, weights, real_store, server):
    model = resolve_model(ModelSpec(source, weights=weights))
    x = load_image(DEFAULT_IMAGE, model.preprocess, model.input_shape)
    result = compiled_check(model, real_store, server, x)
    assert result.passed, result.reason
    assert result.output_top5 == result.reference_top5 and result.max_abs_diff <= 1e-4


# -- the accuracy command ------------------------------------------------------------------------------


def accuracy_cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    from flows.accuracy import main

    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None), out + err


def test_accuracy_cli__wrong_library_at_the_right_key_exits_1(prefect_api, tmp_path, store_root, capsys):
    """A store whose library for the model holds another model's code (other weights): every check fails."""
    # 1000 outputs: an "ImageNet classifier" for the command's purposes (its accuracy means nothing).
    model_file = make_tiny_onnx(tmp_path / "m.onnx", seed=0, classes=1000)
    code, summary, text = accuracy_cli(capsys, "--model", str(model_file), "--artifacts", str(store_root))
    assert code == 0, text
    assert summary["checks_passed"] and summary["agreement"]["top5_identical"] == summary["agreement"]["count"]
    assert summary["stages"] == {"import-model": "ran", "tune": "skipped", "build": "ran", "export-library": "ran",
                                 "reference": "ran"}

    other = resolve_model(ModelSpec(str(make_tiny_onnx(tmp_path / "o.onnx", seed=1, classes=1000))))
    _, _, _, other_library = compile_all(other, store_root)
    store = ArtifactStore(store_root)
    key = summary["library_key"]
    inputs = store.get(key).inputs
    store.discard(key)
    other_so = store.file(other_library.artifact, LIBRARY_FILE)
    store.put(key, "library", lambda directory: shutil.copy(other_so, directory / LIBRARY_FILE), inputs)

    code, summary, text = accuracy_cli(capsys, "--model", str(model_file), "--artifacts", str(store_root))
    assert code == 1, text
    assert summary["stages"]["export-library"] == "cached" and summary["stages"]["reference"] == "cached"
    assert not summary["checks_passed"] and "FAILED" in text
    error = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "images failed the check" in error[0] and "max abs diff" in error[0]
    assert "--max-abs-diff" in error[0] and "--no-check" in error[0]

    code, _, text = accuracy_cli(capsys, "--model", str(model_file), "--artifacts", str(store_root), "--no-check")
    assert code == 0 and "Error" not in text


def test_accuracy_cli__bad_usage_exits_2(prefect_api, tiny_onnx, store_root, capsys):
    code, _, text = accuracy_cli(capsys, "--model", str(tiny_onnx), "--artifacts", str(store_root))
    assert code == 2 and "Error: " in text and "ImageNet" in text
    code, _, text = accuracy_cli(capsys, "--model", str(tiny_onnx), "--max-abs-diff", "-1")
    assert code == 2 and "--max-abs-diff must be a positive number" in text


@pytest.mark.slow
def test_accuracy_cli__efficientnet_lite0_tvm_agrees_with_reference(prefect_api, real_store, capsys):
    code, summary, text = accuracy_cli(capsys, "--model", "efficientnet_lite0", "--artifacts", str(real_store))
    assert code == 0, text
    tvm, ref = summary["accuracy"]["tvm"], summary["accuracy"]["reference"]
    assert tvm == ref and ref["count"] == len(load_labelled_set())
    assert ref["top5_accuracy"] == 1.0 and ref["top1"] >= 1
    assert summary["agreement"]["top5_identical"] == ref["count"] and summary["checks_passed"]
    assert "Accuracy   TVM" in text and "reference  top-1" in text
