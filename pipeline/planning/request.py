"""What a run asks for, validated where the flow starts.

:class:`RunRequest` is the one place where the run's parameters and their defaults are declared: the
``resnet_remote`` flow takes it as its parameter (Prefect validates a deployment's dict into it), and the
command line is generated from its fields (each field's ``metadata`` holds its flag and help; see
:func:`flows._cli.add_request_arguments`). :func:`resolve` checks it all, cheaply, before anything is
compiled or any device is contacted, and returns typed specs. Every problem with the request is a
:class:`~pipeline.errors.UsageError` (exit code 2).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.device import DeviceSpec
from pipeline.device.cache import check_directory
from pipeline.errors import REGRESSION_EXIT_CODE, UsageError, clip
from pipeline.image import DEFAULT_IMAGE, load_image
from pipeline.latency import MAX_THREADS, Timing
from pipeline.models import MODEL_NAMES, ModelSpec, ResolvedModel, resolve_model
from pipeline.store import ENV_VAR, ArtifactStore
from pipeline.targets import TargetInfo, check_opt_level, parse_target
from pipeline.thresholds import Thresholds, thresholds_for

if typing.TYPE_CHECKING:
    from pipeline.tuning.shared import SharedTuning

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_TARGET = "llvm"
LOCAL_RUNNER = "local"
#: What an untuned CPU build applies: ``rules`` (one schedule per kernel from MetaSchedule's rules, no search;
#: :mod:`pipeline.tuning.rules`) or ``none`` (TVM's default pipeline, no schedules).
SCHEDULES = ("rules", "none")
DEFAULT_SCHEDULES = "rules"
#: ``--shared-tunings``: apply the records of the store's other tunings for the target (:mod:`pipeline.tuning.shared`).
SHARED_TUNINGS = ("on", "off")
MAX_TRIALS = 100_000
MAX_DEVICE_NAME = 100

#: Where a field may be given besides the command line of ``flows.resnet_remote``: the fleet file's top level
#: (shared by every pair), one of its devices, one of its models; the accuracy tool's command line.
FLEET_TOP, FLEET_DEVICE, FLEET_MODEL, ACCURACY = "fleet", "fleet-device", "fleet-model", "accuracy"


@dataclass(frozen=True)
class Rule:
    """What values a field takes, beyond its type: a range, a set of choices, or a positive finite number."""

    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    positive: bool = False
    unit: str | None = None
    """What a positive number counts (``seconds``), for messages."""

    def problem(self, value: Any, kind: type) -> str | None:
        """Why ``value`` breaks the rule (``"must be ..."``), or None."""
        if value is None:
            return None
        positive = f"must be a number of {self.unit}, more than 0" if self.unit else "must be a positive number"
        if kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be a whole number{self._range()}"
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return positive if self.positive else "must be a number"
        elif kind is str and not isinstance(value, str):
            return "must be text"
        if self.choices is not None and value not in self.choices:
            return f"must be {' or '.join(str(c) for c in self.choices)}"
        if self.positive and not value > 0:
            return positive
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"must be a whole number{self._range()}" if kind is int else f"must be a number{self._range()}"
        return None

    def _range(self) -> str:
        def text(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.low is not None and self.high is not None:
            return f" from {text(self.low)} to {text(self.high)}"
        return f" of at least {text(self.low)}" if self.low is not None else ""


def arg(group: str, help: str, flag: str | None = None, *, rule: Rule | None = None,
        where: tuple[str, ...] = (), **argparse: Any) -> dict[str, Any]:
    """A field's metadata: its command-line option (group, help, flag (default ``--field-name``), argparse
    extras), the :class:`Rule` its values follow, and where else it may be given (:data:`FLEET_TOP`...)."""
    return {"cli": {"group": group, "help": help, "flag": flag, **argparse}, "rule": rule or Rule(), "where": where}


@dataclass(frozen=True)
class RunRequest:
    """The parameters of one run, as the user gave them (``python -m flows.resnet_remote --help``).

    Each field's metadata (:func:`arg`) is its whole schema: the command line, the flow's parameters, the fleet
    file's keys and the accuracy tool's options are derived from it, and :func:`check_request` validates it.
    """

    model: str = field(default=DEFAULT_MODEL, metadata=arg(
        "model", f"one of {', '.join(MODEL_NAMES)}, or a path to an .onnx file, a torch.export .pt2 file, or MXNet "
        "export files (PREFIX-symbol.json with PREFIX-0000.params)", where=(FLEET_MODEL, ACCURACY)))
    weights: str = field(default="pretrained", metadata=arg(
        "model", "resnet18_v2 only: pretrained (MXNet model store; downloads when online), random (seeded; the "
        "labels then mean nothing), or a path to a Gluon .params file", where=(FLEET_MODEL, ACCURACY)))
    seed: int = field(default=0, metadata=arg(
        "model", "seed for --weights random", rule=Rule(0, 2**32 - 1), where=(FLEET_MODEL, ACCURACY)))
    target: str = field(default=DEFAULT_TARGET, metadata=arg(
        "build", 'TVM target: "llvm", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", "llvm -target=x86_64-pc-'
        'linux-gnu", or JSON \'{"kind": "llvm", "mcpu": "znver4"}\'; -mcpu=native means this host\'s CPU',
        where=(FLEET_DEVICE, ACCURACY)))
    opt_level: int = field(default=3, metadata=arg(
        "build", "TVM PassContext opt_level", rule=Rule(0, 3), where=(FLEET_TOP, ACCURACY), choices=range(4),
        metavar="{0,1,2,3}"))
    tune_trials: int = field(default=0, metadata=arg(
        "build", "MetaSchedule tuning budget (trials); 0 = no tuning. Tuned once per (model, target, budget) and "
        "cached like the build", rule=Rule(0, MAX_TRIALS), where=(FLEET_TOP, ACCURACY)))
    tune_more: int = field(default=0, metadata=arg(
        "build", "MetaSchedule trials to add to the largest tuning of this model and target already in the store "
        "(it is continued; with none, tune this many). The total is resolved before compiling, so the build "
        "names it. Not with --tune-trials", rule=Rule(0, MAX_TRIALS), where=(FLEET_TOP, ACCURACY), metavar="N"))
    schedules: str = field(default=DEFAULT_SCHEDULES, metadata=arg(
        "build", "what an untuned CPU build applies: rules (default): one schedule per kernel from MetaSchedule's "
        "rules, no search (ResNet-18 ~5x, EfficientNet-Lite0 ~2.4x faster than none, for ~25-35 s more build "
        "time, once); none: TVM's default pipeline, no schedules. Tuned and GPU builds ignore it",
        rule=Rule(choices=SCHEDULES), where=(FLEET_TOP, ACCURACY), choices=SCHEDULES))
    shared_tunings: str = field(default="on", metadata=arg(
        "build", "on (default): a CPU build that applies MetaSchedule's schedules (tuned, or the rules) also applies, "
        "to every kernel its own tuning does not cover, the best record any tuning in the store measured for the "
        "same kernel shape, target, cores and schedule space, whichever model it tuned; the build key names those "
        "tunings, and the run says how many kernels came from which (docs/performance.md#shared-tuning-records). "
        "off: only the build's own schedules", rule=Rule(choices=SHARED_TUNINGS), where=(FLEET_TOP, ACCURACY),
        choices=SHARED_TUNINGS))
    tune_on: str = field(default="host", metadata=arg(
        "build", "measure tuning candidates on this host, or on the --tracker/--key device",
        rule=Rule(choices=("host", "device")), where=(ACCURACY,), choices=("host", "device")))
    build_only: bool = field(default=False, metadata=arg(
        "build", "compile and export for the target without any device (CI, GPU targets from a laptop); prints "
        "the library and its key", action="store_true"))
    artifacts: str | None = field(default=None, metadata=arg(
        "build", f"the artifact store: a directory, or s3://BUCKET/PREFIX on S3-compatible object storage (endpoint "
        f"and credentials as for the AWS tools: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., docs/caching.md) "
        f"(default: ${ENV_VAR} or artifacts/ at the repository root)",
        where=(FLEET_TOP, ACCURACY), metavar="DIR|s3://BUCKET/PREFIX"))
    refresh: bool = field(default=False, metadata=arg(
        "build", "rebuild import-model, build, export-library and the reference (not the tuning)",
        where=(ACCURACY,), action="store_true"))
    host: str | None = field(default=None, metadata=arg(
        "device", "a running TVM RPC server (python -m tvm.exec.rpc_server)", where=(FLEET_DEVICE, ACCURACY)))
    port: int | None = field(default=None, metadata=arg(
        "device", "its port (with --host)", rule=Rule(1, 65535), where=(FLEET_DEVICE, ACCURACY)))
    tracker: str | None = field(default=None, metadata=arg(
        "device", "a TVM RPC tracker to request a device from", where=(FLEET_TOP, FLEET_DEVICE, ACCURACY),
        metavar="HOST:PORT"))
    key: str | None = field(default=None, metadata=arg(
        "device", "the device key to request from the tracker", where=(FLEET_DEVICE, ACCURACY)))
    connect_timeout: float = field(default=10.0, metadata=arg(
        "device", "seconds to open a session", rule=Rule(positive=True, unit="seconds"), where=(FLEET_TOP, FLEET_DEVICE, ACCURACY)))
    request_timeout: float = field(default=30.0, metadata=arg(
        "device", "seconds to wait for the tracker to hand out a device", rule=Rule(positive=True, unit="seconds"),
        where=(FLEET_TOP, FLEET_DEVICE, ACCURACY)))
    call_timeout: float = field(default=300.0, metadata=arg(
        "device", "seconds any one remote call (upload, load, run...) may take; the device ends a session that "
        "lasts longer than this plus 60 s, so a vanished client never holds it", rule=Rule(positive=True, unit="seconds"),
        where=(FLEET_TOP, FLEET_DEVICE, ACCURACY)))
    device_cache: str = field(default="auto", metadata=arg(
        "device", "directory on the device that keeps uploaded libraries between runs, so an unchanged library is "
        "not sent again; it must exist there and only the device's rpc_server user should be able to write it. "
        "auto: inside the artifact store for the embedded server; for another device, the directory it reports "
        "keeping libraries in (a device bundle's, the stack's device), else off; off: upload every run",
        where=(ACCURACY,), metavar="DIR|auto|off"))
    allow_version_skew: bool = field(default=False, metadata=arg(
        "device", "use a device whose TVM is another minor version than this machine's (refused by default; "
        "another patch version only warns)", where=(FLEET_TOP, ACCURACY), action="store_true"))
    device_name: str | None = field(default=None, metadata=arg(
        "device", "the device's name in the run history, where runs are judged against the earlier runs of the "
        "same model on the same device name, target and input (default: its address: embedded, HOST:PORT or "
        "tracker HOST:PORT key=KEY; a fleet uses each device's name)", metavar="NAME"))
    device_retries: int = field(default=1, metadata=arg(
        "device", "fresh sessions to try when the device is lost mid-run; the embedded device is restarted",
        rule=Rule(0, 10), where=(FLEET_TOP, ACCURACY)))
    image: str | None = field(default=None, metadata=arg(
        "input and output", "image to classify (default: the cat photo in data/cat.png)",
        where=(FLEET_TOP, FLEET_MODEL)))
    number: int = field(default=1, metadata=arg(
        "input and output", "time_evaluator: inferences per latency sample", rule=Rule(1, 10**9),
        where=(FLEET_TOP,)))
    repeat: int | None = field(default=None, metadata=arg(
        "input and output", "latency samples (default: adaptive, at least 30 samples and 1 s of measuring after a "
        "warm-up, at most 60 s)", rule=Rule(1, 1_000_000), where=(FLEET_TOP,)))
    threads: int | None = field(default=None, metadata=arg(
        "input and output", "threads of the device's TVM thread pool, set over RPC before timing (default: as the "
        "device starts it: TVM_NUM_THREADS, one per physical core on the devices this project starts); 1 gives the steadiest numbers "
        "on a busy host (docs/performance.md#stable-numbers)", rule=Rule(1, MAX_THREADS),
        where=(FLEET_TOP, FLEET_DEVICE), metavar="N"))
    profile: bool = field(default=False, metadata=arg(
        "input and output", "after the latency samples, time every kernel call of an inference on the device and "
        "report the kernels that take the time, with their share and GFLOP/s, and the glue between them (devices "
        "started from the bundle, the embedded and the emulated device; docs/performance.md#where-the-time-goes-"
        "--profile)", where=(FLEET_TOP,), action="store_true"))
    fail_on_regression: bool = field(default=False, metadata=arg(
        "input and output", f"exit with code {REGRESSION_EXIT_CODE} when the run is judged a latency regression "
        "against the earlier runs of its lineage (a CI gate; docs/history.md)", where=(FLEET_TOP,),
        action="store_true"))
    check: bool = field(default=True, metadata=arg(
        "check", "skip the reference output and the check", flag="--no-check", where=(FLEET_TOP,),
        action="store_false"))
    max_abs_diff: float | None = field(default=None, metadata=arg(
        "check", "largest allowed |TVM - reference| (default for float32: 1e-4; top-5 must match)",
        rule=Rule(positive=True), where=(FLEET_TOP, ACCURACY)))


def request_fields(where: str | None = None) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of :class:`RunRequest` (those that may be given ``where``, e.g. :data:`FLEET_TOP`)."""
    return tuple(f for f in dataclasses.fields(RunRequest) if where is None or where in f.metadata["where"])


