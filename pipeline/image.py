"""Images in, model inputs out: the standard ImageNet preprocessing done with PIL and numpy.

Every PIL mode becomes 8-bit RGB by what its values mean (:func:`rgb_image`), never by PIL's clipping
``convert("RGB")`` of high-bit-depth data:

====================================  ==================================================================
1, L, P, RGB, RGBX, CMYK, YCbCr,      PIL's own conversion (exact for these; CMYK by PIL's formula, no
LAB, HSV                              ICC profile)
LA, La, PA, RGBA, RGBa, and any mode  composited over white (what a viewer shows on a light background;
with a ``transparency`` entry (P, L,  premultiplied La/RGBa are un-premultiplied first)
RGB, I;16... with tRNS)
I;16, I;16B, I;16L, I;16N             16-bit unsigned: divided by 65535/255 (a 12-bit image stored in 16
                                      bits stays dark: nothing is stretched), or by the depth the decoder's
                                      raw mode declares if it is smaller
I (32-bit signed)                     divided by the file's declared depth when it is below 32 bits (16 for a
                                      16-bit PNG or PGM, from the decoder's raw mode); else (a 32-bit TIFF, or
                                      no declared depth) by its real range: the smallest of the 8-bit, 16-bit
                                      and int32 ranges that holds its largest value, with a warning (an 8-bit
                                      picture saved as 32-bit integers stays that picture); negative values
                                      are clipped to 0, with a warning
F (32-bit float)                      values in [0, 1]: times 255; else taken on the 0-255 scale, clipped
                                      to it with a warning if they leave it (NaN becomes 0)
====================================  ==================================================================

High-bit-depth data is rounded to 8 bits, the precision the models were trained with.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError, clip
from pipeline.models import Preprocess

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: The bundled photo of a cat (CC0, from scikit-image; see data/LICENSE-cat.txt): package data, so an installed
#: package has it too (``data/`` at the repository root is a link to ``pipeline/data/``).
DEFAULT_IMAGE: pathlib.Path = pathlib.Path(__file__).resolve().parent / "data" / "cat.png"


#: Modes whose PIL conversion to RGB is exact or the standard formula.
_PIL_CONVERTS = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
#: Modes with an alpha band (La and RGBa premultiplied).
_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
#: Single-band modes of more than 8 bits, and the largest value of their type.
_DEEP = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 2**31 - 1, "F": 255}
_RAW_BITS = re.compile(r"^[A-Z]+;(\d+)(S?)")  # decoder raw modes: "I;16B", "I;32S", "F;32F"...


def declared_max(img: "Image.Image") -> int | None:
    """The largest value the file's pixel data can hold as the file declares it, if PIL exposes it.

    Read from the decoder's raw mode (``I;16B`` for a 16-bit PNG: 65535; ``I;32S``: 2**31 - 1), or for a
    PGM/PPM read as mode I, 65535 (PIL scales any maxval above 255 to 16 bits). Call it before
    ``img.load()``, which forgets the raw mode. None when unknown.
    """
    if img.mode not in _DEEP or img.mode == "F":
        return None
    tile = getattr(img, "tile", None) or []
    if tile:
        args = tile[0].args
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        match = _RAW_BITS.match(rawmode) if isinstance(rawmode, str) else None
        if match and not rawmode.startswith("F"):
            bits = int(match.group(1)) - (1 if match.group(2) else 0)
            if 1 <= bits <= 32:
                return 2**bits - 1
    if img.format == "PPM" and img.mode == "I":
        return 65535
    return None


def _scaled_to_255(img: "Image.Image", maximum: int | None, name: str) -> np.ndarray:
    """A single-band mode of more than 8 bits as float32 on the 0-255 scale (see the module's table)."""
    values = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
            unit = True
        else:
            unit = False
        bad = ~np.isfinite(values)
        if bad.any():
            log.warning("%s: %d NaN or infinite float pixel(s) set to 0 or 255", clip(name), int(bad.sum()))
            values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if not unit and (values.min() < 0.0 or values.max() > 255.0):
            log.warning(
                "%s: float image with values from %g to %g, neither in [0, 1] nor in [0, 255]: "
                "clipped to [0, 255]", clip(name), values.min(), values.max(),
            )
        return np.clip(values, 0.0, 255.0).astype(np.float32)
    if maximum is None or maximum >= _DEEP[img.mode]:
        maximum = _DEEP[img.mode]
        if img.mode == "I":
            # 32-bit integers hardly ever hold 32-bit pictures: an 8- or 16-bit one was saved wider. Dividing by
            # the int32 range would turn it black (a cat became a "microwave").
            largest = int(values.max()) if values.size else 0
            maximum = next(depth for depth in (255, 65535, _DEEP["I"]) if largest <= depth)
            if maximum < _DEEP["I"]:
                log.warning(
                    "%s: 32-bit integer image whose values (up to %d) fit in %d bits: scaled by that range (0-%d)",
                    clip(name), largest, maximum.bit_length(), maximum,
                )
    if values.size and values.min() < 0:
        log.warning("%s: negative pixel values (down to %d) clipped to 0", clip(name), int(values.min()))
    if values.size and values.max() > maximum:
        log.warning(
            "%s: pixel values up to %d exceed the declared maximum %d: clipped", clip(name), int(values.max()), maximum
        )
    return (np.clip(values, 0, maximum) * (255.0 / maximum)).astype(np.float32)


def _to_uint8_rgb(rgb: np.ndarray, alpha: np.ndarray | None) -> "Image.Image":
    """HxWx3 values on the 0-255 scale, composited over white where ``alpha`` (0-255) is given."""
    from PIL import Image

    if alpha is not None:
        a = alpha.astype(np.float32)[..., np.newaxis] / 255.0
        rgb = rgb * a + 255.0 * (1.0 - a)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def rgb_image(img: "Image.Image", maximum: int | None = None, name: str = "the image") -> "Image.Image":
    """``img`` as 8-bit RGB, converted by what each PIL mode's values mean (see the module's table).

    Args:
        img: A loaded image of any PIL mode.
        maximum: For high-bit-depth integer modes, the largest value the file declares
            (:func:`declared_max`); None: the mode's type range.
        name: How to call the image in warnings (its path).

    Raises:
        InputError: A mode PIL has but this function does not know (none in Pillow 13).
    """
    from PIL import Image

    mode = img.mode
    if mode in _DEEP:
        gray = _scaled_to_255(img, maximum, name)
        transparency = img.info.get("transparency")
        if isinstance(transparency, int) and mode != "F":  # a tRNS gray value: those pixels are transparent
            alpha = np.where(np.asarray(img) == transparency, 0, 255)
            return _to_uint8_rgb(np.repeat(gray[..., np.newaxis], 3, axis=2), alpha)
        return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA or (mode in _PIL_CONVERTS and img.info.get("transparency") is not None):
        rgba = np.asarray((img.convert("LA") if mode == "La" else img).convert("RGBA"), dtype=np.float32)
        return _to_uint8_rgb(rgba[..., :3], rgba[..., 3])
    if mode in _PIL_CONVERTS:
        return img if mode == "RGB" else img.convert("RGB")
    raise InputError(f"{clip(name)} has the image mode {clip(mode, 20)!r}, which the pipeline cannot convert to RGB.")


def load_image(path: str | os.PathLike[str], pre: Preprocess, input_shape: tuple[int, ...]) -> np.ndarray:
    """Reads an image file and turns it into one model input.

    The image is converted to 8-bit RGB by what its mode's values mean (:func:`rgb_image`: 16-bit data is
    scaled, not clipped; transparency is composited over white), its shorter side resized to ``pre.resize``
    (bilinear), the centre ``H`` x ``W`` cut out (``H, W = input_shape[2:]``, normally ``pre.crop`` x
    ``pre.crop``), and each channel standardized as ``(x - mean) / std`` on the 0-255 scale.

    Args:
        path: The image file (any format PIL reads).
        pre: The model's preprocessing.
        input_shape: The model's NCHW input shape, ``(1, 3, H, W)``.

    Returns:
        A C-contiguous float32 array of shape ``input_shape``.

    Raises:
        InputError: The file is missing, a directory, unreadable, not an image or truncated, or
            ``input_shape`` is not one RGB image no larger than the resized picture; the message names the path.
    """
    from PIL import Image

    path = pathlib.Path(os.path.abspath(os.path.expanduser(path)))
    if len(input_shape) != 4 or input_shape[0] != 1 or input_shape[1] != 3:
        raise InputError(
            f"Cannot feed {clip(path)} to a model with input shape {input_shape}: only (1, 3, H, W) is supported."
        )
    height, width = int(input_shape[2]), int(input_shape[3])
    rgb = _read_rgb(path)
    # Truncating the longer side and rounding the crop offsets as torchvision does, whose
    # Resize + CenterCrop the pretrained models were evaluated with.
    scale = pre.resize / min(rgb.width, rgb.height)
    size = (max(pre.resize, int(rgb.width * scale)), max(pre.resize, int(rgb.height * scale)))
    resized = rgb.resize(size, Image.BILINEAR)
    if height > resized.height or width > resized.width:
        raise InputError(
            f"Cannot cut {height}x{width} out of {clip(path)} resized to {resized.height}x{resized.width}: "
            f"the preprocessing's resize ({pre.resize}) is smaller than the model's input."
        )
    left = round((resized.width - width) / 2)
    top = round((resized.height - height) / 2)
    crop = resized.crop((left, top, left + width, top + height))

    pixels = np.asarray(crop, dtype=np.float32)  # HWC, 0-255
    pixels = (pixels - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def _read_rgb(path: pathlib.Path) -> Any:
    """The image at ``path`` as an 8-bit RGB PIL image (:func:`rgb_image`), or an InputError naming the path."""
    from PIL import Image

    shown = clip(path)
    if path.is_dir():
        raise InputError(f"Image {shown} is a directory, not an image file. Give the path of a PNG or JPEG file.")
    if not path.exists():
        raise InputError(
            f"Image not found: {shown}. Check the path (or leave it out to use {DEFAULT_IMAGE.name})."
        )
    if not path.is_file():
        raise InputError(f"Image {shown} is not a regular file. Give the path of a PNG or JPEG file.")
    try:
        with Image.open(path) as img:
            maximum = declared_max(img)  # before load(), which forgets the decoder's raw mode
            img.load()  # decodes now, so a truncated file fails here rather than later
            return rgb_image(img, maximum, str(path))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and truncation errors are OSErrors; some decoders raise SyntaxError.
        raise InputError(
            f"Cannot read {shown} as an image ({type(e).__name__}: {clip(e)}). Give a PNG or JPEG file."
        ) from e
