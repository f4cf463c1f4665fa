"""What a writer of the store who does not hold the store key can and cannot do (docs/security.md): every
artifact's manifest carries an HMAC-SHA256 made with a key kept outside the store, an artifact that does not
authenticate is a cache miss and is never read; the store never follows a symbolic link out of itself; a
Prefect cache record that is not one of ours is removed before Prefect reads it. Every planted file is made
here, on the fly. (The same cases through the command line: tests/integration/test_planted_entries.py.)"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from pipeline.errors import StoreError, UsageError
from pipeline.store import MANIFEST, Artifact, ArtifactStore
from pipeline.store.artifacts import MANIFEST_VERSION

KEY = "ab" + "0" * 62
OTHER = "cd" + "1" * 62
THIRD = "ef" + "2" * 62


@pytest.fixture(autouse=True)
def own_key(tmp_path, monkeypatch) -> Path:
    """This test's own per-user key file (its XDG_CONFIG_HOME), no team key."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TVMRP_STORE_KEY", raising=False)
    monkeypatch.delenv("TVMRP_STORE_KEY_FILE", raising=False)
    return tmp_path / "config" / "tvmrp" / "store.key"


def write_two(directory: Path) -> None:
    (directory / "a.bin").write_bytes(b"alpha" * 1000)
    (directory / "b.txt").write_text("beta")


def plant(store: ArtifactStore, key: str, name: str, data: bytes) -> None:
    """Replace file ``name`` of ``key`` by ``data`` and rewrite the manifest's digest and size to match, as
    anyone who can write the store can."""
    (store.path(key) / name).write_bytes(data)
    manifest_path = store.path(key) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest_path.write_text(json.dumps(manifest))


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# -- authenticated entries ----------------------------------------------------------------------------------------------


def test_put__signs_the_manifest_with_a_private_key_kept_outside_the_store(tmp_path, own_key):
    store = ArtifactStore(tmp_path / "store")
    art = store.put(KEY, "build", write_two, {"model": "m"})
    manifest = json.loads((store.path(KEY) / MANIFEST).read_text())
    assert manifest["version"] == MANIFEST_VERSION == 2 and manifest["mac"] == art.mac and len(art.mac) == 64
    assert manifest["mac_key"] == store.store_key().id
    assert own_key.is_file() and own_key.stat().st_mode & 0o777 == 0o600 and own_key.parent.stat().st_mode & 0o077 == 0
    assert len(own_key.read_text().strip()) == 64
    assert not any(p.name.endswith(".key") for p in (tmp_path / "store").rglob("*"))
    assert store.get(KEY) == art


def test_planted_file_with_a_rewritten_manifest__is_a_miss_and_never_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    art = store.put(KEY, "relax-ir", write_two)
    plant(store, KEY, "a.bin", b"planted module")
    artifact, why = store.check(KEY)
    assert artifact is None and "MAC does not verify" in why
    assert store.get(KEY) is None
    with pytest.raises(StoreError, match="does not verify"):
        store.read_verified(KEY, "a.bin")
    with pytest.raises(StoreError, match="changed since it was verified"):
        store.file(art, "a.bin")  # the reference this run verified earlier: the file under it changed
    rebuilt, produced = store.ensure(KEY, "relax-ir", write_two)
    assert produced and rebuilt == art and store.read_verified(KEY, "a.bin")[0] == b"alpha" * 1000


@pytest.mark.parametrize("forge", [
    lambda m: m.pop("mac"),
    lambda m: m.update(mac="0" * 64),
    lambda m: m.update(kind="library"),
    lambda m: m["inputs"].update(model="other"),
    lambda m: m.update(version=3),
])
def test_manifest_altered_or_unsigned__is_a_miss(tmp_path, forge):
    store = ArtifactStore(tmp_path / "store")
    store.put(KEY, "build", write_two, {"model": "m"})
    manifest = json.loads((store.path(KEY) / MANIFEST).read_text())
    forge(manifest)
    (store.path(KEY) / MANIFEST).write_text(json.dumps(manifest))
    assert store.check(KEY)[0] is None and store.get(KEY) is None


def test_file__refuses_a_reference_that_did_not_come_from_an_authenticated_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    art = store.put(KEY, "build", write_two)
    for forged in (Artifact(art.key, art.kind, art.files, art.inputs),  # e.g. read back from a Prefect record
                   Artifact(art.key, art.kind, art.files, {"model": "other"}, art.mac)):
        with pytest.raises(StoreError, match="does not authenticate|not read from a manifest"):
            store.file(forged, "a.bin")
    assert store.file(art, "a.bin") == store.path(KEY) / "a.bin"