def field_kind(f: dataclasses.Field[Any]) -> type:
    """The value type of a field: ``int | None`` -> int."""
    hint = typing.get_type_hints(RunRequest)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def flag_of(f: dataclasses.Field[Any]) -> str:
    """A field's command-line flag, e.g. ``--opt-level``."""
    return f.metadata["cli"]["flag"] or "--" + f.name.replace("_", "-")


def check_request(request: RunRequest) -> None:
    """Every field of ``request`` against its :class:`Rule` (and the rules that tie fields together).

    Raises:
        UsageError: naming the flag, the problem and the value.
    """
    for f in dataclasses.fields(RunRequest):
        value = getattr(request, f.name)
        problem = f.metadata["rule"].problem(value, field_kind(f))
        if problem is not None:
            raise UsageError(f"{flag_of(f)} {problem} (got {clip(repr(value), 80)})")
    if request.tune_trials and request.tune_more:
        raise UsageError("give --tune-trials (a total) or --tune-more (trials added to the largest tuning), not both")
    name = request.device_name
    if name is not None and (not name.strip() or len(name) > MAX_DEVICE_NAME
                             or not all(ch.isprintable() for ch in name)):
        raise UsageError(f"--device-name must be 1 to {MAX_DEVICE_NAME} printable characters "
                         f"(got {clip(repr(name), 80)})")


