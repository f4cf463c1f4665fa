"""Libraries kept on the device between sessions: a real rpc_server on 127.0.0.1, whose files we can see.

Includes the planted-library attacks: another user of the device writes a library whose constructor leaves
proof of execution, plus a forged marker naming it, or overwrites a kept copy in place; no run may load it.
And full disks (a tmpfs; root only): TVM's upload does not report a failed write. ``server`` registers
``tvmrp.file_info`` (a device this project starts); ``stock`` is a stock rpc_server, which cannot tell a file's
size or digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess

import numpy as np
import pytest

from pipeline.store import ArtifactStore
from pipeline.device import cache as device_cache
from pipeline.device import DeviceSpec, open_session
from pipeline.device.cache import DeviceCache, load_placed, place
from pipeline.device.probe import file_info
from pipeline.errors import DeviceDiskFull, KeptCopyFailed, RemoteRunError, StoreError, UsageError
from pipeline.latency import Timing
from pipeline.models import ModelSpec, reference_forward, resolve_model
from tasks._live import opened
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload
from support import compile_all, fill_disk

SECRET = b"k" * 32

# ``server``, an embedded rpc_server for the module: tests/integration/conftest.py.


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


@pytest.fixture(scope="module")
def stock():
    """A stock rpc_server (no ``tvmrp.file_info``), as someone else would run it."""
    from pipeline.device import EmbeddedServer

    with EmbeddedServer(identify=False) as srv:
        yield srv


@pytest.fixture(params=["tells", "stock"])
def any_session(request, server, stock):
    """A session to each kind of server: one that tells a file's size and digest, and a stock one."""
    with open_session(DeviceSpec(), server if request.param == "tells" else stock) as s:
        yield s


def blob(n: int) -> bytes:
    return np.random.default_rng(n).bytes(1000 + n)


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_put_then_find__in_a_later_session(server, tmp_path):
    cache = DeviceCache(str(tmp_path), SECRET)
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


def test_put__file_names_are_unguessable(session, tmp_path):
    cache = DeviceCache(str(tmp_path), SECRET)
    data = blob(1)
    a, b = cache.put(session, data), cache.put(session, data)
    digest = hashlib.sha256(data).hexdigest()
    assert a.file != b.file and digest[:16] not in a.file and digest[:16] not in b.file


def test_find__ignores_a_copy_without_a_complete_marker(session, tmp_path):
    cache = DeviceCache(str(tmp_path), SECRET)
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


def test_find__a_marker_needs_this_clients_secret_and_directory(session, tmp_path):
    data = blob(3)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = DeviceCache(str(tmp_path / "a"), SECRET)
    copy = mine.put(session, data)
    assert mine.find(session, sha, len(data)) == copy
    # Another client's secret (a forger who knows the format but not the key): not found, marker removed.
    assert DeviceCache(str(tmp_path / "a"), b"x" * 32).find(session, sha, len(data)) is None
    assert not (tmp_path / "a" / "tvmrp-slot-0.json").exists()
    # A marker copied into another directory does not authenticate there either.
    copy = mine.put(session, data)
    (tmp_path / "b" / copy.file).write_bytes(data)
    (tmp_path / "b" / "tvmrp-slot-0.json").write_bytes((tmp_path / "a" / "tvmrp-slot-0.json").read_bytes())
    assert DeviceCache(str(tmp_path / "b"), SECRET).find(session, sha, len(data)) is None


def test_put__same_library_again_leaves_a_young_copy_a_concurrent_run_may_still_load(session, tmp_path):
    # Two runs of one library that both found nothing upload it twice. The second must not remove the first's
    # copy: that run loads it after its put returns (CI once failed a run of three concurrent CLIs this way).
    cache = DeviceCache(str(tmp_path), SECRET, slots=2)
    first = cache.put(session, blob(3))
    again = cache.put(session, blob(3))
    assert again.slot == -1 and again.file != first.file
    assert (tmp_path / first.file).read_bytes() == blob(3)  # still there for the run that is about to load it
    assert not cache.settle(session, again) and cache.settle(session, first)
    assert names(tmp_path) == sorted([first.file, f"tvmrp-slot-{first.slot}.json"])


