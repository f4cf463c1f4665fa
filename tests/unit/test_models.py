"""Models and images: resolve (digests, errors), import into Relax vs the framework, preprocessing.

Tiny models are built in code (tests/fixtures_models.py). The real demo models imported into Relax:
tests/system/test_models_real.py; resolving without importing a framework:
tests/integration/test_models_lazy_imports.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import MXNET_SHAPE, NUM_CLASSES, SMALL_SHAPE, SOURCES, write_mxnet, write_onnx, write_pt2

from pipeline.errors import BuildError, InputError, ModelError
from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.models import (
    MODEL_NAMES,
    ModelSpec,
    Preprocess,
    ResolvedModel,
    import_model,
    label_for,
    reference_forward,
    resolve_model,
)
from pipeline.models import _mxnet
from pipeline.models._digest import ContentDigest
from support import REPO
from support import run_tvm as _run_tvm

TOLERANCE = 1e-4

# ``tiny_models`` (one tiny model of each kind in SOURCES, for the module): tests/conftest.py.


def _random_input(model: ResolvedModel, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*model.input_shape).astype(np.float32)


# --- resolve_model: digests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SOURCES)
def test_resolve_model__digest_follows_content_not_path(kind: str, tmp_path: Path) -> None:
    write = SOURCES[kind]
    folder = tmp_path / "a"
    folder.mkdir()
    source = write(folder, 0)
    first = resolve_model(ModelSpec(source))
    assert first.kind == kind and len(first.digest) == 64 and int(first.digest, 16) >= 0
    assert resolve_model(ModelSpec(source)).digest == first.digest
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in first.files)

    copies = tmp_path / "copies"
    copies.mkdir()
    for f in first.files:  # same bytes, other folder and other file names
        shutil.copyfile(f, copies / Path(f).name.replace("tiny", "renamed"))
    moved = resolve_model(ModelSpec(str(copies / Path(source).name.replace("tiny", "renamed"))))
    assert moved.digest == first.digest
    assert set(moved.files).isdisjoint(first.files)

    write(folder, 1)  # other weights, same paths
    assert resolve_model(ModelSpec(source)).digest != first.digest


def test_resolve_model__signatures(tiny_models: dict[str, str]) -> None:
    onnx_model = resolve_model(ModelSpec(tiny_models["onnx"]))
    assert (onnx_model.name, onnx_model.input_name, onnx_model.input_shape) == ("tiny.onnx", "input", SMALL_SHAPE)
    assert onnx_model.labels == "index" and onnx_model.notes == ()
    assert onnx_model.preprocess == Preprocess(resize=37, crop=32)

    torch_model = resolve_model(ModelSpec(tiny_models["torch"]))
    assert (torch_model.input_name, torch_model.input_shape, torch_model.labels) == ("image", SMALL_SHAPE, "index")

    for source in (tiny_models["mxnet"], tiny_models["mxnet"][: -len("-symbol.json")]):  # both spellings
        mx_model = resolve_model(ModelSpec(source))
        assert (mx_model.kind, mx_model.name, mx_model.input_name) == ("mxnet", "tiny-symbol.json", "data")
        assert mx_model.input_shape == MXNET_SHAPE and len(mx_model.files) == 2


def test_resolve_model__onnx_external_data_is_covered(tmp_path: Path) -> None:
    import onnx

    def external(folder: Path, seed: int) -> Path:
        folder.mkdir()
        proto = onnx.load(str(write_onnx(folder / "tiny.onnx", seed=seed)))
        onnx.save_model(proto, str(folder / "tiny.onnx"), save_as_external_data=True, location="weights.bin",
                        size_threshold=0)
        return folder / "tiny.onnx"

    first = resolve_model(ModelSpec(str(external(tmp_path / "a", 0))))
    assert [Path(f).name for f in first.files] == ["tiny.onnx", "weights.bin"]
    other_weights = tmp_path / "b"
    external(other_weights, 1)
    shutil.copyfile(other_weights / "weights.bin", tmp_path / "a" / "weights.bin")  # same graph, other weights
    changed = resolve_model(ModelSpec(first.files[0]))
    assert changed.digest != first.digest
    x = _random_input(changed)
    np.testing.assert_allclose(_run_tvm(changed, x), reference_forward(changed, x), atol=TOLERANCE, rtol=0)


def test_resolve_model__1000_outputs_get_imagenet_labels(tmp_path: Path) -> None:
    sources = [
        str(write_onnx(tmp_path / "big.onnx", classes=1000)),
        str(write_pt2(tmp_path / "big.pt2", classes=1000)),
        str(write_mxnet(tmp_path / "big", classes=1000)[0]),
    ]
    assert [resolve_model(ModelSpec(source)).labels for source in sources] == ["imagenet1k"] * 3


def test_content_digest__format_tag_separates_equal_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(b"same bytes")
    digests = set()
    for tag in ("onnx", "torch-pt2"):
        digest = ContentDigest(tag)
        digest.file("model", path)
        digests.add(digest.hexdigest())
    assert len(digests) == 2


def test_resolve_model__resnet_random_digest() -> None:
    model = resolve_model(ModelSpec("resnet18_v2", weights="random", seed=3))
    assert model.files == () and model.labels == "imagenet1k" and model.input_shape == (1, 3, 224, 224)
    assert any("random weights" in note for note in model.notes)
    assert resolve_model(ModelSpec("resnet18_v2", weights="random", seed=3)).digest == model.digest
    assert resolve_model(ModelSpec("resnet18_v2", weights="random", seed=4)).digest != model.digest


def test_resolve_model__efficientnet_digest_covers_packaged_weights() -> None:
    model = resolve_model(ModelSpec("efficientnet_lite0"))
    assert model.kind == "efficientnet_lite0" and model.labels == "imagenet1k"
    assert len(model.files) == 1 and model.files[0].endswith(".pth")
    assert resolve_model(ModelSpec("efficientnet_lite0")).digest == model.digest


def test_resolve_model__resnet_pretrained_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = (0x112).to_bytes(8, "little") + bytes(8) + b"stands in for the model store's file"
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setattr(_mxnet, "RESNET18_V2_SHA1", hashlib.sha1(fake).hexdigest())
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / f"resnet18_v2-{_mxnet.RESNET18_V2_SHA1[:8]}.params"
    cached.write_bytes(fake)
    model = resolve_model(ModelSpec("resnet18_v2"))
    assert model.files == (str(cached),)
    user_file = tmp_path / "elsewhere.params"
    user_file.write_bytes(fake)
    # The same bytes as --weights PATH are the same content.
    assert resolve_model(ModelSpec("resnet18_v2", weights=str(user_file))).digest == model.digest


# --- resolve_model: shapes ----------------------------------------------------------------------------


def test_resolve_model__onnx_dynamic_batch_becomes_1(tmp_path: Path) -> None:
    model = resolve_model(ModelSpec(str(write_onnx(tmp_path / "dyn.onnx", batch="N"))))
    assert model.input_shape == SMALL_SHAPE
    assert any("batch" in note for note in model.notes)
    x = _random_input(model)
    np.testing.assert_allclose(_run_tvm(model, x), reference_forward(model, x), atol=TOLERANCE, rtol=0)


def test_resolve_model__onnx_dynamic_height_is_refused(tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "dynh.onnx", height="H")
    with pytest.raises(ModelError, match="static") as info:
        resolve_model(ModelSpec(str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", ["no data", "raw data cut short", "typed data cut short", "negative dim"])
def test_resolve_model__onnx_weight_declaring_data_it_lacks_is_a_model_error(tmp_path: Path, case: str) -> None:
    """A weight whose shape declares more than the file holds (a 1 KB file can declare a 2 GB weight): exit 2
    naming the weight and the sizes, before TVM's importer tries (it failed as "unsupported operator", exit 1)."""
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(write_onnx(tmp_path / "good.onnx")))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    if case == "no data":
        weight.ClearField("raw_data")
        weight.ClearField("float_data")
        del weight.dims[:]
        weight.dims.append(536_870_912)  # 2 GiB of float32
    elif case == "raw data cut short":
        weight.raw_data = onnx.numpy_helper.to_array(weight).tobytes()[:-4]
    elif case == "typed data cut short":
        values = onnx.numpy_helper.to_array(weight).ravel()[:-1]
        weight.ClearField("raw_data")
        weight.float_data[:] = values.tolist()
    else:
        weight.dims[0] = -weight.dims[0]
    assert weight.data_type == TensorProto.FLOAT
    path = tmp_path / "damaged.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match=f"is damaged: its weight '{weight.name}' declares shape") as info:
        resolve_model(ModelSpec(str(path)))
    assert str(path) in str(info.value) and info.value.exit_code == 2
    if case == "no data":
        assert "(2,147,483,648 bytes) but the file holds 0 bytes" in str(info.value)