@dataclass(frozen=True)
class DevicePolicy:
    """How the device chain treats a device: where it keeps libraries, how often a lost device is retried, and
    whether another minor TVM version is accepted.

    Attributes:
        device_cache: the directory on the device that keeps libraries between runs; None: upload every run,
            unless ``device_says``.
        retries: fresh sessions to try after the device was lost mid-run.
        allow_version_skew: use a device that runs another minor TVM version (a warning instead of a refusal).
        device_says: with no ``device_cache``, keep libraries in the directory the device reports it keeps them
            in (``tvmrp.device_info``'s ``library_cache``: a device bundle, the stack's device), if it reports
            one (``--device-cache auto`` for a device other than the embedded one).
    """

    device_cache: str | None = None
    retries: int = 1
    allow_version_skew: bool = False
    device_says: bool = False


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request: the specs every stage works from."""

    model: ResolvedModel
    target: TargetInfo
    opt_level: int
    schedules: str
    """What an untuned CPU build applies: ``rules`` (MetaSchedule's rules, no search) or ``none``."""
    tune_trials: int
    """The tuning's total budget (``--tune-more`` resolved against the store); 0: no tuning."""
    tune_runner: str
    """Where tuning measures: ``local`` or ``TRACKER_HOST:PORT/KEY`` (the run's device, ``--tune-on device``)."""
    device: DeviceSpec
    policy: DevicePolicy
    image: Path
    input: np.ndarray
    timing: Timing
    check: bool
    thresholds: Thresholds
    store: ArtifactStore
    refresh: bool = False
    build_only: bool = False
    """Compile and export only: no device, no reference, no check."""
    device_name: str | None = None
    """The device's name in the run history (None: its address, ``pipeline.results.device_name``)."""
    fail_on_regression: bool = False
    """A run judged a regression fails with :class:`pipeline.errors.RegressionFound` (the CI gate)."""
    shared_tunings: str = "on"
    """``--shared-tunings`` as given."""
    shared: tuple[SharedTuning, ...] = ()
    """With ``shared_tunings`` on, the store's tunings for the target, one per model
    (:func:`pipeline.tuning.shared.shared_tunings`); the plan picks those the build shares."""
    profile: bool = False
    """Time every kernel call of an inference after the latency samples (:mod:`pipeline.profiling`)."""


@dataclass
class Resolutions:
    """What resolving requests found, kept so that many requests over the same models, images and store (a
    fleet's pairs) resolve each once."""

    models: dict[ModelSpec, ResolvedModel] = field(default_factory=dict)
    inputs: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict)
    stores: dict[str | None, ArtifactStore] = field(default_factory=dict)
    tunings: dict[tuple[ArtifactStore, str], tuple[SharedTuning, ...]] = field(default_factory=dict)

    def model(self, spec: ModelSpec) -> ResolvedModel:
        if spec not in self.models:
            self.models[spec] = resolve_model(spec)
        return self.models[spec]

    def input(self, image: Path, model: ResolvedModel) -> np.ndarray:
        key = (str(image), model.preprocess, tuple(model.input_shape))
        if key not in self.inputs:
            self.inputs[key] = load_image(image, model.preprocess, model.input_shape)
        return self.inputs[key]

    def shared_tunings(self, store: ArtifactStore, target: TargetInfo) -> tuple[SharedTuning, ...]:
        key = (store, target.canonical)
        if key not in self.tunings:
            from pipeline.tuning.shared import shared_tunings

            self.tunings[key] = shared_tunings(store, target)
        return self.tunings[key]

    def store(self, artifacts: str | None) -> ArtifactStore:
        if artifacts not in self.stores:
            store = ArtifactStore(artifacts)
            store.check_root()
            self.stores[artifacts] = store
        return self.stores[artifacts]