def test_store_key__another_users_key_misses_a_team_key_shares(tmp_path, monkeypatch, caplog):
    """Two "machines" share a store: with their own keys neither reuses the other's build; with one team key
    (one from a file, the other from the environment) they do."""
    root = tmp_path / "shared"
    team = tmp_path / "team.key"
    team.write_text(os.urandom(32).hex() + "\n")
    team.chmod(0o640)
    monkeypatch.setenv("TVMRP_STORE_KEY_FILE", str(team))
    built = ArtifactStore(root).put(KEY, "build", write_two)

    monkeypatch.delenv("TVMRP_STORE_KEY_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine-b"))
    with caplog.at_level(logging.WARNING):
        assert ArtifactStore(root).get(KEY) is None
    assert len(warnings_about(caplog, "signed with another store key")) == 1

    monkeypatch.setenv("TVMRP_STORE_KEY", team.read_text().strip())
    assert ArtifactStore(root).get(KEY) == built


def test_store_key__unusable_keys_are_one_clear_error(tmp_path, monkeypatch, own_key):
    root = tmp_path / "store"
    own_key.mkdir(parents=True)
    with pytest.raises(StoreError, match="is a directory, not a key file"):
        ArtifactStore(root).put(KEY, "build", write_two)
    own_key.rmdir()
    own_key.write_text("0" * 64)
    own_key.chmod(0o644)
    with pytest.raises(StoreError, match="readable or writable by other users"):
        ArtifactStore(root).put(KEY, "build", write_two)
    own_key.chmod(0o600)
    own_key.write_text("short")
    with pytest.raises(StoreError, match="holds 5 bytes"):
        ArtifactStore(root).put(KEY, "build", write_two)

    team = tmp_path / "team"
    team.mkdir()
    monkeypatch.setenv("TVMRP_STORE_KEY_FILE", str(team))
    with pytest.raises(StoreError, match="is a directory, not a key file"):
        ArtifactStore(root).put(KEY, "build", write_two)
    monkeypatch.setenv("TVMRP_STORE_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(StoreError, match="does not exist"):
        ArtifactStore(root).put(KEY, "build", write_two)
    inside = root / "team.key"
    root.mkdir(exist_ok=True)
    inside.write_text("k" * 64)
    inside.chmod(0o600)
    monkeypatch.setenv("TVMRP_STORE_KEY_FILE", str(inside))
    with pytest.raises(StoreError, match="lies inside the artifact store"):
        ArtifactStore(root).put(KEY, "build", write_two)
    monkeypatch.setenv("TVMRP_STORE_KEY", "too short")
    with pytest.raises(UsageError, match="at least 32"):
        ArtifactStore(root).put(KEY, "build", write_two)
    assert not ArtifactStore(root).path(KEY).exists()


def test_store_key__never_pickled_each_process_reads_its_own(tmp_path, monkeypatch):
    """A fleet's worker process unpickles the store: the key does not travel in the pickle; the worker reads
    the key its environment gives."""
    monkeypatch.setenv("TVMRP_STORE_KEY", "k" * 40)
    store = ArtifactStore(tmp_path / "store")
    built = store.put(KEY, "build", write_two)
    blob = pickle.dumps(store)
    assert b"k" * 40 not in blob and store.store_key().secret not in blob
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(store.store_key())
    monkeypatch.setenv("TVMRP_STORE_KEY", "j" * 40)
    assert pickle.loads(blob).get(KEY) is None
    monkeypatch.setenv("TVMRP_STORE_KEY", "k" * 40)
    assert pickle.loads(blob).get(KEY) == built


def test_old_store__each_artifact_rebuilt_once_with_one_line(tmp_path, caplog):
    root = tmp_path / "old-store"
    store = ArtifactStore(root)
    for key in (KEY, OTHER, THIRD):
        store.put(key, "build", write_two)
        manifest_path = store.path(key) / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        del manifest["mac"], manifest["mac_key"]
        manifest_path.write_text(json.dumps({**manifest, "version": 1}))  # what the previous version wrote
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # a run asks for each artifact three or four times
            for key in (KEY, OTHER, THIRD):
                assert store.get(key) is None
        produced = [store.ensure(key, "build", write_two)[1] for key in (KEY, OTHER, THIRD)]
        assert produced == [True, True, True]
        assert [store.ensure(key, "build", write_two)[1] for key in (KEY, OTHER, THIRD)] == [False, False, False]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "written before its entries were authenticated" in lines[0] and str(root) in lines[0]


def test_corrupt_artifact__said_once_per_key(tmp_path, caplog):
    store = ArtifactStore(tmp_path / "store")
    store.put(KEY, "build", write_two)
    (store.path(KEY) / "a.bin").write_bytes(b"alpha" * 999 + b"alphX")
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            assert store.get(KEY) is None
    assert len(warnings_about(caplog, KEY)) == 1


# -- no link is followed out of the store -------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the store, where nothing may appear."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.mark.parametrize("entry", [".tmp", ".locks", ".keys", "ab"])
def test_symlinked_entry_of_the_root__refused_nothing_created_outside(tmp_path, outside, entry):
    root = tmp_path / "store"
    root.mkdir()
    (root / entry).symlink_to(outside)
    store = ArtifactStore(root)
    with pytest.raises(StoreError, match="is a symbolic link"):
        if entry == ".keys":
            store.device_cache_secret()
        else:
            store.ensure(KEY, "build", write_two)
    assert not list(outside.iterdir())


def test_dangling_links__no_file_created_where_they_point(tmp_path, outside):
    root = tmp_path / "store"
    (root / ".locks").mkdir(parents=True)
    (root / ".locks" / f"{KEY}.lock").symlink_to(outside / "planted-lock")
    (root / ".tmp").symlink_to(outside / "planted-tmp")
    store = ArtifactStore(root)
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.ensure(KEY, "build", write_two)
    (root / ".locks" / f"{KEY}.lock").unlink()
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.put(KEY, "build", write_two)
    assert not list(outside.iterdir())


def a_record():
    """A run record with every required field empty (what the ledger writes does not matter here)."""
    from dataclasses import MISSING, fields

    from pipeline.results import RunStamp
    from pipeline.store.ledger import RunRecord

    empty = {f.name: None for f in fields(RunRecord) if f.default is MISSING and f.default_factory is MISSING}
    return RunRecord(**{**empty, "id": RunStamp.new().id, "stages": {}, "versions": {}})


def test_symlinked_trash_runs_and_tuning__nothing_created_outside(tmp_path, outside, caplog):
    from pipeline.planning import keys
    from pipeline.targets import parse_target
    from pipeline.tuning import remember_tuning, tune_inputs

    root = tmp_path / "store"
    store = ArtifactStore(root)
    store.put(KEY, "build", write_two)
    for entry in (".trash", ".runs", ".tuning"):
        (root / entry).symlink_to(outside)
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.discard(KEY)
    with pytest.raises(StoreError, match="is a symbolic link"):
        store.ledger.write(a_record())
    inputs = tune_inputs("a" * 64, parse_target("llvm"), 4)
    remember_tuning(store, inputs, keys.key_of(inputs))  # never raises: the tuning is not indexed
    assert warnings_about(caplog, "is not indexed")
    assert not list(outside.iterdir())


def test_symlinked_artifact__a_miss_its_target_untouched(tmp_path, outside):
    store = ArtifactStore(tmp_path / "store")
    other = ArtifactStore(tmp_path / "elsewhere")
    other.put(KEY, "build", write_two)  # a valid artifact, signed with this user's key, outside the store
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).symlink_to(other.path(KEY))
    assert store.check(KEY) == (None, f"corrupt: {store.path(KEY).name} is a symbolic link")
    store.ensure(KEY, "build", write_two)
    assert not store.path(KEY).is_symlink() and other.get(KEY) is not None


