"""What users hand the pipeline, checked before anything runs: images of every PIL mode, targets against
LLVM's tables, model files with no graph or several outputs, the artifact store's root, capped echoes.

Unit tier: real files, real PIL, real TVM/LLVM, no servers, no subprocesses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import write_onnx

from pipeline.errors import InputError, ModelError, TargetError, UsageError, clip
from pipeline.image import DEFAULT_IMAGE, declared_max, load_image, rgb_image
from pipeline.models import ModelSpec, Preprocess, resolve_model
from pipeline.store import ArtifactStore
from pipeline.targets import parse_target

SHAPE = (1, 3, 224, 224)
STD = np.asarray(Preprocess().std, dtype=np.float32).reshape(1, 3, 1, 1)
MEAN = np.asarray(Preprocess().mean, dtype=np.float32).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def cat():
    """The bundled cat photo, loaded (RGB)."""
    from PIL import Image

    with Image.open(DEFAULT_IMAGE) as img:
        img.load()
        return img.copy()


@pytest.fixture(scope="module")
def gray8(cat) -> np.ndarray:
    """The cat as 8-bit grayscale values (PIL's ITU-R 601 luma)."""
    return np.asarray(cat.convert("L"))


def _gray_levels(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of two preprocessed inputs, in gray levels of the 0-255 scale."""
    return float((np.abs(a - b) * STD).max())


def _read(path: Path):
    """The image at ``path``, loaded, and its declared maximum (read before loading, as load_image does)."""
    from PIL import Image

    with Image.open(path) as img:
        maximum = declared_max(img)
        img.load()
        return img.copy(), maximum


def _reopen(img, path: Path, fmt: str, **save):
    """``img`` written to ``path`` in ``fmt`` and read back: (image, its declared maximum)."""
    img.save(path, fmt, **save)
    return _read(path)


# --- clip ---------------------------------------------------------------------------------------------


def test_clip__short_text_unchanged_long_text_cut_with_its_length():
    assert clip("llvm") == "llvm"
    long = "x" * 10_000
    assert clip(long).startswith("x" * 200) and clip(long).endswith("... (10000 characters)")
    assert len(clip(long)) < 230 and len(clip(long, 20)) < 50
    assert clip(Path("/a/b")) == "/a/b"


# --- images: 16-bit data ------------------------------------------------------------------------------


def test_load_image__16bit_gray_png_matches_8bit_gray(gray8, tmp_path):
    from PIL import Image

    # 16-bit data made from the 8-bit image: v * 257 is the same level; noise below half a level must not
    # change it (the conversion rounds v / 257).
    noise = np.random.RandomState(0).randint(-128, 129, gray8.shape)
    sixteen = np.clip(gray8.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "cat16.png")
    Image.fromarray(gray8).save(tmp_path / "cat8.png")
    with Image.open(tmp_path / "cat16.png") as img:
        assert img.mode == "I;16"  # what PIL's convert("RGB") turned white

    x16 = load_image(tmp_path / "cat16.png", Preprocess(), SHAPE)
    x8 = load_image(tmp_path / "cat8.png", Preprocess(), SHAPE)
    assert x16.shape == SHAPE and np.isfinite(x16).all()
    assert _gray_levels(x16, x8) <= 1.0
    # Not white: the cat's mean brightness survives.
    assert abs(float((x16 * STD).mean() - (x8 * STD).mean())) < 0.5


def test_load_image__16bit_png_using_12_bits_is_not_stretched(gray8, tmp_path):
    from PIL import Image

    twelve = gray8.astype(np.uint16) * 16  # values up to 4080: 12 bits used of 16
    Image.fromarray(twelve).save(tmp_path / "cat12.png")
    img, maximum = _read(tmp_path / "cat12.png")
    assert maximum == 65535
    out = np.asarray(rgb_image(img, maximum))
    np.testing.assert_array_equal(out[..., 0], np.rint(twelve / 257.0).astype(np.uint8))
    assert out.max() <= 16  # dark, as the data says


def test_load_image__16bit_pgm_of_any_maxval(gray8, tmp_path):
    for maxval in (65535, 4095, 1000):
        values = np.rint(gray8.astype(np.float64) * maxval / 255).astype(">u2")
        path = tmp_path / f"cat{maxval}.pgm"
        path.write_bytes(b"P5\n%d %d\n%d\n" % (gray8.shape[1], gray8.shape[0], maxval) + values.tobytes())
        img, maximum = _read(path)
        assert img.mode == "I" and maximum == 65535  # PIL scales maxval to 16 bits; mode I, not I;16
        assert np.abs(np.asarray(rgb_image(img, maximum))[..., 0].astype(int) - gray8).max() <= 1
        x = load_image(path, Preprocess(), SHAPE)
        assert np.isfinite(x).all()


def test_declared_max__from_the_decoder(gray8, tmp_path):
    from PIL import Image

    _, png16 = _reopen(Image.fromarray(gray8.astype(np.uint16) * 257), tmp_path / "a.png", "PNG")
    _, tiff16 = _reopen(Image.fromarray(gray8.astype(np.uint16) * 257), tmp_path / "a.tif", "TIFF")
    _, tiff32 = _reopen(Image.fromarray(gray8.astype(np.int32)), tmp_path / "b.tif", "TIFF")
    _, png8 = _reopen(Image.fromarray(gray8), tmp_path / "c.png", "PNG")
    _, tiff_f = _reopen(Image.fromarray(gray8.astype(np.float32)), tmp_path / "d.tif", "TIFF")
    assert (png16, tiff16, tiff32, png8, tiff_f) == (65535, 65535, 2**31 - 1, None, None)


@pytest.mark.parametrize("maximum", [None, 2**31 - 1])  # no declared depth; a 32-bit TIFF's
def test_rgb_image__int32_scaled_by_its_real_range(gray8, caplog, maximum):
    """An 8- or 16-bit picture saved as 32-bit integers is that picture (divided by the int32 range it came out
    black: the cat was classified "microwave"), with a warning that says how it was read; values beyond 16 bits
    take the int32 range."""
    from PIL import Image

    for factor, bits in ((1, 8), (257, 16)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.image"):
            out = np.asarray(rgb_image(Image.fromarray(gray8.astype(np.int32) * factor), maximum, "int.tif"))
        np.testing.assert_array_equal(out[..., 0], gray8)
        assert f"fit in {bits} bits" in caplog.text and "int.tif" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        wide = np.asarray(rgb_image(Image.fromarray(gray8.astype(np.int32) << 23), maximum))
    assert np.abs(wide[..., 0].astype(int) - gray8).max() <= 1 and not caplog.text
    with_depth = np.asarray(rgb_image(Image.fromarray(gray8.astype(np.int32) * 16), 4095))  # a declared depth wins
    np.testing.assert_array_equal(with_depth[..., 0], np.rint(gray8.astype(float) * 16 * 255 / 4095).astype(np.uint8))


def test_load_image__a_32_bit_integer_tiff_of_the_cat_is_the_gray_cat(cat, tmp_path):
    cat.convert("L").convert("I").save(tmp_path / "cat32.tif")
    cat.convert("L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "cat32.tif", Preprocess(), SHAPE),
                                  load_image(tmp_path / "gray.png", Preprocess(), SHAPE))


def test_rgb_image__negative_int_clipped_with_warning(caplog):
    from PIL import Image

    img = Image.fromarray(np.array([[-5, 0, 65535]], dtype=np.int32))
    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        out = np.asarray(rgb_image(img, 65535))
    assert out[0, :, 0].tolist() == [0, 0, 255]
    assert "negative" in caplog.text


def test_rgb_image__float_unit_range_and_0_255_scale(gray8, caplog):
    from PIL import Image

    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        unit = np.asarray(rgb_image(Image.fromarray(gray8.astype(np.float32) / 255)))
        scale = np.asarray(rgb_image(Image.fromarray(gray8.astype(np.float32))))
    np.testing.assert_array_equal(unit[..., 0], gray8)
    np.testing.assert_array_equal(scale[..., 0], gray8)
    assert caplog.text == ""  # nothing clipped, nothing to say


def test_rgb_image__float_out_of_range_is_clipped_with_a_warning(caplog):
    from PIL import Image

    values = np.array([[-50.0, 0.5, 100.0, 400.0, np.nan, np.inf]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="pipeline.image"):
        out = np.asarray(rgb_image(Image.fromarray(values), name="f.tif"))
    assert out[0, :, 0].tolist() == [0, 0, 100, 255, 0, 255]
    assert "clipped to [0, 255]" in caplog.text and "NaN" in caplog.text and "f.tif" in caplog.text


# --- images: every PIL mode ---------------------------------------------------------------------------


def _mode_cases(cat, gray8):
    """mode -> (image in that mode made from the cat, reference RGB array, largest allowed difference)."""
    from PIL import Image

    rgb = np.asarray(cat)
    gray = np.repeat(gray8[..., np.newaxis], 3, axis=2)
    sixteen = Image.fromarray(gray8.astype(np.uint16) * 257)
    palette = cat.convert("P", palette=Image.ADAPTIVE, colors=256)
    paletted = np.asarray(palette.convert("RGB"))
    one = cat.convert("1")
    return {
        "1": (one, np.repeat(np.asarray(one, dtype=np.uint8)[..., np.newaxis] * 255, 3, axis=2), 0),
        "L": (cat.convert("L"), gray, 0),
        "LA": (cat.convert("LA"), gray, 0),
        "La": (cat.convert("LA").convert("La"), gray, 0),
        "P": (palette, paletted, 0),
        "PA": (palette.convert("PA"), paletted, 0),
        "RGB": (cat, rgb, 0),
        "RGBA": (cat.convert("RGBA"), rgb, 0),
        "RGBa": (cat.convert("RGBa"), rgb, 0),
        "RGBX": (cat.convert("RGBX"), rgb, 0),
        "CMYK": (cat.convert("CMYK"), rgb, 0),
        "YCbCr": (cat.convert("YCbCr"), rgb, 6),
        "LAB": (cat.convert("LAB"), rgb, 8),
        "HSV": (cat.convert("HSV"), rgb, 6),
        "I": (Image.fromarray(gray8.astype(np.int32) * 257), gray, 0),  # with its depth declared: see below
        "I;16": (sixteen, gray, 0),
        # Not sixteen.convert(...): PIL's conversion between the I;16 modes clips at 255.
        "I;16B": (Image.fromarray(gray8.astype(">u2") * 257), gray, 0),
        "I;16L": (Image.frombytes("I;16L", cat.size, (gray8.astype("<u2") * 257).tobytes()), gray, 0),
        "I;16N": (Image.frombytes("I;16N", cat.size, (gray8.astype("=u2") * 257).tobytes()), gray, 0),
        "F": (Image.fromarray(gray8.astype(np.float32) / 255), gray, 0),
    }


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
         "I;16", "I;16B", "I;16L", "I;16N", "F"]


def test_modes__cover_every_pil_mode():
    from PIL import Image

    assert sorted(MODES) == sorted(Image.MODES)


@pytest.mark.parametrize("mode", MODES)
def test_rgb_image__every_mode_is_finite_in_range_and_close_to_the_rgb(mode, cat, gray8):
    img, reference, tolerance = _mode_cases(cat, gray8)[mode]
    assert img.mode == mode
    out = rgb_image(img, 65535 if mode == "I" else None)
    assert out.mode == "RGB" and out.size == cat.size
    values = np.asarray(out).astype(int)
    assert values.min() >= 0 and values.max() <= 255
    assert np.abs(values - reference.astype(int)).max() <= tolerance, mode
    if mode == "1":  # dithering keeps the brightness
        assert abs(values.mean() - gray8.mean()) < 12


def test_rgb_image__alpha_composited_over_white(cat):
    from PIL import Image

    rgba = np.asarray(cat.convert("RGBA")).copy()
    rgba[..., :3] = (10, 20, 30)
    rgba[0, :, 3] = 0  # transparent row
    rgba[1, :, 3] = 255  # opaque row
    rgba[2, :, 3] = 128  # half
    out = np.asarray(rgb_image(Image.fromarray(rgba))).astype(int)
    assert (out[0] == 255).all()
    assert (out[1] == (10, 20, 30)).all()
    expected = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
    assert (np.abs(out[2] - expected) <= 1).all()


def test_rgb_image__transparency_entries_over_white(cat, gray8, tmp_path):
    from PIL import Image

    palette = cat.convert("P", palette=Image.ADAPTIVE, colors=256)
    index = int(np.asarray(palette)[0, 0])
    cases = {
        "P.png": (palette, "PNG", index),
        "P.gif": (palette, "GIF", index),
        "L.png": (cat.convert("L"), "PNG", int(gray8[0, 0])),
        "RGB.png": (cat, "PNG", tuple(int(v) for v in np.asarray(cat)[0, 0])),
        "I16.png": (Image.fromarray(gray8.astype(np.uint16) * 257), "PNG", int(gray8[0, 0]) * 257),
    }
    for name, (img, fmt, transparent) in cases.items():
        read, maximum = _reopen(img, tmp_path / name, fmt, transparency=transparent)
        assert read.info.get("transparency") is not None, name
        out = np.asarray(rgb_image(read, maximum))
        assert (out[0, 0] == 255).all(), name  # the transparent colour became white
        assert out.min() < 100, name  # the rest did not


@pytest.mark.parametrize(
    "mode, fmt",
    [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("PA", "TIFF"),
     ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF"), ("I", "TIFF"), ("I;16B", "TIFF"), ("F", "TIFF"),
     ("RGB", "JPEG"), ("CMYK", "JPEG")],
)
def test_load_image__files_of_each_mode(mode, fmt, cat, gray8, tmp_path):
    from PIL import Image

    img, _, _ = _mode_cases(cat, gray8)[mode]
    path = tmp_path / f"cat.{fmt.lower()}"
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    x = load_image(path, Preprocess(), SHAPE)
    assert x.shape == SHAPE and np.isfinite(x).all()
    assert x.min() >= -2.2 and x.max() <= 2.7  # (0 - mean) / std and (255 - mean) / std bounds
    gray = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "F")
    reference = tmp_path / "reference.png"
    (cat.convert("L") if gray else cat).save(reference)
    if mode != "1":
        assert float(np.abs(x - load_image(reference, Preprocess(), SHAPE)).mean() * STD.max()) < 3.0, mode
    with Image.open(path) as read:
        assert read.mode == mode  # the file really holds that mode


def test_load_image__directory_says_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory") as info:
        load_image(tmp_path, Preprocess(), SHAPE)
    assert "not found" not in str(info.value) and str(tmp_path) in str(info.value)


def test_load_image__long_path_is_clipped_in_the_message(tmp_path):
    path = tmp_path / ("a" * 200) / ("b" * 200) / ("c" * 200) / "x.png"
    with pytest.raises(InputError, match="not found") as info:
        load_image(path, Preprocess(), SHAPE)
    assert len(str(info.value)) < 400


# --- targets ------------------------------------------------------------------------------------------


def test_parse_target__unknown_mattr_fails_at_once_in_one_line(capfd):
    parse_target("llvm")  # TVM and LLVM loaded: time the check alone
    capfd.readouterr()
    start = time.perf_counter()
    with pytest.raises(TargetError) as info:
        parse_target("llvm -mattr=aaaa")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 1.0, elapsed
    assert "\n" not in message and len(message) < 400
    assert "'aaaa'" in message and "closest: +" in message and "+feature" in message
    assert info.value.exit_code == 2
    assert capfd.readouterr().err == ""  # LLVM's own "not a recognized feature" line is kept quiet


@pytest.mark.parametrize(
    "text, match",
    [
        ("llvm -mattr=+avx512fx", r"closest: \+avx512f"),
        ("llvm -mattr=+avx2,+fma,+not-a-feature", "'not-a-feature'"),
        ("llvm -mattr=avx2", r"needs a sign: \+avx2 enables"),
        ("llvm -mattr=+help", "'help'"),
        ("llvm -mtriple=aarch64-linux-gnu -mattr=+avx2", "aarch64-linux-gnu"),
        ("llvm -mcpu=znver44", "does not know the CPU 'znver44'.*closest: znver4"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a7200", "closest: cortex-a720"),
        ("llvm -mtriple=riscv64gc-linux-gnu", "no backend.*closest: riscv64"),
        ("llvm -mtriple=xtensa-none-elf -mcpu=esp32", "no backend for the architecture 'xtensa'"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=native", "-mcpu=native means this host's CPU"),
        ('{"kind": "llvm", "mattr": ["+avx2", "sse4.2"]}', r"needs a sign: \+sse4.2"),
        ('{"kind": "llvm", "mattr": ["+avx2", "+"]}', "names no feature"),
        ("llvm -mattr=++avx2", r"'\+avx2' \(closest: \+avx2"),
    ],
)
def test_parse_target__llvm_names_are_checked(text, match, capfd):
    with pytest.raises(TargetError, match=match) as info:
        parse_target(text)
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "text",
    [
        "llvm -mattr=+avx2,-fma,+retpoline",  # retpoline: no CPU enables it, LLVM knows it
        "llvm -mcpu=znver4 -mattr=+avx512f",
        "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod,-sve",
        "llvm -mtriple=armv7a-linux-gnueabihf -mcpu=cortex-a7 -mattr=+neon",
        "llvm -mtriple=riscv64-linux-gnu -mattr=+m,+v",
        '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}',
    ],
)
def test_parse_target__valid_llvm_names_pass(text):
    assert parse_target(text).kind == "llvm"


@pytest.mark.parametrize(
    "text",
    [
        "llvm -mattr=" + "a" * 10_000,
        "llvm -mattr=" + ",".join(f"+x{i}" for i in range(2000)),
        "llvm -mcpu=" + "z" * 10_000,
        "llvm -mtriple=" + "q" * 10_000,
        "llvm -" + "j" * 10_000,
        "llvm " + "j" * 10_000,
        "llvm -bogus" + "b" * 10_000 + "=1",
        "notakind" + "k" * 10_000,
        "{" + "x" * 10_000,
    ],
)
def test_parse_target__junk_is_echoed_clipped(text):
    start = time.perf_counter()
    with pytest.raises(TargetError) as info:
        parse_target(text)
    assert len(str(info.value)) < 800, len(str(info.value))
    assert time.perf_counter() - start < 2.0


# --- model files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, what", [(".onnx", "not an ONNX model"), (".pt2", "not a torch.export archive")])
def test_resolve_model__empty_file_says_empty(suffix, what, tmp_path):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty") as info:
        resolve_model(ModelSpec(str(path)))
    assert what in str(info.value) and str(path) in str(info.value)
    assert "inputs" not in str(info.value)


def test_resolve_model__protobuf_without_graph_is_not_an_onnx_model(tmp_path):
    path = tmp_path / "other.onnx"
    path.write_bytes(b"\x08\x07")  # a valid protobuf message (field 1 = 7), no graph
    with pytest.raises(ModelError, match="not an ONNX model: .*no graph"):
        resolve_model(ModelSpec(str(path)))


def test_resolve_model__onnx_with_several_outputs_is_refused_naming_them(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    path = write_onnx(tmp_path / "two.onnx")
    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16]))
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="has 2 outputs") as info:
        resolve_model(ModelSpec(str(path)))
    message = str(info.value)
    assert "logits, f" in message and "exactly one output" in message


def test_resolve_model__pt2_with_several_outputs_is_refused_naming_them(tmp_path):
    import torch

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = torch.nn.functional.adaptive_avg_pool2d(self.conv(image), 1).flatten(1)
            return self.fc(features), features

    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(Two().eval(), (torch.randn(1, 3, 32, 32),)), str(path))
    with pytest.raises(ModelError, match="has 2 outputs") as info:
        resolve_model(ModelSpec(str(path)))
    assert "exactly one output" in str(info.value)


# --- the artifact store's root ------------------------------------------------------------------------


def test_check_root__directory_or_creatable(tmp_path):
    ArtifactStore(tmp_path).check_root()
    ArtifactStore(tmp_path / "new" / "deeper").check_root()
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_check_root__a_file_is_a_usage_error(tmp_path):
    path = tmp_path / "artifacts"
    path.write_text("not a directory")
    with pytest.raises(UsageError, match="is not a directory") as info:
        ArtifactStore(path).check_root()
    assert info.value.exit_code == 2 and str(path) in str(info.value) and "--artifacts" in str(info.value)
    with pytest.raises(UsageError, match="is a file, not a directory"):
        ArtifactStore(path / "inside").check_root()


def test_check_root__an_unwritable_store_is_left_to_the_writes(tmp_path):
    """A read-only store still serves a run whose artifacts are cached; a needed write fails as a StoreError."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        ArtifactStore(locked).check_root()
        ArtifactStore(locked / "artifacts").check_root()
    finally:
        locked.chmod(0o700)
