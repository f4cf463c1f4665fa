"""The run ledger: one small JSON record per run in the artifact store, the source of history and trends.

Every run writes one (CLI runs with or without a Prefect server, deployment runs, each pair of a fleet run):
``<store>/.runs/<id>.json``, written atomically (temporary file + rename), never pickled, read back as plain
JSON and validated field by field. The id sorts by time: ``20261128T101500Z-3f2a9c``.

A record's *lineage* is the model, the device's name, the target and the input shape: a nightly job's runs,
whatever build each used. Every run is judged against the earlier runs of its lineage
(:func:`pipeline.store.lineage.judge_record`). Its *series* is narrower: the build key (so the model, target,
opt_level, tuning and TVM), the device's address and what it reports about itself, and the input shape: the
runs of one build, whose drift is judged on its own.

Records only gain fields (each with a default), so that every earlier record stays readable; ``format`` is
bumped only by a change an older reader could not take.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union, get_args, get_origin, get_type_hints

from pipeline.errors import StoreError, UsageError, clip
from pipeline.results import device_name, lineage_of, utc_now
from pipeline.store.fs import read_bytes as fs_read
from pipeline.store.fs import real_directory

if TYPE_CHECKING:
    from pipeline.results import RunSummary
    from pipeline.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

FORMAT = 1
_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_MAX_RECORD = 1 << 20


def _local_names(directory: Path) -> list[str]:
    """The names of the plain files in ``directory`` (empty when it does not exist)."""
    try:
        return [entry.name for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False)]
    except OSError:
        return []


@dataclass(frozen=True)
class RunRecord:
    """One run, as the ledger keeps it (JSON keys = attribute names).

    ``status`` is ``passed`` (exit 0, or 3 when ``--fail-on-regression`` failed it), ``failed`` (a stage or
    the check failed: exit 1), ``error`` (bad usage: exit 2) or ``interrupted`` (exit 130). ``latency_ms``
    holds mean, median, p90, p99, min, max, std, cv, and ``samples_ms`` the samples themselves; ``check`` the
    check's figures; ``regression`` the verdict against the lineage (see :class:`pipeline.latency.Verdict`);
    ``conditions`` what the latency was measured under (:class:`pipeline.results.Conditions`);
    ``device_facts`` and ``profile`` what the device showed besides the latency. Anything the run did not get
    to is null.
    """

    id: str
    series: str | None
    started: str
    finished: str
    status: str
    exit_code: int
    error: str | None
    model: str
    model_digest: str | None
    target: str
    opt_level: int
    tune_trials: int
    tuning_key: str | None
    build_key: str | None
    library_key: str | None
    device: str
    device_identity: str | None
    image: str | None
    input_shape: list[int] | None
    stages: dict[str, str]
    latency_ms: dict[str, float] | None
    samples: int | None
    check: dict[str, Any] | None
    regression: dict[str, Any] | None
    versions: dict[str, str]
    flow_run_id: str | None = None
    fleet_run: str | None = None
    number: int | None = None
    """Inferences per latency sample (``--number``)."""
    weights: str | None = None
    top5: list[dict[str, Any]] | None = None
    upload: dict[str, Any] | None = None
    schedules: str | None = None
    """The schedules the build applied: ``tuned``, ``rules`` or ``tvm-default`` (None: recorded before they were)."""
    lineage: str | None = None
    """The lineage id (:func:`lineage_of`; None: recorded before lineages were, see :attr:`lineage_id`)."""
    device_name: str | None = None
    """The device's name: a fleet's device name, ``--device-name``, else :attr:`device` (None: recorded before)."""
    samples_ms: list[float] | None = None
    """The latency samples (at most ``pipeline.latency.KEPT_SAMPLES``, evenly spaced in time order)."""
    conditions: dict[str, Any] | None = None
    """Threads and the load of the device and the host during timing (:class:`pipeline.results.Conditions`)."""
    device_facts: dict[str, Any] | None = None
    """Load time, first inference, peak memory and library size (:class:`pipeline.results.DeviceFacts`; None:
    recorded before they were, or the run failed before)."""
    profile: dict[str, Any] | None = None
    """Where an inference's time went (``--profile``: :class:`pipeline.results.Profile`); None without it."""
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        """A record from its JSON; ValueError when it is not one.

        Every field is checked against its annotation (:func:`_conforms`: ``int`` is no bool, ``float`` takes
        an int, ``list[int]`` checks each item, ``X | None`` takes null), so code reading a record never meets
        a wrong type. Keys this version does not know are ignored (a newer writer's); a missing field without
        a default is an error.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT or not _ID.fullmatch(str(data.get("id", ""))):
            raise ValueError("not a run record")
        values = {}
        for item in fields(cls):
            if item.name not in data:
                if item.default is MISSING and item.default_factory is MISSING:
                    raise ValueError(f"{item.name} is missing")
                continue
            value, annotation = data[item.name], _field_types(cls)[item.name]
            if not _conforms(value, annotation):
                raise ValueError(f"{item.name} is not {_type_name(annotation)} (got {type(value).__name__})")
            values[item.name] = value
        return cls(**values)

    @property
    def median_ms(self) -> float | None:
        """The median latency; None when the record has none that is a positive, finite number."""
        value = (self.latency_ms or {}).get("median")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None

    @property
    def name(self) -> str:
        """The device's name (:attr:`device_name`, else :attr:`device`)."""
        return self.device_name or self.device

    @property
    def lineage_id(self) -> str | None:
        """The lineage: recorded, else derived from the record's fields (records written before lineages)."""
        if self.lineage:
            return self.lineage
        if self.input_shape is None:
            return None
        return lineage_of(self.model, self.name, self.target, self.input_shape)

    @property
    def threads(self) -> int | None:
        """The TVM threads the run was timed with (None: not recorded)."""
        value = (self.conditions or {}).get("threads")
        return value if type(value) is int else None

    @property
    def threads_requested(self) -> int | None:
        value = (self.conditions or {}).get("threads_requested")
        return value if type(value) is int else None


