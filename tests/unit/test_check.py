"""Stages ``reference`` and ``check``, and the accuracy mode: TVM's output proven against the source framework.

Unit tests of the comparison, the accuracy arithmetic and the labelled set; the reference cached in a real
store. (The check on real compiled output on a real TVM RPC server, and the accuracy command:
tests/integration/test_check_on_device.py.)
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from pipeline.planning import keys
from pipeline.errors import CheckFailed, InputError, StoreError, UsageError
from pipeline.image import load_image
from pipeline.labelled import DEFAULT_LABELLED_DIR, load_labelled_set
from pipeline.models import ModelSpec, Preprocess, reference_forward, resolve_model
from pipeline.store import ArtifactStore
from pipeline.planning.plan import plan_reference
from tasks.accuracy import accuracy, hit
from pipeline.store.layout import REFERENCE_FILE
from pipeline.thresholds import Thresholds, thresholds_for
from pipeline.views.run import format_check
from tasks.check import check, failure_message, raise_if_failed
from tasks.reference import load_reference, reference

input_digest = keys.input_digest


def reference_key(model, x):
    return plan_reference(model, x).key


FP32 = thresholds_for("float32")


def logits(seed: int = 0, classes: int = 1000) -> np.ndarray:
    return (4.0 * np.random.default_rng(seed).standard_normal((1, classes))).astype(np.float32)


# -- check(): pure numpy -------------------------------------------------------------------------------


def test_check__identical_arrays_pass():
    ref = logits()
    result = check(ref.copy(), ref, FP32)
    assert result.passed and result.top1_match and result.top5_match
    assert result.max_abs_diff == 0.0 and result.max_rel_diff == 0.0
    assert result.cosine == pytest.approx(1.0) and math.isinf(result.psnr_db)
    assert result.output_top5 == result.reference_top5 == tuple(np.argsort(-ref[0])[:5])


def test_check__noise_below_threshold_passes():
    ref = logits()
    noisy = ref + np.random.default_rng(1).uniform(-9e-5, 9e-5, ref.shape).astype(np.float32)
    result = check(noisy, ref, FP32)
    assert result.passed, result.reason
    assert 0 < result.max_abs_diff <= 1e-4 and result.cosine > 0.999999 and result.psnr_db > 80
    assert "<= 0.0001" in result.reason and "top-5 identical" in result.reason


def test_check__swapped_near_tied_top_classes_fail_top5_although_abs_diff_holds():
    ref = logits()
    first, second, third = np.argsort(-ref[0])[:3]
    ref[0, third] = ref[0, second] - 5e-5  # the 2nd and 3rd classes 5e-5 apart
    out = ref.copy()
    out[0, second], out[0, third] = ref[0, third], ref[0, second]
    result = check(out, ref, FP32)
    assert result.max_abs_diff <= 1e-4  # within the abs threshold...
    assert result.top1_match and not result.top5_match and not result.passed  # ...but the ranking changed
    assert result.output_top5[:3] == (first, third, second)
    assert f"top-5 differs: compiled [{first}, {third}, {second}" in result.reason


def test_check__exact_ties_may_come_in_either_order():
    # A softmax that underflowed: the reference has exact zeros, the compiled model tiny non-zeros.
    ref = np.zeros((1, 10), np.float32)
    ref[0, 3] = 1.0
    out = ref.copy()
    out[0, 7] = 1e-30
    result = check(out, ref, FP32)
    assert result.output_top5 != result.reference_top5
    assert result.top5_match and result.passed


def test_check__large_diff_fails_naming_threshold_and_overrides():
    ref = logits()
    result = check(ref * 1.02 + 0.3, ref, FP32)
    assert not result.passed and result.top5_match  # the ranking holds, the values do not
    assert result.reason.startswith("max abs diff ") and "> 0.0001" in result.reason
    assert "x the threshold" in result.reason
    with pytest.raises(CheckFailed) as caught:
        raise_if_failed(result, "tiny.onnx")
    message = str(caught.value)
    assert "check failed" in message and "tiny.onnx" in message and "float32 thresholds" in message
    assert "raise the threshold with --max-abs-diff 1 or skip the check with --no-check" in message
    assert caught.value.exit_code == 1 and caught.value.check == result.as_dict()
    assert pickle.loads(pickle.dumps(caught.value)).check == result.as_dict()  # Prefect may persist it
    # The suggested threshold would indeed let it pass.
    assert check(ref * 1.02 + 0.3, ref, thresholds_for("float32", 1.0)).passed
    raise_if_failed(check(ref, ref, FP32))  # a pass raises nothing


def test_check__both_broken_says_top5_must_still_match():
    ref = logits()
    result = check(-ref, ref, FP32)
    assert not result.passed and not result.top1_match and not result.top5_match
    assert "max abs diff" in result.reason and "top-5 differs" in result.reason
    assert "(the top-5 must still match)" in failure_message(result)
    assert format_check(result).startswith("Check      FAILED  max abs diff")
    assert format_check(check(ref, ref, FP32)).startswith("Check      passed  max abs diff 0  ")
    assert format_check(None) == "Check      skipped (--no-check)"


def test_check__wrong_shape_or_nan_output_fails():
    ref = logits(classes=10)
    wrong = check(np.zeros((1, 9), np.float32), ref, FP32)
    assert not wrong.passed and "shape (1, 9)" in wrong.reason and "(1, 10)" in wrong.reason
    nan = ref.copy()
    nan[0, 4] = np.nan
    result = check(nan, ref, FP32)
    assert not result.passed and "1 NaN or infinite" in result.reason
    json.dumps(result.as_dict(), allow_nan=False)  # NaN becomes null: the summary stays valid JSON
    assert check(ref.reshape(10), ref, FP32).passed  # same values, other shape of the same size: compared


def test_check_result__as_dict_is_the_summary_check_object():
    ref = logits()
    d = check(ref + 1e-6, ref, FP32).as_dict()
    assert {"max_abs_diff", "top1_match", "top5_match", "passed"} <= d.keys()
    assert {"max_rel_diff", "cosine", "psnr_db", "output_top5", "reference_top5", "thresholds", "reason"} <= d.keys()
    assert d["thresholds"] == {"max_abs_diff": 1e-4, "top5_identical": True, "top1_match": True,
                               "min_cosine": None, "tie_tolerance": 1e-6, "precision": "float32"}
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert check(ref, ref, FP32).as_dict()["psnr_db"] is None  # infinite: identical


def test_thresholds_for__precisions_and_override():
    assert FP32 == Thresholds(max_abs_diff=1e-4, top5_identical=True)
    fp16, int8 = thresholds_for("float16"), thresholds_for("int8")
    assert fp16.max_abs_diff > FP32.max_abs_diff and not fp16.top5_identical and fp16.top1_match
    assert int8.max_abs_diff is None and int8.min_cosine is not None
    assert thresholds_for("float32", 0.01).max_abs_diff == 0.01
    with pytest.raises(UsageError, match="known: float32"):
        thresholds_for("float8")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--max-abs-diff"):
            thresholds_for("float32", bad)
    # fp16-sized noise fails fp32 but passes fp16.
    ref = logits()
    noisy = ref + np.random.default_rng(2).uniform(-1e-2, 1e-2, ref.shape).astype(np.float32)
    assert not check(noisy, ref, FP32).passed and check(noisy, ref, fp16).passed


# -- accuracy and the labelled set ---------------------------------------------------------------------


def test_accuracy__counts_top1_and_top5_hits():
    out = np.array([[0.0, 5.0, 1.0, 3.0, 2.0, 4.0, -1.0]], np.float32)  # ranking 1, 5, 3, 4, 2, 0, 6
    assert hit(out, 1) == hit(out, 1) and hit(out, 1).top1_hit
    assert not hit(out, 2).top1_hit and hit(out, 2).top5_hit and not hit(out, 0).top5_hit
    acc = accuracy([out, out, out, out], [1, 2, 0, 6])
    assert (acc.count, acc.top1, acc.top5) == (4, 1, 2)
    assert acc.as_dict() == {"count": 4, "top1": 1, "top5": 2, "top1_accuracy": 0.25, "top5_accuracy": 0.5}
    with pytest.raises(ValueError):
        accuracy([out], [1, 2])


def test_labelled_set__bundled_photos_are_small_labelled_and_licensed():
    images = load_labelled_set()
    assert len(images) >= 4 and len({i.label for i in images}) == len(images)
    assert sum(i.path.stat().st_size for i in images) < 1_500_000
    licences = (DEFAULT_LABELLED_DIR / "LICENSES.txt").read_text()
    for image in images:
        assert image.path.name in licences and 0 <= image.label < 1000
        assert load_image(image.path, Preprocess(), (1, 3, 224, 224)).shape == (1, 3, 224, 224)


def test_labelled_set__bad_manifest_is_input_error(tmp_path):
    with pytest.raises(InputError, match="labels.json is missing"):
        load_labelled_set(tmp_path)
    (tmp_path / "labels.json").write_text('{"images": [{"file": "x.jpg", "class": 3}]}')
    with pytest.raises(InputError, match="x.jpg"):
        load_labelled_set(tmp_path)


# -- reference: cached in the store --------------------------------------------------------------------


def test_reference__cached_in_store_and_keyed_by_input(tiny_onnx, store_root):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    key = reference_key(model, x)
    first = reference(model, x, plan_reference(model, x), ArtifactStore(store_root))
    assert first.built and first.artifact.kind == "reference"
    assert {f.name for f in first.artifact.files} == {REFERENCE_FILE}
    inputs = first.artifact.inputs
    assert inputs["model"] == model.digest and inputs["input"] == input_digest(x)
    assert inputs["framework"].startswith("onnxruntime==") and inputs["stage"] == "reference"
    stored = load_reference(first.artifact, ArtifactStore(store_root))
    np.testing.assert_array_equal(stored, reference_forward(model, x))
    assert stored.dtype == np.float32 and stored.shape == (1, 10)

    second = reference(model, x, plan_reference(model, x), ArtifactStore(store_root))
    assert not second.built and second.artifact == first.artifact  # reused, the framework not run again

    other = x.copy()
    other[0, 0, 0, 0] += 1.0
    assert reference_key(model, other) != key
    assert input_digest(x) != input_digest(x.reshape(1, 3, 16, 64))  # shape is part of the content
    assert input_digest(x) != input_digest(x.astype(np.float64))
    assert input_digest(x.copy()) == input_digest(x)
    assert key == keys.key_of(keys.reference_inputs(model.digest, input_digest(x), keys.framework_version("onnx")))

    # A corrupted stored reference is never used: loading refuses it, the stage recomputes it.
    path = ArtifactStore(store_root).file(first.artifact, REFERENCE_FILE)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StoreError, match="missing or corrupt"):
        load_reference(first.artifact, ArtifactStore(store_root))
    assert reference(model, x, plan_reference(model, x), ArtifactStore(store_root)).built
