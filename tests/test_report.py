"""tasks/report.py without a Prefect server: series keys, tables, the chart, the markdown, and that publishing
never fails a run when the API is unreachable. (Against a real server: tests/test_stack.py, test_ui.py.)"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time
import warnings
from datetime import datetime, timedelta, timezone

from PIL import Image

from tasks.report import (
    Point,
    change_text,
    draw_trend,
    latency_table,
    median_of_table,
    publish_run_artifacts,
    series_of,
    summary_markdown,
    top5_table,
)

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'


def _summary(**changes):
    summary = {
        "model": "efficientnet_lite0", "model_digest": "1f69048b3289aee0" * 4, "target": TARGET, "opt_level": 3,
        "build_key": "ab" * 32, "artifact": "/store/ab/cd/model.so", "device": "embedded 127.0.0.1:46055",
        "stages": {"import-model": "cached", "build": "cached", "export-library": "cached", "upload": "ran",
                   "load": "ran", "set-input": "ran", "run": "ran", "postprocess": "ran"},
        "top5": [{"class": 285 - i, "label": f"cat {i}", "prob": 0.3 - i * 0.05} for i in range(5)],
        "latency_ms": {"mean": 118.9, "median": 118.97, "min": 116.9, "max": 121.9, "std": 1.83},
        "timing": {"number": 1, "repeat": 5},
        "notes": [],
    }
    summary.update(changes)
    return summary


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_series_of__ignores_the_embedded_port_and_is_a_valid_artifact_key():
    a, b = series_of(_summary()), series_of(_summary(device="embedded 127.0.0.1:50000"))
    assert a == b
    assert re.fullmatch(r"[a-z0-9-]+", a.key) and a.key.startswith("efficientnet-lite0-")
    assert a.title == "efficientnet_lite0 @ llvm (x86_64-conda-linux-gnu) on embedded"


def test_series_of__other_target_or_device_is_another_series():
    base = series_of(_summary()).key
    assert series_of(_summary(target=TARGET.replace("x86_64", "aarch64"))).key != base
    assert series_of(_summary(device="tracker 10.0.0.1:9190 key=rpi4")).key != base


def test_latency_table__round_trips_the_median_through_json():
    rows = latency_table(_summary())
    assert [r["statistic"] for r in rows] == ["mean", "median", "min", "max", "std"]
    assert median_of_table(json.dumps(rows)) == 118.97
    assert median_of_table("not json") is None and median_of_table([{"statistic": "mean", "ms": 1}]) is None


def test_top5_table__ranks_and_rounds():
    rows = top5_table(_summary())
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0] == {
        "rank": 1, "class": 285, "label": "cat 0", "probability": 0.3}


def test_change_text__compares_with_the_median_of_the_previous_runs():
    assert change_text([Point(None, 100.0)]) == "first run of this series"
    text = change_text([Point(None, 100.0), Point(None, 102.0), Point(None, 100.0), Point(None, 125.0)])
    assert text.startswith("+25.0% against the median of the previous 3 run(s)")


def test_draw_trend__is_a_png_for_no_one_or_many_points():
    start = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)
    many = [Point(start + timedelta(days=i), 118 + i % 3) for i in range(20)]
    for points in ([], many[:1], many):
        assert _png_size(draw_trend(points, "Median latency (ms): " + "x" * 200)) == (720, 300)


def test_summary_markdown__names_the_build_and_marks_cached_stages():
    summary = _summary()
    text = summary_markdown(summary, series_of(summary), [Point(None, 118.97)], "data:image/png;base64,AAAA")
    assert f"`{'ab' * 32}`" in text and "| opt_level | 3 |" in text
    assert "| build | **cached** |" in text and "| upload | ran |" in text
    assert "Cached (not rebuilt): import-model, build, export-library." in text
    assert "![median latency of the last 1 runs](data:image/png;base64,AAAA)" in text


def test_publish_run_artifacts__unreachable_api_only_warns(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    start = time.monotonic()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "artifact creation outside of a flow run"
        with caplog.at_level(logging.WARNING, logger="tasks.report"):
            publish_run_artifacts(_summary())  # must not raise
    assert time.monotonic() - start < 30
    assert any("could not publish" in r.getMessage() for r in caplog.records)


def test_progress__is_a_progress_artifact_of_the_flow_run(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import Progress

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


def test_progress__unreachable_api_keeps_the_log_lines(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.report import Progress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with caplog.at_level(logging.INFO, logger="tasks.report"), Progress("tune-x", "tuning") as progress:
            progress.update(1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("tuning: 0%") == messages.count("tuning: 50%") == messages.count("tuning: 100%") == 1
    assert sum("not published" in m for m in messages) == 1  # warned once, then only log lines
