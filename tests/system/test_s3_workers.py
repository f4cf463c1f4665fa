"""Two Prefect workers of one process work pool, each a "machine" of its own (its own local cache directory and
Prefect cache), run three models x two targets into one store on S3-compatible object storage (a real SeaweedFS
on 127.0.0.1): every key is built once, whichever worker needs it first, the other reusing it through the
bucket."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

from support import REPO, make_tiny_onnx

TARGETS = ("llvm", "llvm -mcpu=x86-64")


def _start_worker(pool, env, log_path):
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "2"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_workers__two_workers_of_one_pool_build_three_models_by_two_targets_each_key_once(
        prefect_api, s3_store, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    from pipeline.store import ArtifactStore

    models = [make_tiny_onnx(tmp_path / f"w{seed}.onnx", seed=seed) for seed in (11, 12, 13)]
    pool = "s3-test-pool"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        client.create_deployment(
            flow_id=client.create_flow_from_name("resnet-remote"), name="s3-runs",
            entrypoint="flows/resnet_remote.py:resnet_remote", work_pool_name=pool, path=str(REPO),
            parameters={"artifacts": s3_store.url, "repeat": 2},
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}])
    workers = []
    try:
        for name in ("worker-a", "worker-b"):
            env = {**os.environ, **s3_store.machine(tmp_path / name), "PREFECT_API_URL": prefect_api,
                   "PREFECT_WORKER_QUERY_SECONDS": "1"}
            workers.append(_start_worker(pool, env, tmp_path / f"{name}.log"))
        runs = [run_deployment("resnet-remote/s3-runs", parameters={"model": str(model), "target": target},
                               timeout=0)
                for model in models for target in TARGETS]
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                states = [client.read_flow_run(run.id).state for run in runs]
                if all(state is not None and state.is_final() for state in states):
                    break
                time.sleep(2)
        logs = "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("worker-a", "worker-b"))
        assert all(state.is_completed() for state in states), f"{[s.name for s in states]}\n{logs}"
    finally:
        for worker in workers:
            _stop(worker)

    records = list(ArtifactStore(s3_store.url, cache=tmp_path / "reader").ledger.records())
    assert len(records) == 6 and {r.status for r in records} == {"passed"}
    ran = collections.Counter((stage, r.model_digest) for r in records for stage, status in r.stages.items()
                              if status == "ran" and stage in ("import-model", "reference"))
    assert sorted(ran.values()) == [1] * 6, ran  # each model imported once and its reference computed once
    assert sum(r.stages["build"] == "ran" for r in records) == 6 and len({r.build_key for r in records}) == 6
    for name in ("worker-a", "worker-b"):  # both machines took part, each through its own copy of the store
        assert (tmp_path / name / "tvmrp" / "s3").is_dir(), logs
