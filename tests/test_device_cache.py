"""Libraries kept on the device between sessions: a real rpc_server on 127.0.0.1, whose files we can see."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from pipeline import device_cache
from pipeline.device import DeviceSpec, EmbeddedServer, open_session
from pipeline.device_cache import DeviceCache
from pipeline.errors import RemoteRunError, StaleDeviceCopy, UsageError
from pipeline.models import ModelSpec, reference_forward, resolve_model
from tasks._sessions import registered
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload
from test_stages import compile_all


@pytest.fixture(scope="module")
def server():
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture()
def device_dir(tmp_path):
    """The device's cache directory (the server is local, so the test can look inside)."""
    path = tmp_path / "device"
    path.mkdir()
    return path


@pytest.fixture()
def session(server):
    with open_session(DeviceSpec(), server) as s:
        yield s


def blob(n: int) -> bytes:
    return np.random.default_rng(n).bytes(1000 + n)


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_put_then_find__in_a_later_session(server, tmp_path):
    cache = DeviceCache(str(tmp_path))
    data = blob(1)
    with open_session(DeviceSpec(), server) as s:
        assert cache.find(s, hashlib.sha256(data).hexdigest(), len(data)) is None
        copy = cache.put(s, data)
        assert cache.settle(s, copy)
    assert (tmp_path / copy.file).read_bytes() == data
    assert names(tmp_path) == sorted([copy.file, "tvmrp-slot-0.json"])
    with open_session(DeviceSpec(), server) as s:  # the server's session directory is gone; ours is not
        assert cache.find(s, hashlib.sha256(data).hexdigest(), len(data)) == copy
        assert cache.find(s, hashlib.sha256(data).hexdigest(), len(data) + 1) is None
        assert cache.find(s, hashlib.sha256(b"other").hexdigest(), len(data)) is None


def test_find__ignores_a_copy_without_a_complete_marker(session, tmp_path):
    cache = DeviceCache(str(tmp_path))
    data = blob(2)
    sha = hashlib.sha256(data).hexdigest()
    copy = cache.put(session, data)
    marker = tmp_path / "tvmrp-slot-0.json"
    good = marker.read_bytes()
    # A run killed between the library upload and its marker: no marker, nothing found.
    marker.unlink()
    assert cache.find(session, sha, len(data)) is None
    # A marker cut short, or one that points outside its own naming scheme, is not trusted either.
    marker.write_bytes(good[: len(good) // 2])
    assert cache.find(session, sha, len(data)) is None
    record = json.loads(good)
    marker.write_text(json.dumps({**record, "file": "../../etc/evil.so"}))
    assert cache.find(session, sha, len(data)) is None
    marker.write_bytes(good)
    assert cache.find(session, sha, len(data)) == copy


def test_put__same_library_again_replaces_its_own_slot(session, tmp_path):
    cache = DeviceCache(str(tmp_path), slots=2)
    first = cache.put(session, blob(3))
    again = cache.put(session, blob(3))
    assert again.slot == first.slot and again.file != first.file
    assert names(tmp_path) == sorted([again.file, f"tvmrp-slot-{again.slot}.json"])  # the old copy is removed


def test_put__evicts_the_oldest_slot_but_not_a_young_one(session, tmp_path, monkeypatch, caplog):
    cache = DeviceCache(str(tmp_path), slots=2)
    a, b = cache.put(session, blob(4)), cache.put(session, blob(5))
    assert {a.slot, b.slot} == {0, 1}
    # Both slots were written just now: a concurrent run may be loading them, so a third library is not kept.
    with caplog.at_level(logging.INFO, logger="pipeline.device_cache"):
        c = cache.put(session, blob(6))
    assert c.slot == -1 and "not kept" in caplog.text
    assert (tmp_path / c.file).exists()  # usable by this run
    assert not cache.settle(session, c)
    assert not (tmp_path / c.file).exists()  # and removed once loaded
    monkeypatch.setattr(device_cache, "GRACE_S", 0.0)
    d = cache.put(session, blob(7))
    assert d.slot == a.slot  # the oldest
    assert not (tmp_path / a.file).exists() and (tmp_path / b.file).exists()
    assert cache.find(session, d.sha256, d.size) == d
    assert cache.find(session, a.sha256, a.size) is None


def test_settle__removes_a_copy_a_concurrent_run_displaced(session, tmp_path):
    cache = DeviceCache(str(tmp_path))
    mine = cache.put(session, blob(8))
    theirs = cache.put(session, blob(8))  # the same library, uploaded by another run in between
    assert theirs.slot == mine.slot
    assert not cache.settle(session, mine) and not (tmp_path / mine.file).exists()
    assert cache.settle(session, theirs) and (tmp_path / theirs.file).exists()


def test_put__into_a_directory_the_device_lacks_fails_cleanly(session, tmp_path):
    with pytest.raises(RemoteRunError, match="Cannot open"):
        DeviceCache(str(tmp_path / "missing")).put(session, blob(9))
    session.device()  # the session survives the error


@pytest.mark.parametrize("bad", ["relative/dir", "", "C:\\temp"])
def test_device_cache__needs_an_absolute_device_path(bad):
    with pytest.raises(UsageError, match="absolute"):
        DeviceCache(bad)


def test_upload_stage__second_session_loads_the_kept_copy(tiny_onnx, store_root, server, device_dir):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    outputs = []
    for expect_reused in (False, True):
        with open_session(DeviceSpec(), server) as s, registered(s) as ref:
            up = upload(ref, library.artifact, str(store_root), target.arch, str(device_dir))
            assert up.reused is expect_reused and up.bytes == library.artifact.size
            assert up.remote_name.startswith(str(device_dir))
            assert (up.mb_per_s is None) is expect_reused
            load(ref)
            set_input(ref, x)
            outputs.append(run(ref, 1, 1).output)
    for output in outputs:
        np.testing.assert_allclose(output, reference_forward(model, x), atol=1e-4, rtol=1e-4)
    with open_session(DeviceSpec(), server) as s, registered(s) as ref:  # reuse=False: sent anyway
        assert not upload(ref, library.artifact, str(store_root), target.arch, str(device_dir), reuse=False).reused


def test_load_stage__a_kept_copy_that_vanished_is_stale_and_forgotten(tiny_onnx, store_root, server, device_dir):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    with open_session(DeviceSpec(), server) as s, registered(s) as ref:
        upload(ref, library.artifact, str(store_root), target.arch, str(device_dir))
        load(ref)
    for so in device_dir.glob("*.so"):
        so.unlink()  # e.g. the device's /tmp was cleaned
    with open_session(DeviceSpec(), server) as s, registered(s) as ref:
        assert upload(ref, library.artifact, str(store_root), target.arch, str(device_dir)).reused
        with pytest.raises(StaleDeviceCopy, match="upload it again"):
            load(ref)
    assert names(device_dir) == []  # the marker is gone too: the next run uploads


def test_upload_stage__falls_back_to_the_session_directory(tiny_onnx, store_root, server, device_dir, caplog):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    with open_session(DeviceSpec(), server) as s, registered(s) as ref:
        with caplog.at_level(logging.WARNING, logger="tasks.upload"):
            up = upload(ref, library.artifact, str(store_root), target.arch, str(device_dir / "missing"))
        assert not up.reused and not up.remote_name.startswith("/")
        assert "--device-cache" in caplog.text
        load(ref)
