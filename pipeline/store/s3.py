"""A bucket of S3-compatible object storage as the shared half of an artifact store (``s3://BUCKET/PREFIX``).

:class:`pipeline.store.ArtifactStore` keeps the store's shared entries (artifacts, the run ledger, the tuning
index) in the bucket and reads them through a local root (:mod:`pipeline.store.layout`); this module is the
client of the bucket: a few plain operations on objects, every failure a :class:`StoreError` that says what
to do, and :meth:`S3Bucket.lease`, the lock across machines.

The endpoint and the credentials are found the usual way, by boto3: ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``),
``AWS_REGION``, ``AWS_PROFILE`` and the AWS config files (``~/.aws/config``, ``~/.aws/credentials``; a
profile's ``endpoint_url`` and ``s3 = addressing_style = ...`` included). With an endpoint of its own, a server
is addressed path-style (``http://host:port/BUCKET/...``) unless the config says otherwise: most S3-compatible
servers (MinIO, SeaweedFS, Ceph) expect it.

What makes it safe without ``flock``: a manifest is created only if absent (``If-None-Match: *``) after every
file of the artifact is in the bucket, so a writer killed mid-put leaves no manifest and readers see nothing;
files are named by their digest, so two writers of one key never overwrite each other's bytes; a lease (an
object created only if absent, renewed by its holder, taken over once it has not been renewed for its time to
live, judged by the server's clock) makes machines build a key once.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError, UsageError, clip
from pipeline.store.layout import RemoteLayout

log = logging.getLogger(__name__)

SCHEME = "s3://"
LEASE_SECONDS = 60.0
"""How long a lease holds without renewal; its holder renews it every third of that."""
ENV_LEASE = "TVMRP_S3_LEASE_SECONDS"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,62}")
_SEGMENT = re.compile(r"[A-Za-z0-9._\-=+@,]{1,255}")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}


def is_s3(location: object) -> bool:
    """Whether ``location`` (``--artifacts``, ``$TVMRP_ARTIFACTS``) names a store in a bucket."""
    return isinstance(location, str) and location.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    """``s3://BUCKET/PREFIX``, checked: a bucket name as S3 allows it and a prefix of plain segments."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> S3Location:
        """Raises: UsageError naming what is wrong with ``text``."""
        if not is_s3(text):
            raise UsageError(f"{clip(text)!r} is not an s3:// URL")
        bucket, _, prefix = text[len(SCHEME):].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket):
            raise UsageError(f"{clip(text)!r}: {clip(bucket, 80)!r} is not a bucket name (3-63 characters: lower-case "
                             "letters, digits, '.', '-', '_'); give --artifacts s3://BUCKET/PREFIX")
        segments = prefix.split("/") if prefix else []
        if any(not _SEGMENT.fullmatch(s) or s in (".", "..") or s.startswith(".") for s in segments):
            raise UsageError(f"{clip(text)!r}: the prefix {clip(prefix, 80)!r} must be '/'-separated names of letters, "
                             "digits and ._-=+@, (none empty, none starting with '.')")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


@dataclass(frozen=True)
class ObjectInfo:
    """An object of a listing: its name (full, prefix included), size and last modification (server time)."""

    name: str
    size: int
    modified: float


def _lease_seconds() -> float:
    try:
        value = float(os.environ.get(ENV_LEASE, "") or LEASE_SECONDS)
    except ValueError:
        value = LEASE_SECONDS
    return min(max(value, 2.0), 3600.0)