def _tune_runner(tune_on: str, device: DeviceSpec) -> str:
    if tune_on != "device":
        return LOCAL_RUNNER
    if device.kind != "tracker":
        raise UsageError("--tune-on device measures through a TVM tracker: give --tracker HOST:PORT --key KEY")
    return f"{device.tracker}/{device.key}"


def resolve(request: RunRequest, found: Resolutions | None = None) -> ResolvedRequest:
    """Validate ``request`` and resolve its model, target, device, image and store.

    Cheap: models are located and digested, the target parsed, the image read; nothing is compiled and no device
    is contacted.

    Args:
        found: what earlier resolutions found (models, inputs, stores), shared by the pairs of a fleet.

    Raises:
        UsageError: (or a subclass) naming what is wrong and the valid choices.
    """
    found = found if found is not None else Resolutions()
    check_request(request)
    opt_level = check_opt_level(request.opt_level)
    thresholds = thresholds_for("float32", request.max_abs_diff)
    device = DeviceSpec(
        host=request.host, port=request.port, tracker=request.tracker, key=request.key,
        connect_timeout=request.connect_timeout, request_timeout=request.request_timeout,
        call_timeout=request.call_timeout,
    )
    device.validate()
    store = found.store(request.artifacts)
    device_cache = _device_cache_dir(request.device_cache, device, store)
    tune_runner = _tune_runner(request.tune_on, device)
    model = found.model(ModelSpec(source=request.model, weights=request.weights, seed=request.seed))
    target = parse_target(request.target)
    from pipeline.tuning import resolve_trials

    tune_trials = resolve_trials(store, model.digest, target, request.tune_trials, request.tune_more)
    if target.device == "cuda" and tune_trials and request.tune_on != "device":
        raise UsageError("tuning a CUDA build measures on the GPU: add --tune-on device with --tracker/--key of a "
                         "GPU device, or leave --tune-trials out (the default build applies TVM's GPU schedules)")
    shared = ()
    if request.shared_tunings == "on" and target.device == "cpu" and (tune_trials or request.schedules == "rules"):
        shared = found.shared_tunings(store, target)
    image = Path(request.image).expanduser() if request.image else DEFAULT_IMAGE
    return ResolvedRequest(
        model=model, target=target, opt_level=opt_level, schedules=request.schedules, tune_trials=tune_trials,
        tune_runner=tune_runner, device=device,
        policy=DevicePolicy(device_cache, request.device_retries, request.allow_version_skew,
                            device_says=request.device_cache == "auto" and device.kind != "local"),
        image=image, input=found.input(image, model),
        timing=Timing(number=request.number, repeat=request.repeat, threads=request.threads),
        check=request.check, thresholds=thresholds, store=store, refresh=request.refresh,
        build_only=request.build_only, device_name=request.device_name.strip() if request.device_name else None,
        fail_on_regression=request.fail_on_regression, shared_tunings=request.shared_tunings, shared=shared,
        profile=request.profile,
    )


