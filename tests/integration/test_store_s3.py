"""The artifact store on S3-compatible object storage, against a real server (SeaweedFS on 127.0.0.1): the same
content addressing, manifests, MACs and verification as a local store; build-once across machines without
flock; a killed writer leaves nothing readers take as complete. (The command line against it:
test_flow_s3.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support import REPO

from pipeline.errors import StoreError, UsageError
from pipeline.store import ArtifactStore
from pipeline.store.s3 import S3Location

KEY = "ab" + "0" * 62
OTHER = "cd" + "1" * 62


def _write(text: str):
    return lambda d: (d / "model.so").write_text(text)


def test_location__parses_bucket_and_prefix_and_refuses_what_is_not_one():
    assert str(S3Location.parse("s3://team-store/a/b/")) == "s3://team-store/a/b"
    assert S3Location.parse("s3://team-store").prefix == ""
    for bad in ("s3://", "s3://UPPER/x", "s3://b/../x", "s3://bucket/a//b", "s3://bucket/.runs"):
        with pytest.raises(UsageError):
            S3Location.parse(bad)


def test_put__another_machine_reads_it_verified_through_its_own_cache(s3_store, tmp_path):
    here = ArtifactStore(s3_store.url)
    here.check_root()
    artifact = here.put(KEY, "library", _write("library bytes"), {"stage": "export-library"})
    assert here.root != tmp_path / "there" and (here.path(KEY) / "model.so").read_text() == "library bytes"
    there = ArtifactStore(s3_store.url, cache=tmp_path / "there")
    assert not there.path(KEY).exists()
    found = there.get(KEY)
    assert found == artifact and there.file(found, "model.so").read_text() == "library bytes"
    assert there.read_verified(KEY, "model.so")[0] == b"library bytes"
    assert there.get(OTHER) is None
    names = sorted(info.name for info in there.remote.list(there.remote.layout.artifact(KEY)))
    digest = artifact.digest_of("model.so")
    assert names == [f"team/ab/{'0' * 62}/blobs/{digest}", f"team/ab/{'0' * 62}/manifest.json"]


def test_get__a_store_key_of_another_team_or_an_altered_manifest_is_a_miss(s3_store, tmp_path, monkeypatch):
    store = ArtifactStore(s3_store.url)
    store.put(KEY, "library", _write("theirs"))
    monkeypatch.setenv("TVMRP_STORE_KEY", "another-teams-key-" + "9" * 40)
    foreign = ArtifactStore(s3_store.url, cache=tmp_path / "foreign")
    artifact, reason = foreign.check(KEY)
    assert artifact is None and reason.startswith("unauthenticated: signed with another store key")
    assert not foreign.path(KEY).exists()  # no file of an unauthenticated entry is downloaded


def test_get__a_flipped_byte_in_the_bucket_is_corrupt_and_rebuilt(s3_store, tmp_path):
    store = ArtifactStore(s3_store.url)
    artifact = store.put(KEY, "library", _write("good bytes"))
    bucket = store.remote
    blob = bucket.layout.blob(KEY, artifact.digest_of("model.so"))
    bucket.put(blob, b"good byteS")
    fresh = ArtifactStore(s3_store.url, cache=tmp_path / "fresh")
    assert fresh.check(KEY) == (None, "corrupt: model.so in the bucket does not match its digest")
    rebuilt, produced = fresh.ensure(KEY, "library", _write("rebuilt"))
    assert produced and fresh.file(rebuilt, "model.so").read_text() == "rebuilt"
    assert ArtifactStore(s3_store.url, cache=tmp_path / "third").get(KEY) == rebuilt


def test_put__a_writer_killed_before_its_manifest_leaves_no_entry(s3_store, tmp_path):
    """Files in the bucket without a manifest (what a killed writer leaves) are no artifact: readers see it
    missing and build it."""
    store = ArtifactStore(s3_store.url)
    store.remote.put(store.remote.layout.blob(KEY, "0" * 64), b"half of a library")
    assert store.check(KEY) == (None, "missing")
    artifact, produced = store.ensure(KEY, "library", _write("whole"))
    assert produced and artifact.files[0].size == 5


_ENSURE = """
import sys, time
from pathlib import Path
from pipeline.store import ArtifactStore
url, key, log = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def produce(d):
    with open(log, "a") as f:
        f.write("built\\n")
    print("producing", flush=True)
    time.sleep(float(sys.argv[4]))
    (d / "model.so").write_text("built once")