def test_key_paths_that_are_directories__said_so(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    store.layout.device_cache_key.mkdir(parents=True)
    with pytest.raises(StoreError, match="is a directory"):
        store.device_cache_secret()


# -- Prefect's cache records ------------------------------------------------------------------------------------------


def _record(directory: Path, key: str, serializer: dict, result: str) -> Path:
    path = directory / key
    path.write_text(json.dumps({"metadata": {"storage_key": str(path), "expiration": None, "serializer": serializer,
                                             "prefect_version": "3.9.1", "storage_block_id": None},
                                "result": result}))
    return path


class _Proof:
    """Unpickling this creates the file ``path``: what a planted pickle record would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_screen_record__a_pickle_record_is_removed_unread(tmp_path, caplog):
    from prefect.serializers import PickleSerializer

    from tasks._cache import ArtifactRefSerializer, Built, screen_record

    directory, proof = tmp_path / "records", tmp_path / "proof"
    directory.mkdir()
    store = ArtifactStore(tmp_path / "store")
    ours = Built(store.put(KEY, "build", write_two), True, 0.5)
    kept = _record(directory, KEY, {"type": "tvmrp-artifact-ref"}, ArtifactRefSerializer().dumps(ours).decode())
    assert screen_record(directory, KEY) and kept.exists()

    planted = _record(directory, OTHER, {"type": "pickle", "picklelib": "cloudpickle"},
                      PickleSerializer().dumps(_Proof(proof)).decode())
    assert screen_record(directory, OTHER) and not planted.exists() and not proof.exists()
    assert warnings_about(caplog, "not one of this project's")
    # Ours in shape but for another key, a Prefect record of the old layout, a link, a directory: removed.
    _record(directory, THIRD, {"type": "tvmrp-artifact-ref"}, ArtifactRefSerializer().dumps(ours).decode())
    assert screen_record(directory, THIRD) and not (directory / THIRD).exists()
    (directory / OTHER).write_text(json.dumps({"serializer": {"type": "pickle"}, "data": "gAR9lC4="}))
    assert screen_record(directory, OTHER) and not (directory / OTHER).exists()
    (directory / OTHER).symlink_to(kept)
    assert screen_record(directory, OTHER) and not (directory / OTHER).is_symlink() and kept.exists()
    (directory / OTHER).mkdir()
    assert screen_record(directory, OTHER) and not (directory / OTHER).exists()
    assert not proof.exists()
