"""The ``resnet_remote`` flow called in this process under ``prefect_test_harness`` (no CLI subprocess): its typed
summary, Prefect's record of it (the second run's compile stages ``Cached``, its profile table), the run
ledger."""

from __future__ import annotations

import pytest

from pipeline.store import ArtifactStore
from support import COMPILE


@pytest.fixture
def flow_runs(prefect_api, store_root, tiny_onnx):
    from flows._cli import cli_prefect_settings
    from flows.resnet_remote import resnet_remote

    with cli_prefect_settings():
        return [resnet_remote(model=str(tiny_onnx), artifacts=str(store_root), repeat=2, profile=i == 1)
                for i in range(2)]


def test_flow_in_process__returns_the_typed_summary_and_caches_the_builds(flow_runs, store_root):
    first, second = flow_runs
    assert first.check is not None and first.check.passed and len(first.outcome.top5) == 5
    assert all(first.stages[stage] == "ran" for stage in COMPILE)
    assert all(second.stages[stage] == "cached" for stage in COMPILE)
    assert second.outcome.upload.reused and second.build.build_key == first.build.build_key
    assert second.series == first.series and second.regression is not None
    recorded = {record.id: record for record in ArtifactStore(store_root).ledger.records()}
    assert {first.run_id, second.run_id} <= set(recorded)
    assert recorded[second.run_id].latency_ms["median"] == second.latency.median
    assert first.outcome.profile is None and recorded[first.run_id].profile is None
    assert recorded[second.run_id].profile == second.outcome.profile.as_dict() and second.outcome.profile.kernels
    assert recorded[second.run_id].device_facts == second.outcome.facts.as_dict()


def test_flow_in_process__prefect_shows_the_cached_stages_and_the_profile(flow_runs):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from pipeline.views.run import ui_key

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="tiny.onnx@llvm")),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}))
        key = f"profile-{ui_key(flow_runs[1])}"
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    (table,) = [t for t in tables if t.flow_run_id == runs[0].id]
    rows = json.loads(table.data)
    assert table.type == "table" and rows[-1]["kernel"].startswith("glue")
    assert [row["kernel"] for row in rows[:-1]] == [k.name for k in flow_runs[1].outcome.profile.kernels]
    states = {run.name: run.state_name for run in task_runs}
    assert runs[0].state_name == "Completed"
    assert all(states[stage] == "Cached" for stage in COMPILE), states
    assert states["upload"] == states["run"] == states["report"] == "Completed"
