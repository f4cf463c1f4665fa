"""``python -m flows.store``: du, gc and verify, on a local store through the command line (three generations of
real builds) and on a store in a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import COMPILE, REPO, cli_json, make_summary, make_tiny_onnx

from pipeline.store import ArtifactStore
from pipeline.store.maintenance import Policy, apply_gc, entries, plan_gc, usage, verify


def store_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.store", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=180, check=False)


def _json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gc__three_generations_free_the_old_ones_the_latest_stays_cached_and_verify_finds_a_flipped_byte(
        prefect_api, store_root, tmp_path):
    model = tmp_path / "net.onnx"
    runs = []
    for seed in (1, 2, 3):  # one model file retrained twice: three generations of one lineage
        make_tiny_onnx(model, seed=seed)
        runs.append(cli_json(prefect_api, store_root, "--model", str(model)))
    held = store_cli("du", "--artifacts", str(store_root), "--json")
    assert held.returncode == 0, held.stderr
    assert {k: v["count"] for k, v in _json(held)["by_kind"].items()} == {
        "build": 3, "library": 3, "relax-ir": 3, "reference": 3}

    everything = store_cli("gc", "--artifacts", str(store_root), "--json")  # defaults: all of it is recent
    assert _json(everything)["to_remove"] == 0
    dry = store_cli("gc", "--artifacts", str(store_root), "--keep-days", "0", "--grace-hours", "0", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = _json(dry)
    assert (planned["to_remove"], planned["removed"], planned["applied"]) == (8, 0, False)
    assert {e["key"] for e in planned["entries"]} >= {runs[0]["build_key"], runs[1]["library_key"]}
    assert len(list(store_root.glob("[0-9a-f][0-9a-f]/*"))) == 12  # a dry run removes nothing
    applied = _json(store_cli("gc", "--artifacts", str(store_root), "--keep-days", "0", "--grace-hours", "0",
                              "--apply", "--json"))
    assert applied["removed"] == 8 and applied["bytes"] > 0
    assert len(list(store_root.glob("[0-9a-f][0-9a-f]/*"))) == 4
    store = ArtifactStore(store_root)
    assert store.get(runs[0]["build_key"]) is None and store.get(runs[2]["library_key"]) is not None

    latest = cli_json(prefect_api, store_root, "--model", str(model))
    assert [latest["stages"][s] for s in (*COMPILE, "reference")] == ["cached"] * 4

    library = store.path(latest["library_key"]) / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0x01
    library.write_bytes(bytes(data))
    checked = store_cli("verify", "--artifacts", str(store_root))
    assert checked.returncode == 1
    assert f"{latest['library_key']}  local: corrupt: model.so does not match its digest" in checked.stdout
    assert checked.stderr.strip().splitlines()[-1].startswith("Error: 1 of 4 entries of ")


def _generation(store: ArtifactStore, n: int):
    """A library, its build and imported module (generation ``n`` of one lineage) and the ledger record of the
    run that used them."""
    digest = f"{n:064x}"
    relax = store.put(f"{n:02x}" + "a" * 62, "relax-ir", lambda d: (d / "module.json").write_text(f"m{n}"),
                      {"stage": "import-model", "model": digest, "tvm": "tvm-x"})
    build = store.put(f"{n:02x}" + "b" * 62, "build", lambda d: (d / "build.tar").write_text(f"b{n}" * 100),
                      {"stage": "build", "model": digest, "tvm": "tvm-x"})
    library = store.put(f"{n:02x}" + "c" * 62, "library", lambda d: (d / "model.so").write_text(f"l{n}" * 1000),
                        {"stage": "export-library", "build": build.key})
    from pipeline.store.ledger import record_of

    summary = make_summary(run_id=f"2026112{n}T020000Z-abcde{n}", model="net.onnx", model_digest=digest,
                           build_key=build.key, library_key=library.key)
    store.ledger.write(record_of(summary, "passed", 0, None, versions={}))
    return relax, build, library


def test_gc_and_verify__on_an_s3_store_its_bucket_and_this_machines_copy(s3_store, tmp_path):
    store = ArtifactStore(s3_store.url)
    generations = [_generation(store, n) for n in (1, 2, 3)]
    tuning = store.put("dd" * 32, "tuning", lambda d: (d / "tuning.json").write_text("{}"), {"stage": "tune"})
    bucket = store.remote
    bucket.put(bucket.layout.blob("ee" * 32, "0" * 64), b"a writer killed before its manifest")
    found = usage(store)
    assert found.count == 11 and found.by_kind["library"][0] == 3 and found.local == (10, found.local[1])

    now_policy = Policy(keep_days=0, grace=0)
    with store.lock(generations[0][2].key):  # a run building or using it: kept whatever its age
        plan = plan_gc(store, now_policy)
        assert plan.reasons.get("locked") == 2  # in the bucket and in this machine's copy
    removed = {(r.entry.key, r.entry.where) for r in plan.remove}
    old = {a.key for g in generations[:2] for a in g} - {generations[0][2].key}
    assert removed == {(k, w) for k in old for w in ("bucket", "local")} | {("ee" * 32, "bucket")}
    assert apply_gc(store, plan, now_policy) == len(removed)
    left = {(e.key, e.where) for e in entries(store)}
    assert left == {(a.key, "bucket") for a in generations[2]} | {(tuning.key, "bucket"),
                                                                  (generations[0][2].key, "bucket")}
    fresh = ArtifactStore(s3_store.url, cache=tmp_path / "fresh")
    assert all(fresh.get(a.key) is not None for a in generations[2])  # the latest stays, for every machine

    with_tunings = plan_gc(store, Policy(keep_days=0, grace=0, tunings=True))
    assert (tuning.key, "bucket") in {(r.entry.key, r.entry.where) for r in with_tunings.remove}

    library = generations[2][2]
    bucket.put(bucket.layout.blob(library.key, library.digest_of("model.so")), b"flipped")
    _, problems = verify(store)
    assert [(p.key, p.where, p.problem) for p in problems] == [
        (library.key, "bucket", "corrupt: model.so does not match its digest")]
