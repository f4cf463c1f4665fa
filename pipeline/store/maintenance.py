"""What a store holds, what of it is still used, and whether it is intact: ``python -m flows.store du | gc | verify``.

Works on a store's *entries*: for a local store the artifact directories of its root, for a store in a bucket
the artifacts in the bucket and, separately, this machine's copy of them (``where="local"``). The store's
content is untrusted: a manifest is read as JSON data for what it says it holds (its kind, inputs, creation),
and :func:`verify` checks every MAC and digest.

What ``gc`` keeps (:func:`plan_gc`), everything else of the store's artifacts being removed:

- what any run in the ledger used within ``keep_days`` (the ledger's build, library and tuning keys), and,
  however old, the latest build of every *lineage* (a model on a device, for a target and input:
  :func:`pipeline.results.lineage_of`, what nightly runs are judged against) and of every *recipe* (model,
  weights, target, opt_level, schedules and tuning budget: what a user asks to build, on any device);
- what those need: a library's build, a build's tuning and the tunings whose records it shares, and the
  imported module (same model and TVM) and the reference outputs of its model;
- every tuning, unless ``tunings`` (they cost minutes to hours to redo; ``--tune-more`` continues them);
- what a running flow may be using: anything created or used (for a local root: any run that read it marks its
  manifest) within ``grace`` seconds, and any key whose lock (this machine's ``flock``, or a lease in the bucket)
  is held, checked again right before each removal.

Files of a key without a manifest (what a killed writer leaves) are removed once older than ``grace``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import StoreError, clip
from pipeline.store.artifacts import _MAX_MANIFEST, ArtifactStore
from pipeline.store.layout import MANIFEST
from pipeline.store.ledger import RunRecord

log = logging.getLogger(__name__)

_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX62 = re.compile(r"[0-9a-f]{62}")
DAY = 86400.0
AGES = ((DAY, "< 1 day"), (7 * DAY, "1-7 days"), (30 * DAY, "7-30 days"), (float("inf"), "> 30 days"))


@dataclass(frozen=True)
class Entry:
    """One key of a store: an artifact (its manifest read as data), or files without a manifest.

    Attributes:
        key: the artifact key.
        kind: the manifest's kind; None without a readable manifest (an orphan, or a corrupt entry).
        size: bytes of its files.
        created: when it was written (POSIX seconds): the manifest's ``created``, else its files' time.
        used: when a run last used it: a local root's manifest modification time (every run that reads an
            artifact marks it), in a bucket the manifest's time.
        inputs: the manifest's inputs (data: model digest, build key, tuning key...).
        where: ``"local"`` (a root on this machine) or ``"bucket"``.
    """

    key: str
    kind: str | None
    size: int
    created: float
    used: float
    inputs: dict[str, Any] = field(default_factory=dict)
    where: str = "local"


def entries(store: ArtifactStore, where: str = "store") -> Iterator[Entry]:
    """Every entry of ``store``: ``where="store"`` the store's own (a bucket's, for a store in one), ``"local"``
    this machine's root (for a store in a bucket: its copy)."""
    if where == "store" and store.remote is not None:
        yield from _bucket_entries(store)
    else:
        yield from _local_entries(store)


def _manifest_fields(data: bytes, key: str) -> tuple[str | None, dict[str, Any], float | None]:
    """The kind, inputs and creation time a manifest says it has (data only: not authenticated here)."""
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            return None, {}, None
        inputs = manifest.get("inputs")
        created = manifest.get("created")
        when = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp() \
            if isinstance(created, str) else None
        kind = manifest.get("kind")
        return (kind if isinstance(kind, str) else None), (inputs if isinstance(inputs, dict) else {}), when
    except (ValueError, TypeError, RecursionError):
        return None, {}, None


