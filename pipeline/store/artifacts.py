"""A content-addressed artifact store: ``<root>/<key[:2]>/<key[2:]>/`` holds files and a ``manifest.json``.

The store is a value that runs pass around (never its path): it owns every entry of its root
(:mod:`pipeline.store.layout`), the run ledger in it (:attr:`ArtifactStore.ledger`) and this client's secret that
authenticates the libraries devices keep (:meth:`ArtifactStore.device_cache_secret`, read once per store object).

The key is a 64-hex SHA-256 of everything that determines the artifact (see :mod:`pipeline.planning.keys`). The
manifest records what produced the artifact and the SHA-256 and size of every file in it, and carries a MAC
over all of that made with the store key, which is kept outside the store (:mod:`pipeline.store.auth`). An
artifact is only returned by :meth:`ArtifactStore.get` if its manifest parses, its MAC verifies with this
process's key and every file still has its recorded digest; otherwise it is treated as absent (and rebuilt by
the caller). :meth:`~ArtifactStore.check`, :meth:`~ArtifactStore.get`, :meth:`~ArtifactStore.read_verified`
and :meth:`~ArtifactStore.file` are the only ways to an artifact's files, and each refuses one that does not
authenticate. A store written before manifests carried a MAC is rebuilt once, with one warning.

The store creates and writes its files without following symbolic links (:mod:`pipeline.store.fs`), and
reads an artifact's files and manifest the same way: a link planted in a shared store cannot make a run
create or write a file outside it, nor read one as an artifact.

Writes are atomic: :meth:`ArtifactStore.put` fills a temporary directory under ``<root>/.tmp`` and renames
it into place, so a crash or a kill never leaves a partial artifact at a key's path. :meth:`ArtifactStore.lock`
is an inter-process lock per key (``fcntl.flock``), so concurrent runs build a key once.

A store on S3-compatible object storage (``ArtifactStore("s3://BUCKET/PREFIX")``) is the same object with the
same API: its root is a directory of this machine (:func:`pipeline.store.layout.s3_cache_root`) that keeps a
verified copy of each artifact a run used, and :attr:`ArtifactStore.remote` is the bucket
(:mod:`pipeline.store.s3`) that holds the shared entries. :meth:`~ArtifactStore.check` finds an artifact in
the local copy or else fetches it (manifest first: its MAC is checked before any file is downloaded, then
every file against its digest); :meth:`~ArtifactStore.put` writes the files to the bucket, then the manifest,
created only if absent, then the local copy; :meth:`~ArtifactStore.lock` adds a lease in the bucket to the
local ``flock``. The run ledger and the tuning index are written to the bucket and read from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pipeline.errors import StoreError, UsageError, clip
from pipeline.store import fs
from pipeline.store.auth import StoreKey, load_store_key, manifest_message
from pipeline.store.layout import MANIFEST, SHARED_ENTRIES, ArtifactKind, StoreLayout, s3_cache_root
from pipeline.store.s3 import S3Bucket, S3Location, is_s3

if TYPE_CHECKING:
    from pipeline.store.ledger import Ledger

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
"""2: the manifest carries ``mac`` (HMAC-SHA256 with the store key) and ``mac_key`` (the key's public id)."""
ENV_VAR = "TVMRP_ARTIFACTS"
REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this code runs from (for an installed package: the directory the package is installed in)."""
DEFAULT_ROOT = REPO_ROOT / "artifacts"
"""The store of a checkout: ``artifacts/`` at its root (:func:`default_root` uses it only in a checkout)."""

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20
_MAX_MANIFEST = 8 << 20
_OLD = "unauthenticated: written before the store's entries were authenticated"
_FOREIGN = "unauthenticated: signed with another store key"
# Temporary directories are named KEY.HOST.PID.RANDOM so that dead writers' leftovers can be swept.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def check_key(key: str) -> str:
    """Return ``key`` if it is 64 lower-case hex digits, else raise :class:`StoreError` (no path tricks)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise StoreError(f"invalid artifact key {key!r}: expected 64 hex digits")
    return key


_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 256


def file_digest(path: str | os.PathLike[str], follow_links: bool = True) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks.

    Remembered for the life of this process by the file's identity (device, inode, size, modification time
    in ns), so a file this run already hashed (written it, verified it) is not read again; any change to
    the file, or a new process, hashes it afresh.

    Args:
        follow_links: False: a symbolic link is an OSError (``ELOOP``) instead of its target's digest.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with _DIGESTS_LOCK:
            known = _DIGESTS.get(identity)
        if known is not None:
            return known
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _DIGESTS_LOCK:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[identity] = digest
    return digest


