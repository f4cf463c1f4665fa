"""The store key: what authenticates every artifact of a store, kept outside the store.

Each artifact's manifest carries an HMAC-SHA256 (:func:`manifest_mac`) over its key, kind, inputs and its
files' digests and sizes, made with the store key. An artifact whose MAC does not verify with the key of the
run reading it is a cache miss: it is never read, linked, uploaded or evaluated, and it is rebuilt. So
whoever can write the store but does not hold the key can make runs rebuild, and nothing more.

Where the key comes from, first found:

    $TVMRP_STORE_KEY         the key itself (at least 32 characters, e.g. ``openssl rand -hex 32``): a team's
                             key handed to runs by a secret manager or a CI secret
    $TVMRP_STORE_KEY_FILE    a file holding it (a team's key for a shared store): a regular file outside the
                             store that nobody but its owner may write and nobody outside its group may read
    this user's key          ``$XDG_CONFIG_HOME/tvmrp/store.key`` (by default ``~/.config/tvmrp/store.key``):
                             64 hex digits created on first use (mode 0600), refused unless it is a regular file
                             of this user's that only they can read or write

Runs that share a store (users, machines, a fleet's build machines) reuse each other's artifacts only when
they hold the same key: give them the team key. The key never travels with a store object that is pickled
into a worker process: each process reads it (:class:`StoreKey` refuses to be pickled).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError, UsageError, clip

ENV_KEY = "TVMRP_STORE_KEY"
ENV_KEY_FILE = "TVMRP_STORE_KEY_FILE"
MIN_KEY_BYTES = 32
_MAX_KEY_FILE = 4096
_DOMAIN = "tvmrp-artifact-manifest"


@dataclass(frozen=True)
class StoreKey:
    """The secret that authenticates a store's manifests, and where it was found (for messages).

    Attributes:
        secret: the key's bytes (never shown, never pickled).
        source: where it came from: ``$TVMRP_STORE_KEY`` or the key file's path.
    """

    secret: bytes = field(repr=False)
    source: str

    @property
    def id(self) -> str:
        """A short public name of the key (16 hex digits of an HMAC of a constant): manifests record it, so a
        manifest signed with another key is told apart from one that was altered."""
        return hmac.new(self.secret, b"tvmrp store key id", hashlib.sha256).hexdigest()[:16]

    def sign(self, message: bytes) -> str:
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def verifies(self, message: bytes, mac: object) -> bool:
        return isinstance(mac, str) and hmac.compare_digest(self.sign(message), mac)

    def __reduce__(self) -> Any:
        raise TypeError("a store key is not pickled: each process reads it from where it is kept")


def manifest_message(key: str, kind: str, inputs: dict[str, Any], files: dict[str, tuple[str, int]]) -> bytes:
    """What a manifest's MAC covers, in one canonical encoding: the artifact key, its kind, its inputs (as
    JSON reads them back) and each file's SHA-256 and size."""
    return json.dumps(
        {"domain": _DOMAIN, "key": key, "kind": kind, "inputs": inputs,
         "files": {name: [sha256, size] for name, (sha256, size) in sorted(files.items())}},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    ).encode()


def default_key_path() -> Path:
    """This user's key file: ``$XDG_CONFIG_HOME/tvmrp/store.key`` (a relative or unset ``XDG_CONFIG_HOME``
    means ``~/.config``)."""
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "tvmrp" / "store.key"


