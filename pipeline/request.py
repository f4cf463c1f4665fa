"""What a run asks for, validated where the flow starts.

:class:`RunRequest` holds the flow's parameters as given (CLI or deployment); :func:`resolve` checks them
all, cheaply, before anything is compiled or any device is contacted, and returns typed specs. Every
problem with the request is a :class:`~pipeline.errors.UsageError` (exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.device import DeviceSpec
from pipeline.device_cache import DeviceCache
from pipeline.errors import UsageError
from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.models import ModelSpec, ResolvedModel, resolve_model
from pipeline.store import ArtifactStore
from pipeline.targets import TargetInfo, check_opt_level, parse_target
from pipeline.thresholds import Thresholds, thresholds_for

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_TARGET = "llvm"


@dataclass(frozen=True)
class RunRequest:
    """The parameters of one run, as the user gave them (see ``flows/resnet_remote.py --help``)."""

    model: str = DEFAULT_MODEL
    weights: str = "pretrained"
    seed: int = 0
    target: str = DEFAULT_TARGET
    opt_level: int = 3
    host: str | None = None
    port: int | None = None
    tracker: str | None = None
    key: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    call_timeout: float = 300.0
    device_retries: int = 1
    image: str | None = None
    number: int = 1
    repeat: int = 5
    artifacts: str | None = None
    refresh: bool = False
    check: bool = True
    max_abs_diff: float | None = None
    tune_trials: int = 0
    tune_on: str = "host"
    device_cache: str = "auto"


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request: the specs every stage works from."""

    model: ResolvedModel
    target: TargetInfo
    opt_level: int
    device: DeviceSpec
    image: Path
    input: np.ndarray
    store: ArtifactStore
    number: int
    repeat: int
    refresh: bool
    device_retries: int
    check: bool
    thresholds: Thresholds
    tune_trials: int
    tune_on: str
    device_cache: str | None
    """Directory on the device that keeps libraries between runs; None: upload every run."""


def resolve(request: RunRequest) -> ResolvedRequest:
    """Validate ``request`` and resolve its model, target, device, image and store.

    Raises:
        UsageError: (or a subclass) naming what is wrong and the valid choices.
    """
    if request.number < 1 or request.repeat < 1:
        raise UsageError(f"--number and --repeat must be at least 1 (got {request.number}, {request.repeat})")
    if not 0 <= request.device_retries <= 10:
        raise UsageError(f"--device-retries must be 0-10 (got {request.device_retries})")
    if not 0 <= request.tune_trials <= 100_000:
        raise UsageError(f"--tune-trials must be 0 (no tuning) to 100000 (got {request.tune_trials})")
    if request.tune_on not in ("host", "device"):
        raise UsageError(f"--tune-on must be host or device (got {request.tune_on!r})")
    opt_level = check_opt_level(request.opt_level)
    thresholds = thresholds_for("float32", request.max_abs_diff)
    device = DeviceSpec(
        host=request.host,
        port=request.port,
        tracker=request.tracker,
        key=request.key,
        connect_timeout=request.connect_timeout,
        request_timeout=request.request_timeout,
        call_timeout=request.call_timeout,
    )
    device.validate()
    store = ArtifactStore(request.artifacts)
    device_cache = _device_cache_dir(request.device_cache, device, store)
    model = resolve_model(ModelSpec(source=request.model, weights=request.weights, seed=request.seed))
    target = parse_target(request.target)
    image = Path(request.image).expanduser() if request.image else DEFAULT_IMAGE
    data = load_image(image, model.preprocess, model.input_shape)
    return ResolvedRequest(
        model=model,
        target=target,
        opt_level=opt_level,
        device=device,
        image=image,
        input=data,
        store=store,
        number=request.number,
        repeat=request.repeat,
        refresh=request.refresh,
        device_retries=request.device_retries,
        check=request.check,
        thresholds=thresholds,
        tune_trials=request.tune_trials,
        tune_on=request.tune_on,
        device_cache=device_cache,
    )


def _device_cache_dir(value: str, device: DeviceSpec, store: ArtifactStore) -> str | None:
    """``--device-cache``: off, auto (the embedded server: inside the store; another device: its /tmp) or a path."""
    if value == "off":
        return None
    if value == "auto":
        return str(store.root / ".device") if device.kind == "local" else "/tmp"
    return DeviceCache(value).directory  # validates
