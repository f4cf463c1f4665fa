"""The model specs and results shared by the backends (no framework imports)."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAMES: tuple[str, ...] = ("efficientnet_lite0", "resnet18_v2")

#: What ``ModelSpec.source`` accepts besides a name, as shown to users in error messages.
ACCEPTED_FILES = (
    "an ONNX file (*.onnx), a torch.export archive (*.pt2), or MXNet export files "
    "(PREFIX-symbol.json with PREFIX-0000.params beside it, given as PREFIX-symbol.json or PREFIX)"
)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for.

    Attributes:
        source: A name in ``MODEL_NAMES``, or a path to an ``*.onnx`` file, a ``*.pt2`` archive
            (``torch.export.save``), or MXNet export files given as ``PREFIX-symbol.json`` (with
            ``PREFIX-0000.params`` beside it) or as ``PREFIX``.
        weights: For ``resnet18_v2`` only: ``"pretrained"`` (MXNet model zoo), ``"random"``, or the
            path of a Gluon ``.params`` file written by ``net.save_parameters``.
        seed: Seed of the random weights (``weights="random"``).
    """

    source: str
    weights: str = "pretrained"
    seed: int = 0


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input.

    The shorter side is resized to ``resize`` (bilinear), the centre ``crop`` x ``crop`` is cut out,
    then every RGB channel is standardized as ``(x - mean) / std`` on the 0-255 scale.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"Preprocess needs 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"Preprocess needs 3 means and 3 non-zero stds, got {self.mean}, {self.std}")

    @classmethod
    def for_shape(cls, height: int, width: int) -> "Preprocess":
        """ImageNet preprocessing scaled to an input of ``height`` x ``width`` (224 -> resize 256, crop 224).

        For a non-square input, ``crop`` is the longer side and the image is cropped to
        ``height`` x ``width`` directly (see ``pipeline.image.load_image``).
        """
        size = max(height, width)
        return cls(resize=round(size * 256 / 224), crop=size)


@dataclass(frozen=True)
class ResolvedModel:
    """A located and fingerprinted model, cheap to compute and safe to pass between tasks.

    Attributes:
        spec: The spec this was resolved from.
        name: What the user sees: the model name, or the model file's name.
        kind: ``"efficientnet_lite0"``, ``"resnet18_v2"``, ``"onnx"``, ``"mxnet"`` or ``"torch"``.
        digest: 64-hex SHA-256 of the model content (never of a path): equal digests mean the same
            network with the same weights.
        files: Absolute paths of the files the digest covers (empty for random weights).
        input_name: Name of the single input, as the model's framework names it.
        input_shape: Static NCHW float32 input shape, batch 1, e.g. ``(1, 3, 224, 224)``.
        preprocess: How to turn an image into that input.
        labels: ``"imagenet1k"`` if the output has the 1000 ImageNet classes, else ``"index"``.
        notes: User-facing remarks (random weights, a dynamic batch fixed to 1, ...).
    """

    spec: ModelSpec
    name: str
    kind: str
    digest: str
    files: tuple[str, ...]
    input_name: str
    input_shape: tuple[int, ...]
    preprocess: Preprocess
    labels: str
    notes: tuple[str, ...] = ()
