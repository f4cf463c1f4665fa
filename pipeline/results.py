"""What runs produce, as one family of typed values.

    BuildSummary        a compile chain's outcome (a --build-only run is one)
    DeviceOutcome       what one model did on one device: output, top-5, latency (with its samples and the
                        conditions it was measured under), upload, check, the device's facts (load, first
                        inference, peak memory) and, with --profile, where an inference's time goes (Profile)
    RunSummary          a run: its BuildSummary + its DeviceOutcome (+ the verdict against earlier runs)
    PairResult          one (device, model) pair of a fleet: its RunSummary, or why it has none
    FleetSummary        a fleet run: every PairResult and the builds' counts
    AccuracySummary     an accuracy run over a labelled set

The run ledger's record (:class:`pipeline.store.ledger.RunRecord`) is derived from a RunSummary; every rendering
(terminal text, markdown, Prefect tables) is in :mod:`pipeline.views`, from these values. ``as_json`` gives each
value's ``--json`` object: those keys are an interface that users' tools read (see the README).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.latency import Latency, Verdict
    from pipeline.thresholds import Thresholds

STAGES = (
    "import-model", "tune", "build", "export-library", "reference", "upload", "load", "set-input", "run", "check",
    "postprocess",
)
"""Every stage of a run, in order (``skipped`` where a run does not have it)."""
COMPILE_STAGES = STAGES[:4]


def utc_now(timespec: str = "seconds") -> str:
    """The current UTC time in ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


# -- a run's identity in the history: its device's name, its series and its lineage ---------------------------------


def device_name(description: str) -> str:
    """A device's name without what changes between runs (an embedded server's port)."""
    return "embedded" if description.startswith("embedded") else description


def series_of(build_key: str, device: str, device_identity: str, input_shape: Iterable[int]) -> str:
    """The series id (16 hex) of the runs of one build on one device."""
    ident = json.dumps([build_key, device_name(device), device_identity, list(input_shape)])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def lineage_of(model: str, device: str, target: str, input_shape: Iterable[int]) -> str:
    """The lineage id (16 hex) of the runs of ``model`` on the device named ``device`` (:func:`device_name` of
    its address, or its given name), for ``target``, on an input of ``input_shape``: whatever build they used."""
    ident = json.dumps(["lineage", model, device_name(device), target, list(input_shape)])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunStamp:
    """A run's id and start time, taken once when the run starts: its ledger record's name and order.

    The id sorts by time: ``20261128T101500Z-3f2a9c`` (UTC to the second, then 24 random bits).
    """

    id: str
    started: str

    @classmethod
    def new(cls, now: dt.datetime | None = None) -> RunStamp:
        now = now or dt.datetime.now(dt.timezone.utc)
        return cls(f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}", now.isoformat(timespec="seconds"))


# -- what stages produce ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Top:
    """One of the top-k classes of an output."""

    index: int
    label: str
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.index, "label": self.label, "prob": self.prob}