def load_store_key(store_root: Path) -> StoreKey:
    """The key this process authenticates ``store_root``'s artifacts with (see the module docstring).

    Raises:
        UsageError: ``$TVMRP_STORE_KEY`` is shorter than 32 characters.
        StoreError: the key file is missing (a team key), unreadable, a directory, too short, open to other
            users, or inside the store.
    """
    value = os.environ.get(ENV_KEY, "").strip()
    if value:
        if len(value.encode()) < MIN_KEY_BYTES:
            raise UsageError(f"{ENV_KEY} holds {len(value.encode())} bytes: a store key needs at least "
                             f"{MIN_KEY_BYTES} (e.g. the output of: openssl rand -hex 32)")
        return StoreKey(value.encode(), f"${ENV_KEY}")
    named = os.environ.get(ENV_KEY_FILE, "").strip()
    if named:
        path = Path(named).expanduser().absolute()
        _outside(path, store_root)
        return StoreKey(_read_team_key(path), str(path))
    path = default_key_path()
    _outside(path, store_root)
    return StoreKey(_read_own_key(path), str(path))


def _outside(path: Path, store_root: Path) -> None:
    """Refuse a key file inside the store it authenticates (whoever writes the store could read or replace it)."""
    try:
        inside = path.resolve().is_relative_to(store_root.resolve())
    except OSError:
        inside = False
    if inside:
        raise StoreError(f"the store key {clip(path)} lies inside the artifact store {clip(store_root)}: whoever "
                         f"writes the store could read or replace it. Keep it outside ({ENV_KEY_FILE}=FILE)")


def _kind_problem(path: Path, info: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise StoreError(f"{what} {clip(path)} is a directory, not a key file: remove it or point {ENV_KEY_FILE} "
                         "at the key file")
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{what} {clip(path)} is not a regular file: remove it")


def _key_bytes(path: Path, what: str, fix: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1).strip()
    except OSError as exc:
        raise StoreError(f"cannot read {what} {clip(path)} ({exc.strerror or exc})") from None
    if not MIN_KEY_BYTES <= len(data) <= _MAX_KEY_FILE:
        raise StoreError(f"{what} {clip(path)} holds {len(data)} bytes, not a key of {MIN_KEY_BYTES} to "
                         f"{_MAX_KEY_FILE}: {fix}")
    return data


def _read_team_key(path: Path) -> bytes:
    """A team's key file: it must exist, be a regular file (a link to one is fine), be writable by nobody but
    its owner and readable by nobody outside its owner and group."""
    what = f"the store key ({ENV_KEY_FILE})"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise StoreError(f"{what} {clip(path)} does not exist: create it once for the team "
                         f"(openssl rand -hex 32 > FILE; chmod 640 FILE) and share it, or unset {ENV_KEY_FILE}") from None
    except OSError as exc:
        raise StoreError(f"cannot read {what} {clip(path)} ({exc.strerror or exc})") from None
    _kind_problem(path, info, what)
    if info.st_mode & 0o027:
        raise StoreError(f"{what} {clip(path)} is writable by its group or others, or readable by others "
                         f"(mode {stat.S_IMODE(info.st_mode):o}): chmod 640 it")
    return _key_bytes(path, what, "write one with openssl rand -hex 32")


def _read_own_key(path: Path) -> bytes:
    """This user's key file, created (64 hex digits, mode 0600) on first use; a racing process's file wins."""
    what = "this user's store key"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.path.lexists(path):
            _create_key(path)
        info = path.lstat()
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot create or read {what} {clip(path)} ({exc.strerror or exc}); or give the runs a "
                         f"key with {ENV_KEY_FILE}=FILE") from None
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{what} {clip(path)} is a symbolic link: replace it by the file itself, or set "
                         f"{ENV_KEY_FILE} to the file")
    _kind_problem(path, info, what)
    if info.st_mode & 0o077 or info.st_uid != os.getuid():
        raise StoreError(f"{what} {clip(path)} is readable or writable by other users or not yours: chmod 600 it "
                         "if it is yours, else remove it (a new one is made, and the store's artifacts are rebuilt)")
    return _key_bytes(path, what, "remove it (a new one is made, and the store's artifacts are rebuilt)")


def _create_key(path: Path) -> None:
    """Write a new key next to ``path`` and link it into place: readers never see half a key, and when two
    processes create it at once, the first link wins and both read that one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