def default_root() -> Path:
    """The store root: ``$TVMRP_ARTIFACTS`` if set (for an ``s3://`` store: this machine's root of it,
    :func:`pipeline.store.layout.s3_cache_root`); else, running from a checkout, ``artifacts/`` at the
    repository root (:data:`DEFAULT_ROOT`); else (an installed package) this user's
    ``$XDG_DATA_HOME/tvmrp/artifacts`` (by default ``~/.local/share/tvmrp/artifacts``)."""
    env = os.environ.get(ENV_VAR)
    if env and is_s3(env):
        return s3_cache_root(str(S3Location.parse(env)))
    if env:
        return Path(env).expanduser().resolve()
    if _is_checkout(REPO_ROOT):
        return DEFAULT_ROOT
    data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"  # XDG: relative = unset
    return (base / "tvmrp" / "artifacts").resolve()


def _is_checkout(root: Path) -> bool:
    """Whether ``root`` is this project's source tree (not the site-packages an installed package sits in)."""
    return (root / "pyproject.toml").is_file() and (root / "pipeline" / "store").is_dir()


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Artifact:
    """A small reference to a verified artifact: what tasks pass to each other.

    Attributes:
        key: the content key (64 hex).
        kind: what it holds, e.g. ``"relax-ir"``, ``"build"``, ``"library"``.
        files: the artifact's files with their digests, sorted by name.
        inputs: what produced it (copied from the manifest).
        mac: the manifest's MAC, which :meth:`ArtifactStore.file` checks again ("" for a reference that did
            not come from the store, e.g. one read from a Prefect cache record: the store refuses it).
    """

    key: str
    kind: str
    files: tuple[FileEntry, ...]
    inputs: dict[str, Any]
    mac: str = ""

    def digest_of(self, name: str) -> str:
        """The recorded SHA-256 of file ``name``."""
        for entry in self.files:
            if entry.name == name:
                return entry.sha256
        raise KeyError(name)

    @property
    def size(self) -> int:
        """Total bytes of the artifact's files."""
        return sum(f.size for f in self.files)