@pytest.mark.parametrize("why", ["old", "distrusted"])
def test_put__same_library_again_replaces_its_own_slot_once_old_or_distrusted(session, tmp_path, monkeypatch, why):
    cache = DeviceCache(str(tmp_path), SECRET, slots=2)
    first = cache.put(session, blob(3))
    if why == "old":
        monkeypatch.setattr(device_cache, "GRACE_S", 0.0)
    again = cache.put(session, blob(3), replace_kept=why == "distrusted")  # e.g. the retry after a lost device
    assert again.slot == first.slot and again.file != first.file
    assert names(tmp_path) == sorted([again.file, f"tvmrp-slot-{again.slot}.json"])  # the old copy is removed
    data = blob(3)  # place() without reuse is that retry
    third = place(session, cache, data, hashlib.sha256(data).hexdigest(), reuse=False, session_name="x.so")
    assert third.copy.slot == first.slot and not (tmp_path / again.file).exists()


def test_put__evicts_the_oldest_slot_but_not_a_young_one(session, tmp_path, monkeypatch, caplog):
    cache = DeviceCache(str(tmp_path), SECRET, slots=2)
    a, b = cache.put(session, blob(4)), cache.put(session, blob(5))
    assert {a.slot, b.slot} == {0, 1}
    # Both slots were written just now: a concurrent run may be loading them, so a third library is not kept.
    with caplog.at_level(logging.INFO, logger="pipeline.device.cache"):
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


def test_settle__removes_a_copy_a_concurrent_run_displaced(session, tmp_path, monkeypatch):
    cache = DeviceCache(str(tmp_path), SECRET)
    mine = cache.put(session, blob(8))
    # Another run read the slots before our marker was written, saw slot 0 free and takes it too.
    monkeypatch.setattr(DeviceCache, "copies", lambda self, s: [None] * self.slots)
    theirs = cache.put(session, blob(8))
    monkeypatch.undo()
    assert theirs.slot == mine.slot
    assert (tmp_path / mine.file).exists()  # not removed under the run that is loading it
    assert not cache.settle(session, mine) and not (tmp_path / mine.file).exists()  # but once it has loaded it
    assert cache.settle(session, theirs) and (tmp_path / theirs.file).exists()


def test_put__into_a_directory_the_device_lacks_fails_cleanly(session, tmp_path):
    with pytest.raises(RemoteRunError, match="Cannot open"):
        DeviceCache(str(tmp_path / "missing"), SECRET).put(session, blob(9))
    session.device()  # the session survives the error


@pytest.mark.parametrize("bad", ["relative/dir", "", "C:\\temp"])
def test_device_cache__needs_an_absolute_device_path(bad):
    with pytest.raises(UsageError, match="absolute"):
        DeviceCache(bad, SECRET)


def test_device_cache_secret__is_private_stable_and_read_once_per_store(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.device_cache_secret()
    path = tmp_path / ".keys" / "device-cache.key"
    assert len(first) == 32 and ArtifactStore(tmp_path).device_cache_secret() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # readable by others: a forger could learn it
    assert store.device_cache_secret() == first  # read once: this store object does not read it again
    with pytest.raises(StoreError, match="readable or writable by other users"):
        ArtifactStore(tmp_path).device_cache_secret()
    path.unlink()
    path.mkdir()  # a directory where the key should be: said so, not "readable by other users"
    with pytest.raises(StoreError, match="not a regular file"):
        ArtifactStore(tmp_path).device_cache_secret()


def test_upload_stage__second_session_loads_the_kept_copy(tiny_onnx, store_root, server, device_dir):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    outputs = []
    for expect_reused in (False, True):
        with open_session(DeviceSpec(), server) as s, opened(s) as ref:
            up = upload(ref, library.artifact, ArtifactStore(store_root), target.arch, str(device_dir))
            assert up.reused is expect_reused and up.bytes == library.artifact.size
            assert up.remote_name.startswith(str(device_dir))
            outputs.append(run(set_input(load(up, ArtifactStore(store_root)), x), Timing(repeat=1)).output)
    for output in outputs:
        np.testing.assert_allclose(output, reference_forward(model, x), atol=1e-4, rtol=1e-4)
    with open_session(DeviceSpec(), server) as s, opened(s) as ref:  # reuse=False: sent anyway
        assert not upload(ref, library.artifact, ArtifactStore(store_root), target.arch, str(device_dir), reuse=False).reused


def test_upload_stage__falls_back_to_the_session_directory(tiny_onnx, store_root, server, device_dir, caplog):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    with open_session(DeviceSpec(), server) as s, opened(s) as ref:
        with caplog.at_level(logging.WARNING, logger="pipeline.device.cache"):
            up = upload(ref, library.artifact, ArtifactStore(store_root), target.arch, str(device_dir / "missing"))
        assert not up.reused and not up.remote_name.startswith("/")
        assert "--device-cache" in caplog.text
        load(up, ArtifactStore(store_root))


def _planted_library(directory, proof):
    """A shared library whose constructor writes ``proof``: what an attacker would plant."""
    source = directory / "evil.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void run(void) {{ FILE *f = fopen("{proof}", "w"); '
        'if (f) { fputs("ran", f); fclose(f); } }\n'
    )
    out = directory / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(source)], check=True)
    return out.read_bytes()


