"""tasks/progress.py against a real Prefect server: an upload's progress is a progress artifact of its flow run.
(tasks/report.py without a server: tests/unit/test_report.py.)"""

from __future__ import annotations


def test_progress__is_a_progress_artifact_of_the_flow_run(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.progress import Progress

    @flow
    def long_work() -> None:
        with Progress("upload-progress-test", "upload of model.so") as progress:
            for sent in range(0, 101, 5):
                progress.update(sent, 100)

    long_work()
    with get_client(sync_client=True) as client:
        by_key = ArtifactFilter(key=ArtifactFilterKey(any_=["upload-progress-test"]))
        (artifact,) = client.read_artifacts(artifact_filter=by_key)
    assert artifact.type == "progress" and float(artifact.data) == 100.0 and artifact.flow_run_id is not None
