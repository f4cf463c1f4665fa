"""The artifact store: atomic puts, digest verification, key validation. (Locking across processes:
tests/integration/test_store_processes.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import StoreError
from pipeline.store import MANIFEST, ArtifactStore, check_key, file_digest

KEY = "ab" + "0" * 62
OTHER = "cd" + "1" * 62


def write_two(directory: Path) -> None:
    (directory / "a.bin").write_bytes(b"alpha" * 1000)
    (directory / "b.txt").write_text("beta")


def test_put_then_get__returns_verified_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.put(KEY, "build", write_two, {"model": "m"})
    assert store.path(KEY) == tmp_path / "ab" / ("0" * 62)
    assert [f.name for f in art.files] == ["a.bin", "b.txt"]
    assert art.digest_of("a.bin") == file_digest(store.file(art, "a.bin"))
    assert art.inputs == {"model": "m"}
    again = store.get(KEY)
    assert again == art
    assert not list((tmp_path / ".tmp").iterdir())


def test_read_verified__one_read_checked_against_the_current_manifest(tmp_path):
    import hashlib

    store = ArtifactStore(tmp_path)
    store.put(KEY, "library", write_two)
    data, digest = store.read_verified(KEY, "a.bin")
    assert data == b"alpha" * 1000 and digest == hashlib.sha256(data).hexdigest()
    (store.path(KEY) / "a.bin").write_bytes(b"alpha" * 999 + b"alphX")
    with pytest.raises(StoreError, match="does not match its digest"):
        store.read_verified(KEY, "a.bin")
    with pytest.raises(StoreError, match="no file c.bin"):
        store.read_verified(KEY, "c.bin")
    (store.path(KEY) / "b.txt").unlink()
    with pytest.raises(StoreError, match="cannot read b.txt"):
        store.read_verified(KEY, "b.txt")
    with pytest.raises(StoreError, match="missing"):
        store.read_verified(OTHER, "a.bin")


def test_get__missing_key_is_none(tmp_path):
    assert ArtifactStore(tmp_path).get(KEY) is None
    assert ArtifactStore(tmp_path).check(KEY) == (None, "missing")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "a.bin").write_bytes(b"alpha" * 999 + b"alphX"), "digest"),
        (lambda d: (d / "a.bin").write_bytes(b"short"), "size"),
        (lambda d: (d / "b.txt").unlink(), "missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "manifest"),
        (lambda d: (d / MANIFEST).unlink(), "missing"),
    ],
)
def test_get__damaged_artifact_is_none(tmp_path, damage, reason):
    store = ArtifactStore(tmp_path)
    store.put(KEY, "build", write_two)
    damage(store.path(KEY))
    artifact, why = store.check(KEY)
    assert artifact is None and reason in why
    assert store.get(KEY) is None


def test_get__manifest_with_path_traversal_is_rejected(tmp_path):
    store = ArtifactStore(tmp_path)
    store.put(KEY, "build", write_two)
    (tmp_path / "secret").write_text("x")
    manifest = store.path(KEY) / MANIFEST
    manifest.write_text(manifest.read_text().replace('"b.txt"', '"../../secret"'))
    artifact, why = store.check(KEY)
    assert artifact is None and "bad file name" in why


@pytest.mark.parametrize("key", ["", "AB" + "0" * 62, "../" + "0" * 61, "0" * 63, "g" * 64, None])
def test_check_key__rejects_non_hex(key):
    with pytest.raises(StoreError, match="invalid artifact key"):
        check_key(key)


def test_put__failing_producer_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        store.put(KEY, "build", boom)
    assert not store.path(KEY).exists()
    assert not list((tmp_path / ".tmp").iterdir())


def test_put__replaces_corrupt_copy(tmp_path):
    store = ArtifactStore(tmp_path)
    store.put(KEY, "build", write_two)
    (store.path(KEY) / "a.bin").write_bytes(b"garbage")
    art = store.put(KEY, "build", write_two)
    assert store.get(KEY) == art
    assert (store.path(KEY) / "a.bin").read_bytes() == b"alpha" * 1000


def test_put__rejects_subdirectories(tmp_path):
    store = ArtifactStore(tmp_path)

    def nested(directory: Path) -> None:
        (directory / "sub").mkdir()

    with pytest.raises(StoreError, match="not a plain file"):
        store.put(KEY, "build", nested)
    assert not store.path(KEY).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_put__read_only_store_is_a_store_error(tmp_path):  # pragma: no cover - CI runs as root
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StoreError, match="cannot write"):
            ArtifactStore(tmp_path / "store").put(KEY, "build", write_two)
    finally:
        tmp_path.chmod(stat.S_IRWXU)


def test_put__unwritable_root_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot write in the artifact store"):
        ArtifactStore(blocker).put(KEY, "build", write_two)


def test_default_root__honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMRP_ARTIFACTS", str(tmp_path / "shared"))
    assert ArtifactStore().root == (tmp_path / "shared").resolve()
    monkeypatch.delenv("TVMRP_ARTIFACTS")
    assert ArtifactStore().root.name == "artifacts"