def test_planted_library_and_forged_marker__never_load(tiny_onnx, store_root, server, device_dir, tmp_path):
    """Another user of the device plants a library named like ours and a marker naming it, with the right
    digest and size: the run ignores and removes the marker, uploads its own library, and nothing planted runs."""
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    data = (store_root / library.artifact.key[:2] / library.artifact.key[2:] / "model.so").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    proof = tmp_path / "proof-of-execution"
    planted = f"tvmrp-{sha[:16]}-aaaaaaaaaaaa.so"
    (device_dir / planted).write_bytes(_planted_library(tmp_path, proof))
    forged = {"format": 1, "sha256": sha, "bytes": len(data), "file": planted, "time": 0.0}
    for fmt in (1, 2):  # the old format, and the new one with a made-up MAC
        (device_dir / "tvmrp-slot-0.json").write_text(json.dumps({**forged, "format": fmt, "mac": "0" * 64}))
        with open_session(DeviceSpec(), server) as s, opened(s) as ref:
            up = upload(ref, library.artifact, ArtifactStore(store_root), target.arch, str(device_dir))
            assert not up.reused and up.remote_name != str(device_dir / planted)
            loaded = load(up, ArtifactStore(store_root))
            x = np.zeros(model.input_shape, np.float32)
            out = run(set_input(loaded, x), Timing(repeat=1)).output
        np.testing.assert_allclose(out, reference_forward(model, x), atol=1e-4, rtol=1e-4)
        assert not proof.exists(), "the planted library ran"
        marker = json.loads((device_dir / "tvmrp-slot-0.json").read_text())
        assert marker["file"] == os.path.basename(loaded.remote_name) and marker["format"] == 2


def _library(tiny_onnx, store_root):
    """The tiny model's library: (target, library stage result, its bytes, their sha256)."""
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    data = ArtifactStore(store_root).file(library.artifact, "model.so").read_bytes()
    return target, library, data, hashlib.sha256(data).hexdigest()


def test_file_info__size_and_digest_of_a_file_on_the_device(session, tmp_path, stock):
    data = blob(10)
    (tmp_path / "a.so").write_bytes(data)
    info = file_info(session, str(tmp_path / "a.so"))
    assert (info.size, info.sha256, info.error) == (len(data), hashlib.sha256(data).hexdigest(), None)
    assert info.free is not None and info.free > 0
    session.call("upload", session.remote.upload, bytearray(data), "relative.so")  # the session's directory
    assert file_info(session, "relative.so").sha256 == hashlib.sha256(data).hexdigest()
    missing = file_info(session, str(tmp_path / "missing.so"))
    assert missing.size is None and "No such file" in missing.error
    assert file_info(session, str(tmp_path)).error == "Is a directory"
    os.mkfifo(tmp_path / "fifo")  # no writer: opening it must not hang the session
    assert file_info(session, str(tmp_path / "fifo")).error == "not a regular file"
    with open_session(DeviceSpec(), stock) as s:
        assert file_info(s, str(tmp_path / "a.so")) is None  # a stock server cannot tell