artifact, produced = ArtifactStore(url).ensure(key, "library", produce)
print(artifact.digest_of("model.so"), produced, flush=True)
"""


def _machine(s3_store, tmp_path, name, key, log, sleep, **env):
    return subprocess.Popen([sys.executable, "-c", _ENSURE, s3_store.url, key, str(log), str(sleep)], cwd=REPO,
                            env={**os.environ, **s3_store.machine(tmp_path / name), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ensure__two_machines_racing_on_one_key_build_it_once(s3_store, tmp_path):
    """Two processes with caches of their own (so no flock in common): the lease in the bucket lets one build,
    the other waits and takes its build."""
    log = tmp_path / "builds.log"
    procs = [_machine(s3_store, tmp_path, f"machine-{i}", KEY, log, 2) for i in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert log.read_text() == "built\n"
    lines = [out.strip().splitlines()[-1].split() for out, _ in outputs]
    assert lines[0][0] == lines[1][0] and sorted(line[1] for line in lines) == ["False", "True"]
    store = ArtifactStore(s3_store.url)
    assert list(store.remote.list(store.remote.layout.leases)) == []  # each lease was given back


def test_ensure__a_killed_builders_lease_is_taken_over_after_it_expires(s3_store, tmp_path):
    log = tmp_path / "builds.log"
    holder = _machine(s3_store, tmp_path, "killed", KEY, log, 60, TVMRP_S3_LEASE_SECONDS="3")
    try:
        assert holder.stdout.readline().strip() == "producing"
        holder.kill()
        holder.wait(10)
        start = time.monotonic()
        other = _machine(s3_store, tmp_path, "other", KEY, log, 0, TVMRP_S3_LEASE_SECONDS="3")
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, err
        assert out.split()[-1] == "True" and 3 <= time.monotonic() - start < 40
        assert log.read_text() == "built\nbuilt\n"
    finally:
        holder.kill()
        holder.wait(10)


def test_lock__a_lease_holder_excludes_other_machines_until_it_is_done(s3_store, tmp_path):
    here = ArtifactStore(s3_store.url)
    there = ArtifactStore(s3_store.url, cache=tmp_path / "there")
    with here.lock(KEY):
        with pytest.raises(StoreError, match="held the lease"), there.lock(KEY, timeout=1):
            pass
        with there.lock(OTHER, timeout=5):
            pass
    with there.lock(KEY, timeout=5):
        pass


def test_ledger_and_tuning_index__live_in_the_bucket(s3_store, tmp_path):
    from support import make_summary

    from pipeline.store.ledger import record_of

    here = ArtifactStore(s3_store.url)
    record = record_of(make_summary(run_id="20261201T010203Z-abc123"), "passed", 0, None, versions={})
    here.ledger.write(record)
    here.write_entry(here.layout.tuning_index / (OTHER + ".json"), b'{"version": 1}')
    there = ArtifactStore(s3_store.url, cache=tmp_path / "there")
    assert [r.id for r in there.ledger.records()] == ["20261201T010203Z-abc123"]
    assert there.read_entry(there.layout.tuning_index / (OTHER + ".json")) == b'{"version": 1}'
    with pytest.raises(FileNotFoundError):
        there.read_entry(there.layout.tuning_index / (KEY + ".json"))
    assert json.loads((there.layout.ledger / "20261201T010203Z-abc123.json").read_text())["id"] == record.id


def test_check_root__says_what_is_wrong_with_the_bucket(s3_store, monkeypatch):
    with pytest.raises(StoreError, match="the bucket 'no-such-bucket' does not exist"):
        ArtifactStore("s3://no-such-bucket/x").check_root()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match="secret key does not match|access denied"):
        ArtifactStore(s3_store.url).check_root()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StoreError, match="cannot reach"):
        ArtifactStore(s3_store.url).check_root()


def test_store__pickles_as_its_url_and_local_root(s3_store, tmp_path):
    import pickle

    store = ArtifactStore(s3_store.url, cache=tmp_path / "c")
    copy = pickle.loads(pickle.dumps(store))
    assert copy == store and copy.remote is not None and copy.root == store.root and str(copy) == s3_store.url
