"""Whole fleet runs against a real tracker, real rpc_servers, a real Prefect server and real compiled libraries.
(The fleet file's validation and renderings: tests/unit/test_fleet_spec.py; with the emulated aarch64 device:
tests/system/test_fleet_aarch64.py.)"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest

from support import REPO, last_json, make_tiny_onnx, run_fleet


def ledger(store_root: Path, fleet_run: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (store_root / ".runs").glob("*.json")]
    return [r for r in records if r.get("fleet_run") == fleet_run]


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


@pytest.fixture(scope="module")
def two_live_keys():
    """A real tracker with an rpc_server under ``fleet-a`` and one under ``fleet-b``; yields its address."""
    from pipeline.device import EmbeddedServer, start_tracker

    with start_tracker() as tracker:
        address = tracker.spec_address
        with EmbeddedServer(tracker=address, key="fleet-a"), EmbeddedServer(tracker=address, key="fleet-b"):
            yield address


def test_fleet__three_devices_by_two_models_builds_once_and_fails_only_the_missing_key(
        prefect_api, store_root, tmp_path, two_live_keys):
    models = [make_tiny_onnx(tmp_path / f"m{seed}.onnx", seed=seed) for seed in (0, 1)]
    fleet_file = tmp_path / "lab.yaml"
    fleet_file.write_text(textwrap.dedent(f"""\
        tracker: {two_live_keys}
        request_timeout: 3
        repeat: 3
        build_concurrency: 2             # the compile phase in worker processes, also on two cores
        devices:
          - {{key: fleet-a, target: llvm}}
          - {{key: fleet-b, target: llvm, name: bench-b}}
          - {{key: ghost, target: llvm}}
        models:
          - {models[0].name}
          - {{model: {models[1]}}}
    """))
    junit = tmp_path / "out.xml"
    proc = run_fleet(fleet_file, store_root, prefect_api, "--junit", str(junit))
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    first = last_json(proc)
    results = {(r["device"], r["model"]): r for r in first["results"]}
    assert list(results) == [(d, m) for d in ("fleet-a", "bench-b", "ghost") for m in ("m0.onnx", "m1.onnx")]
    live = [r for r in first["results"] if r["device"] != "ghost"]
    assert [r["status"] for r in live] == ["passed"] * 4
    for r in live:
        assert r["check"]["passed"] and r["error"] is None and r["latency_ms"]["median"] > 0
        assert r["regression"]["runs"] == 0 and "fleet-" in r["device_address"]
    ghost = [r for r in first["results"] if r["device"] == "ghost"]
    assert [r["status"] for r in ghost] == ["failed"] * 2
    assert all("'ghost'" in r["error"] and r["latency_ms"] is None and r["check"] is None for r in ghost)
    assert ghost[0]["error_type"] == "DeviceUnavailable" and "\n" not in ghost[0]["error"]

    # Each distinct build once: two devices share llvm (and the missing key would too), so 2 models -> 2 builds.
    assert first["builds"] == {"ran": 2, "cached": 0, "failed": 0}
    for model in ("m0.onnx", "m1.onnx"):
        assert len({results[(d, model)]["build_key"] for d in ("fleet-a", "bench-b", "ghost")}) == 1
    assert results[("fleet-a", "m0.onnx")]["build_key"] != results[("fleet-a", "m1.onnx")]["build_key"]

    # The two live devices ran at the same time: some pair of one overlaps some pair of the other.
    a = [(_when(r["started"]), _when(r["finished"])) for r in live if r["device"] == "fleet-a"]
    b = [(_when(r["started"]), _when(r["finished"])) for r in live if r["device"] == "bench-b"]
    assert any(sa < fb and sb < fa for sa, fa in a for sb, fb in b), (a, b)
    # ...and each device ran its own pairs one after another (one session per device).
    for pairs in (a, b):
        assert sorted(pairs)[0][1] <= sorted(pairs)[1][0]

    # The whole table once, its JSON once, then the error line.
    assert "FAILED" in proc.stdout and "ghost" in proc.stdout and "bench-b" in proc.stdout
    assert proc.stdout.count("Fleet      ") == 1 and proc.stdout.count('"fleet_run"') == 1, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and errors[-1].startswith("Error: 2 of 6 pairs failed (m0.onnx on ghost, m1.onnx on ghost); the first: Tracker ") and "Traceback" not in proc.stderr

    # Every pair is in the ledger, under the fleet run, as a single run would be, named by its fleet device name.
    records = ledger(store_root, first["fleet_run"])
    assert sorted((r["status"], r["id"] in {x["run_id"] for x in first["results"]}) for r in records) == \
        [("failed", True)] * 2 + [("passed", True)] * 4
    assert all(r["flow_run_id"] == first["flow_run_id"] for r in records)
    assert sorted(r["device_name"] for r in records) == ["bench-b"] * 2 + ["fleet-a"] * 2 + ["ghost"] * 2
    found = subprocess.run([sys.executable, "-m", "flows.history", "--device", "bench-b", "--json", "--artifacts",
                            str(store_root)], cwd=REPO, capture_output=True, text=True, timeout=60)
    bench = json.loads(found.stdout)["runs"]
    assert found.returncode == 0 and sorted(r["model"] for r in bench) == ["m0.onnx", "m1.onnx"]
    assert all(r["device_name"] == "bench-b" and r["device"].endswith("key=fleet-b") for r in bench)
    assert len({r["lineage"] for r in records if r["status"] == "passed"}) == 4  # one per (device, model)

    # The JUnit file: one test case per pair; the two pairs of the missing key are failures.
    root = ElementTree.parse(junit).getroot()
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert root.tag == "testsuites" and suite.get("tests") == "6" and suite.get("failures") == "2"
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (f"fleet.{d}", m) for d in ("fleet-a", "bench-b", "ghost") for m in ("m0.onnx", "m1.onnx")]
    assert [f.get("type") for c in cases for f in c.findall("failure")] == ["DeviceUnavailable"] * 2

    # The fleet run's Prefect artifacts: the table and the markdown summary.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-lab", "fleet-summary-lab"])))
    assert {x.key for x in found if str(x.flow_run_id) == first["flow_run_id"]} == {"fleet-lab", "fleet-summary-lab"}

    # Again: every build cached, and each pair compared with its previous run.
    second = last_json(run_fleet(fleet_file, store_root, prefect_api))
    assert second["builds"] == {"ran": 0, "cached": 2, "failed": 0}
    assert [r["status"] for r in second["results"]] == [r["status"] for r in first["results"]]
    assert all(r["regression"]["runs"] == 1 for r in second["results"] if r["status"] == "passed")
    print(f"3x2 fleet: first run {first['seconds']:.1f} s (sum of its pairs {sum(r['seconds'] or 0 for r in first['results']):.1f} s),"
          f" second {second['seconds']:.1f} s (pairs {sum(r['seconds'] or 0 for r in second['results']):.1f} s)")


def test_fleet__all_passed_exits_0_and_a_failed_check_fails_its_pair_alone(prefect_api, store_root, tmp_path, two_live_keys):
    from pipeline.store import ArtifactStore

    right, wrong = (make_tiny_onnx(tmp_path / f"{name}.onnx", seed=seed) for name, seed in (("right", 0), ("wrong", 1)))
    fleet_file = tmp_path / "two.yaml"
    fleet_file.write_text(f"tracker: {two_live_keys}\nrepeat: 2\ndevices: [{{key: fleet-a}}]\nmodels: [{right}, {wrong}]\n")
    proc = run_fleet(fleet_file, store_root, prefect_api)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    passed = last_json(proc)
    assert [r["status"] for r in passed["results"]] == ["passed", "passed"] and "Error" not in proc.stderr

    # The library of `right` now holds the weights of `wrong`: its check fails, on that pair only.
    store = ArtifactStore(store_root)
    libraries = {r["model"]: r["library_key"] for r in ledger(store_root, passed["fleet_run"])}
    right_library, wrong_library = store.get(libraries["right.onnx"]), store.get(libraries["wrong.onnx"])
    impostor = store.file(wrong_library, "model.so").read_bytes()
    store.discard(right_library.key)
    store.put(right_library.key, "library", lambda d: (d / "model.so").write_bytes(impostor), right_library.inputs)
    proc = run_fleet(fleet_file, store_root, prefect_api)
    assert proc.returncode == 1, proc.stderr[-4000:]
    checked = {r["model"]: r for r in last_json(proc)["results"]}
    assert checked["right.onnx"]["status"] == "failed" and checked["right.onnx"]["check"]["passed"] is False
    assert checked["right.onnx"]["error"].startswith("check failed") and checked["right.onnx"]["latency_ms"]["median"] > 0
    assert checked["wrong.onnx"]["status"] == "passed"


@pytest.fixture(scope="module")
def pool_worker(prefect_api, tmp_path_factory):
    """A process work pool with two deployments, a ``build_only`` one of resnet_remote and one of the fleet, and
    one worker polling it (here, the build machine and the device machine in one); yields the deployments' ids.
    The worker's process group is ended after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = "fleet-test-pool"
    common = {"work_pool_name": pool, "path": str(REPO),
              "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        ids = {
            "resnet-remote/fleet-build": client.create_deployment(
                flow_id=client.create_flow_from_name("resnet-remote"), name="fleet-build",
                entrypoint="flows/resnet_remote.py:resnet_remote", parameters={"build_only": True}, **common),
            "fleet/fleet-test": client.create_deployment(
                flow_id=client.create_flow_from_name("fleet"), name="fleet-test", entrypoint="flows/fleet.py:fleet",
                **common),
        }
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "3"],
            cwd=REPO, env={**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield ids, log_path
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(worker.pid, sig)
            except ProcessLookupError:
                break
            try:
                worker.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def test_fleet__builds_run_on_the_build_pool_when_the_file_names_a_build_deployment(
        prefect_api, store_root, tmp_path, two_live_keys, pool_worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    ids, worker_log = pool_worker
    deployment = "resnet-remote/fleet-build"
    deployment_id = ids[deployment]
    models = [make_tiny_onnx(tmp_path / f"p{seed}.onnx", seed=seed) for seed in (5, 6)]
    fleet_file = tmp_path / "pooled.yaml"
    fleet_file.write_text(f"tracker: {two_live_keys}\nrepeat: 2\nbuild_deployment: {deployment}\nbuild_timeout: 300\n"
                          f"devices: [{{key: fleet-a}}, {{key: fleet-b}}]\nmodels: [{models[0]}, {models[1]}]\n")
    proc = run_fleet(fleet_file, store_root, prefect_api)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}\n{worker_log.read_text()[-4000:]}"
    summary = last_json(proc)
    assert summary["builds"] == {"ran": 2, "cached": 0, "failed": 0}
    assert [r["status"] for r in summary["results"]] == ["passed"] * 4
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 2 and all(run.state.is_completed() for run in runs)
    assert sorted(run.parameters["model"] for run in runs) == sorted(map(str, models))
    assert all(run.parameters["build_only"] and run.parameters["artifacts"] == str(store_root) for run in runs)
    assert {str(run.parent_task_run_id) != "None" for run in runs} == {True}  # shown under the fleet run


def test_fleet__a_deployment_run_with_an_inline_spec(prefect_api, store_root, tmp_path, two_live_keys, pool_worker):
    from prefect.deployments import run_deployment

    _, worker_log = pool_worker
    model = make_tiny_onnx(tmp_path / "inline.onnx", seed=9)
    spec = {"tracker": two_live_keys, "repeat": 2, "devices": [{"key": "fleet-b"}], "models": [str(model)]}
    run = run_deployment("fleet/fleet-test", parameters={"spec": spec, "artifacts": str(store_root)}, timeout=600)
    assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-4000:]}"
    (record,) = [r for r in (json.loads(p.read_text()) for p in (store_root / ".runs").glob("*.json"))
                 if r["flow_run_id"] == str(run.id)]
    assert record["status"] == "passed" and record["fleet_run"] and record["model"] == "inline.onnx"


def test_cli__a_bad_fleet_file_exits_2_naming_file_line_and_field(tmp_path, store_root):
    fleet_file = tmp_path / "bad.yaml"
    fleet_file.write_text("tracker: 127.0.0.1:9\ndevices:\n  - {key: a, targt: llvm}\nmodels: [efficientnet_lite0]\n")
    proc = run_fleet(fleet_file, store_root, None, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"Error: {fleet_file}:3: devices[0].targt: unknown key; did you mean 'target'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    fleet_file.write_text("tracker: 127.0.0.1:9\ndevices: [{key: a}]\nmodels: [alexnet]\n")
    proc = run_fleet(fleet_file, store_root, None, timeout=120)
    assert proc.returncode == 2 and f"Error: {fleet_file}:3: models[0] (alexnet): Unknown model 'alexnet'" in proc.stderr
