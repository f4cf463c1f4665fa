"""Properties of the device cache's slot markers (pipeline/device/cache.py): written by DeviceCache.put, read
back by DeviceCache.copies, on a fake device (a dict of files behind the three calls TVM's server offers).

A marker read back from a device is untrusted: anything but this client's own marker is rejected (None), never
an exception. The cases at the end are what the properties once found (an overflowing number, deep nesting, a
non-ASCII mac).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.device import cache as device_cache
from pipeline.device.cache import DeviceCache, DeviceCopy
from pipeline.errors import RemoteRunError

FAST = settings(max_examples=100, deadline=None, database=None)


class FakeDevice:
    """What TVM's rpc_server offers the cache: upload, download, remove (a missing file is the device's error).

    ``free``: bytes its disk has left (None: unlimited); an upload then writes what fits and reports nothing,
    as TVM's does. ``tells``: it also registers ``tvmrp.file_info`` (a device this project starts).
    """

    def __init__(self, free: int | None = None, tells: bool = False) -> None:
        self.files: dict[str, bytes] = {}
        self.free = free
        self.tells = tells

    def upload(self, data: bytearray, path: str) -> None:
        old = self.files.pop(path, b"")  # truncated first, as std::ofstream does
        if self.free is not None:
            self.free += len(old)
            data = data[: self.free]
            self.free -= len(data)
        self.files[path] = bytes(data)

    def get_function(self, name: str) -> Any:
        if self.tells and name == "tvmrp.file_info":
            return self.file_info
        raise AttributeError(name)  # TVM's answer for a function the server does not register

    def file_info(self, path: str) -> str:
        if path not in self.files:
            return json.dumps({"error": "No such file or directory"})
        data = self.files[path]
        return json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "free": self.free})

    def download(self, path: str) -> bytearray:
        if path not in self.files:
            raise RemoteRunError(f"download {path} failed: no such file")
        return bytearray(self.files[path])

    def remove(self, path: str) -> None:
        if (data := self.files.pop(path, None)) is None:
            raise RemoteRunError(f"remove {path} failed: no such file")
        if self.free is not None:
            self.free += len(data)


class FakeSession:
    description = "fake device"

    def __init__(self, device: FakeDevice | None = None) -> None:
        self.remote = device or FakeDevice()

    def call(self, what: str, fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


DIRECTORIES = st.from_regex(r"/[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){0,2}", fullmatch=True)
SECRETS = st.binary(min_size=16, max_size=48)


def _marker_path(cache: DeviceCache, slot: int) -> str:
    return cache.path(f"tvmrp-slot-{slot}.json")


# -------------------------------------------------------------------------------------------- round trip


@FAST
@given(DIRECTORIES, SECRETS, st.lists(st.binary(max_size=64), min_size=1, max_size=4, unique=True),
       st.integers(min_value=1, max_value=6))
def test_put_then_copies__markers_round_trip_and_authenticate(directory, secret, libraries, slots):
    cache, session = DeviceCache(directory, secret, slots=slots), FakeSession()
    kept = [copy for copy in (cache.put(session, data) for data in libraries) if copy.slot >= 0]
    assert len(kept) == min(len(libraries), slots)  # fresh slots first; none is old enough to be evicted
    assert [c for c in cache.copies(session) if c is not None] == kept
    for copy, data in zip(kept, libraries):
        assert copy == DeviceCopy(copy.slot, hashlib.sha256(data).hexdigest(), len(data), copy.file, copy.time)
        assert cache.find(session, copy.sha256, copy.size) == copy
        assert session.remote.files[cache.path(copy.file)] == data


@FAST
@given(DIRECTORIES, DIRECTORIES, SECRETS, SECRETS, st.binary(max_size=32))
def test_copies__a_marker_of_another_directory_or_secret_does_not_authenticate(directory, other_dir, secret,
                                                                              other_secret, data):
    cache, session = DeviceCache(directory, secret), FakeSession()
    copy = cache.put(session, data)
    marker = session.remote.files[_marker_path(cache, copy.slot)]
    for other in (DeviceCache(other_dir, secret), DeviceCache(directory, other_secret)):
        if (other.directory, other.secret) == (directory, secret):
            continue
        planted = FakeSession()
        planted.remote.files[_marker_path(other, copy.slot)] = marker
        assert other.copies(planted)[copy.slot] is None
        assert _marker_path(other, copy.slot) not in planted.remote.files  # ignored, and removed


# ------------------------------------------------------------------------------------------ a full disk


@FAST
@given(DIRECTORIES, SECRETS, st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=3, unique=True),
       st.binary(min_size=1, max_size=5000), st.integers(min_value=0, max_value=6000), st.booleans(),
       st.integers(min_value=1, max_value=3), st.booleans())
def test_put__a_full_disk_never_records_a_short_copy_nor_loses_a_kept_one(
    directory, secret, kept, data, free, tells, slots, evict
):
    """Whatever room is left: the new library is recorded only whole; when it is not, the markers and files
    the device held before are all still there, byte for byte, and nothing of this upload is left."""
    device = FakeDevice(tells=tells)
    cache, session = DeviceCache(directory, secret, slots=slots), FakeSession(device)
    for library in kept:
        cache.put(session, library)
    before = dict(device.files)
    device.free = free
    grace, device_cache.GRACE_S = device_cache.GRACE_S, 0.0 if evict else device_cache.GRACE_S
    try:
        copy = cache.put(session, data)
    except RemoteRunError as exc:
        assert "is full" in str(exc) and "\n" not in str(exc)
        assert device.files == before
        return
    finally:
        device_cache.GRACE_S = grace
    assert device.files[cache.path(copy.file)] == data
    if copy.slot >= 0:
        assert cache.copies(session)[copy.slot] == copy


# ----------------------------------------------------------------------------------- any bytes read back


def _read_back(cache: DeviceCache, raw: bytes) -> DeviceCopy | None:
    session = FakeSession()
    session.remote.files[_marker_path(cache, 0)] = raw
    return cache.copies(session)[0]


def _marker_like() -> st.SearchStrategy[bytes]:
    """JSON objects with the marker's keys and values of any JSON type."""
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70),
                       st.just("a" * 64), st.just("tvmrp-" + "b" * 32 + ".so"), st.just(2))
    keys = st.sampled_from(["format", "sha256", "bytes", "file", "time", "mac", "directory", "x"])
    return st.dictionaries(keys, values, max_size=7).map(lambda d: json.dumps(d).encode())