def test_import_model__pt2_dynamic_batch(tmp_path: Path) -> None:
    model = resolve_model(ModelSpec(str(write_pt2(tmp_path / "dyn.pt2", dynamic_batch=True))))
    assert model.input_shape == SMALL_SHAPE and model.notes
    x = _random_input(model)
    np.testing.assert_allclose(_run_tvm(model, x), reference_forward(model, x), atol=TOLERANCE, rtol=0)


# --- import_model vs the framework --------------------------------------------------------------------


@pytest.mark.parametrize("kind", SOURCES)
def test_import_model__matches_reference_forward(kind: str, tiny_models: dict[str, str]) -> None:
    model = resolve_model(ModelSpec(tiny_models[kind]))
    x = _random_input(model)
    expected = reference_forward(model, x)
    assert expected.shape == (1, NUM_CLASSES) and expected.dtype == np.float32
    assert np.abs(expected).max() > 0.05  # a real signal, not all zeros
    np.testing.assert_allclose(_run_tvm(model, x), expected, atol=TOLERANCE, rtol=0)


def test_import_model__mxnet_fix_gamma_is_honoured(tiny_models: dict[str, str]) -> None:
    import mxnet as mx

    nodes = json.loads(Path(tiny_models["mxnet"]).read_text())["nodes"]
    first_bn = next(n for n in nodes if n["op"] == "BatchNorm")
    assert first_bn["attrs"]["fix_gamma"] == "True"
    params = mx.nd.load(tiny_models["mxnet"].replace("-symbol.json", "-0000.params"))
    gamma = params["arg:" + nodes[first_bn["inputs"][1][0]]["name"]].asnumpy()
    # A stored gamma far from 1 that MXNet ignores: the comparison with MXNet above would catch its use.
    assert np.abs(gamma - 1.0).max() > 0.1


