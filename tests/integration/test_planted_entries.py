"""Planted entries against the real command line (docs/security.md#the-artifact-store): a writer of the store
who does not hold the store key plants an imported module and a library that would run code, with their
manifests rewritten to match, and a Prefect cache record that names a pickle; none of it is read, uploaded or
unpickled, and the next run passes with those artifacts rebuilt. Two "machines" sharing the store with one
team key (a key file on one, the environment on the other) reuse each other's builds, and a store written
before artifacts were authenticated is rebuilt once, with one line. Every planted file is made here.
(The store's own cases, links and keys: tests/unit/test_store_trust.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import run_cli

from pipeline.store import MANIFEST, ArtifactStore
from pipeline.store.layout import LIBRARY_FILE, MODULE_FILE

COMPILED = ("import-model", "build", "export-library", "reference")


def cli(prefect_api: str, store_root: Path, model: Path, key_env: dict[str, str]) -> tuple[dict, str]:
    """One run of the command line with the key ``key_env`` gives: its ``--json`` summary and its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVMRP_STORE_KEY", "TVMRP_STORE_KEY_FILE")}
    proc = run_cli("--model", str(model), "--artifacts", str(store_root), "--json", "--repeat", "2",
                   env={**env, **key_env, "PREFECT_API_URL": prefect_api}, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def plant(store_root: Path, key: str, name: str, data: bytes) -> None:
    """Put ``data`` as file ``name`` of artifact ``key`` and rewrite its manifest to match: what anyone who can
    write the store (and does not hold its key) can do."""
    directory = store_root / key[:2] / key[2:]
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def library_that_proves(work: Path, proof: Path) -> bytes:
    """A shared library whose constructor creates ``proof``: it runs wherever the library is loaded."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the planted library")
    source = work / "planted.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                      f'{{ FILE *f = fopen("{proof}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(work / "planted.so"), str(source)], check=True,
                   timeout=60)
    return (work / "planted.so").read_bytes()


def pickle_record_that_proves(path: Path, proof: Path) -> None:
    """A Prefect cache record at ``path`` that names cloudpickle as its serializer; unpickling it creates ``proof``."""
    from prefect.serializers import PickleSerializer

    class Proof:
        def __reduce__(self):
            return (open, (str(proof), "w"))

    blob = PickleSerializer().dumps(Proof()).decode()
    path.write_text(json.dumps({"metadata": {"storage_key": str(path), "expiration": None,
                                             "serializer": {"type": "pickle", "picklelib": "cloudpickle"},
                                             "prefect_version": "3.9.1", "storage_block_id": None},
                                "result": blob}))


def test_planted_entries__never_run_and_the_next_run_passes_rebuilt(prefect_api, store_root, tiny_onnx, tmp_path):
    from tasks._cache import records_dir

    team = tmp_path / "team.key"
    team.write_text(os.urandom(32).hex() + "\n")
    team.chmod(0o600)
    machine_a, machine_b = {"TVMRP_STORE_KEY_FILE": str(team)}, {"TVMRP_STORE_KEY": team.read_text().strip()}
    first, _ = cli(prefect_api, store_root, tiny_onnx, machine_a)
    module_path = store_root / first["import_key"][:2] / first["import_key"][2:] / MODULE_FILE
    module = module_path.read_bytes()

    proofs = [tmp_path / "proof-library", tmp_path / "proof-record"]
    plant(store_root, first["import_key"], MODULE_FILE, b'{"root": 1, "nodes": [{"type_key": "planted"}]}')
    plant(store_root, first["library_key"], LIBRARY_FILE, library_that_proves(tmp_path, proofs[0]))
    records = records_dir(ArtifactStore(store_root))
    assert records is not None and (records / first["build_key"]).is_file()
    pickle_record_that_proves(records / first["build_key"], proofs[1])

    second, stderr = cli(prefect_api, store_root, tiny_onnx, machine_b)  # the team key, from the environment
    assert not any(proof.exists() for proof in proofs)
    assert second["stages"]["import-model"] == second["stages"]["export-library"] == "ran"
    assert second["stages"]["build"] == second["stages"]["reference"] == "cached"  # machine A's, reused
    assert second["top5"] == first["top5"] and second["check"]["passed"]
    assert module_path.read_bytes() == module
    assert stderr.count("removed Prefect's cache record") == 1

    # A store written before its artifacts were authenticated: every artifact rebuilt, one line.
    for manifest_path in store_root.glob(f"[0-9a-f][0-9a-f]/*/{MANIFEST}"):
        manifest = json.loads(manifest_path.read_text())
        manifest.pop("mac"), manifest.pop("mac_key")
        manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    third, stderr = cli(prefect_api, store_root, tiny_onnx, machine_b)
    assert all(third["stages"][stage] == "ran" for stage in COMPILED), third["stages"]
    # One warning about the store; the latency trend of a 0.03 ms model may warn too, on a busy machine.
    lines = [line for line in stderr.splitlines() if "WARNING" in line and "latency trend" not in line]
    assert len(lines) == 1 and "written before its entries were authenticated" in lines[0], stderr[-3000:]
    assert third["top5"] == first["top5"] and not any(proof.exists() for proof in proofs)
