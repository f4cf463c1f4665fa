"""What a run asks for, validated where the flow starts.

:class:`RunRequest` is the one place where the run's parameters and their defaults are declared: the
``resnet_remote`` flow takes it as its parameter (Prefect validates a deployment's dict into it), and the
command line is generated from its fields (each field's ``metadata`` holds its flag and help; see
:func:`flows._cli.add_request_arguments`). :func:`resolve` checks it all, cheaply, before anything is
compiled or any device is contacted, and returns typed specs. Every problem with the request is a
:class:`~pipeline.errors.UsageError` (exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.device import DeviceSpec
from pipeline.device.cache import check_directory
from pipeline.errors import UsageError
from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.latency import Timing
from pipeline.models import MODEL_NAMES, ModelSpec, ResolvedModel, resolve_model
from pipeline.store import ENV_VAR, ArtifactStore
from pipeline.targets import TargetInfo, check_opt_level, parse_target
from pipeline.thresholds import Thresholds, thresholds_for

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_TARGET = "llvm"
LOCAL_RUNNER = "local"
#: What an untuned CPU build applies: ``rules`` (one schedule per kernel from MetaSchedule's rules, no search;
#: :mod:`pipeline.tuning.rules`) or ``none`` (TVM's default pipeline, no schedules).
SCHEDULES = ("rules", "none")
DEFAULT_SCHEDULES = "rules"


def arg(group: str, help: str, flag: str | None = None, **argparse: Any) -> dict[str, Any]:
    """A field's command-line option: its group, help, flag (default ``--field-name``) and argparse extras."""
    return {"cli": {"group": group, "help": help, "flag": flag, **argparse}}


@dataclass(frozen=True)
class RunRequest:
    """The parameters of one run, as the user gave them (``python -m flows.resnet_remote --help``)."""

    model: str = field(default=DEFAULT_MODEL, metadata=arg(
        "model", f"one of {', '.join(MODEL_NAMES)}, or a path to an .onnx file, a torch.export .pt2 file, or MXNet "
        "export files (PREFIX-symbol.json with PREFIX-0000.params)"))
    weights: str = field(default="pretrained", metadata=arg(
        "model", "resnet18_v2 only: pretrained (MXNet model store; downloads when online), random (seeded; the "
        "labels then mean nothing), or a path to a Gluon .params file"))
    seed: int = field(default=0, metadata=arg("model", "seed for --weights random"))
    target: str = field(default=DEFAULT_TARGET, metadata=arg(
        "build", 'TVM target: "llvm", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", "llvm -target=x86_64-pc-'
        'linux-gnu", or JSON \'{"kind": "llvm", "mcpu": "znver4"}\'; -mcpu=native means this host\'s CPU'))
    opt_level: int = field(default=3, metadata=arg(
        "build", "TVM PassContext opt_level", choices=range(4), metavar="{0,1,2,3}"))
    tune_trials: int = field(default=0, metadata=arg(
        "build", "MetaSchedule tuning budget (trials); 0 = no tuning. Tuned once per (model, target, budget) and "
        "cached like the build"))
    tune_more: int = field(default=0, metadata=arg(
        "build", "MetaSchedule trials to add to the largest tuning of this model and target already in the store "
        "(it is continued; with none, tune this many). The total is resolved before compiling, so the build "
        "names it. Not with --tune-trials", metavar="N"))
    schedules: str = field(default=DEFAULT_SCHEDULES, metadata=arg(
        "build", "what an untuned CPU build applies: rules (default): one schedule per kernel from MetaSchedule's "
        "rules, no search (ResNet-18 ~5x, EfficientNet-Lite0 ~2.4x faster than none, for ~25-35 s more build "
        "time, once); none: TVM's default pipeline, no schedules. Tuned and GPU builds ignore it", choices=SCHEDULES))
    tune_on: str = field(default="host", metadata=arg(
        "build", "measure tuning candidates on this host, or on the --tracker/--key device", choices=("host", "device")))
    build_only: bool = field(default=False, metadata=arg(
        "build", "compile and export for the target without any device (CI, GPU targets from a laptop); prints "
        "the library and its key", action="store_true"))
    artifacts: str | None = field(default=None, metadata=arg(
        "build", f"artifact store directory (default: ${ENV_VAR} or artifacts/ at the repository root)"))
    refresh: bool = field(default=False, metadata=arg(
        "build", "rebuild import-model, build, export-library and the reference (not the tuning)", action="store_true"))
    host: str | None = field(default=None, metadata=arg("device", "a running TVM RPC server (python -m tvm.exec.rpc_server)"))
    port: int | None = field(default=None, metadata=arg("device", "its port (with --host)"))
    tracker: str | None = field(default=None, metadata=arg(
        "device", "a TVM RPC tracker to request a device from", metavar="HOST:PORT"))
    key: str | None = field(default=None, metadata=arg("device", "the device key to request from the tracker"))
    connect_timeout: float = field(default=10.0, metadata=arg("device", "seconds to open a session"))
    request_timeout: float = field(default=30.0, metadata=arg(
        "device", "seconds to wait for the tracker to hand out a device"))
    call_timeout: float = field(default=300.0, metadata=arg(
        "device", "seconds any one remote call (upload, load, run...) may take; the device ends a session that "
        "lasts longer than this plus 60 s, so a vanished client never holds it"))
    device_cache: str = field(default="auto", metadata=arg(
        "device", "directory on the device that keeps uploaded libraries between runs, so an unchanged library is "
        "not sent again; it must exist there and only the device's rpc_server user should be able to write it. "
        "auto: inside the artifact store for the embedded server, off for other devices; off: upload every run",
        metavar="DIR|auto|off"))
    allow_version_skew: bool = field(default=False, metadata=arg(
        "device", "use a device whose TVM is another minor version than this machine's (refused by default; "
        "another patch version only warns)", action="store_true"))
    device_retries: int = field(default=1, metadata=arg(
        "device", "fresh sessions to try when the device is lost mid-run; the embedded device is restarted"))
    image: str | None = field(default=None, metadata=arg(
        "input and output", "image to classify (default: the cat photo in data/cat.png)"))
    number: int = field(default=1, metadata=arg("input and output", "time_evaluator: inferences per latency sample"))
    repeat: int | None = field(default=None, metadata=arg(
        "input and output", "latency samples (default: adaptive, at least 30 samples and 1 s of measuring after a "
        "warm-up, at most 60 s)"))
    check: bool = field(default=True, metadata=arg(
        "check", "skip the reference output and the check", flag="--no-check", action="store_false"))
    max_abs_diff: float | None = field(default=None, metadata=arg(
        "check", "largest allowed |TVM - reference| (default for float32: 1e-4; top-5 must match)"))


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
    timing: Timing
    refresh: bool
    device_retries: int
    allow_version_skew: bool
    check: bool
    thresholds: Thresholds
    tune_trials: int
    build_only: bool
    """Compile and export only: no device, no reference, no check."""
    tune_runner: str
    """Where tuning measures: ``local`` or ``TRACKER_HOST:PORT/KEY`` (the run's device, ``--tune-on device``)."""
    device_cache: str | None
    """Directory on the device that keeps libraries between runs; None: upload every run."""
    schedules: str = DEFAULT_SCHEDULES
    """What an untuned CPU build applies: ``rules`` (MetaSchedule's rules, no search) or ``none``."""