def _local_entries(store: ArtifactStore) -> Iterator[Entry]:
    try:
        tops = sorted(os.scandir(store.root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for top in tops:
        if not _HEX2.fullmatch(top.name) or not top.is_dir(follow_symlinks=False):
            continue
        for item in sorted(os.scandir(top.path), key=lambda e: e.name):
            if not _HEX62.fullmatch(item.name) or not item.is_dir(follow_symlinks=False):
                continue
            key = top.name + item.name
            size, newest = 0, 0.0
            manifest: bytes | None = None
            used = 0.0
            for f in os.scandir(item.path):
                info = f.stat(follow_symlinks=False)
                if f.name == MANIFEST and stat.S_ISREG(info.st_mode):
                    used = info.st_mtime
                    with open(f.path, "rb") as handle:
                        manifest = handle.read(_MAX_MANIFEST + 1)
                else:
                    size += info.st_size
                    newest = max(newest, info.st_mtime)
            kind, inputs, created = _manifest_fields(manifest, key) if manifest is not None else (None, {}, None)
            created = created or newest or used
            yield Entry(key, kind, size, created, max(used, created), inputs, "local")


def _bucket_entries(store: ArtifactStore) -> Iterator[Entry]:
    bucket = store.remote
    assert bucket is not None
    groups: dict[str, list[Any]] = defaultdict(list)
    for info in bucket.list(bucket.layout.name("")):
        relative = bucket.layout.relative(info.name)
        top, _, rest = relative.partition("/")
        item = rest.split("/", 1)[0]
        if _HEX2.fullmatch(top) and _HEX62.fullmatch(item):
            groups[top + item].append(info)
    for key in sorted(groups):
        objects = groups[key]
        manifest = next((o for o in objects if o.name == bucket.layout.manifest(key)), None)
        size = sum(o.size for o in objects if o is not manifest)
        newest = max(o.modified for o in objects)
        kind, inputs, created = None, {}, None
        if manifest is not None:
            got = bucket.get(manifest.name, _MAX_MANIFEST + 1)
            if got is not None:
                kind, inputs, created = _manifest_fields(got[0], key)
        created = created or (manifest.modified if manifest else newest)
        yield Entry(key, kind, size, created, max(created, manifest.modified if manifest else newest), inputs,
                    "bucket")


# -- du ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What a store holds: artifacts by kind, by model and by age, and the ledger's records."""

    location: str
    root: str
    count: int
    size: int
    by_kind: dict[str, tuple[int, int]]
    by_model: dict[str, tuple[int, int]]
    by_age: dict[str, tuple[int, int]]
    runs: int
    local: tuple[int, int] | None = None
    """For a store in a bucket: this machine's copy (artifacts, bytes)."""

    def as_json(self) -> dict[str, Any]:
        def rows(d: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
            return {k: {"count": n, "bytes": b} for k, (n, b) in d.items()}
        return {"store": self.location, "root": self.root, "artifacts": self.count, "bytes": self.size,
                "by_kind": rows(self.by_kind), "by_model": rows(self.by_model), "by_age": rows(self.by_age),
                "runs": self.runs,
                "local_copy": None if self.local is None else {"count": self.local[0], "bytes": self.local[1]}}


def model_names(records: Iterable[RunRecord]) -> dict[str, str]:
    """Model digest -> the name runs gave it (the newest run's)."""
    names: dict[str, str] = {}
    for record in records:  # newest first: the first name seen wins
        if record.model_digest:
            names.setdefault(record.model_digest, record.model)
    return names


def _model_of(entry: Entry, by_key: dict[str, Entry]) -> str | None:
    """The model digest an entry belongs to (a library: through its build)."""
    model = entry.inputs.get("model")
    if isinstance(model, str):
        return model
    build = by_key.get(str(entry.inputs.get("build", "")))
    return build.inputs.get("model") if build is not None and isinstance(build.inputs.get("model"), str) else None


def usage(store: ArtifactStore, now: float | None = None) -> Usage:
    """What ``store`` holds (:class:`Usage`)."""
    now = time.time() if now is None else now
    found = list(entries(store))
    by_key = {e.key: e for e in found}
    records = list(store.ledger.records())
    names = model_names(records)
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_model: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_age: dict[str, list[int]] = {label: [0, 0] for _, label in AGES}
    for entry in found:
        digest = _model_of(entry, by_key)
        model = names.get(digest, f"model {digest[:12]}") if digest else "-"
        label = next(label for limit, label in AGES if now - entry.created < limit)
        for table, name in ((by_kind, entry.kind or "no manifest"), (by_model, model), (by_age, label)):
            table[name][0] += 1
            table[name][1] += entry.size
    local = None
    if store.remote is not None:
        copies = list(entries(store, "local"))
        local = (len(copies), sum(e.size for e in copies))
    order = lambda d: {k: (v[0], v[1]) for k, v in sorted(d.items(), key=lambda kv: -kv[1][1])}
    return Usage(store.location, str(store.root), len(found), sum(e.size for e in found), order(by_kind),
                 order(by_model), {k: (v[0], v[1]) for k, v in by_age.items()}, len(records), local)


def format_usage(u: Usage) -> str:
    def line(title: str, table: dict[str, tuple[int, int]]) -> str:
        parts = [f"{name} {n} ({human(b)})" for name, (n, b) in table.items() if n]
        return f"{title:<10} {'   '.join(parts) if parts else '-'}"
    lines = [f"{'Store':<10} {u.location}" + (f"  (this machine's copy: {u.root})" if u.local is not None else ""),
             f"{'Artifacts':<10} {u.count} ({human(u.size)})",
             line("By kind", u.by_kind), line("By model", u.by_model), line("By age", u.by_age),
             f"{'Runs':<10} {u.runs} recorded in the ledger"]
    if u.local is not None:
        lines.append(f"{'Local':<10} {u.local[0]} artifacts ({human(u.local[1])}) copied to this machine")
    return "\n".join(lines)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# -- gc ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What ``gc`` keeps besides the latest build of each lineage (see the module docstring)."""

    keep_days: float = 7.0
    grace: float = 3600.0
    tunings: bool = False


@dataclass(frozen=True)
class Removal:
    entry: Entry
    why: str


@dataclass(frozen=True)
class GcPlan:
    """What ``gc`` removes and keeps, and why."""

    location: str
    remove: tuple[Removal, ...]
    kept: int
    kept_bytes: int
    reasons: dict[str, int]
    """How many entries each keep rule kept (``recent run``, ``latest of a lineage``, ``needed``, ``tuning``,
    ``in grace``, ``locked``)."""

    @property
    def freed(self) -> int:
        return sum(r.entry.size for r in self.remove)

    def as_json(self, applied: bool, removed: int) -> dict[str, Any]:
        return {"store": self.location, "applied": applied, "removed": removed, "to_remove": len(self.remove),
                "bytes": self.freed, "kept": self.kept, "kept_bytes": self.kept_bytes, "kept_because": self.reasons,
                "entries": [{"key": r.entry.key, "kind": r.entry.kind, "bytes": r.entry.size, "where": r.entry.where,
                             "why": r.why} for r in self.remove]}


def _stamp(record: RunRecord) -> float:
    try:
        return dt.datetime.fromisoformat(record.started).timestamp()
    except (TypeError, ValueError):
        return 0.0


def recipe(record: RunRecord) -> tuple[Any, ...]:
    """What a user asks to build, without the versions that make its key change: the builds of one recipe
    replace each other."""
    return (record.model, record.weights, record.target, record.opt_level, record.schedules, record.tune_trials)


def live_keys(records: list[RunRecord], policy: Policy, now: float) -> dict[str, str]:
    """The keys the ledger names as used recently, or as the latest build of a lineage or a recipe: key -> why."""
    keep: dict[str, str] = {}
    latest: set[tuple[Any, ...]] = set()
    for record in records:  # newest first
        keys = [k for k in (record.library_key, record.build_key, record.tuning_key) if k]
        if not keys:
            continue
        if now - _stamp(record) <= policy.keep_days * DAY:
            for k in keys:
                keep.setdefault(k, "recent run")
        for why, group in (("latest of a lineage", ("lineage", record.lineage_id)),
                           ("latest of a recipe", ("recipe", *recipe(record)))):
            if group not in latest:
                latest.add(group)
                for k in keys:
                    keep.setdefault(k, why)
    return keep


def _needed(found: list[Entry], keep: dict[str, str]) -> None:
    """Add to ``keep`` what the kept entries need: a library's build, a build's tuning and the tunings it shares
    records of, its model's imported module (same TVM) and reference outputs."""
    by_key = {e.key: e for e in found}
    for key in [k for k in keep if k in by_key and by_key[k].kind == "library"]:
        build = by_key[key].inputs.get("build")
        if isinstance(build, str):
            keep.setdefault(build, "needed")
    builds = [by_key[k] for k in keep if k in by_key and by_key[k].kind == "build"]
    for build in builds:
        records = build.inputs.get("records")
        for tuning in [build.inputs.get("tuning"), *(records if isinstance(records, list) else [])]:
            if isinstance(tuning, str):
                keep.setdefault(tuning, "needed")
    models = {(b.inputs.get("model"), b.inputs.get("tvm")) for b in builds}
    digests = {m for m, _ in models}
    for entry in found:
        if entry.kind == "relax-ir" and (entry.inputs.get("model"), entry.inputs.get("tvm")) in models or entry.kind == "reference" and entry.inputs.get("model") in digests:
            keep.setdefault(entry.key, "needed")


def _in_use(store: ArtifactStore, entry: Entry, policy: Policy, now: float) -> str | None:
    if now - entry.used < policy.grace or now - entry.created < policy.grace:
        return "in grace"
    if store.lock_held(entry.key):
        return "locked"
    bucket = store.remote
    if bucket is not None and entry.where == "bucket" and bucket.lease_held(bucket.layout.lease(entry.key)):
        return "locked"
    return None


def plan_gc(store: ArtifactStore, policy: Policy, now: float | None = None) -> GcPlan:
    """What ``gc`` would remove from ``store`` under ``policy`` (nothing is removed here)."""
    now = time.time() if now is None else now
    found = list(entries(store))
    local = list(entries(store, "local")) if store.remote is not None else []
    keep = live_keys(list(store.ledger.records()), policy, now)
    _needed(found + local, keep)
    reasons: dict[str, int] = defaultdict(int)
    remove: list[Removal] = []
    kept = kept_bytes = 0
    for entry in found + local:
        why_kept = keep.get(entry.key)
        if why_kept is None and entry.kind == "tuning" and not policy.tunings:
            why_kept = "tuning"
        why_kept = why_kept or _in_use(store, entry, policy, now)
        if why_kept is not None:
            reasons[why_kept] += 1
            kept += 1
            kept_bytes += entry.size
            continue
        if entry.kind is None:
            why = "files without a manifest (a writer that did not finish)"
        else:
            why = f"{entry.kind}, no run in {policy.keep_days:g} days and not the latest of its lineage"
        remove.append(Removal(entry, why))
    return GcPlan(store.location, tuple(remove), kept, kept_bytes, dict(reasons))


def apply_gc(store: ArtifactStore, plan: GcPlan, policy: Policy) -> int:
    """Remove what ``plan`` names, each entry checked again just before (a run may have started using it since
    the plan: its lock, a lease, or its mark of use). Returns how many were removed."""
    removed = 0
    for removal in plan.remove:
        entry = removal.entry
        fresh = next((e for e in _refresh(store, entry)), None)
        if fresh is None:
            continue  # already gone
        if _in_use(store, fresh, policy, time.time()) is not None:
            log.info("gc: %s is in use now; kept", entry.key[:16])
            continue
        if entry.where == "bucket":
            assert store.remote is not None
            store.remote.delete(store.remote.layout.manifest(entry.key))
            for info in store.remote.list(store.remote.layout.artifact(entry.key)):
                store.remote.delete(info.name)
        else:
            path = store.path(entry.key)
            trash = store.layout.trash
            trash.mkdir(parents=True, exist_ok=True)
            aside = trash / f"{entry.key}.gc.{os.getpid()}"
            try:
                os.rename(path, aside)
            except OSError as exc:
                raise StoreError(f"cannot remove {path} ({exc.strerror})") from None
            shutil.rmtree(aside, ignore_errors=True)
        removed += 1
    return removed


def _refresh(store: ArtifactStore, entry: Entry) -> Iterator[Entry]:
    """The entry as it is now (for a local root: its manifest's mark of use read again)."""
    if entry.where == "bucket":
        yield entry  # a bucket's entries carry no mark of use; the lease is checked by _in_use
        return
    path = store.path(entry.key)
    try:
        used = (path / MANIFEST).lstat().st_mtime if (path / MANIFEST).exists() else entry.used
    except OSError:
        used = entry.used
    if path.is_dir():
        yield Entry(entry.key, entry.kind, entry.size, entry.created, max(used, entry.used), entry.inputs, entry.where)


def format_gc(plan: GcPlan, applied: bool, removed: int) -> str:
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(plan.reasons.items(), key=lambda kv: -kv[1]))
    head = (f"Removed    {removed} of {len(plan.remove)} entries ({human(plan.freed)})" if applied else
            f"Would remove {len(plan.remove)} entries ({human(plan.freed)}); run again with --apply to remove them")
    lines = [f"Store      {plan.location}", head,
             f"Kept       {plan.kept} entries ({human(plan.kept_bytes)}){': ' + reasons if reasons else ''}"]
    for r in plan.remove[:50]:
        lines.append(f"  {r.entry.key[:16]}  {r.entry.where:<6} {human(r.entry.size):>9}  {r.why}")
    if len(plan.remove) > 50:
        lines.append(f"  ... and {len(plan.remove) - 50} more")
    return "\n".join(lines)


# -- verify -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    key: str
    where: str
    problem: str


def verify(store: ArtifactStore) -> tuple[int, list[Problem]]:
    """Check every manifest (its MAC with this process's store key) and every file's size and SHA-256: the
    store's own entries and, for a store in a bucket, this machine's copy. Returns how many entries were checked
    and the problems found (nothing is changed)."""
    checked, problems = 0, []
    for entry in entries(store):
        checked += 1
        problem = _verify_bucket(store, entry.key) if entry.where == "bucket" else _verify_local(store, entry.key)
        if problem:
            problems.append(Problem(entry.key, entry.where, problem))
    if store.remote is not None:
        for entry in entries(store, "local"):
            checked += 1
            if problem := _verify_local(store, entry.key):
                problems.append(Problem(entry.key, "local copy", problem))
    return checked, problems


def _verify_local(store: ArtifactStore, key: str) -> str | None:
    artifact, reason = store._local_check(key)
    if artifact is None and reason == "missing":
        return "files without a manifest (a writer that did not finish)"
    return None if artifact is not None else reason


def _verify_bucket(store: ArtifactStore, key: str) -> str | None:
    bucket = store.remote
    assert bucket is not None
    got = bucket.get(bucket.layout.manifest(key), _MAX_MANIFEST + 1)
    if got is None:
        return "files without a manifest (a writer that did not finish)"
    artifact, reason = store._parse_manifest(key, got[0])
    if artifact is None:
        return reason
    for entry in artifact.files:
        found = bucket.digest(bucket.layout.blob(key, entry.sha256))
        if found is None:
            return f"corrupt: {entry.name} is missing from the bucket"
        if found != (entry.sha256, entry.size):
            return f"corrupt: {entry.name} does not match its digest"
    return None


def format_verify(location: str, checked: int, problems: list[Problem]) -> str:
    lines = [f"Store      {location}",
             f"Verified   {checked} entries: " + ("every manifest authenticates and every file matches its digest"
                                                  if not problems else f"{len(problems)} with problems")]
    lines += [f"  {p.key}  {p.where}: {clip(p.problem, 160)}" for p in problems]
    return "\n".join(lines)