@dataclass(frozen=True)
class Upload:
    """How the library reached the device: where it is there, its size, the seconds it took, whether it was sent."""

    remote_name: str
    bytes: int
    seconds: float
    reused: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes, "seconds": self.seconds, "reused": self.reused,
            "mb_per_s": None if self.reused else self.bytes / 1e6 / max(self.seconds, 1e-9),
            "remote_name": self.remote_name,
        }


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class CheckResult:
    """How far the compiled output is from the reference, and whether that is within the thresholds
    (``tasks.check.check``).

    Attributes:
        max_abs_diff: ``max |output - reference|``.
        max_rel_diff: ``max |output - reference| / |reference|``, with ``|reference|`` floored at
            1e-3 x its largest value so that values near zero do not dominate.
        cosine: cosine similarity of the flattened outputs (1.0 = same direction).
        psnr_db: peak signal-to-noise ratio in dB, the peak being the reference's range; inf if identical.
        top1_match: the top-1 class is the reference's (in every row; ties aside).
        top5_match: the top-5 classes are the reference's, in the same order (in every row; ties aside).
        passed: every threshold holds.
        reason: what broke, with figures; or what held.
        thresholds: what was checked.
        output_top5: the compiled output's top-5 class indices (first row).
        reference_top5: the reference's top-5 class indices (first row).
    """

    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    psnr_db: float
    top1_match: bool
    top5_match: bool
    passed: bool
    reason: str
    thresholds: Thresholds
    output_top5: tuple[int, ...] = ()
    reference_top5: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (the summary's ``check`` object); NaN and infinity become null (psnr_db null: identical)."""
        return {
            "passed": self.passed,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "cosine": _json_float(self.cosine),
            "psnr_db": _json_float(self.psnr_db),
            "top1_match": self.top1_match,
            "top5_match": self.top5_match,
            "output_top5": list(self.output_top5),
            "reference_top5": list(self.reference_top5),
            "thresholds": self.thresholds.as_dict(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Load:
    """How busy a machine was when a run was timed (each None where it could not tell).

    Attributes:
        loadavg: the 1, 5 and 15 minute load averages.
        affinity: the CPUs the timing process may run on.
        cpus: the CPUs the machine has.
    """

    loadavg: tuple[float, float, float] | None = None
    affinity: tuple[int, ...] | None = None
    cpus: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"loadavg": list(self.loadavg) if self.loadavg is not None else None,
                "affinity": list(self.affinity) if self.affinity is not None else None, "cpus": self.cpus}


@dataclass(frozen=True)
class Conditions:
    """What a run was timed under: the device's TVM threads and how busy the device and this host were.

    Attributes:
        threads: the threads of the device's TVM thread pool during timing (``runtime.NumThreads``); None: the
            device could not tell.
        threads_requested: what ``--threads`` asked for (None: the pool as the device had it).
        device: the device's load; None for a device that cannot tell (a stock ``rpc_server``).
        host: this machine's load (the same machine as the device for the embedded server).
    """

    threads: int | None = None
    threads_requested: int | None = None
    device: Load | None = None
    host: Load | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_requested": self.threads_requested,
                "device": self.device.as_dict() if self.device is not None else None,
                "host": self.host.as_dict() if self.host is not None else None}


@dataclass(frozen=True)
class TuningSource:
    """A tuning whose records a build applied, and to how many of its kernels.

    Attributes:
        tuning: the tuning's artifact key. model: the name of the model it tuned. trials: its budget.
        kernels: the build's kernels scheduled from its records. own: the build's own tuning (``--tune-trials``),
            else a tuning of the store shared with the build (:mod:`pipeline.tuning.shared`).
    """

    tuning: str
    model: str
    trials: int
    kernels: int
    own: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TuningSources:
    """Where the schedules of a build with shared tuning records came from, kernel by kernel.

    Attributes:
        kernels: the build's kernels (its prepared module's functions).
        rules: kernels scheduled by MetaSchedule's rules, no search (an untuned build's default).
        tunings: the tunings that scheduled at least one kernel, the build's own first, then by kernels.
        considered: the shared tunings the build could draw on (its key names them).
    """

    kernels: int
    rules: int
    tunings: tuple[TuningSource, ...]
    considered: int

    @property
    def unscheduled(self) -> int:
        """Kernels built as written: no record, or a schedule that does not replay on them."""
        return max(0, self.kernels - self.rules - sum(t.kernels for t in self.tunings))

    def as_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "rules": self.rules, "unscheduled": self.unscheduled,
                "considered": self.considered, "tunings": [t.as_dict() for t in self.tunings]}


@dataclass(frozen=True)
class DeviceFacts:
    """What the device showed of the model besides its latency (each None where it could not tell).

    Attributes:
        load_ms: loading the library and creating its VM on the device (``load_module`` + the VM), as this
            client timed the two remote calls.
        first_inference_ms: the first (cold) inference after the load, as this client timed the remote call.
        peak_memory_bytes: the peak resident memory of the device's session process (Linux ``VmHWM``: TVM's
            runtime and Python included) after the run; None for a device that cannot tell (a stock rpc_server).
        library_bytes: the library's size.
    """

    load_ms: float | None = None
    first_inference_ms: float | None = None
    peak_memory_bytes: int | None = None
    library_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"load_ms": self.load_ms, "first_inference_ms": self.first_inference_ms,
                "peak_memory_bytes": self.peak_memory_bytes, "library_bytes": self.library_bytes}


