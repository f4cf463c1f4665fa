"""The command line against a store on S3-compatible object storage (a real SeaweedFS on 127.0.0.1): a run, the
same run again (all cached), and the same run on another "machine" (its own local cache directory and Prefect
cache, the same bucket and team key), which reuses the first machine's builds. (The store itself:
test_store_s3.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import COMPILE, REPO, run_cli


def _run(s3_store, env, model, prefect_api):
    proc = run_cli("--model", str(model), "--artifacts", s3_store.url, "--json", "--repeat", "2",
                   env={**env, "PREFECT_API_URL": prefect_api})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli__runs_twice_against_an_s3_store_and_another_machine_reuses_the_builds(
        prefect_api, s3_store, tiny_onnx, tmp_path):
    first = _run(s3_store, s3_store.env, tiny_onnx, prefect_api)
    assert [first["stages"][s] for s in (*COMPILE, "reference")] == ["ran"] * 4
    again = _run(s3_store, s3_store.env, tiny_onnx, prefect_api)
    assert [again["stages"][s] for s in (*COMPILE, "reference")] == ["cached"] * 4
    assert again["upload"]["reused"] is True  # the embedded device kept the library (a local entry of the store)
    other = _run(s3_store, s3_store.machine(tmp_path / "other-machine"), tiny_onnx, prefect_api)
    assert [other["stages"][s] for s in (*COMPILE, "reference")] == ["cached"] * 4
    assert other["build_key"] == first["build_key"] and other["check"]["passed"]
    assert (tmp_path / "other-machine" / "tvmrp" / "s3").is_dir()  # its own copy, fetched from the bucket

    history = subprocess.run([sys.executable, "-m", "flows.history", "--artifacts", s3_store.url, "--json"],
                             cwd=REPO, env={**os.environ, **s3_store.machine(tmp_path / "third")},
                             capture_output=True, text=True, timeout=120, check=False)
    assert history.returncode == 0, history.stderr[-3000:]
    runs = json.loads(history.stdout.strip().splitlines()[-1])["runs"]
    assert sorted(r["id"] for r in runs) == sorted(r["run_id"] for r in (first, again, other))
