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


def test_format_text__names_the_run_id_what_it_was_measured_under_and_escapes_labels():
    from pipeline.results import Conditions, Load

    conditions = Conditions(threads=1, threads_requested=1, device=Load((0.52, 0.4, 0.33), (0,), 2),
                            host=Load((1.5, 1.0, 0.5), (0, 1), 2))
    text = format_text(_summary(run_id="20261128T020000Z-abcdef", conditions=conditions, model="m\x1b[2J.onnx"))
    lines = text.splitlines()
    assert lines[0] == "Run        20261128T020000Z-abcdef  (python -m flows.history show 20261128T020000Z-abcdef)"
    assert ("Measured   threads 1 (asked 1); device load 0.52 0.40 0.33, CPUs 0 of 2; host load 1.50 1.00 0.50, "
            "CPUs 0-1 of 2") in lines
    assert "\x1b" not in text and "m\\x1b[2J.onnx" in text
    assert "Measured   not recorded" in format_text(_summary())


def test_ui_key__one_readable_key_per_lineage_model_and_device():
    embedded, fleet = _summary(), _summary(name="bench-b", device="tracker 127.0.0.1:9190 key=fleet-b")
    tracker = _summary(device="tracker 127.0.0.1:9190 key=rpi4")
    assert re.fullmatch(r"efficientnet-lite0-embedded-[0-9a-f]{6}", ui_key(embedded))
    assert re.fullmatch(r"efficientnet-lite0-bench-b-[0-9a-f]{6}", ui_key(fleet))
    assert re.fullmatch(r"efficientnet-lite0-rpi4-[0-9a-f]{6}", ui_key(tracker))
    assert ui_key(_summary(build_key="cd" * 32, schedules="tvm-default")) == ui_key(embedded)  # same lineage
    assert ui_key(_summary(target='{"kind":"llvm","mcpu":"znver4"}')) != ui_key(embedded)


def test_lineage_rows_and_trend_points__mark_the_build_change():
    import dataclasses

    from pipeline.latency import Change, Verdict
    from pipeline.store.ledger import record_of
    from pipeline.views.run import lineage_rows, trend_points

    earlier = [record_of(_summary(run_id=f"20261128T0{h}0000Z-abcdef"), "passed", 0, None, versions={})
               for h in (1, 2)]
    earlier[1] = dataclasses.replace(earlier[1], started="2026-11-28T03:00:00+00:00")
    verdict = Verdict(True, 1.4, 118.97, 0.1, 2, "REGRESSION: +140.0% ...", "regression", (1.2, 1.6), "bootstrap",
                      "previous build", (Change("schedules", "rules", "tvm-default"),))
    now = _summary(run_id="20261128T040000Z-abcdef", build_key="cd" * 32, schedules="tvm-default", regression=verdict)
    rows = lineage_rows(earlier, now)
    assert [r["run"] for r in rows] == ["20261128T040000Z-abcdef", *(r.id for r in reversed(earlier))]
    assert rows[0]["build change"] == "schedules" and rows[0]["verdict"] == "REGRESSION +140.0% [schedules]"
    assert rows[1]["build change"] == "" and set(rows[0]) == {"date", "run", "build change", "median ms", "p90 ms",
                                                               "verdict"}
    points = trend_points(earlier, now)
    assert [p.change for p in points] == [None, None, "schedules"] and points[-1].regression
    assert _png_size(draw_trend(points, "x")) == SIZE
    markdown = summary_markdown(now, "data:image/png;base64,AAAA", rows)
    assert "## Last runs of this lineage" in markdown
    assert "| 20261128T040000Z-abcdef | schedules | 118.97 | 121.06 | REGRESSION +140.0% [schedules] |" in markdown


def test_printable__escapes_every_control_format_and_separator_character():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.views.text import markdown_cell, printable

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.text())
    def check(text):
        import unicodedata

        for out in (printable(text), markdown_cell(text)):
            assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in out)
        assert printable(text) == text or any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)
        assert "\n" not in printable(text) and ("|" not in markdown_cell(text).replace("\\|", ""))

    check()
    assert printable("a\x1b[2J\r\u202eb") == "a\\x1b[2J\\r\\u202eb" and printable("x\ny", keep_newlines=True) == "x\ny"
    assert markdown_cell("a|b`<script>") == "a\\|b\\`&lt;script&gt;"


def test_parse_load__takes_only_well_formed_figures():
    from pipeline.device.probe import host_load, parse_load

    good = parse_load('{"loadavg": [0.5, 0.25, 0.125], "affinity": [0, 1], "cpus": 2}')
    assert good.loadavg == (0.5, 0.25, 0.12) and good.affinity == (0, 1) and good.cpus == 2
    bad = parse_load('{"loadavg": ["x", 1, 2], "affinity": [true, -1], "cpus": 0}')
    assert bad.loadavg is None and bad.affinity is None and bad.cpus is None
    assert parse_load("not json") is None and parse_load("[1]") is None and parse_load("x" * 100_000) is None
    here = host_load()
    assert here.cpus and here.affinity and len(here.loadavg) == 3