@dataclass(frozen=True)
class KernelTime:
    """One kernel of a profile (:mod:`pipeline.profiling`): its calls in one inference and their time.

    Attributes:
        name: the kernel as the VM calls it (a compiled function's name).
        calls: how many times one inference calls it.
        ms: the time of those calls in one inference (the sum of each call's median over the repetitions).
        share: of the profile's ``total_ms``.
        shapes: the tensor arguments of its first call (``1x56x56x64``; ``:dtype`` when not float32).
        flops: floating-point operations of those calls (None: unknown); gflop_per_s: flops / ms.
    """

    name: str
    calls: int
    ms: float
    share: float
    shapes: tuple[str, ...] = ()
    flops: float | None = None
    gflop_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "ms": self.ms, "share": self.share,
                "shapes": list(self.shapes), "flops": self.flops, "gflop_per_s": self.gflop_per_s}


@dataclass(frozen=True)
class BuiltinTime:
    """One of the VM's builtins in a profile: its calls in one inference and their timed sum (the instrument's
    own cost included: an upper bound)."""

    name: str
    calls: int
    ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "ms": self.ms}


@dataclass(frozen=True)
class Profile:
    """Where the time of one inference goes, on the device (``--profile``; :mod:`pipeline.profiling`).

    Attributes:
        kernels: every kernel, slowest first.
        glue_ms: the time of an inference beyond its kernels: the VM's builtins (allocations, shape checks) and its
            own work between calls (``measured_ms - kernels_ms``, at least 0).
        total_ms: ``kernels_ms + glue_ms``: what the shares are of (``measured_ms``, unless the kernels' timed
            calls add up to more).
        kernels_ms: the kernels' time.
        measured_ms: the median of uninstrumented inferences timed on the device between the instrumented ones.
        instrumented_ms: the median of the instrumented inferences (the instrument's own cost included).
        repeat: inferences of each kind timed.
        builtins: the VM builtins' timed calls, slowest first (part of the glue; upper bounds).
        flops_known: the build recorded its kernels' FLOPs.
        note: what to know when reading it (kernels overstated by the instrument), or None.
    """

    kernels: tuple[KernelTime, ...]
    glue_ms: float
    total_ms: float
    kernels_ms: float
    measured_ms: float
    instrumented_ms: float
    repeat: int
    builtins: tuple[BuiltinTime, ...] = ()
    flops_known: bool = False
    note: str | None = None

    @property
    def glue_share(self) -> float:
        return self.glue_ms / self.total_ms if self.total_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``profile`` object of a run's JSON and ledger record."""
        return {"kernels": [k.as_dict() for k in self.kernels], "glue_ms": self.glue_ms, "total_ms": self.total_ms,
                "kernels_ms": self.kernels_ms, "glue_share": self.glue_share, "measured_ms": self.measured_ms,
                "instrumented_ms": self.instrumented_ms, "repeat": self.repeat,
                "builtins": [b.as_dict() for b in self.builtins], "flops_known": self.flops_known, "note": self.note}

    @classmethod
    def from_dict(cls, data: Any) -> Profile | None:
        """A ``profile`` object read back (a ledger record: untrusted), or None when it is not one. Text is kept
        as it is (renderings escape it); kernels without a name or a time are dropped."""
        if not isinstance(data, dict):
            return None
        numbers = [data.get(k) for k in ("glue_ms", "total_ms")]
        if not all(_finite(x) for x in numbers) or not isinstance(data.get("kernels"), list):
            return None

        def number(value: Any, default: float | None = None) -> float | None:
            return float(value) if _finite(value) else default

        def count(value: Any) -> int:
            return value if type(value) is int and value >= 0 else 0

        kernels = tuple(
            KernelTime(name=k["name"], calls=count(k.get("calls")), ms=float(k["ms"]),
                       share=number(k.get("share"), 0.0) or 0.0,
                       shapes=tuple(str(s) for s in k.get("shapes", []) if isinstance(s, str))
                       if isinstance(k.get("shapes"), list) else (),
                       flops=number(k.get("flops")), gflop_per_s=number(k.get("gflop_per_s")))
            for k in data["kernels"] if isinstance(k, dict) and isinstance(k.get("name"), str) and _finite(k.get("ms")))
        builtins = tuple(BuiltinTime(b["name"], count(b.get("calls")), float(b["ms"]))
                         for b in data.get("builtins") or [] if isinstance(b, dict)
                         and isinstance(b.get("name"), str) and _finite(b.get("ms"))) \
            if isinstance(data.get("builtins"), list) else ()
        total = float(data["total_ms"])
        return cls(kernels=kernels, glue_ms=float(data["glue_ms"]), total_ms=total,
                   kernels_ms=number(data.get("kernels_ms"), sum(k.ms for k in kernels)) or 0.0,
                   measured_ms=number(data.get("measured_ms"), total) or 0.0,
                   instrumented_ms=number(data.get("instrumented_ms"), total) or 0.0,
                   repeat=count(data.get("repeat")), builtins=builtins, flops_known=data.get("flops_known") is True,
                   note=data["note"] if isinstance(data.get("note"), str) else None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- one run ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildSummary:
    """What a compile chain gave: the library, its keys, and what each compile stage did.

    Attributes:
        stages: ``ran``, ``cached`` or ``skipped`` for import-model, tune, build and export-library.
        schedules: what the build applies: ``tuned``, ``rules`` or ``tvm-default`` (``BuildPlan.applied``).
        gpu_code: for a GPU target, what the library holds: ``cubin`` (machine code), ``ptx`` or ``source``.
        tuning: what the tuning the build applies did (``tasks.tune.read_summary``); None untuned.
        tuning_sources: which tunings scheduled how many kernels, for a build that shares other tunings'
            records (:mod:`pipeline.tuning.shared`); None for one that does not.
    """

    model: str
    model_digest: str
    weights: str | None
    target: str
    opt_level: int
    tune_trials: int
    schedules: str
    tuning_key: str | None
    import_key: str
    build_key: str
    library_key: str
    artifact: str
    library_bytes: int
    gpu_code: str | None
    stages: dict[str, str]
    tuning: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    tuning_sources: TuningSources | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object of a ``--build-only`` run."""
        return {
            "build_only": True, "model": self.model, "model_digest": self.model_digest, "weights": self.weights,
            "target": self.target, "opt_level": self.opt_level, "tune_trials": self.tune_trials,
            "tuning_key": self.tuning_key, "import_key": self.import_key, "build_key": self.build_key,
            "library_key": self.library_key, "artifact": self.artifact, "library_bytes": self.library_bytes,
            "gpu_code": self.gpu_code, "stages": dict(self.stages), "schedules": self.schedules,
            "tuning": self.tuning, "notes": list(self.notes),
            "tuning_sources": self.tuning_sources.as_dict() if self.tuning_sources is not None else None,
        }


@dataclass(frozen=True, kw_only=True)
class DeviceOutcome:
    """What one model did on one device.

    Attributes:
        device: how the run reached the device (``embedded 127.0.0.1:PORT``, ``HOST:PORT``, ``tracker ...``).
        device_identity: what the device reported about itself (triple, TVM version, host, GPU).
        stages: what each device-side stage did (reference, upload, load, set-input, run, check, postprocess).
        check: None without the check (``--no-check``).
        name: the device's name in the run history (a fleet's device name, ``--device-name``); None: its
            address without what changes between runs (:func:`pipeline.results.device_name`).
        conditions: what the latency was measured under (threads, load).
        facts: load time, first inference, peak memory, library size (None: a summary made without them).
        profile: where an inference's time goes (``--profile``; None without it, or on a device that cannot).
        notes: what the device stages want the user to know (e.g. why there is no profile).
    """

    device: str
    device_identity: str
    image: str
    input_shape: tuple[int, ...]
    stages: dict[str, str]
    top5: tuple[Top, ...]
    latency: Latency
    upload: Upload
    check: CheckResult | None
    name: str | None = None
    conditions: Conditions | None = None
    facts: DeviceFacts | None = None
    profile: Profile | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """A run of a model on a device: the build it used, what the device did, and the verdict against the earlier
    runs (set by the ``report`` stage)."""

    stamp: RunStamp
    build: BuildSummary
    outcome: DeviceOutcome
    regression: Verdict | None = None

    @property
    def run_id(self) -> str:
        return self.stamp.id

    @property
    def started(self) -> str:
        return self.stamp.started

    @property
    def stages(self) -> dict[str, str]:
        """Every stage of the run (:data:`STAGES`), in order: ``ran``, ``cached`` or ``skipped``."""
        done = {**self.build.stages, **self.outcome.stages}
        return {name: done.get(name, "skipped") for name in STAGES}

    @property
    def latency(self) -> Latency:
        return self.outcome.latency

    @property
    def check(self) -> CheckResult | None:
        return self.outcome.check

    @property
    def passed(self) -> bool:
        """The run passed: no check, or a check that passed."""
        return self.outcome.check is None or self.outcome.check.passed

    @property
    def series(self) -> str:
        """The series of runs of this very build and device (:func:`series_of`)."""
        return series_of(self.build.build_key, self.outcome.device, self.outcome.device_identity,
                         self.outcome.input_shape)

    @property
    def device_name(self) -> str:
        """The device's name in the run history: its given name, else its address (``embedded`` for the
        embedded server)."""
        return self.outcome.name or device_name(self.outcome.device)

    @property
    def lineage(self) -> str:
        """The lineage this run is judged in: every run of this model on this device, target and input,
        whatever build it used (:func:`lineage_of`)."""
        return lineage_of(self.build.model, self.device_name, self.build.target, self.outcome.input_shape)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object of a run."""
        b, o, latency = self.build, self.outcome, self.outcome.latency
        return {
            "run_id": self.run_id, "series": self.series, "lineage": self.lineage,
            "model": b.model, "model_digest": b.model_digest, "weights": b.weights,
            "target": b.target, "opt_level": b.opt_level, "tune_trials": b.tune_trials,
            "tuning_key": b.tuning_key, "import_key": b.import_key, "build_key": b.build_key,
            "library_key": b.library_key, "artifact": b.artifact, "library_bytes": b.library_bytes,
            "gpu_code": b.gpu_code, "device": o.device, "device_name": self.device_name,
            "device_identity": o.device_identity, "image": o.image,
            "stages": self.stages, "top5": [entry.as_dict() for entry in o.top5],
            "latency_ms": latency.as_dict(), "latency_samples_ms": list(latency.samples_ms),
            "timing": {"number": latency.number, "repeat": latency.repeat,
                       "threads": o.conditions.threads if o.conditions is not None else None},
            "conditions": o.conditions.as_dict() if o.conditions is not None else None,
            "upload": o.upload.as_dict(),
            "check": o.check.as_dict() if o.check is not None else None,
            "regression": self.regression.as_dict() if self.regression is not None else None,
            "tuning": b.tuning, "schedules": b.schedules, "notes": [*b.notes, *o.notes],
            "tuning_sources": b.tuning_sources.as_dict() if b.tuning_sources is not None else None,
            "device_facts": (o.facts or DeviceFacts(library_bytes=o.upload.bytes)).as_dict(),
            "profile": o.profile.as_dict() if o.profile is not None else None,
        }


