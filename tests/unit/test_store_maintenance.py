"""What ``flows.store gc`` keeps and removes on a local store, and what ``du`` and ``verify`` say
(:mod:`pipeline.store.maintenance`). Through real runs and in a bucket: tests/integration/test_store_gc.py."""

from __future__ import annotations

import json
import os
import time

from support import make_summary

from pipeline.store import ArtifactStore
from pipeline.store.ledger import record_of
from pipeline.store.maintenance import Policy, apply_gc, entries, plan_gc, usage, verify

OLD = time.time() - 20 * 86400


def _put(store: ArtifactStore, key: str, kind: str, inputs: dict, age: float = OLD):
    """An artifact written at time ``age`` (its manifest's ``created``, which its MAC does not cover, and its
    files' times)."""
    artifact = store.put(key, kind, lambda d: (d / "f.bin").write_text(key), inputs)
    manifest = store.path(key) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(age))
    manifest.write_text(json.dumps(data))
    for path in store.path(key).iterdir():
        os.utime(path, (age, age))
    return artifact


def _record(store: ArtifactStore, run_id: str, started: str, **keys):
    summary = make_summary(run_id=run_id, model="net.onnx", **keys)
    record = record_of(summary, "passed", 0, None, versions={})
    store.ledger.write(record.__class__(**{**record.as_json(), "started": started}))


def test_gc__keeps_the_latest_of_a_lineage_and_what_it_needs_removes_the_rest(store_root):
    store = ArtifactStore(store_root)
    keys = {}
    for n in (1, 2):
        digest = f"{n:064x}"
        relax = _put(store, f"{n:02x}" + "a" * 62, "relax-ir", {"model": digest, "tvm": "t"})
        build = _put(store, f"{n:02x}" + "b" * 62, "build", {"model": digest, "tvm": "t"})
        library = _put(store, f"{n:02x}" + "c" * 62, "library", {"build": build.key})
        reference = _put(store, f"{n:02x}" + "d" * 62, "reference", {"model": digest})
        keys[n] = (relax.key, build.key, library.key, reference.key)
        _record(store, f"2026010{n}T000000Z-00000{n}", f"2026-01-0{n}T00:00:00+00:00", model_digest=digest,
                build_key=build.key, library_key=library.key)
    tuning = _put(store, "ee" * 32, "tuning", {"model": "x"})
    orphan = store.path("ff" * 32)
    orphan.mkdir(parents=True)
    (orphan / "f.bin").write_text("a writer killed before its manifest")
    os.utime(orphan / "f.bin", (OLD, OLD))

    plan = plan_gc(store, Policy(keep_days=7, grace=3600))
    assert {r.entry.key for r in plan.remove} == set(keys[1]) | {"ff" * 32}
    assert plan.reasons == {"latest of a lineage": 2, "needed": 2, "tuning": 1}
    assert apply_gc(store, plan, Policy()) == 5
    assert {e.key for e in entries(store)} == set(keys[2]) | {tuning.key}
    assert [r.entry.key for r in plan_gc(store, Policy(tunings=True)).remove] == [tuning.key]


def test_gc__never_removes_what_a_run_is_using(store_root):
    """An old artifact that a run has just read (its manifest marked) is in grace; one whose lock a run holds is
    kept; a plan made before a run started using an artifact is checked again before removing it."""
    store = ArtifactStore(store_root)
    read = _put(store, "a1" * 32, "build", {"model": "m"})
    locked = _put(store, "b2" * 32, "build", {"model": "m"})
    later = _put(store, "c3" * 32, "build", {"model": "m"})
    assert store.get(read.key) is not None  # a run reads it: marked used now
    policy = Policy(keep_days=0, grace=3600)
    with store.lock(locked.key):
        plan = plan_gc(store, policy)
        assert {r.entry.key for r in plan.remove} == {later.key}
        assert plan.reasons == {"in grace": 1, "locked": 1}
    store.file(later, "f.bin")  # a run starts using it after the plan
    assert apply_gc(store, plan, policy) == 0
    assert store.get(later.key) is not None


def test_du_and_verify__by_kind_and_model_and_a_flipped_byte(store_root):
    store = ArtifactStore(store_root)
    build = _put(store, "a1" * 32, "build", {"model": "9" * 64})
    _put(store, "b2" * 32, "library", {"build": build.key}, age=time.time())
    _record(store, "20260101T000000Z-000001", "2026-01-01T00:00:00+00:00", model_digest="9" * 64,
            build_key=build.key)
    found = usage(store)
    assert (found.count, found.runs, found.by_kind["build"][0], found.by_kind["library"][0]) == (2, 1, 1, 1)
    assert found.by_model == {"net.onnx": (2, found.size)}
    assert found.by_age["< 1 day"][0] == 1 and found.by_age["7-30 days"][0] == 1
    assert verify(store) == (2, [])
    path = store.path(build.key) / "f.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x20
    path.write_bytes(bytes(data))
    checked, problems = verify(store)
    assert checked == 2 and [(p.key, p.problem) for p in problems] == [
        (build.key, "corrupt: f.bin does not match its digest")]
