"""Images in, model inputs out: the standard ImageNet preprocessing done with PIL and numpy."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from pipeline.errors import InputError
from pipeline.models import Preprocess

#: The bundled photo of a cat (CC0, from scikit-image; see data/LICENSE-cat.txt).
DEFAULT_IMAGE: pathlib.Path = pathlib.Path(__file__).resolve().parent.parent / "data" / "cat.png"


def load_image(path: str | os.PathLike[str], pre: Preprocess, input_shape: tuple[int, ...]) -> np.ndarray:
    """Reads an image file and turns it into one model input.

    The image is converted to RGB, its shorter side resized to ``pre.resize`` (bilinear), the centre
    ``H`` x ``W`` cut out (``H, W = input_shape[2:]``, normally ``pre.crop`` x ``pre.crop``), and each
    channel standardized as ``(x - mean) / std`` on the 0-255 scale.

    Args:
        path: The image file (any format PIL reads).
        pre: The model's preprocessing.
        input_shape: The model's NCHW input shape, ``(1, 3, H, W)``.

    Returns:
        A C-contiguous float32 array of shape ``input_shape``.

    Raises:
        InputError: The file is missing, unreadable, not an image or truncated, or ``input_shape`` is not
            one RGB image no larger than the resized picture; the message names the path.
    """
    from PIL import Image

    path = pathlib.Path(os.path.abspath(os.path.expanduser(path)))
    if len(input_shape) != 4 or input_shape[0] != 1 or input_shape[1] != 3:
        raise InputError(
            f"Cannot feed {path} to a model with input shape {input_shape}: only (1, 3, H, W) is supported."
        )
    height, width = int(input_shape[2]), int(input_shape[3])
    if not path.is_file():
        raise InputError(f"Image not found: {path}. Check the path (or leave it out to use {DEFAULT_IMAGE.name}).")
    try:
        with Image.open(path) as img:
            img.load()  # decodes now, so a truncated file fails here rather than later
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and truncation errors are OSErrors; some decoders raise SyntaxError.
        raise InputError(f"Cannot read {path} as an image ({type(e).__name__}: {e}). Give a PNG or JPEG file.") from e

    # Truncating the longer side and rounding the crop offsets as torchvision does, whose
    # Resize + CenterCrop the pretrained models were evaluated with.
    scale = pre.resize / min(rgb.width, rgb.height)
    size = (max(pre.resize, int(rgb.width * scale)), max(pre.resize, int(rgb.height * scale)))
    resized = rgb.resize(size, Image.BILINEAR)
    if height > resized.height or width > resized.width:
        raise InputError(
            f"Cannot cut {height}x{width} out of {path} resized to {resized.height}x{resized.width}: "
            f"the preprocessing's resize ({pre.resize}) is smaller than the model's input."
        )
    left = round((resized.width - width) / 2)
    top = round((resized.height - height) / 2)
    crop = resized.crop((left, top, left + width, top + height))

    pixels = np.asarray(crop, dtype=np.float32)  # HWC, 0-255
    pixels = (pixels - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)
