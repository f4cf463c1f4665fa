"""pipeline/profiling.py and its renderings without a device: a device's answer parsed (untrusted), its calls
grouped into kernels and glue, the build's FLOPs table, a profile through the ledger, ``show`` and
``compare --kernels``. (On real devices: tests/integration/test_device.py, test_profile.py, test_history_runs.py;
the demo and the emulated aarch64 device: tests/system.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_summary

from flows.history import main
from pipeline.device.device_side import tvmrp_device
from pipeline.device.probe import parse_memory
from pipeline.errors import RemoteRunError, UsageError
from pipeline.latency import Timing
from pipeline.profiling import (
    MAX_KERNELS,
    MAX_SECONDS,
    MIN_SAMPLES,
    kernels_json,
    parse_answer,
    parse_kernels,
    repeats_for,
    summarize,
)
from pipeline.results import DeviceFacts, Profile
from pipeline.store import ArtifactStore
from pipeline.store.ledger import RunRecord
from pipeline.views.history import CSV_COLUMNS, compare, format_comparison, format_csv, format_run
from pipeline.views.profile import CHANGE, kernel_changes, profile_lines
from pipeline.views.run import format_text, summary_markdown

FAST = settings(max_examples=100, deadline=None, database=None)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def answer(calls, plain_ms=1.0, instrumented_ms=1.3, repeat=20, **extra) -> str:
    """A ``tvmrp.profile`` answer: ``calls`` as (name, ms) or (name, ms, args)."""
    return json.dumps({"schema": 1, "repeat": repeat, "plain_ms": plain_ms, "instrumented_ms": instrumented_ms,
                       "calls": [{"name": c[0], "ms": c[1], "args": c[2] if len(c) > 2 else []} for c in calls],
                       **extra})


CONV = [[[1, 32, 32, 32], "float32"], [[8, 4, 3, 4, 3, 8], "float32"], "int", [[1, 32, 32, 32], "float32"]]
CALLS = [("vm.builtin.check_tensor_info", 0.002), ("vm.builtin.alloc_storage", 0.003), ("transpose1", 0.004),
         ("fused_conv2d_add_relu", 0.5, CONV), ("vm.builtin.null_value", 0.001), ("fused_conv2d_add_relu", 0.3),
         ("mean1", 0.05, [[[1, 32, 32, 32], "float16"]]), ("vm.builtin.alloc_storage", 0.002)]


# -- the device's answer ------------------------------------------------------------------------------------------


def test_parse_answer__calls_in_order_with_their_tensor_shapes():
    times = parse_answer(answer(CALLS))
    assert [c.name for c in times.calls] == [c[0] for c in CALLS]
    assert times.calls[3].shapes == ("1x32x32x32", "8x4x3x4x3x8", "1x32x32x32")  # the int is no tensor
    assert times.calls[6].shapes == ("1x32x32x32:float16",)
    assert (times.plain_ms, times.instrumented_ms, times.repeat) == (1.0, 1.3, 20)


def test_parse_answer__the_devices_error_and_garbage_are_remote_run_errors():
    with pytest.raises(RemoteRunError, match="could not profile the model: ValueError: no \\?escape"):
        parse_answer(json.dumps({"schema": 1, "error": "ValueError: no \x1bescape"}), "device d")
    for bad in ("not json", "[]", answer([("k", -1.0)]), answer([("", 1.0)]), answer(CALLS, repeat=0),
                answer(CALLS, plain_ms="1"), "x" * (9 << 20)):
        with pytest.raises(RemoteRunError, match="answered tvmrp.profile with"):
            parse_answer(bad)


@FAST
@given(JSON)
def test_parse_answer__any_json_is_a_profile_or_a_remote_run_error(data):
    try:
        times = parse_answer(json.dumps(data))
    except RemoteRunError:
        return
    assert all(isinstance(c.name, str) and c.name.isprintable() and c.ms >= 0 for c in times.calls)


# -- grouping -------------------------------------------------------------------------------------------------


def test_summarize__kernels_by_name_slowest_first_and_the_rest_is_glue():
    profile = summarize(parse_answer(answer(CALLS, plain_ms=1.0)), {"fused_conv2d_add_relu": 2e6, "transpose1": 0.0})
    assert [k.name for k in profile.kernels] == ["fused_conv2d_add_relu", "mean1", "transpose1"]
    conv = profile.kernels[0]
    assert conv.calls == 2 and conv.ms == pytest.approx(0.8) and conv.shapes[0] == "1x32x32x32"
    assert conv.flops == 4e6 and conv.gflop_per_s == pytest.approx(4e6 / 0.8e-3 / 1e9)
    assert profile.kernels[1].flops is None and profile.kernels[2].flops == 0.0
    assert profile.kernels[2].gflop_per_s is None  # a transpose computes nothing
    assert profile.kernels_ms == pytest.approx(0.854) and profile.glue_ms == pytest.approx(0.146)
    assert profile.total_ms == pytest.approx(1.0) == profile.measured_ms
    assert sum(k.share for k in profile.kernels) + profile.glue_share == pytest.approx(1.0)
    assert [(b.name, b.calls) for b in profile.builtins][:1] == [("vm.builtin.alloc_storage", 2)]
    assert profile.flops_known and profile.note is None


def test_summarize__kernels_timed_longer_than_the_inference_leave_no_glue_and_say_why():
    profile = summarize(parse_answer(answer([("k", 0.02), ("j", 0.02)], plain_ms=0.03)))
    assert profile.glue_ms == 0.0 and profile.total_ms == pytest.approx(0.04)
    assert "overstated by the instrument" in profile.note and not profile.flops_known


def test_summarize__keeps_the_slowest_kernels_one_by_one_and_the_rest_as_one():
    profile = summarize(parse_answer(answer([(f"k{i}", 0.001 * (i + 1)) for i in range(MAX_KERNELS + 100)],
                                            plain_ms=200.0)))
    assert len(profile.kernels) == MAX_KERNELS and profile.kernels[0].name == f"k{MAX_KERNELS + 99}"
    assert profile.kernels[-1].name == "(101 more kernels)" and profile.kernels[-1].calls == 101
    assert sum(k.share for k in profile.kernels) + profile.glue_share == pytest.approx(1.0)


def test_repeats_for__repeat_given_else_adaptive_within_bounds():
    assert repeats_for(Timing(repeat=7), 500.0) == 7
    assert repeats_for(Timing(), 500.0) == MIN_SAMPLES  # 10 x 0.5 s already passes the second
    assert repeats_for(Timing(), 1.0) == 1000  # a second of 1 ms inferences
    assert repeats_for(Timing(), 10_000.0) == int(MAX_SECONDS / 10)


def test_kernels_json__round_trips_and_junk_is_none():
    flops = {"fused_conv2d_add_relu": 18939904.0, "transpose1": 0.0}
    assert parse_kernels(kernels_json(flops)) == flops
    for junk in (b"", b"[]", b'{"schema": 2, "kernels": {}}', b"\xff", json.dumps({"schema": 1, "kernels": {
            "a": {"flops": -1}, "b": {"flops": True}, "c": "x"}}).encode()):
        assert not parse_kernels(junk)


def test_device_memory__this_process_tells_its_peak_and_junk_is_none():
    told = tvmrp_device.memory()
    assert told["peak_rss_bytes"] >= told["rss_bytes"] > 1 << 20
    assert parse_memory(tvmrp_device.device_memory()) == told["peak_rss_bytes"]
    for junk in ("{}", "[]", '{"peak_rss_bytes": true}', '{"peak_rss_bytes": -5}', "nope"):
        assert parse_memory(junk) is None


# -- through the ledger and the renderings --------------------------------------------------------------------




def profile_of(conv_ms: float = 0.5, plain_ms: float = 3.0) -> Profile:
    """A profile of :data:`CALLS` (the first convolution taking ``conv_ms``) and 12 more kernels."""
    calls = [(c[0], conv_ms, *c[2:]) if i == 3 else c for i, c in enumerate(CALLS)]
    return summarize(parse_answer(answer([*calls, *((f"kernel_{i}", 0.01 * (i + 1)) for i in range(12))],
                                         plain_ms=plain_ms)), {"fused_conv2d_add_relu": 2e6})


PROFILE = profile_of()
FACTS = DeviceFacts(load_ms=95.2, first_inference_ms=130.0, peak_memory_bytes=312_400_000, library_bytes=21_400_000)


@FAST
@given(JSON)
def test_profile_from_dict__any_json_is_a_profile_or_none(data):
    profile = Profile.from_dict(data)
    assert profile is None or all(isinstance(k.name, str) for k in profile.kernels)


def test_profile__json_keys_round_trip_and_report_lines():
    data = json.loads(json.dumps(PROFILE.as_dict()))
    assert {"kernels", "glue_ms", "total_ms"} <= data.keys()
    assert {"name", "calls", "ms", "share", "shapes", "flops", "gflop_per_s"} == data["kernels"][0].keys()
    assert Profile.from_dict(data) == PROFILE
    summary = make_summary(profile=PROFILE, facts=FACTS)
    assert summary.as_json()["profile"] == PROFILE.as_dict()
    assert summary.as_json()["device_facts"] == FACTS.as_dict()
    assert make_summary().as_json()["profile"] is None
    assert make_summary().as_json()["device_facts"] == {"load_ms": None, "first_inference_ms": None,
                                                        "peak_memory_bytes": None, "library_bytes": 20_000_000}
    text = format_text(summary)
    assert "On device  load 95.2 ms  first inference 130 ms  peak memory 312.4 MB (its session process)  library " \
           "21.4 MB" in text
    assert "Profile    3 ms per inference on the device (median of 20)" in text
    markdown = summary_markdown(summary, "data:image/png;base64,")
    assert "## Where the time goes" in markdown and "| `fused_conv2d_add_relu` | 2 | 0.8000 | 26.7% | 5.0 |" in markdown
    assert "On the device: load 95.2 ms" in markdown and "| glue | | 1.3660 | 45.5% | |" in markdown
    stock = make_summary(notes=("profiling needs a device started from the bundle (...)",))
    assert "\nNote       profiling needs a device started from the bundle (...)" in format_text(stock)
    assert stock.as_json()["notes"][-1].startswith("profiling needs") and stock.as_json()["profile"] is None
    lines = profile_lines(PROFILE)
    assert lines[2].split()[:4] == ["fused_conv2d_add_relu", "2", "0.8000", "26.7%"] and "5.0" in lines[2]
    assert "(5 more kernels)" in lines[-2] and lines[-1].lstrip().startswith("glue (VM builtins")


def test_record__old_records_without_facts_or_profile_still_read_and_show(store_root):
    summary = make_summary(profile=PROFILE, facts=FACTS)
    from pipeline.store.ledger import record_of

    record = record_of(summary, "passed", 0, None, versions={})
    assert record.profile == PROFILE.as_dict() and record.device_facts == FACTS.as_dict()
    old = {k: v for k, v in json.loads(json.dumps(record.as_json())).items() if k not in ("profile", "device_facts")}
    read = RunRecord.from_json(old)
    assert read.profile is None and read.device_facts is None
    assert "On device  not recorded" in format_run(read) and "Profile" not in format_run(read)
    shown = format_run(RunRecord.from_json(json.loads(json.dumps(record.as_json()))))
    assert "Profile    3 ms per inference" in shown and "fused_conv2d_add_relu" in shown
    row = format_csv([record]).splitlines()[1].split(",")
    assert CSV_COLUMNS[-5:] == ("load_ms", "first_inference_ms", "peak_memory_bytes", "profile_total_ms",
                                "profile_glue_ms")
    assert [float(x) for x in row[-5:]] == pytest.approx([95.2, 130.0, 312400000, 3.0, 1.366])


def test_kernel_changes__moved_kernels_and_kernels_of_one_run_only():
    a = Profile(kernels=tuple(PROFILE.kernels), glue_ms=1.0, total_ms=3.0, kernels_ms=2.0, measured_ms=3.0,
                instrumented_ms=3.5, repeat=10)
    slower = dataclasses.replace(a.kernels[0], ms=a.kernels[0].ms * (1 + 2 * CHANGE))
    jitter = dataclasses.replace(a.kernels[1], ms=a.kernels[1].ms * (1 + CHANGE / 2))
    b = dataclasses.replace(a, kernels=(slower, jitter, *a.kernels[3:],
                                        dataclasses.replace(a.kernels[2], name="new_kernel")))
    compared = kernel_changes(a, b)
    changed = {k.name: k for k in compared.changed}
    assert set(changed) == {"fused_conv2d_add_relu", a.kernels[2].name, "new_kernel"}
    assert changed["new_kernel"].a_ms is None and changed[a.kernels[2].name].b_ms is None
    assert compared.kernels[0].name == "fused_conv2d_add_relu"  # the largest move first


def test_compare_kernels__cli_shows_the_changed_kernels_and_refuses_runs_without_profile(store_root, capsys):
    from pipeline.store.ledger import record_of

    faster = profile_of(conv_ms=0.1, plain_ms=2.4)  # the convolution: 0.8 -> 0.4 ms
    ledger = ArtifactStore(store_root).ledger
    runs = [record_of(make_summary(run_id=f"20261128T0{i}0000Z-abcdef", profile=profile), "passed", 0, None,
                      versions={}) for i, profile in enumerate((PROFILE, faster, None))]
    for run in runs:
        ledger.write(run)
    code = main(["compare", runs[0].id, runs[1].id, "--kernels", "--artifacts", str(store_root)])
    out = capsys.readouterr().out
    assert code == 0 and "\nKernels    total 3 -> 2.4 ms (-20.0%)" in out
    assert "0 kernel(s) slower, 1 faster" in out and "fused_conv2d_add_relu" in out and "-50.0%" in out
    code = main(["compare", runs[0].id, runs[1].id, "--kernels", "--json", "--artifacts", str(store_root)])
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert kernels["changed"] == 1 and kernels["kernels"][0]["b_ms"] == pytest.approx(0.4)
    assert "kernels" not in compare(runs[0], runs[1]).as_json()
    code = main(["compare", runs[0].id, runs[2].id, "--kernels", "--artifacts", str(store_root)])
    err = capsys.readouterr().err
    assert code == 2 and f"run B ({runs[2].id}) has none: record one with" in err and "--profile" in err
    with pytest.raises(UsageError):
        compare(runs[2], runs[0], kernels=True)
    assert "Kernels" not in format_comparison(compare(runs[0], runs[1]))
