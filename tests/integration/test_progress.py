"""tasks/report.py without a Prefect server: the typed summary and its renderings (text, JSON, tables, the
chart, the markdown), series keys, and that publishing never fails a run when the API is unreachable.
(Against a real server: tests/test_stack.py, test_ui.py.)"""

from __future__ import annotations

import dataclasses
import io

from PIL import Image

from pipeline.device_cache import Placement
from pipeline.latency import latency_of
from tasks.postprocess import Top
from tasks.report import (
    RunSummary,
)

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'


def _summary(**changes):
    summary = RunSummary(
        run_id="20261128T020000Z-abcdef", started="2026-11-28T02:00:00+00:00",
        model="efficientnet_lite0", model_digest="1f69048b3289aee0" * 4, weights=None, target=TARGET, opt_level=3,
        tune_trials=0, tuning_key=None, import_key="cd" * 32, build_key="ab" * 32, library_key="ef" * 32,
        artifact="/store/ab/cd/model.so", device="embedded 127.0.0.1:46055", device_identity="x86_64-conda-linux-gnu",
        image="data/cat.png", input_shape=(1, 3, 224, 224),
        stages={"import-model": "cached", "build": "cached", "export-library": "cached", "upload": "ran",
                "load": "ran", "set-input": "ran", "run": "ran", "postprocess": "ran"},
        top5=tuple(Top(285 - i, f"cat {i}", 0.3 - i * 0.05) for i in range(5)),
        latency=latency_of([116.9, 118.97, 121.9, 118.0, 119.8], 1),
        upload=Placement("/tmp/tvmrp-x.so", 20_000_000, 0.33, False), check=None,
    )
    return dataclasses.replace(summary, **changes)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


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