# -- a fleet ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairResult:
    """What one (device, model) pair of a fleet run gave.

    Attributes:
        device: the device's name in the fleet file; model: the model's label in the table; target: as written.
        device_address: how the pair reached its device (``tracker HOST:PORT key=K``, ``HOST:PORT``).
        run_id: its record in the run ledger.
        summary: the pair's run (None: it failed before it had figures).
        error: why it failed, one line (None: passed); error_type: the error's class.
        started, finished, seconds: when its device stages ran, and how long (None: they did not start).
    """

    device: str
    model: str
    target: str
    target_canonical: str
    device_address: str
    run_id: str
    summary: RunSummary | None = None
    error: str | None = None
    error_type: str | None = None
    build_key: str | None = None
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None

    @property
    def status(self) -> str:
        return "passed" if self.error is None and self.summary is not None else "failed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def latency(self) -> Latency | None:
        return self.summary.latency if self.summary is not None else None

    @property
    def regression(self) -> Verdict | None:
        return self.summary.regression if self.summary is not None else None

    def as_json(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "device": self.device, "model": self.model, "target": self.target,
            "target_canonical": self.target_canonical, "status": self.status,
            "latency_ms": summary.latency.as_dict() if summary is not None else None,
            "check": summary.check.as_dict() if summary is not None and summary.check is not None else None,
            "regression": summary.regression.as_dict() if summary is not None and summary.regression else None,
            "error": self.error, "error_type": self.error_type, "build_key": self.build_key, "run_id": self.run_id,
            "lineage": summary.lineage if summary is not None else None,
            "device_address": self.device_address, "started": self.started, "finished": self.finished,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class BuildCounts:
    """The distinct compile chains of a fleet run: produced now, found in the store, or failed."""

    ran: int = 0
    cached: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FleetSummary:
    """A fleet run: every pair's result (device by device, in the file's order) and its builds."""

    fleet_run: str
    source: str
    results: tuple[PairResult, ...]
    builds: BuildCounts
    seconds: float
    flow_run_id: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of each phase: ``resolve``, ``compile`` (builds and references), ``devices`` (every pair)."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> tuple[PairResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "fleet_run": self.fleet_run, "flow_run_id": self.flow_run_id, "fleet_file": self.source,
            "passed": sum(r.passed for r in self.results), "failed": len(self.failed), "seconds": self.seconds,
            "phases": dict(self.phases),
            "results": [r.as_json() for r in self.results], "builds": self.builds.as_json(),
        }