@FAST
@given(st.one_of(st.binary(max_size=200), _marker_like()), SECRETS)
@example(b"", b"k" * 32)
@example(b"\xff\xfe{", b"k" * 32)
@example(b'{"mac": "x"}', b"k" * 32)
def test_copies__any_marker_bytes_are_rejected_never_raised(raw, secret):
    cache = DeviceCache("/var/cache/tvmrp", secret)
    assert _read_back(cache, raw) is None  # nothing but our own marker authenticates


@FAST
@given(SECRETS, st.binary(max_size=32), st.data())
def test_copies__a_damaged_marker_is_the_same_copy_or_rejected(secret, data, draw):
    cache, session = DeviceCache("/var/cache/tvmrp", secret), FakeSession()
    copy = cache.put(session, data)
    marker = bytearray(session.remote.files[_marker_path(cache, copy.slot)])
    for _ in range(draw.draw(st.integers(1, 3))):
        at = draw.draw(st.integers(0, 10**6)) % len(marker)  # the marker's length varies with the clock
        marker[at] = draw.draw(st.integers(0, 255))
    read = _read_back(cache, bytes(marker))
    assert read is None or read == copy


# ------------------------------------------------------------------- cases the properties found, kept


_GOOD = {"format": 2, "sha256": "a" * 64, "bytes": 1, "file": "tvmrp-" + "b" * 32 + ".so", "time": 1.0, "mac": "0"}


@pytest.mark.parametrize("raw", [json.dumps({**_GOOD, "bytes": float("inf")}).encode(),
                                 json.dumps({**_GOOD, "time": 10**400}).encode()])
def test_copies__an_overflowing_marker_is_rejected(raw):
    assert _read_back(DeviceCache("/var/cache/tvmrp", b"k" * 32), raw) is None


def test_copies__a_deeply_nested_marker_is_rejected():
    assert _read_back(DeviceCache("/var/cache/tvmrp", b"k" * 32), b"[" * 100_000) is None


def test_copies__a_non_ascii_mac_is_rejected():
    raw = json.dumps({**_GOOD, "mac": "\u00e9"}).encode()
    assert _read_back(DeviceCache("/var/cache/tvmrp", b"k" * 32), raw) is None


# ------------------------------------------------------------------------- what a device says of a file


@functools.cache
def _device_side():
    """pipeline/device/device_side/tvmrp_device.py, the module a device runs (not a package of ours)."""
    import importlib.util

    from pipeline.device.servers import DEVICE_SIDE

    spec = importlib.util.spec_from_file_location("tvmrp_device_under_test", DEVICE_SIDE / "tvmrp_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@FAST
@given(st.binary(max_size=3000))
def test_file_info__what_the_device_side_answers_round_trips(tmp_path_factory, data):
    from pipeline.device.probe import parse_file_info

    path = tmp_path_factory.mktemp("file") / "lib.so"
    path.write_bytes(data)
    info = parse_file_info(_device_side().file_info(str(path)))
    assert (info.size, info.sha256, info.error) == (len(data), hashlib.sha256(data).hexdigest(), None)
    missing = parse_file_info(_device_side().file_info(str(path) + ".missing"))
    assert missing.size is None and missing.sha256 is None and missing.error == "No such file or directory"


def _file_info_like() -> st.SearchStrategy[bytes]:
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=120),
                       st.just("a" * 64), st.lists(st.integers(), max_size=3))
    keys = st.sampled_from(["schema", "path", "size", "sha256", "free", "error", "x"])
    return st.dictionaries(keys, values, max_size=6).map(lambda d: json.dumps(d).encode())


@FAST
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), _file_info_like()))
@example(b"[" * 100_000)
@example(json.dumps({"size": 2**70, "sha256": "a" * 64}))
@example(json.dumps({"error": "\x1b[31m" + "x" * 500}))
def test_parse_file_info__any_answer_is_a_file_info_or_none_never_raised(answer):
    """A device's answer is untrusted: whatever it is, it parses into sane fields or is rejected."""
    from pipeline.device.probe import FileInfo, parse_file_info

    info = parse_file_info(answer)
    assert info is None or isinstance(info, FileInfo)
    if info is not None and info.error is None:
        assert isinstance(info.size, int) and 0 <= info.size < 1 << 62 and len(info.sha256) == 64
    if info is not None and info.error is not None:
        assert info.size is None and len(info.error) <= 100 and info.error.isprintable()