class S3Bucket:
    """The bucket of a store: the objects under its prefix. Thread-safe (one boto3 client, made on first use).

    Attributes:
        location: the store's URL.
        layout: the object names of the store (:class:`pipeline.store.layout.RemoteLayout`).
    """

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.layout = RemoteLayout(location.prefix)
        self._client: Any = None
        self._transfer: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Bucket({str(self.location)!r})"

    # -- the client ---------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (endpoint, credentials and region as boto3 finds them)."""
        with self._lock:
            if self._client is None:
                self._client = _make_client()
            return self._client

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _fail(self, action: str, exc: BaseException) -> StoreError:
        """The StoreError of a failed request: what failed, why, and what to do."""
        from botocore import exceptions as bx

        where = f"the artifact store {self.location}"
        if isinstance(exc, bx.NoCredentialsError):
            hint = ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile "
                    "in ~/.aws/credentials")
        elif isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            hint = (f"cannot reach {clip(getattr(exc, 'kwargs', {}).get('endpoint_url') or self.endpoint, 120)}: "
                    "check AWS_ENDPOINT_URL (or the profile's endpoint_url) and that the server runs")
        elif isinstance(exc, bx.ReadTimeoutError):
            hint = "the server did not answer in time; run again"
        elif isinstance(exc, bx.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            hint = {
                "NoSuchBucket": f"the bucket {self.location.bucket!r} does not exist: create it",
                "AccessDenied": "access denied: the credentials may not read or write this bucket",
                "InvalidAccessKeyId": "the access key is not known to the server (AWS_ACCESS_KEY_ID)",
                "SignatureDoesNotMatch": "the secret key does not match (AWS_SECRET_ACCESS_KEY)",
                "403": "access denied: the credentials may not read or write this bucket",
            }.get(code, f"{clip(code, 60)}: {clip(exc, 160)}")
        else:
            hint = clip(f"{type(exc).__name__}: {exc}", 200)
        return StoreError(f"cannot {action} in {where} ({hint})")

    @staticmethod
    def _code(exc: BaseException) -> str:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code if code and not code.isdigit() else status or code

    def _errors(self) -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    # -- objects ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Check that the bucket answers with these credentials (one HEAD request).

        Raises:
            StoreError: it does not (no credentials, unreachable endpoint, no such bucket, access denied).
        """
        try:
            self.client.head_bucket(Bucket=self.location.bucket)
        except self._errors() as exc:
            if self._code(exc) in _MISSING:
                exc = _client_error("NoSuchBucket")
            raise self._fail("read the bucket", exc) from None

    def get(self, name: str, limit: int) -> tuple[bytes, str] | None:
        """The bytes (at most ``limit``) and ETag of object ``name``; None when it does not exist."""
        try:
            response = self.client.get_object(Bucket=self.location.bucket, Key=name)
            with contextlib.closing(response["Body"]) as body:
                data = body.read(limit)
            return data, str(response.get("ETag", ""))
        except self._errors() as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._fail(f"read {clip(name, 120)}", exc) from None

    def digest(self, name: str) -> tuple[str, int] | None:
        """The SHA-256 and size of object ``name``, read through once; None when it does not exist."""
        import hashlib

        try:
            response = self.client.get_object(Bucket=self.location.bucket, Key=name)
            h, size = hashlib.sha256(), 0
            with contextlib.closing(response["Body"]) as body:
                for chunk in body.iter_chunks(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            return h.hexdigest(), size
        except self._errors() as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._fail(f"read {clip(name, 120)}", exc) from None

    def head(self, name: str) -> tuple[str, float, float] | None:
        """``(etag, last modified, the server's time now)`` of object ``name`` (POSIX seconds, both by the
        server's clock); None when it does not exist."""
        try:
            response = self.client.head_object(Bucket=self.location.bucket, Key=name)
        except self._errors() as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._fail(f"read {clip(name, 120)}", exc) from None
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        try:
            now = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            now = time.time()
        return str(response.get("ETag", "")), response["LastModified"].timestamp(), now

    def put(self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str | None:
        """Write object ``name``; with ``if_absent`` only if it does not exist (``If-None-Match: *``), with
        ``if_match`` only if its ETag is still that one.

        Returns:
            The new object's ETag; None when the condition did not hold.
        """
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        try:
            response = self.client.put_object(Bucket=self.location.bucket, Key=name, Body=data, **conditions)
        except self._errors() as exc:
            if conditions and self._code(exc) in _PRECONDITION | ({"404", "NoSuchKey"} if if_match else set()):
                return None
            raise self._fail(f"write {clip(name, 120)}", exc) from None
        return str(response.get("ETag", ""))

    def upload(self, path: Path, name: str) -> None:
        """Copy the file ``path`` to object ``name`` (in parts, several at once, when it is large)."""
        try:
            self.client.upload_file(str(path), self.location.bucket, name, Config=self._transfer_config())
        except (*self._errors(), *_transfer_errors()) as exc:
            raise self._fail(f"write {clip(name, 120)}", exc) from None

    def download(self, name: str, path: Path) -> bool:
        """Copy object ``name`` to the new file ``path``; False when the object does not exist."""
        try:
            self.client.download_file(self.location.bucket, name, str(path), Config=self._transfer_config())
        except (*self._errors(), *_transfer_errors()) as exc:
            if self._code(exc) in _MISSING:
                return False
            raise self._fail(f"read {clip(name, 120)}", exc) from None
        return True

    def delete(self, name: str, if_match: str | None = None) -> bool:
        """Delete object ``name`` (only if its ETag is still ``if_match``, when given); False when the condition
        did not hold."""
        conditions = {"IfMatch": if_match} if if_match is not None else {}
        try:
            self.client.delete_object(Bucket=self.location.bucket, Key=name, **conditions)
        except self._errors() as exc:
            code = self._code(exc)
            if code in _MISSING:
                return True
            if conditions and code in _PRECONDITION:
                return False
            raise self._fail(f"delete {clip(name, 120)}", exc) from None
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix``, a page (1000) at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield ObjectInfo(str(item["Key"]), int(item.get("Size", 0)), item["LastModified"].timestamp())
        except self._errors() as exc:
            raise self._fail(f"list {clip(prefix, 120)}", exc) from None

    def _transfer_config(self) -> Any:
        with self._lock:
            if self._transfer is None:
                from boto3.s3.transfer import TransferConfig

                self._transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                                                max_concurrency=4)
            return self._transfer

    # -- the lock across machines ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, name: str, timeout: float, poll: float = 0.5, seconds: float | None = None) -> Iterator[None]:
        """Hold the lease object ``name``: created only if absent, renewed every third of its time to live by a
        thread of this process, deleted on exit. A lease that its holder has not renewed for its time to live
        (killed, cut off) is taken over, judged by the server's clock (last modified against the server's date),
        so clocks of the machines do not matter.

        A holder that loses its lease (paused for longer than its time to live) goes on: the manifest's
        conditional create keeps the store consistent; at worst two machines build one key.

        Raises:
            StoreError: not held within ``timeout`` seconds, or the bucket failed.
        """
        ttl = seconds or _lease_seconds()
        body = json.dumps({"owner": f"{socket.gethostname()[:64]}:{os.getpid()}", "seconds": ttl,
                           "nonce": secrets.token_hex(8)}).encode()
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            etag = self.put(name, body, if_absent=True)
            if etag is not None:
                break
            self._take_over_expired(name, ttl)
            if time.monotonic() >= deadline:
                raise StoreError(f"another machine has held the lease {clip(name, 120)} in {self.location} for more "
                                 f"than {timeout:.0f} s; it expires {ttl:.0f} s after its holder stops renewing it")
            if not logged:
                log.info("waiting for another machine that is building %s", clip(name, 120))
                logged = True
            time.sleep(poll)
        stop = threading.Event()
        held = {"etag": etag}
        renewer = threading.Thread(target=self._renew, args=(name, body, held, ttl, stop), daemon=True,
                                   name="tvmrp-lease")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=30)
            with contextlib.suppress(StoreError):
                if held["etag"] is not None:
                    self.delete(name, if_match=held["etag"])

    def lease_held(self, name: str) -> bool:
        """Whether the lease ``name`` exists and its holder renewed it within its time to live."""
        return self._lease_state(name, _lease_seconds())[0] == "held"

    def _lease_state(self, name: str, ttl: float) -> tuple[str, str, float]:
        """``("held" | "expired" | "absent", etag, seconds since its last renewal)`` of the lease ``name``, by the
        server's clock; its time to live is the one it records (1 s to 1 h), else ``ttl``."""
        info = self.head(name)
        if info is None:
            return "absent", "", 0.0
        etag, modified, now = info
        got = self.get(name, 4096)
        seconds = ttl
        if got is not None:
            try:
                recorded = json.loads(got[0]).get("seconds")
                if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and 1 <= recorded <= 3600:
                    seconds = float(recorded)
            except (ValueError, AttributeError, RecursionError):
                pass
        expired = now - modified > seconds + 1  # + the one-second resolution of Last-Modified
        return ("expired" if expired else "held"), etag, now - modified

    def _take_over_expired(self, name: str, ttl: float) -> None:
        """Delete the lease ``name`` if its holder has not renewed it for its time to live."""
        state, etag, age = self._lease_state(name, ttl)
        if state == "expired" and self.delete(name, if_match=etag):
            log.warning("took over the lease %s: its holder stopped renewing it %.0f s ago", clip(name, 120), age)

    def _renew(self, name: str, body: bytes, held: dict[str, str | None], ttl: float, stop: threading.Event) -> None:
        while not stop.wait(ttl / 3):
            try:
                etag = self.put(name, body, if_match=held["etag"])
            except StoreError as exc:
                log.warning("could not renew the lease %s (%s); trying again", clip(name, 120), exc)
                continue
            if etag is None:
                log.warning("lost the lease %s (not renewed within %.0f s): another machine may build the same key",
                            clip(name, 120), ttl)
                held["etag"] = None
                return
            held["etag"] = etag


def _make_client() -> Any:
    """A boto3 S3 client: the environment's endpoint, credentials and region; path-style addressing when an
    endpoint is given and the config does not choose; bounded timeouts and retries; checksums only where the
    API requires them (the store verifies every file by its SHA-256, and not every S3-compatible server takes
    the newer default checksums)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    scoped = session._session.get_scoped_config()  # the profile's settings (no public accessor)
    style = (scoped.get("s3") or {}).get("addressing_style") if isinstance(scoped.get("s3"), dict) else None
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or scoped.get("endpoint_url"))
    s3_options = {"addressing_style": style or ("path" if endpoint else "auto")}
    config = Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 4},
                    s3=s3_options, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", max_pool_connections=16)
    region = session.region_name or ("us-east-1" if endpoint else None)
    return session.client("s3", region_name=region, config=config)


def _client_error(code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "HeadBucket")


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """What boto3's managed transfers raise besides botocore's errors."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError

    return (S3TransferFailedError, S3UploadFailedError)