# -- accuracy over a labelled set ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """Where one image's label ranks in one output."""

    top5: tuple[int, ...]
    top1_hit: bool
    top5_hit: bool


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 hits over ``count`` labelled images."""

    count: int
    top1: int
    top5: int

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.count if self.count else 0.0

    @property
    def top5_rate(self) -> float:
        return self.top5 / self.count if self.count else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "top1": self.top1, "top5": self.top5,
            "top1_accuracy": self.top1_rate, "top5_accuracy": self.top5_rate,
        }


@dataclass(frozen=True)
class ImageResult:
    """One labelled image: its label, the compiled model's and the reference's top-5, and their check."""

    file: str
    label: int
    label_text: str
    tvm: Hit
    reference: Hit
    tvm_top1_label: str
    reference_top1_label: str
    check: CheckResult

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "class": self.label, "label": self.label_text,
            "tvm_top5": list(self.tvm.top5), "reference_top5": list(self.reference.top5),
            "tvm_top1_label": self.tvm_top1_label, "reference_top1_label": self.reference_top1_label,
            "tvm_top1_hit": self.tvm.top1_hit, "tvm_top5_hit": self.tvm.top5_hit,
            "reference_top1_hit": self.reference.top1_hit, "reference_top5_hit": self.reference.top5_hit,
            "check": self.check.as_dict(),
        }


@dataclass(frozen=True)
class AccuracySummary:
    """An accuracy run: the build, the device, each image's result and the accuracy of both models."""

    build: BuildSummary
    device: str
    upload: Upload
    reference_status: str
    images: tuple[ImageResult, ...]
    tvm: Accuracy
    reference: Accuracy
    thresholds: Thresholds

    @property
    def stages(self) -> dict[str, str]:
        return {**self.build.stages, "reference": self.reference_status}

    @property
    def checks_passed(self) -> bool:
        return all(image.check.passed for image in self.images)

    @property
    def max_abs_diff(self) -> float | None:
        """The largest difference over the images; None where an output was NaN or misshapen."""
        diffs = [_json_float(image.check.max_abs_diff) for image in self.images]
        return None if None in diffs or not diffs else max(d for d in diffs if d is not None)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object of an accuracy run."""
        b = self.build
        return {
            "model": b.model, "model_digest": b.model_digest, "target": b.target, "opt_level": b.opt_level,
            "schedules": b.schedules, "build_key": b.build_key, "library_key": b.library_key,
            "artifact": b.artifact, "device": self.device, "upload": self.upload.as_dict(), "stages": self.stages,
            "images": [image.as_dict() for image in self.images],
            "accuracy": {"tvm": self.tvm.as_dict(), "reference": self.reference.as_dict()},
            "agreement": {
                "top1": sum(i.tvm.top5[0] == i.reference.top5[0] for i in self.images),
                "top5_identical": sum(i.tvm.top5 == i.reference.top5 for i in self.images),
                "count": len(self.images),
            },
            "checks_passed": self.checks_passed, "max_abs_diff": self.max_abs_diff,
            "thresholds": self.thresholds.as_dict(),
        }