# --- errors -------------------------------------------------------------------------------------------


def test_resolve_model__unknown_name() -> None:
    with pytest.raises(ModelError) as info:
        resolve_model(ModelSpec("resnet50"))
    message = str(info.value)
    assert "'resnet50'" in message and all(name in message for name in MODEL_NAMES)
    assert ".onnx" in message and ".pt2" in message and "-symbol.json" in message


@pytest.mark.parametrize("name", ["missing.onnx", "missing.pt2", "missing-symbol.json", "sub/missing"])
def test_resolve_model__missing_file(name: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found") as info:
        resolve_model(ModelSpec(str(tmp_path / name)))
    assert str(tmp_path) in str(info.value)


def test_resolve_model__unsupported_file(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ModelError, match=r"\.onnx") as info:
        resolve_model(ModelSpec(str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_resolve_model__corrupt_file(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(ModelError) as info:
        resolve_model(ModelSpec(str(path)))
    assert str(path) in str(info.value)


def test_resolve_model__corrupt_params(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    garbage = np.random.RandomState(0).bytes(4096)
    weights = tmp_path / "weights.params"
    weights.write_bytes(garbage)
    with pytest.raises(ModelError) as info:
        resolve_model(ModelSpec("resnet18_v2", weights=str(weights)))
    assert str(weights) in str(info.value)

    symbol = tmp_path / "broken-symbol.json"
    shutil.copyfile(tiny_models["mxnet"], symbol)
    params = tmp_path / "broken-0000.params"
    params.write_bytes(garbage)
    with pytest.raises(ModelError) as info:
        resolve_model(ModelSpec(str(symbol)))
    assert str(params) in str(info.value)


def test_import_model__params_of_another_network(tiny_models: dict[str, str]) -> None:
    # Valid MXNet parameters, but not resnet18_v2's: found when the weights are loaded.
    params = tiny_models["mxnet"].replace("-symbol.json", "-0000.params")
    model = resolve_model(ModelSpec("resnet18_v2", weights=params))
    with pytest.raises(ModelError, match="resnet18_v2") as info:
        import_model(model)
    assert params in str(info.value)


def test_resolve_model__mxnet_params_missing(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    symbol = tmp_path / "lonely-symbol.json"
    shutil.copyfile(tiny_models["mxnet"], symbol)
    with pytest.raises(ModelError, match="lonely-0000.params"):
        resolve_model(ModelSpec(str(symbol)))


def test_resolve_model__weights_only_for_resnet(tiny_models: dict[str, str]) -> None:
    for source in ("efficientnet_lite0", tiny_models["onnx"]):
        with pytest.raises(ModelError, match="resnet18_v2"):
            resolve_model(ModelSpec(source, weights="random"))
    with pytest.raises(ModelError, match="'random'"):
        resolve_model(ModelSpec("resnet18_v2", weights="Random"))


@pytest.mark.timeout(60)
def test_resolve_model__resnet_pretrained_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing cached, and a model store nobody listens on: the same as offline, wherever the test runs.
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        resolve_model(ModelSpec("resnet18_v2"))
    assert time.monotonic() - start < 15
    message = str(info.value)
    for hint in ("--weights random", "--weights PATH", "--model efficientnet_lite0", "resnet18_v2-a81db45f.params"):
        assert hint in message


@pytest.mark.timeout(60)
def test_resolve_model__resnet_pretrained_really_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mxnet.gluon.model_zoo import model_store

    if _mxnet._unreachable(model_store.apache_repo_url) is None:
        pytest.skip("MXNet's model store is reachable: resolving would download 45 MB")
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.delenv("MXNET_GLUON_REPO", raising=False)
    with pytest.raises(ModelError, match="--weights random"):
        resolve_model(ModelSpec("resnet18_v2"))


@pytest.mark.timeout(60)
def test_resolve_model__resnet_pretrained_download_error_is_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the reachability probe, MXNet's own downloader fails (and retries); that too is a ModelError.
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    monkeypatch.setattr(_mxnet, "_unreachable", lambda url: None)
    with pytest.raises(ModelError, match="--weights random"):
        resolve_model(ModelSpec("resnet18_v2"))


def test_import_model__unconvertible_onnx_is_build_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # Valid ONNX that TVM's frontend has no converter for (a custom domain op).
    node = helper.make_node("Mystery", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph(
        [node], "odd",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SMALL_SHAPE))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, NUM_CLASSES])],
    )
    model_proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "odd.onnx"
    onnx.save(model_proto, str(path))
    model = resolve_model(ModelSpec(str(path)))
    with pytest.raises(BuildError) as info:
        import_model(model)
    assert str(path) in str(info.value)


# --- labels -------------------------------------------------------------------------------------------


def test_label_for(tiny_models: dict[str, str]) -> None:
    assert label_for(resolve_model(ModelSpec("efficientnet_lite0")), 281) == "tabby, tabby cat"
    assert label_for(resolve_model(ModelSpec(tiny_models["onnx"])), 3) == "class 3"


# --- images -------------------------------------------------------------------------------------------


def test_load_image__cat_is_standardized() -> None:
    assert DEFAULT_IMAGE.samefile(REPO / "data" / "cat.png")
    x = load_image(DEFAULT_IMAGE, Preprocess(), (1, 3, 224, 224))
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    assert abs(float(x.mean())) < 0.5 and 0.3 < float(x.std()) < 1.5
    assert x.min() >= -2.2 and x.max() <= 2.7  # (0 - mean) / std and (255 - mean) / std bounds


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image__any_mode_becomes_rgb(mode: str, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / f"{mode}.png"
    Image.new(mode, (300, 200), color=128).save(path)
    x = load_image(path, Preprocess(), (1, 3, 224, 224))
    assert x.shape == (1, 3, 224, 224) and np.isfinite(x).all()


def test_load_image__input_shape_smaller_than_crop() -> None:
    x = load_image(DEFAULT_IMAGE, Preprocess.for_shape(32, 48), (1, 3, 32, 48))
    assert x.shape == (1, 3, 32, 48)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_load_image__bad_file(content: bytes | str, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(DEFAULT_IMAGE.read_bytes()[:20000] if content == "truncated" else content)
    with pytest.raises(InputError) as info:
        load_image(path, Preprocess(), (1, 3, 224, 224))
    assert str(path) in str(info.value)


def test_load_image__missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as info:
        load_image(tmp_path / "nope.jpg", Preprocess(), (1, 3, 224, 224))
    assert str(tmp_path / "nope.jpg") in str(info.value)


# --- the demo models ----------------------------------------------------------------------------------


def test_reference_forward__efficientnet_sees_a_cat() -> None:
    model = resolve_model(ModelSpec("efficientnet_lite0"))
    logits = reference_forward(model, load_image(DEFAULT_IMAGE, model.preprocess, model.input_shape))
    assert logits.shape == (1, 1000)
    assert 281 <= int(logits.argmax()) <= 285, label_for(model, int(logits.argmax()))