def record_of(summary: RunSummary, status: str, exit_code: int, error: str | None, **context: Any) -> RunRecord:
    """The record of a run that got as far as a summary: the summary's JSON form, field by field (the device
    by its :func:`device_name`), with how the run ended and ``context`` (versions, flow_run_id, fleet_run)."""
    data = summary.as_json()
    names = {f.name for f in fields(RunRecord)}
    latency = summary.latency
    return RunRecord(
        **{k: v for k, v in data.items() if k in names and k != "device"},
        id=summary.run_id, started=summary.started, finished=utc_now(), status=status, exit_code=exit_code,
        error=error, device=device_name(summary.outcome.device), input_shape=list(summary.outcome.input_shape),
        samples=latency.repeat, number=latency.number, samples_ms=list(latency.samples_ms) or None, **context,
    )


@cache
def _field_types(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a dataclass's fields (this module uses postponed annotations)."""
    return get_type_hints(cls)


def _conforms(value: Any, annotation: Any) -> bool:
    """Whether a JSON value has the type ``annotation`` names (``Any``, ``None``, ``bool``, ``int``, ``float``,
    ``str``, ``list[T]``, ``dict[K, V]`` and unions of these). JSON gives exact types: a bool is no int, an int
    is a float if a float can hold it.

    Raises:
        TypeError: an annotation this check does not know (a programming error, found by the first read).
    """
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arm) for arm in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_conforms(entry, item) for entry in value)
    if origin is dict:
        key, item = get_args(annotation) or (Any, Any)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return type(value) is int
    if annotation is float:  # an int too large for a float would raise in float()
        return isinstance(value, float) or (type(value) is int and abs(value) <= sys.float_info.max)
    if annotation is str:
        return isinstance(value, str)
    raise TypeError(f"a run record cannot check the type {annotation!r}")


def _type_name(annotation: Any) -> str:
    name = str(annotation) if get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return name.replace("typing.", "")