def _device_cache_dir(value: str, device: DeviceSpec, store: ArtifactStore) -> str | None:
    """``--device-cache``: off, auto (the embedded server: inside the store; another device: None here, and the
    directory the device reports, if any: :attr:`DevicePolicy.device_says`) or a path."""
    if value == "off":
        return None
    if value == "auto":
        return str(store.layout.device_cache) if device.kind == "local" else None
    return check_directory(value)


_RESOLVED: contextvars.ContextVar[tuple[RunRequest, ResolvedRequest] | None] = contextvars.ContextVar(
    "tvmrp_resolved", default=None)


@contextlib.contextmanager
def resolved_in_advance(request: RunRequest) -> Iterator[ResolvedRequest]:
    """Resolve ``request`` now (a command line fails fast, before Prefect starts) and let the flow it runs next
    use that resolution (:func:`resolve_once`) instead of resolving it a second time."""
    resolved = resolve(request)
    token = _RESOLVED.set((request, resolved))
    try:
        yield resolved
    finally:
        _RESOLVED.reset(token)


def resolve_once(request: RunRequest) -> ResolvedRequest:
    """The resolution of ``request`` made in advance by :func:`resolved_in_advance`, else :func:`resolve`."""
    ahead = _RESOLVED.get()
    if ahead is not None and ahead[0] == request:
        return ahead[1]
    return resolve(request)