def _check_numbers(request: RunRequest) -> None:
    if request.number < 1 or (request.repeat is not None and request.repeat < 1):
        raise UsageError(f"--number and --repeat must be at least 1 (got {request.number}, {request.repeat})")
    if not 0 <= request.device_retries <= 10:
        raise UsageError(f"--device-retries must be 0-10 (got {request.device_retries})")
    if not 0 <= request.tune_trials <= 100_000:
        raise UsageError(f"--tune-trials must be 0 (no tuning) to 100000 (got {request.tune_trials})")
    if not 0 <= request.tune_more <= 100_000:
        raise UsageError(f"--tune-more must be 0 to 100000 (got {request.tune_more})")
    if request.schedules not in SCHEDULES:
        raise UsageError(f"--schedules must be rules or none (got {request.schedules!r})")
    if request.tune_on not in ("host", "device"):
        raise UsageError(f"--tune-on must be host or device (got {request.tune_on!r})")


def _tune_runner(tune_on: str, device: DeviceSpec) -> str:
    if tune_on != "device":
        return LOCAL_RUNNER
    if device.kind != "tracker":
        raise UsageError("--tune-on device measures through a TVM tracker: give --tracker HOST:PORT --key KEY")
    return f"{device.tracker}/{device.key}"


def resolve(request: RunRequest) -> ResolvedRequest:
    """Validate ``request`` and resolve its model, target, device, image and store.

    Raises:
        UsageError: (or a subclass) naming what is wrong and the valid choices.
    """
    _check_numbers(request)
    opt_level = check_opt_level(request.opt_level)
    thresholds = thresholds_for("float32", request.max_abs_diff)
    device = DeviceSpec(
        host=request.host, port=request.port, tracker=request.tracker, key=request.key,
        connect_timeout=request.connect_timeout, request_timeout=request.request_timeout,
        call_timeout=request.call_timeout,
    )
    device.validate()
    store = ArtifactStore(request.artifacts)
    store.check_root()
    device_cache = _device_cache_dir(request.device_cache, device, store)
    tune_runner = _tune_runner(request.tune_on, device)
    model = resolve_model(ModelSpec(source=request.model, weights=request.weights, seed=request.seed))
    target = parse_target(request.target)
    from pipeline.tuning import resolve_trials

    tune_trials = resolve_trials(store.root, model.digest, target, request.tune_trials, request.tune_more)
    if target.device == "cuda" and tune_trials and request.tune_on != "device":
        raise UsageError("tuning a CUDA build measures on the GPU: add --tune-on device with --tracker/--key of a "
                         "GPU device, or leave --tune-trials out (the default build applies TVM's GPU schedules)")
    image = Path(request.image).expanduser() if request.image else DEFAULT_IMAGE
    data = load_image(image, model.preprocess, model.input_shape)
    return ResolvedRequest(
        model=model, target=target, opt_level=opt_level, device=device, image=image, input=data, store=store,
        timing=Timing(number=request.number, repeat=request.repeat), refresh=request.refresh,
        device_retries=request.device_retries, allow_version_skew=request.allow_version_skew, check=request.check,
        thresholds=thresholds,
        tune_trials=tune_trials, build_only=request.build_only, tune_runner=tune_runner,
        device_cache=device_cache, schedules=request.schedules,
    )


def _device_cache_dir(value: str, device: DeviceSpec, store: ArtifactStore) -> str | None:
    """``--device-cache``: off, auto (the embedded server: inside the store; another device: off) or a path."""
    if value == "off":
        return None
    if value == "auto":
        return str(store.root / ".device") if device.kind == "local" else None
    return check_directory(value)