class Ledger:
    """The run records of an artifact store (``ArtifactStore.ledger``: its ``.runs`` directory).

    For a store in a bucket, records are written to the bucket as well, and :meth:`records` first copies the
    bucket's records this machine has not seen yet into the local directory (records never change once
    written: each is fetched once).

    Attributes:
        skipped: the files that :meth:`records` met and could not read as a record (name -> why), so that a
            reader can say so once (:meth:`skipped_note`).
    """

    def __init__(self, directory: str | os.PathLike[str], store: ArtifactStore | None = None) -> None:
        self.directory = Path(directory)
        self._store = store
        self.skipped: dict[str, str] = {}

    def write(self, record: RunRecord) -> Path:
        """Write ``record`` atomically.

        Raises:
            StoreError: the store cannot be written, or the ledger's directory is a symbolic link.
        """
        path = self.directory / f"{record.id}.json"
        data = json.dumps(record.as_json(), indent=1).encode()  # in field order: stages stay in pipeline order
        try:
            if self._store is not None:
                self._store.write_entry(path, data)
                return path
            real_directory(self.directory)
            tmp = self.directory / f".{record.id}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # a link planted at ``path`` is replaced, not followed
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write the run record {path} ({exc.strerror})") from exc
        return path

    def _sync(self) -> None:
        """Copy the bucket's records that the local directory lacks (a store in a bucket); never raises: the
        local records are read when the bucket cannot be."""
        store = self._store
        if store is None or store.remote is None:
            return
        try:
            have = set(_local_names(self.directory))
            for name in store.shared_names(self.directory):
                if name in have or not name.endswith(".json") or not _ID.fullmatch(name[:-5]):
                    continue
                data = store.read_entry(self.directory / name, _MAX_RECORD)
                store.write_entry(self.directory / name, data, local_only=True)
        except (OSError, StoreError) as exc:
            log.warning("the run ledger in %s could not be read (%s): only this machine's records are used",
                        store.location, clip(exc))

    def records(self, prefix: str = "") -> Iterator[RunRecord]:
        """Every readable record (whose id starts with ``prefix``), newest first.

        Unreadable or malformed files are skipped and noted in :attr:`skipped`; only the files whose names
        match are read.
        """
        self._sync()
        names = sorted(_local_names(self.directory), reverse=True)
        for name in names:
            if not name.endswith(".json") or not _ID.fullmatch(name[:-5]) or not name.startswith(prefix):
                continue
            try:
                yield RunRecord.from_json(json.loads(fs_read(self.directory / name, _MAX_RECORD)))
            except (OSError, ValueError, TypeError, RecursionError) as exc:
                if name not in self.skipped:
                    log.debug("skipping the run record %s: %s", name, exc)
                self.skipped[name] = clip(exc, 120)

    def skipped_note(self) -> str | None:
        """One line on the records that could not be read, or None when there were none."""
        if not self.skipped:
            return None
        name, why = next(iter(sorted(self.skipped.items())))
        more = f" and {len(self.skipped) - 1} more" if len(self.skipped) > 1 else ""
        return (f"skipped {len(self.skipped)} run record(s) in {self.directory} that are not valid records "
                f"({name}: {why}{more})")

    def find(self, run_id: str) -> RunRecord:
        """The record whose id is ``run_id`` or starts with it (unique).

        Raises:
            UsageError: no record, or several, match.
        """
        matches = [r for r in self.records(run_id) if r.id.startswith(run_id)] if run_id else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UsageError(f"no run {clip(run_id)!r} in {self.directory}: list them with python -m flows.history")
        raise UsageError(f"{len(matches)} runs start with {clip(run_id)!r}: give more of the id")

    def series_history(self, series: str, before: str, limit: int) -> list[RunRecord]:
        """The ``limit`` newest passed runs of ``series`` older than the run ``before``, oldest first."""
        found = []
        for record in self.records():
            if record.series == series and record.id < before and record.status == "passed" and record.median_ms:
                found.append(record)
                if len(found) >= limit:
                    break
        return found[::-1]

    def lineage_history(self, lineage: str, before: str, limit: int) -> list[RunRecord]:
        """The ``limit`` newest passed runs of ``lineage`` older than the run ``before``, oldest first (runs
        recorded before lineages were: by the lineage their fields give)."""
        found = []
        for record in self.records():
            if (record.id < before and record.status == "passed" and record.median_ms
                    and record.lineage_id == lineage):
                found.append(record)
                if len(found) >= limit:
                    break
        return found[::-1]
