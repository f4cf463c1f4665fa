"""tasks/report.py without a Prefect server: the typed summary and its renderings (text, JSON, tables, the
chart, the markdown), series keys, and that publishing never fails a run when the API is unreachable.
(Against a real server: tests/system/test_stack.py, test_ui.py.)"""

from __future__ import annotations

import io
import logging
import re
import socket
import time
import warnings
from datetime import datetime, timedelta, timezone

from PIL import Image

from pipeline.views.chart import SIZE, TrendPoint, draw_trend
from pipeline.latency import judge
from pipeline.results import Upload
from support import make_summary
from pipeline.views.run import format_text, latency_table, series_title, summary_markdown, top5_table, ui_key
from tasks.report import publish_artifacts

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'


_summary = make_summary


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_series__ignores_the_embedded_port_and_is_a_valid_ui_key():
    a, b = _summary(), _summary(device="embedded 127.0.0.1:50000")
    assert a.series == b.series and ui_key(a) == ui_key(b)
    assert re.fullmatch(r"[a-z0-9-]+", ui_key(a)) and ui_key(a).startswith("efficientnet-lite0-")
    assert series_title(a) == "efficientnet_lite0 @ llvm (x86_64-conda-linux-gnu) opt_level 3 on embedded"


def test_series__another_build_device_or_input_is_another_series():
    base = _summary().series
    assert _summary(build_key="ba" * 32).series != base  # another target, opt_level or tuning: another build
    assert _summary(device="tracker 10.0.0.1:9190 key=rpi4").series != base
    assert _summary(device_identity="aarch64-linux-gnu").series != base
    assert _summary(input_shape=(1, 3, 256, 256)).series != base
    assert _summary(run_id="20261129T020000Z-000000").series == base


def test_latency_table__every_statistic_with_its_counts():
    rows = latency_table(_summary())
    assert [r["statistic"] for r in rows] == ["mean", "median", "p90", "p99", "min", "max", "std", "cv"]
    assert rows[1]["ms"] == 118.97 and rows[0]["repeat"] == 5 and rows[0]["number"] == 1


def test_top5_table__ranks_and_rounds():
    rows = top5_table(_summary())
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0] == {
        "rank": 1, "class": 285, "label": "cat 0", "probability": 0.3}


def test_judge__compares_with_the_median_of_the_previous_runs():
    assert judge(100.0, []).message == "first run of this lineage"
    verdict = judge(125.0, [100.0, 102.0, 100.0])
    assert verdict.message.startswith("REGRESSION: +25.0% against the median of the previous 3 run(s)")


def test_draw_trend__is_a_png_for_no_one_or_many_points():
    start = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)
    many = [TrendPoint(start + timedelta(days=i), 118 + i % 3, 116, 121, i == 19) for i in range(20)]
    for points in ([], many[:1], many):
        assert _png_size(draw_trend(points, "Median latency (ms): " + "x" * 200)) == SIZE


def test_summary_markdown__names_the_build_and_marks_cached_stages():
    text = summary_markdown(_summary(), "data:image/png;base64,AAAA")
    assert f"`{'ab' * 32}`" in text and "| opt_level | 3 |" in text
    assert "| build | **cached** |" in text and "| upload | ran |" in text
    assert "Cached (not rebuilt): import-model, build, export-library." in text
    assert "![median latency per run](data:image/png;base64,AAAA)" in text


def test_format_text__reports_upload_rate_with_sense_on_slow_links():
    slow = _summary(upload=Upload("/tmp/x.so", 20_000_000, 57.0, False))
    assert "(350.9 kB/s)" in format_text(slow)
    assert "(61 MB/s)" in format_text(_summary())
    assert "Upload     none: the device kept" in format_text(_summary(upload=Upload("/tmp/x.so", 5, 0.01, True)))


def test_publish_artifacts__unreachable_api_only_warns(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    start = time.monotonic()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "artifact creation outside of a flow run"
        with caplog.at_level(logging.WARNING, logger="tasks.report"):
            publish_artifacts(_summary(), [])  # must not raise
    assert time.monotonic() - start < 30
    assert any("could not publish" in r.getMessage() for r in caplog.records)


def test_progress__unreachable_api_keeps_the_log_lines(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.progress import Progress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with caplog.at_level(logging.INFO, logger="tasks.progress"), Progress("tune-x", "tuning") as progress:
            progress.update(1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("tuning: 0%") == messages.count("tuning: 50%") == messages.count("tuning: 100%") == 1
    assert sum("not published" in m for m in messages) == 1  # warned once, then only log lines


def test_while_waiting__shows_a_long_call_only(caplog):
    from tasks.progress import while_waiting

    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        with while_waiting("quick", "a quick call", after=1.0, every=0.2):
            time.sleep(0.1)
        assert not caplog.records  # ended before `after`: nothing shown
        with while_waiting("slow", "a slow call", after=0.2, every=0.2):
            time.sleep(1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("a slow call: 0% (") and "s so far" in m for m in messages)
    assert messages[-1] == "a slow call: 100%"