def test_put__full_disk__one_error_nothing_left_and_the_earlier_copy_kept(any_session, small_disk):
    """TVM's upload writes what fits and reports nothing. The upload must not leave a short library, an empty
    marker, or touch the marker of the copy kept before; once space is freed that copy is found again."""
    disk = small_disk("1m")
    cache = DeviceCache(str(disk), SECRET, slots=1)  # one slot: the new library would evict the kept one
    kept = cache.put(any_session, blob(11))
    marker = (disk / "tvmrp-slot-0.json").read_bytes()
    fill_disk(disk)
    before = names(disk)
    with pytest.raises(RemoteRunError, match=f"that holds {disk} is full") as failed:
        device_cache.GRACE_S, grace = 0.0, device_cache.GRACE_S
        try:
            cache.put(any_session, blob(300_000))
        finally:
            device_cache.GRACE_S = grace
    assert "\n" not in str(failed.value) and "TVM's upload does not report a failed write" in str(failed.value)
    assert names(disk) == before and (disk / "tvmrp-slot-0.json").read_bytes() == marker
    (disk / "filler").unlink()
    assert cache.find(any_session, kept.sha256, kept.size) == kept
    assert (disk / kept.file).read_bytes() == blob(11)


def test_place__full_session_directory__one_error_and_no_short_library_loaded(tiny_onnx, store_root, small_disk):
    """Without a device cache the library goes to the server's session directory, in its TMPDIR: a full disk
    there is said so before anything is loaded, on a stock server too (by the check file written after it; a
    device that tells a file's size is asked, as in the tests above)."""
    from pipeline.device import EmbeddedServer

    disk = small_disk("1m")
    _, _, data, sha = _library(tiny_onnx, store_root)
    server = EmbeddedServer(identify=False)
    server._environment = lambda env=server._environment: {**env(), "TMPDIR": str(disk)}
    with server, open_session(DeviceSpec(), server) as s:
        fill_disk(disk)
        with pytest.raises(DeviceDiskFull, match="that holds the session's directory is full") as failed:
            place(s, None, data, sha, session_name="model.so")
        assert "check file written right after the library came back with 0 bytes" in str(failed.value)
        with pytest.raises(RemoteRunError, match="cannot find file"):
            s.call("load", s.remote.load_module, "model.so")  # nothing short was left to load


def _planted_library_of_size(directory, proof, size):
    """A planted library (its constructor writes ``proof``), padded with zeros to ``size`` bytes when given."""
    data = _planted_library(directory, proof)
    assert size is None or len(data) <= size
    return data if size is None else data + b"\0" * (size - len(data))


@pytest.mark.parametrize("size", ["smaller", "same"])
def test_load_placed__a_kept_copy_overwritten_in_place_never_loads(session, tmp_path, tiny_onnx, store_root, size):
    """The kept copy is overwritten in place (its marker kept) with a library of another size, or of the same
    size: the device tells its size and digest, so it is forgotten before anything loads it."""
    _, _, data, sha = _library(tiny_onnx, store_root)
    cache, proof = DeviceCache(str(tmp_path / "device"), SECRET), tmp_path / "proof-of-execution"
    (tmp_path / "device").mkdir()
    first = place(session, cache, data, sha, session_name="x.so")
    load_placed(session, cache, first, lambda path: session.call("load", session.remote.load_module, path))
    planted = _planted_library_of_size(tmp_path, proof, None if size == "smaller" else len(data))
    (tmp_path / "device" / first.copy.file).write_bytes(planted)
    again = place(session, cache, data, sha, session_name="x.so")
    assert again.reused
    with pytest.raises(KeptCopyFailed, match="holds .* bytes sent|another SHA-256") as failed:
        load_placed(session, cache, again, lambda path: session.call("load", session.remote.load_module, path))
    assert "forgotten" in str(failed.value)
    assert not proof.exists(), "the planted library ran"
    assert names(tmp_path / "device") == [] and cache.find(session, sha, len(data)) is None


def test_load_placed__a_stock_servers_kept_copy_that_does_not_load_is_forgotten(tmp_path, stock):
    """A stock server cannot tell a file's digest: a kept copy that is not a library fails to load, and is
    forgotten (the device chain then uploads again)."""
    cache, data = DeviceCache(str(tmp_path), SECRET), blob(12)
    with open_session(DeviceSpec(), stock) as s:
        kept = place(s, cache, data, hashlib.sha256(data).hexdigest(), session_name="x.so")
        assert kept.copy.slot == 0
        again = place(s, cache, data, hashlib.sha256(data).hexdigest(), session_name="x.so")
        assert again.reused
        with pytest.raises(KeptCopyFailed, match="did not load"):
            load_placed(s, cache, again, lambda path: s.call("load", s.remote.load_module, path))
    assert names(tmp_path) == []