def _store_error(action: str, root: Path, exc: OSError) -> StoreError:
    hint = {
        errno.ENOSPC: "the disk is full: free space",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EDQUOT: "the disk quota is exceeded: free space",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StoreError(
        f"cannot {action} in the artifact store {root} ({hint}). "
        f"Fix that, or choose another store with --artifacts DIR or {ENV_VAR}=DIR"
    )


class ArtifactStore:
    """A store of content-addressed artifacts: a directory, or a bucket read through a directory of this machine.
    Safe for concurrent use by several processes (and, in a bucket, by several machines).

    Attributes:
        location: what names the store: its directory, or ``s3://BUCKET/PREFIX`` (what ``--artifacts`` takes).
        root: the store's directory on this machine (for a store in a bucket: its local entries and the copy of
            the artifacts runs used here).
        layout: every path under the root (:class:`pipeline.store.layout.StoreLayout`).
        remote: the bucket of a store on object storage (:class:`pipeline.store.s3.S3Bucket`), else None.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None) -> None:
        """Args:
            root: the store's directory or ``s3://BUCKET/PREFIX`` (default: ``$TVMRP_ARTIFACTS``, else
                :func:`default_root`).
            cache: for a store in a bucket, the local root to use instead of
                :func:`pipeline.store.layout.s3_cache_root`.
        """
        location = root if root else os.environ.get(ENV_VAR) or None
        if is_s3(location):
            self.remote: S3Bucket | None = S3Bucket(S3Location.parse(str(location)))
            self.location = str(self.remote.location)
            self.root = Path(cache).expanduser().resolve() if cache else s3_cache_root(self.location)
        else:
            self.remote = None
            self.root = Path(location).expanduser().resolve() if location else default_root()
            self.location = str(self.root)
        self._cache = cache
        self.layout = StoreLayout(self.root)
        self._secret: bytes | None = None
        self._key: StoreKey | None = None
        self._secret_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.location!r})"

    def __str__(self) -> str:
        return self.location

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArtifactStore) and (other.location, other.root) == (self.location, self.root)

    def __hash__(self) -> int:
        return hash((self.location, self.root))

    def __getstate__(self) -> dict[str, Any]:  # a store sent to a worker process carries where it is, no secret or key
        return {"root": self.location, "cache": str(self.root) if self.remote is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state.get("cache"))  # type: ignore[misc]

    def path(self, key: str) -> Path:
        """The directory of ``key`` (which may not exist)."""
        return self.layout.artifact(check_key(key))

    @property
    def ledger(self) -> Ledger:
        """The run ledger kept in this store (for a store in a bucket: written there, read from there)."""
        from pipeline.store.ledger import Ledger

        return Ledger(self.layout.ledger, self)

    # -- the shared entries besides artifacts (the ledger, the tuning index) ---------------------------------

    def _object_name(self, path: Path) -> str:
        """The bucket's name of ``path``, a file of one of the root's shared entries."""
        relative = path.relative_to(self.root).as_posix()
        if relative.split("/", 1)[0] not in SHARED_ENTRIES:
            raise StoreError(f"{clip(path)} is not a shared entry of the store {self.location}")
        assert self.remote is not None
        return self.remote.layout.name(relative)

    def read_entry(self, path: Path, limit: int = 1 << 20) -> bytes:
        """The bytes (at most ``limit``) of ``path``, a file of a shared entry of the root (``layout.ledger``,
        ``layout.tuning_index``): for a store in a bucket, the bucket's object.

        Raises:
            FileNotFoundError: there is no such file (object).
            OSError, StoreError: it cannot be read.
        """
        if self.remote is None:
            return fs.read_bytes(path, limit)
        got = self.remote.get(self._object_name(path), limit)
        if got is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(path))
        return got[0]

    def write_entry(self, path: Path, data: bytes, local_only: bool = False) -> None:
        """Replace ``path``, a file of a shared entry of the root, atomically (temporary file and rename, the
        directory checked to be no link); for a store in a bucket, the bucket's object as well (unless
        ``local_only``: a copy of what the bucket holds).

        Raises:
            OSError, StoreError: it cannot be written.
        """
        self._private_root()
        directory = fs.real_directory(path.parent)
        tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a link planted at ``path`` is replaced, not followed
        finally:
            tmp.unlink(missing_ok=True)
        if self.remote is not None and not local_only:
            self.remote.put(self._object_name(path), data)

    def _private_root(self) -> None:
        """For a store in a bucket, create this machine's root as a directory of this user's only (mode 0700): it
        is a cache of this user's, not a store that others share."""
        if self.remote is not None and not self.root.is_dir():
            fs.real_directory(self.root, 0o700)

    def shared_names(self, directory: Path) -> list[str]:
        """The file names in ``directory``, a shared entry of the root: for a store in a bucket, the names of
        the objects under it (one listing), else the directory's (empty when it does not exist)."""
        if self.remote is None:
            try:
                return [entry.name for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False)]
            except (FileNotFoundError, NotADirectoryError):
                return []
        prefix = self._object_name(directory / "x")[:-1]
        return [info.name[len(prefix):] for info in self.remote.list(prefix) if "/" not in info.name[len(prefix):]]

    def device_cache_secret(self) -> bytes:
        """This client's secret that authenticates the libraries devices keep: 32 random bytes in the store's
        keys directory (mode 0600), created on first use (atomically; a racing process's file wins) and read once
        per store object.

        Raises:
            StoreError: the file cannot be created or read, or other users can read or write it.
        """
        with self._secret_lock:
            if self._secret is None:
                try:
                    fs.real_directory(self.layout.keys, 0o700)
                except OSError as exc:
                    raise StoreError(f"cannot create the device cache's secret in {self.layout.keys} "
                                     f"({exc.strerror or exc})") from None
                self._secret = _read_secret(self.layout.device_cache_key)
            return self._secret

    def store_key(self) -> StoreKey:
        """The key that authenticates this store's manifests (:mod:`pipeline.store.auth`: ``$TVMRP_STORE_KEY``,
        ``$TVMRP_STORE_KEY_FILE`` or this user's key), read once per store object and never pickled with it.

        Raises:
            UsageError, StoreError: the key is unusable (too short, a directory, open to other users...).
        """
        with self._secret_lock:
            if self._key is None:
                self._key = load_store_key(self.root)
            return self._key

    def file(self, artifact: Artifact, name: str) -> Path:
        """The path of file ``name`` of ``artifact``, once ``artifact`` authenticates with this store's key and
        the file still is what it records (its digest is remembered: a file this process verified is not read
        again).

        Raises:
            KeyError: ``name`` is not a file of ``artifact``.
            StoreError: ``artifact`` did not come from a manifest that authenticates (a forged or foreign
                reference), or the file changed since.
        """
        entry = next((f for f in artifact.files if f.name == name), None)
        if entry is None:
            raise KeyError(f"{name} is not a file of artifact {artifact.key}")
        files = {f.name: (f.sha256, f.size) for f in artifact.files}
        if not self.store_key().verifies(manifest_message(artifact.key, artifact.kind, artifact.inputs, files),
                                         artifact.mac):
            raise StoreError(f"artifact {artifact.key} was not read from a manifest that authenticates with this "
                             f"run's store key: it is not used; run again")
        path = self.path(artifact.key) / name
        for attempt in range(2):
            try:
                same = path.lstat().st_size == entry.size and file_digest(path, follow_links=False) == entry.sha256
            except OSError:
                same = False
            if same:
                self._touch(artifact.key)
                return path
            # A store in a bucket fetches the artifact again (its local copy changed) and checks once more.
            if self.remote is None or attempt or self.check(artifact.key)[0] is None:
                break
        raise StoreError(f"artifact {artifact.key}: {name} changed since it was verified; run again")

    def check_root(self) -> None:
        """Check, before a run starts, that the root is a directory or can become one (nothing is created).

        A store that cannot be written is not refused here: a run whose artifacts are all cached only reads it,
        and a write that is needed fails with a :class:`StoreError` that says why (read-only, disk full...).
        A store in a bucket is asked once whether the bucket answers.

        Raises:
            UsageError: the root exists and is not a directory, or a file stands where it would be created.
            StoreError: the bucket does not answer (credentials, endpoint, no such bucket).
        """
        where = f"Choose another store with --artifacts DIR or {ENV_VAR}=DIR"
        if self.remote is not None:
            self.remote.check()  # the bucket answers with these credentials
            where = f"It is this machine's copy of {self.location}: set XDG_CACHE_HOME to another directory"
        existing = self.root
        try:
            while not existing.exists() and existing.parent != existing:
                existing = existing.parent
            is_dir = existing.is_dir()
        except OSError as exc:  # e.g. a parent without search permission
            raise UsageError(
                f"cannot check the artifact store {clip(self.root)} ({exc.strerror or exc}). {where}"
            ) from None
        if existing == self.root and not is_dir:
            raise UsageError(f"the artifact store {clip(self.root)} exists and is not a directory. {where}")
        if not is_dir:
            raise UsageError(
                f"the artifact store {clip(self.root)} cannot be created: {clip(existing)} is a file, not a "
                f"directory. {where}"
            )

    # -- reading -------------------------------------------------------------------------------------

    def check(self, key: str) -> tuple[Artifact | None, str]:
        """Verify the artifact at ``key``: its manifest's MAC with this store's key, then every file's digest.

        For a store in a bucket, the local copy is verified; when it is missing or fails, the bucket's entry is
        fetched into the local root (its manifest authenticated before any file is downloaded, every file
        checked against its digest) and returned.

        Returns:
            ``(artifact, "ok")`` when the manifest parses and authenticates and every file matches its digest,
            else ``(None, reason)`` with a short reason: ``"missing"``, ``"unauthenticated: ..."`` (written
            before manifests carried a MAC, signed with another key, or altered), ``"corrupt: ..."``.

        Raises:
            UsageError, StoreError: the store key is unusable (:meth:`store_key`), or the bucket failed.
        """
        artifact, reason = self._local_check(key)
        if artifact is not None or self.remote is None:
            if artifact is not None:
                self._touch(key)
            return artifact, reason
        return self._fetch(key)

    def _touch(self, key: str) -> None:
        """Mark the artifact ``key`` used now (its manifest's modification time, which ``flows.store gc`` reads
        as its last use); a store this user may not write is left as it is."""
        with contextlib.suppress(OSError):
            os.utime(self.path(key) / MANIFEST, follow_symlinks=False)

    def _local_check(self, key: str) -> tuple[Artifact | None, str]:
        """:meth:`check` of the local root only."""
        artifact, reason = self._manifest(key)
        if artifact is None:
            return None, reason
        directory = self.path(key)
        for entry in artifact.files:
            path = directory / entry.name
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
                    return None, f"corrupt: {entry.name} is missing or has the wrong size"
                if file_digest(path, follow_links=False) != entry.sha256:
                    return None, f"corrupt: {entry.name} does not match its digest"
            except FileNotFoundError:
                return None, f"corrupt: {entry.name} is missing or has the wrong size"
            except OSError as exc:
                return None, f"corrupt: cannot read {entry.name} ({exc.strerror})"
        return artifact, "ok"

    def read_verified(self, key: str, name: str) -> tuple[bytes, str]:
        """The bytes of file ``name`` of the artifact at ``key``, read once and checked against its manifest
        (which must authenticate).

        Returns:
            The bytes and their sha256.

        Raises:
            StoreError: The artifact is missing or does not authenticate, or the file is unreadable or does not
                match its digest.
        """
        artifact, reason = self._manifest(key)
        if artifact is None and self.remote is not None:
            if self.check(key)[0] is not None:
                artifact, reason = self._manifest(key)
        if artifact is None:
            raise StoreError(f"artifact {key} in {self.location} is {reason}")
        path = self.path(key) / name
        try:
            expected = artifact.digest_of(name)
            data = fs.read_bytes(path)
        except OSError as exc:
            if path.is_symlink():
                raise StoreError(f"artifact {key}: {name} is a symbolic link") from None
            raise StoreError(f"artifact {key}: cannot read {name} ({exc.strerror})") from exc
        except KeyError:
            raise StoreError(f"artifact {key} has no file {name}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise StoreError(f"artifact {key}: {name} does not match its digest (corrupt)")
        return data, digest

    def _manifest(self, key: str) -> tuple[Artifact | None, str]:
        """The artifact as its manifest describes it, once the manifest authenticates (files not read), or
        ``(None, reason)``."""
        directory = self.path(key)
        try:
            for entry in (directory.parent, directory):
                if entry.is_symlink():
                    return None, f"corrupt: {entry.name} is a symbolic link"
            data = fs.read_bytes(directory / MANIFEST, _MAX_MANIFEST + 1)
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return None, f"corrupt: cannot read the manifest ({exc.strerror})"
        return self._parse_manifest(key, data)

    def _parse_manifest(self, key: str, data: bytes) -> tuple[Artifact | None, str]:
        """The artifact the manifest ``data`` of ``key`` describes, once it authenticates, or ``(None, reason)``."""
        store_key = self.store_key()  # an unusable key is the run's error, whatever the manifest says
        try:
            if len(data) > _MAX_MANIFEST:
                raise ValueError("larger than 8 MiB")
            manifest = json.loads(data)
            if manifest.get("version") == 1 and manifest.get("key") == key:
                return None, f"{_OLD} (manifest version 1)"
            if manifest.get("version") != MANIFEST_VERSION or manifest.get("key") != key:
                return None, "corrupt: manifest does not belong to this key"
            entries = tuple(
                FileEntry(str(name), str(meta["sha256"]), int(meta["size"]))
                for name, meta in sorted(manifest["files"].items())
            )
            kind = str(manifest["kind"])
            inputs = dict(manifest.get("inputs", {}))
            mac, signer = manifest.get("mac"), manifest.get("mac_key")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            return None, f"corrupt: unreadable manifest ({clip(exc)})"
        if not entries:
            return None, "corrupt: manifest lists no files"
        for entry in entries:
            if not _NAME_RE.match(entry.name) or entry.name == MANIFEST:
                return None, f"corrupt: bad file name {clip(entry.name)!r} in manifest"
            if not _KEY_RE.match(entry.sha256) or entry.size < 0:  # a digest names the file's object in a bucket
                return None, f"corrupt: bad digest or size of {entry.name} in manifest"
        files = {e.name: (e.sha256, e.size) for e in entries}
        if not store_key.verifies(manifest_message(key, kind, inputs, files), mac):
            if isinstance(signer, str) and signer != store_key.id:
                return None, f"{_FOREIGN} (id {clip(signer, 16)}; this run's is {store_key.id})"
            return None, "unauthenticated: its manifest's MAC does not verify (altered, or written without the store key)"
        return Artifact(key=key, kind=kind, files=entries, inputs=inputs, mac=mac), "ok"

    def _fetch(self, key: str) -> tuple[Artifact | None, str]:
        """Copy the bucket's entry ``key`` into the local root and return it verified, or ``(None, reason)``.

        The manifest is read first and must authenticate before any file is downloaded; each file is then
        downloaded into a temporary directory and checked against its size and digest, and the whole renamed
        into place as :meth:`put` does.
        """
        artifact, reason, _ = self._fetch_entry(key)
        return artifact, reason

    def _fetch_entry(self, key: str) -> tuple[Artifact | None, str, str | None]:
        """:meth:`_fetch`, and the ETag of the manifest it read (None when there was none)."""
        assert self.remote is not None
        got = self.remote.get(self.remote.layout.manifest(key), _MAX_MANIFEST + 1)
        if got is None:
            return None, "missing", None
        artifact, reason = self._parse_manifest(key, got[0])
        artifact, reason = self._download(key, artifact, reason, got[0])
        return artifact, reason, got[1]

    def _download(self, key: str, artifact: Artifact | None, reason: str,
                  manifest: bytes) -> tuple[Artifact | None, str]:
        """Download the files of the authenticated ``artifact`` and publish them in the local root."""
        assert self.remote is not None
        if artifact is None:
            return None, reason
        tmp = self._new_tmp(key)
        try:
            for entry in artifact.files:
                path = tmp / entry.name
                if not self.remote.download(self.remote.layout.blob(key, entry.sha256), path):
                    return None, f"corrupt: {entry.name} is missing from the bucket"
                if path.lstat().st_size != entry.size or file_digest(path, follow_links=False) != entry.sha256:
                    return None, f"corrupt: {entry.name} in the bucket does not match its digest"
            fd = fs.open_new(tmp / MANIFEST, os.O_WRONLY | os.O_TRUNC)
            with os.fdopen(fd, "wb") as f:
                f.write(manifest)
            self._publish(tmp, key)
        except OSError as exc:
            raise _store_error("write", self.root, exc) from None
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return self._local_check(key)

    def get(self, key: str) -> Artifact | None:
        """The verified artifact at ``key``, or None if it is missing or fails verification (said once per key
        and process; for a store written before its entries were authenticated, or by another key's holder,
        once per store)."""
        artifact, reason = self.check(key)
        if artifact is None and reason != "missing":
            _warn_once(self.root, key, reason)
        return artifact

    # -- writing -------------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        kind: ArtifactKind | str,
        produce: Callable[[Path], None],
        inputs: dict[str, Any] | None = None,
    ) -> Artifact:
        """Create the artifact ``key`` atomically, its manifest signed with the store key.

        Args:
            key: the content key.
            kind: what the artifact holds.
            produce: writes the artifact's files (flat, regular files) into the directory it is given.
            inputs: what produced the artifact, recorded in the manifest (JSON-serialisable).

        Returns:
            The verified artifact.

        Raises:
            StoreError: the store cannot be written (read-only, disk full, a symbolic link among its entries...)
                or the store key is unusable; the store is left unchanged.
            Whatever ``produce`` raises, after removing the temporary directory.
        """
        store_key = self.store_key()  # before producing: a build of minutes must not end on a bad key
        tmp = self._new_tmp(key)
        try:
            produce(tmp)
            artifact = self._write_manifest(tmp, key, kind, inputs, store_key)
            if self.remote is not None:
                theirs = self._publish_remote(tmp, artifact)
                if theirs is not None:  # another writer's authentic entry was there first: it is the one
                    return theirs
            existing = self._publish(tmp, key)
            if existing is not None:
                return existing
        except OSError as exc:
            raise _store_error("write", self.root, exc) from None
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return artifact

    def _new_tmp(self, key: str) -> Path:
        """A fresh temporary directory for ``key``'s files (dead writers' leftovers swept first)."""
        try:
            self._private_root()
            tmp_root = fs.real_directory(self.layout.tmp)
            self._sweep_tmp(tmp_root)
            tmp = tmp_root / f"{key}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as exc:
            raise _store_error("write", self.root, exc) from None
        return tmp

    @staticmethod
    def _write_manifest(tmp: Path, key: str, kind: ArtifactKind | str, inputs: dict[str, Any] | None,
                        store_key: StoreKey) -> Artifact:
        """fsync every file ``produce`` wrote, then write (and fsync) the manifest with their digests and its MAC;
        return the artifact it describes."""
        files = {}
        for path in sorted(tmp.iterdir()):
            if not path.is_file() or path.is_symlink() or not _NAME_RE.match(path.name) or path.name == MANIFEST:
                raise StoreError(f"artifact {key}: {path.name!r} is not a plain file with a safe name")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = (file_digest(path, follow_links=False), path.stat().st_size)
        kind_name = kind.name if isinstance(kind, ArtifactKind) else kind
        recorded = json.loads(json.dumps(inputs or {}))  # the inputs as a reader gets them back: what the MAC covers
        mac = store_key.sign(manifest_message(key, kind_name, recorded, files))
        manifest = {
            "version": MANIFEST_VERSION,
            "key": key,
            "kind": kind_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {name: {"sha256": sha256, "size": size} for name, (sha256, size) in files.items()},
            "inputs": recorded,
            "mac": mac,
            "mac_key": store_key.id,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        entries = tuple(FileEntry(name, sha256, size) for name, (sha256, size) in sorted(files.items()))
        return Artifact(key=key, kind=kind_name, files=entries, inputs=recorded, mac=mac)

    def _publish(self, tmp: Path, key: str) -> Artifact | None:
        """Rename ``tmp`` into place; return the valid copy another process put there first, if any."""
        final = self.path(key)
        fs.real_directory(final.parent)
        if os.path.lexists(final):
            existing, _ = self.check(key)
            if existing is not None:
                return existing
            self._discard_dir(final)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another process put the same key between our check and the rename: its copy wins.
            existing, _ = self.check(key) if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) else (None, "")
            if existing is None:
                raise
            return existing
        _fsync_dir(final.parent)
        return None

    def _publish_remote(self, tmp: Path, artifact: Artifact) -> Artifact | None:
        """Write ``tmp`` (files and manifest) to the bucket: every file first, under its digest, then the manifest,
        created only if absent. When another writer's manifest is there and its entry verifies, that entry
        (fetched into the local root) is returned; one that does not (another key's, altered, files gone or
        corrupt) is replaced, only if it is still the manifest that was judged. None: ours is published."""
        assert self.remote is not None
        layout = self.remote.layout
        for entry in artifact.files:
            self.remote.upload(tmp / entry.name, layout.blob(artifact.key, entry.sha256))
        manifest = fs.read_bytes(tmp / MANIFEST)
        name = layout.manifest(artifact.key)
        for _ in range(3):
            if self.remote.put(name, manifest, if_absent=True) is not None:
                return None
            theirs, reason, etag = self._fetch_entry(artifact.key)
            if theirs is not None:
                return theirs
            if etag is None:
                continue  # removed in between: create it again
            log.warning("replacing the manifest of artifact %s in %s: it is %s", artifact.key[:16], self.location,
                        reason)
            if self.remote.put(name, manifest, if_match=etag) is not None:
                return None
        raise StoreError(f"cannot publish artifact {artifact.key} in {self.location}: its manifest keeps changing; "
                         "run again")

    @staticmethod
    def _sweep_tmp(tmp_root: Path) -> None:
        """Remove temporary directories left by writers on this host that died mid-put (killed builds)."""
        for entry in tmp_root.iterdir():
            parts = entry.name.split(".")
            if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit() or entry.is_symlink():
                continue
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except PermissionError:
                pass  # alive, owned by someone else

    def ensure(
        self,
        key: str,
        kind: ArtifactKind | str,
        produce: Callable[[Path], None],
        inputs: dict[str, Any] | None = None,
        refresh: bool = False,
    ) -> tuple[Artifact, bool]:
        """Return the verified artifact ``key``, producing it if needed: at most once across processes.

        Concurrent callers for one key serialise on :meth:`lock`; the first produces, the others then find
        its copy and reuse it.

        Args:
            refresh: produce it even if a valid copy exists.

        Returns:
            ``(artifact, produced)``: ``produced`` is False when a valid copy was reused.
        """
        if not refresh and (artifact := self.get(key)) is not None:
            return artifact, False
        with self.lock(key):
            if not refresh and (artifact := self.get(key)) is not None:
                return artifact, False
            return self.put(key, kind, produce, inputs), True

    def discard(self, key: str) -> None:
        """Remove the artifact at ``key`` if present (moved aside first, so readers never see half of it); in a
        bucket, its manifest first, then its files."""
        path = self.path(key)
        if os.path.lexists(path):
            self._discard_dir(path)
        if self.remote is not None:
            self.remote.delete(self.remote.layout.manifest(key))
            for info in self.remote.list(self.remote.layout.artifact(key)):
                self.remote.delete(info.name)

    def _discard_dir(self, path: Path) -> None:
        if path.is_symlink():  # a planted link: removed itself, its target left alone
            path.unlink()
            return
        trash = fs.real_directory(self.layout.trash)
        aside = trash / f"{path.parent.name}{path.name}.{uuid.uuid4().hex[:8]}"
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 3600.0, poll: float = 0.2) -> Iterator[None]:
        """Hold an exclusive lock on ``key``: between the processes of this machine a ``flock`` (released if the
        holder dies), and for a store in a bucket, once that is held, a lease in the bucket between machines
        (:meth:`pipeline.store.s3.S3Bucket.lease`: taken over once its holder stopped renewing it).

        Raises:
            StoreError: the lock could not be taken within ``timeout`` seconds, or the store is unwritable, or
                its lock (or locks directory) is a symbolic link, or the bucket failed.
        """
        start = time.monotonic()
        with self._flock(key, timeout, poll):
            if self.remote is None:
                yield
                return
            left = max(timeout - (time.monotonic() - start), 0.0)
            with self.remote.lease(self.remote.layout.lease(key), left, max(poll, 0.5)):
                yield

    def lock_held(self, key: str) -> bool:
        """Whether a process of this machine holds the lock on ``key`` now (``flows.store gc`` leaves such keys
        alone)."""
        path = self.layout.locks / f"{check_key(key)}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _flock(self, key: str, timeout: float, poll: float) -> Iterator[None]:
        check_key(key)
        try:
            lock_dir = fs.real_directory(self.layout.locks)
            fd = fs.open_new(lock_dir / f"{key}.lock", os.O_RDWR)
        except OSError as exc:
            raise _store_error("take a lock", self.root, exc) from None
        try:
            deadline = time.monotonic() + timeout
            logged = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"another run has held the lock on artifact {key} for more than {timeout:.0f} s; "
                            f"if no other run is building it, remove {lock_dir / (key + '.lock')}"
                        ) from None
                    if not logged:
                        log.info("waiting for another run that is building artifact %s", key[:12])
                        logged = True
                    time.sleep(poll)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock


_WARNED: set[tuple[str, ...]] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(root: Path, key: str, reason: str) -> None:
    """Say why an artifact is rebuilt, once per process: per store when the whole store is concerned (written
    before its entries were authenticated, or signed with another key), else per key and reason."""
    if reason.startswith(_OLD):
        topic: tuple[str, ...] = (str(root), _OLD)
        message = (f"the artifact store {root} was written before its entries were authenticated "
                   "(docs/caching.md#authenticated-entries): each artifact is rebuilt once, when a run needs it")
    elif reason.startswith(_FOREIGN):
        topic = (str(root), reason)
        message = (f"artifacts in {root} were {reason.removeprefix('unauthenticated: ')}: they are rebuilt and "
                   "signed with this run's key; runs that share a store need one team key "
                   "(TVMRP_STORE_KEY_FILE, docs/caching.md#authenticated-entries)")
    else:
        topic = (str(root), key, reason)
        message = f"artifact {key} is {reason}; it will be rebuilt"
    with _WARNED_LOCK:
        if topic in _WARNED:
            return
        _WARNED.add(topic)
    log.warning("%s", message)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_secret(path: Path) -> bytes:
    """The 32-byte secret at ``path``, created (mode 0600) if missing; see :meth:`ArtifactStore.device_cache_secret`."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            raise StoreError(f"{path} (the device cache's secret) is a directory, not a regular file: remove it "
                             "(a new one is made)")
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"{path} (the device cache's secret) is not a regular file: remove it (a new one is made)")
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise StoreError(
                f"{path} (the device cache's secret) is readable or writable by other users or not yours: "
                f"remove it (a new one is made) or chmod 600 it"
            )
        secret = path.read_bytes()
        if len(secret) < 32:  # a racing creator had not written it yet
            time.sleep(0.1)
            secret = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot create or read the device cache's secret {path} ({exc.strerror})") from exc
    if len(secret) < 32:
        raise StoreError(f"{path} (the device cache's secret) is damaged: remove it (a new one is made)")
    return secret
