"""flows/history.py and pipeline/views/history.py: the run ledger read back (list, filters, renderings, show, compare).

The tests build records in code (``RunRecord``) and write them with ``Ledger.write``; the CLI runs
in-process (``main``). (Three real runs read back by ``python -m flows.history`` in a fresh process:
tests/integration/test_history_runs.py.)
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import re

import pytest

from flows.history import main
from pipeline.errors import UsageError
from pipeline.latency import judge
from pipeline.results import RunStamp, series_of
from pipeline.store import ArtifactStore
from pipeline.store.ledger import Ledger, RunRecord
from pipeline.views.history import (
    CSV_COLUMNS,
    Selection,
    compare,
    format_csv,
    format_markdown,
    format_table,
    latency_change,
    parse_since,
    select,
    target_short,
)

TARGET = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'
AARCH64 = '{"kind":"llvm","tag":"","keys":["arm_cpu","cpu"],"mtriple":"aarch64-linux-gnu","mattr":["+neon"]}'
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
VERSIONS = {"apache-tvm": "0.27.0.post1", "prefect": "3.9.1", "python": "3.11.7"}


def latency(median: float, spread: float = 0.03) -> dict[str, float]:
    """A record's ``latency_ms`` with this median and p90 ``spread`` above it."""
    return {"mean": median * 1.01, "median": median, "p90": median * (1 + spread), "p99": median * (1 + 2 * spread),
            "min": median * 0.98, "max": median * 1.2, "std": median * 0.02, "cv": 0.0198}


def record(started: dt.datetime = NOW, **changes) -> RunRecord:
    """A passed run of efficientnet_lite0 on the embedded device, started at ``started``."""
    build_key = changes.pop("build_key", "ab" * 32)
    base = RunRecord(
        id=RunStamp.new(started).id, series=series_of(build_key, "embedded", "x86_64-conda-linux-gnu", [1, 3, 224, 224]),
        started=started.isoformat(timespec="seconds"), finished=(started + dt.timedelta(seconds=20)).isoformat(),
        status="passed", exit_code=0, error=None, model="efficientnet_lite0", model_digest="1f" * 32, target=TARGET,
        opt_level=3, tune_trials=0, tuning_key=None, build_key=build_key, library_key="ef" * 32, device="embedded",
        device_identity="x86_64-conda-linux-gnu", image="data/cat.png", input_shape=[1, 3, 224, 224],
        stages={"build": "cached", "run": "ran"}, latency_ms=latency(117.4), samples=30,
        check={"passed": True, "max_abs_diff": 3.8e-06, "max_rel_diff": 2.2e-4, "reason": "max abs diff 3.81e-06"},
        regression={"regression": False, "change": None, "baseline_ms": None, "threshold": None, "runs": 0,
                    "message": "first run of this series"},
        versions=dict(VERSIONS), flow_run_id="e79c2236-7d04-4552-84f5-cc5e7ec773c3",
    )
    return dataclasses.replace(base, **changes)


def failed_record(started: dt.datetime = NOW, **changes) -> RunRecord:
    """A run that failed before it had a summary (no series, latency, check or verdict)."""
    return record(started, series=None, status="failed", exit_code=1, error="device 10.0.0.7:9090 refused the "
                  "connection", device="10.0.0.7:9090", device_identity=None, stages={}, latency_ms=None,
                  samples=None, check=None, regression=None, **changes)


@pytest.fixture
def ledger(store_root) -> Ledger:
    return ArtifactStore(store_root).ledger


def write(ledger: Ledger, *records: RunRecord) -> list[RunRecord]:
    for r in records:
        ledger.write(r)
    return list(records)


def history(capsys, store_root, *args: str) -> tuple[int, str, str]:
    """``python -m flows.history ARGS --artifacts STORE``, in this process: exit code, stdout, stderr."""
    code = main([*args, "--artifacts", str(store_root)])
    out, err = capsys.readouterr()
    return code, out, err


# -- selecting runs -------------------------------------------------------------------------------------


def test_parse_since__iso_date_datetime_zone_and_relative():
    assert parse_since("2026-11-27") == dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)
    assert parse_since("2026-11-27T10:30") == dt.datetime(2026, 11, 27, 10, 30, tzinfo=dt.timezone.utc)
    assert parse_since("2026-11-27T10:30+01:00") == dt.datetime(2026, 11, 27, 9, 30, tzinfo=dt.timezone.utc)
    assert parse_since("2026-11-27T10:30:00Z") == dt.datetime(2026, 11, 27, 10, 30, tzinfo=dt.timezone.utc)
    assert parse_since("7d", now=NOW) == NOW - dt.timedelta(days=7)
    assert parse_since("12h", now=NOW) == NOW - dt.timedelta(hours=12)
    assert parse_since("30m", now=NOW) == NOW - dt.timedelta(minutes=30)
    assert parse_since("2w", now=NOW) == NOW - dt.timedelta(weeks=2)


@pytest.mark.parametrize("text", ["yesterday", "7 days", "-3d", "2026-13-01", "", "12y"])
def test_parse_since__anything_else_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--since .* is not a date"):
        parse_since(text)


def test_select__filters_by_model_device_and_target():
    runs = [
        record(NOW, model="resnet18_v2"),
        record(NOW - dt.timedelta(hours=1), device="rpi4@10.0.0.2:9190", target=AARCH64),
        record(NOW - dt.timedelta(hours=2), model="/models/tiny.onnx"),
    ]
    assert select(runs, Selection(model="resnet18_v2")) == [runs[0]]
    assert select(runs, Selection(model="RESNET")) == [runs[0]]  # a substring, any case
    assert select(runs, Selection(model="tiny")) == [runs[2]]
    assert select(runs, Selection(device="rpi4")) == [runs[1]]
    assert select(runs, Selection(target="aarch64")) == [runs[1]]  # the canonical target
    assert select(runs, Selection(target="llvm (x86_64")) == [runs[0], runs[2]]  # its short form
    assert select(runs, Selection(model="resnet", device="rpi4")) == []


def test_select__keeps_newest_first_and_last_counts_after_the_filters():
    runs = [record(NOW - dt.timedelta(hours=h), opt_level=2 if h % 2 else 3) for h in range(6)]
    assert select(runs, Selection(last=2)) == runs[:2]
    assert select(runs, Selection(last=2, model="efficient")) == runs[:2]
    assert [r.opt_level for r in select(runs, Selection())] == [3, 2, 3, 2, 3, 2]
    with pytest.raises(UsageError, match="--last must be at least 1"):
        Selection(last=0)


def test_select__since_absolute_and_relative():
    runs = [record(NOW - dt.timedelta(days=d)) for d in (0, 1, 3, 10)]
    assert select(runs, Selection(since=parse_since("2026-11-25"))) == runs[:3]
    assert select(runs, Selection(since=parse_since("2d", now=NOW))) == runs[:2]
    assert select(runs, Selection(since=parse_since("2026-11-28T11:00+02:00"))) == runs[:1]


def test_target_short__names_kind_triple_and_cpu():
    assert target_short(TARGET) == "llvm (x86_64-conda-linux-gnu)"
    znver4 = '{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"znver4"}'
    assert target_short(znver4) == "llvm (x86_64-linux-gnu, znver4)"
    assert target_short('{"kind":"cuda","arch":"sm_90"}') == "cuda (sm_90)"
    assert target_short("llvm") == "llvm"


# -- lists of runs --------------------------------------------------------------------------------------


def test_format_table__one_line_per_run_with_marks():
    slow = record(NOW, latency_ms=latency(152.6), regression={
        "regression": True, "change": 0.3, "baseline_ms": 117.4, "threshold": 0.05, "runs": 10,
        "message": "REGRESSION: +30.0% against ..."})
    bad_check = record(NOW - dt.timedelta(hours=1), status="failed", exit_code=1,
                       check={"passed": False, "max_abs_diff": 0.2}, regression={"change": 0.012, "regression": False})
    text = format_table([slow, bad_check, failed_record(NOW - dt.timedelta(hours=2))])
    header, *lines = text.splitlines()
    assert header.split()[:3] == ["id", "started", "(UTC)"] and "median ms" in header and "build" in header
    assert len(lines) == 3
    assert lines[0].startswith(slow.id) and "2026-11-28 12:00" in lines[0] and "REGRESSION +30.0%" in lines[0]
    assert "152.6" in lines[0] and "157.2" in lines[0] and "161.8" in lines[0] and "abababab" in lines[0]  # p99
    assert "llvm (x86_64-conda-linux-gnu)" in lines[0] and "passed" in lines[0] and "0.27.0.post1" in lines[0]
    for column in ("schedules", "opt", "trials", "tvm", "p99 ms", "verdict"):
        assert column in header, column
    assert "FAILED" in lines[1] and "+1.2%" in lines[1]
    assert "failed" in lines[2] and "10.0.0.7:9090" in lines[2]


def test_format_markdown__a_table_with_a_header_rule_and_escaped_pipes():
    lines = format_markdown([record(model="a|b"), record(NOW - dt.timedelta(hours=1))]).splitlines()
    assert lines[0].startswith("| id | started (UTC) | model |") and lines[1].startswith("|---|")
    assert len(lines) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])
    assert "a\\|b" in lines[2]
    assert len(re.split(r"(?<!\\)\|", lines[0])) == len(re.split(r"(?<!\\)\|", lines[2]))  # as many cells


def test_format_csv__parses_back_one_flat_row_per_run():
    nasty = record(NOW, model="=HYPERLINK(\"x\")", error='line one\nsays "no", then, a comma')
    text = format_csv([nasty, failed_record(NOW - dt.timedelta(hours=1))])
    assert text.endswith("\r\n") and "\r\n" in text.splitlines(keepends=True)[0]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 2 and tuple(rows[0]) == CSV_COLUMNS
    first, second = rows
    for name in ("mean", "median", "p90", "p99", "min", "max", "std"):
        assert float(first[f"latency_{name}_ms"]) == nasty.latency_ms[name]
    assert float(first["latency_cv"]) == nasty.latency_ms["cv"]
    assert first["check_passed"] == "true" and first["regression"] == "false"
    assert first["model"] == "'=HYPERLINK(\"x\")"  # a spreadsheet shows it, it does not run it
    assert first["error"] == 'line one\nsays "no", then, a comma'
    assert first["input_shape"] == "1x3x224x224" and first["target"] == TARGET
    assert first["target_short"] == "llvm (x86_64-conda-linux-gnu)"
    assert second["status"] == "failed" and second["latency_median_ms"] == "" and second["check_passed"] == ""


def test_cli_list__json_csv_markdown_and_the_table(capsys, store_root, ledger):
    runs = write(ledger, record(NOW - dt.timedelta(hours=2)), record(NOW - dt.timedelta(hours=1), opt_level=2),
                 failed_record(NOW))
    code, out, _ = history(capsys, store_root, "--json")
    listed = json.loads(out)["runs"]
    assert code == 0 and [r["id"] for r in listed] == [r.id for r in reversed(runs)]
    assert listed[1] == runs[1].as_json()  # the record's own fields, nothing added
    for key in ("id", "series", "build_key", "started", "status", "check", "latency_ms"):
        assert key in listed[1]
    assert set(listed[1]["latency_ms"]) == {"mean", "median", "p90", "p99", "min", "max", "std", "cv"}
    code, out, _ = history(capsys, store_root, "--csv", "--last", "2")
    assert code == 0 and [row["id"] for row in csv.DictReader(io.StringIO(out))] == [runs[2].id, runs[1].id]
    code, out, _ = history(capsys, store_root, "--markdown", "--device", "embedded")
    assert code == 0 and len(out.splitlines()) == 4
    code, out, _ = history(capsys, store_root)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [r.id for r in reversed(runs)]


def test_cli_list__since_relative_to_now(capsys, store_root, ledger):
    now = dt.datetime.now(dt.timezone.utc)
    recent, _ = write(ledger, record(now - dt.timedelta(hours=1)), record(now - dt.timedelta(days=3)))
    code, out, _ = history(capsys, store_root, "--since", "2d", "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)["runs"]] == [recent.id]
    code, out, _ = history(capsys, store_root, "--since", f"{now - dt.timedelta(days=5):%Y-%m-%d}", "--json")
    assert len(json.loads(out)["runs"]) == 2


def test_cli_list__an_empty_ledger_says_so_and_exits_0(capsys, store_root):
    code, out, err = history(capsys, store_root)
    assert code == 0 and out.strip() == f"no runs recorded in {store_root.resolve() / '.runs'}" and not err
    code, out, err = history(capsys, store_root, "--json")
    assert code == 0 and json.loads(out) == {"runs": []} and "no runs recorded" in err
    code, out, err = history(capsys, store_root, "--csv")
    assert code == 0 and out.strip() == ",".join(CSV_COLUMNS)
    assert not (store_root / ".runs").exists()  # reading never creates the ledger


def test_cli_list__no_match_says_how_many_are_recorded(capsys, store_root, ledger):
    write(ledger, record())
    code, out, _ = history(capsys, store_root, "--model", "resnet")
    assert code == 0 and out.startswith("no runs match (1 recorded in ")


def test_cli__bad_usage_exits_2_with_one_error_line(capsys, store_root, ledger):
    write(ledger, record())
    for args, message in [(("--since", "last tuesday"), "is not a date"), (("--last", "0"), "at least 1"),
                          (("--csv", "--markdown"), "not allowed with"), (("frobnicate",), "invalid choice")]:
        code, out, err = history(capsys, store_root, *args)
        assert code == 2 and not out and err.splitlines()[-1].startswith("Error: ") and message in err, args


def test_cli__store_from_the_environment(capsys, store_root, ledger, monkeypatch):
    (one,) = write(ledger, record())
    monkeypatch.setenv("TVMRP_ARTIFACTS", str(store_root))
    assert main(["--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [one.id]


# -- one run, and run ids -------------------------------------------------------------------------------


def test_cli_show__one_run_in_full_by_prefix(capsys, store_root, ledger):
    run, _ = write(ledger, record(NOW), record(NOW - dt.timedelta(days=1)))
    code, out, _ = history(capsys, store_root, "show", run.id[:10])
    assert code == 0 and out.startswith(f"Run        {run.id}  passed (exit 0)")
    for text in (run.series, run.build_key, run.library_key, run.model_digest, TARGET, "opt_level 3", "tuning none",
                 "1x3x224x224", "median 117.4 ms", "p90 120.9 ms", "CV 2.0%", "(30 samples)", "Check      passed",
                 "first run of this series", "apache-tvm 0.27.0.post1", run.flow_run_id):
        assert text in out, text
    assert "schedules" not in out  # a record from before the schedules were recorded
    code, out, _ = history(capsys, store_root, "show", run.id, "--json")
    assert code == 0 and json.loads(out) == run.as_json()
    code, out, _ = history(capsys, store_root, "--json", "show", run.id)  # --json before the command too
    assert code == 0 and json.loads(out)["id"] == run.id


def test_cli_show__a_failed_run_shows_its_error(capsys, store_root, ledger):
    (run,) = write(ledger, failed_record())
    code, out, _ = history(capsys, store_root, "show", run.id)
    assert code == 0 and "Error      device 10.0.0.7:9090 refused" in out and "Latency    none" in out


def test_cli_show__unknown_or_ambiguous_run_exits_2(capsys, store_root, ledger):
    write(ledger, record(NOW), record(NOW + dt.timedelta(seconds=1)))
    code, out, err = history(capsys, store_root, "show", "20261128T1200")
    assert code == 2 and not out and "Error: 2 runs start with '20261128T1200': give more of the id" in err
    code, _, err = history(capsys, store_root, "show", "20251128")
    assert code == 2 and "Error: no run '20251128' in " in err and "python -m flows.history" in err
    code, _, err = history(capsys, store_root, "compare", "2026", "2026")
    assert code == 2 and "give more of the id" in err


def test_ledger_find__reads_only_the_records_that_match(ledger):
    one, two = write(ledger, record(NOW), record(NOW - dt.timedelta(days=1)))
    (ledger.directory / f"{two.id}.json").write_text("{not json")  # unreadable: skipped, and not read for `one`
    assert ledger.find(one.id[:14]) == one
    assert [r.id for r in ledger.records(one.id[:8])] == [one.id]


# -- two runs -------------------------------------------------------------------------------------------


def test_compare__names_what_changed():
    a = record(NOW - dt.timedelta(hours=1))
    b = record(NOW, opt_level=2, build_key="cd" * 32, library_key="12" * 32,
               versions={**VERSIONS, "apache-tvm": "0.28.0"}, latency_ms=latency(117.9))
    c = compare(a, b)
    assert [d.field for d in c.differences] == ["opt_level", "build_key", "library_key", "series",
                                                "versions.apache-tvm"]
    assert (c.differences[0].a, c.differences[0].b) == (3, 2)
    assert "model_digest" in c.same and "target" in c.same and "device_identity" in c.same
    assert not c.latency.beyond_noise and c.latency.message.startswith("within noise (+0.4%")
    data = c.as_json()
    assert data["a"] == a.id and data["b"] == b.id and data["latency"]["a"]["median"] == 117.4
    assert {"field": "opt_level", "a": 3, "b": 2} in data["differences"]


def test_latency_change__beyond_the_noise_or_within_it():
    slower = latency_change(latency(100.0), latency(130.0))
    assert slower.beyond_noise and slower.message.startswith("slower by 30.0%") and slower.threshold == 0.05
    faster = latency_change(latency(100.0), latency(80.0))
    assert faster.beyond_noise and faster.message.startswith("faster by 20.0%")
    assert not latency_change(latency(100.0), latency(104.0)).beyond_noise
    noisy = latency_change(latency(100.0, spread=0.25), latency(120.0))  # A's p90 is 25 % above its median
    assert not noisy.beyond_noise and noisy.threshold == pytest.approx(0.25) and "run A noisy" in noisy.message
    missing = latency_change(latency(100.0), None)
    assert missing.change is None and not missing.beyond_noise and "no latency" in missing.message


def test_cli_compare__text_and_json(capsys, store_root, ledger):
    a, b = write(ledger, record(NOW - dt.timedelta(hours=1)),
                 record(NOW, tune_trials=64, tuning_key="77" * 32, build_key="cd" * 32, latency_ms=latency(80.1)))
    code, out, _ = history(capsys, store_root, "compare", a.id[:12], b.id[:12])
    assert code == 0
    differs = out[out.index("Differs"):out.index("Same")]
    for field in ("tune_trials", "tuning_key", "build_key", "series"):
        assert field in differs, field
    assert "tune_trials  0 -> 64" in differs and "opt_level" not in differs
    assert "Latency A  mean" in out and "Latency B  mean" in out
    assert "median 117.4 -> 80.1 ms: faster by 31.8%" in out and "different builds" in out
    code, out, _ = history(capsys, store_root, "compare", a.id, b.id, "--json")
    data = json.loads(out)
    assert code == 0 and data["latency"]["beyond_noise"]
    assert data["latency"]["change"] == pytest.approx(-0.3177, abs=1e-4)


# -- the regression rule, end to end on records ---------------------------------------------------------


def judge_and_record(ledger: Ledger, run: RunRecord) -> RunRecord:
    """What tasks/report.py does with a run: judge it against its series in the ledger, then record it."""
    earlier = ledger.series_history(run.series, run.id, 10)
    lat = run.latency_ms
    noisy = (lat["p90"] - lat["median"]) / lat["median"] > 0.1
    verdict = judge(lat["median"], [r.median_ms for r in earlier], noisy=noisy)
    judged = dataclasses.replace(run, regression=verdict.as_dict())
    ledger.write(judged)
    return judged


def test_regression__noise_alone_is_never_flagged_and_30_percent_slower_is(capsys, store_root, ledger):
    noise = [0.0, 0.02, -0.02, 0.01, -0.015, 0.018, -0.01, 0.005, -0.02, 0.015]  # +/- 2 %
    runs = [judge_and_record(ledger, record(NOW + dt.timedelta(minutes=i), latency_ms=latency(117.4 * (1 + d))))
            for i, d in enumerate(noise)]
    assert not any(r.regression["regression"] for r in runs)
    slow = judge_and_record(ledger, record(NOW + dt.timedelta(minutes=10), latency_ms=latency(117.4 * 1.3)))
    assert slow.regression["regression"] and slow.regression["runs"] == 10
    assert slow.regression["message"].startswith("REGRESSION: +")
    other = judge_and_record(ledger, record(NOW + dt.timedelta(minutes=11), build_key="cd" * 32,
                                            latency_ms=latency(117.4 * 1.3)))
    assert not other.regression["regression"]  # another series (another build): no history to be slower than

    code, out, _ = history(capsys, store_root, "--csv")
    flags = {row["id"]: row["regression"] for row in csv.DictReader(io.StringIO(out))}
    assert code == 0 and [i for i, flag in flags.items() if flag == "true"] == [slow.id]
    code, out, _ = history(capsys, store_root, "--last", "2")
    assert "REGRESSION +" in out.splitlines()[2] and "first" in out.splitlines()[1]
    code, out, _ = history(capsys, store_root, "compare", runs[-1].id, slow.id)
    assert "slower by" in out and "same" not in out.split("Differs")[1].split("Same")[0]


def test_compare__names_the_schedules_of_two_untuned_builds(capsys, store_root, ledger):
    a = record(NOW - dt.timedelta(hours=1), schedules="tvm-default")
    b = record(NOW, schedules="rules", build_key="cd" * 32, latency_ms=latency(50.0))
    write(ledger, a, b)
    c = compare(a, b)
    assert [d.field for d in c.differences][:2] == ["schedules", "build_key"]
    assert (c.differences[0].a, c.differences[0].b) == ("tvm-default", "rules")
    code, out, _ = history(capsys, store_root, "show", b.id)
    assert code == 0 and "tuning none (schedules: rules)" in out


# -- untrusted records: malformed ones skipped, control characters escaped ---------------------------------------

CONTROL = "\x1b[2J\x1b]0;pwned\x07\rX\u202e\x9b"


def _raw(ledger: Ledger, run_id: str, **changes) -> None:
    """Write a record file as JSON, bypassing RunRecord (what another writer could leave in a shared store)."""
    data = {**record(NOW).as_json(), "id": run_id, **changes}
    ledger.directory.mkdir(parents=True, exist_ok=True)
    (ledger.directory / f"{run_id}.json").write_text(json.dumps(data))


def _raw_controls(text: str, allowed: str = "\n") -> list[str]:
    return sorted({repr(ch) for ch in text if (ord(ch) < 32 or 0x7f <= ord(ch) < 0xa0 or ch == "\u202e")
                   and ch not in allowed})


def test_cli__a_ledger_of_wrong_types_and_control_characters_never_breaks_the_output(capsys, store_root, ledger):
    _raw(ledger, "20261128T090000Z-000001", check="yes")
    _raw(ledger, "20261128T090000Z-000002", regression=5)
    _raw(ledger, "20261128T090000Z-000003", versions=["tvm", "0.27"])
    (ledger.directory / "20261128T090000Z-000004.json").write_text("{not json")
    (ledger.directory / "20261128T090000Z-000005.json").write_text("[" * 100_000)  # deeper than json can nest
    nasty = record(NOW - dt.timedelta(hours=2), model=f"m{CONTROL}.onnx", device=f"d{CONTROL}", target=f"t{CONTROL}",
                   device_name=f"n{CONTROL}", error=f"boom{CONTROL}\nline two", image=CONTROL, schedules=CONTROL,
                   device_identity=CONTROL, stages={CONTROL: CONTROL}, versions={"apache-tvm": CONTROL},
                   check={"passed": "yes", "max_abs_diff": "x", "reason": CONTROL},
                   regression={"change": "big", "regression": "yes", "message": CONTROL, "interval": ["a"],
                               "changes": [{"field": CONTROL, "a": [1], "b": {"x": CONTROL}}],
                               "baseline_runs": [CONTROL]},
                   conditions={"threads": "8", "device": 5, "host": {"loadavg": ["x"], "affinity": [CONTROL]}},
                   latency_ms={"median": float("nan"), "p90": float("inf")}, samples_ms=[float("nan"), -1.0])
    plain = record(NOW - dt.timedelta(hours=1))
    write(ledger, nasty, plain)
    outputs = []
    for args in [(), ("--csv",), ("--markdown",), ("--json",), ("show", nasty.id), ("show", "latest"),
                 ("compare", nasty.id, plain.id), ("compare", plain.id, nasty.id), ("compare", "previous", "latest"),
                 ("show", "20261128T090000Z-000001"), ("--device", CONTROL)]:
        code, out, err = history(capsys, store_root, *args)
        assert code in (0, 2) and "Traceback" not in out + err, (args, out, err)
        assert not _raw_controls(out, "\n\r" if "--csv" in args else "\n"), (args, out)
        assert not _raw_controls(err), (args, err)
        # One warning at most; a list reads every file (`show ID` reads only the files that match).
        warnings = err.count("Warning: skipped")
        assert warnings == 1 if not args or args[0].startswith("--") else warnings <= 1, (args, err)
        assert warnings == 0 or "Warning: skipped 5 run record(s) in " in err, err
        outputs.append((code, out))
    assert [code for code, _ in outputs] == [0] * 8 + [2, 2, 0]  # no earlier run in the lineage; no such run
    table = outputs[0][1]
    assert "m\\x1b[2J\\x1b]0;~X\\u202e" in table and nasty.id in table and plain.id in table
    csv_rows = list(csv.DictReader(io.StringIO(outputs[1][1], newline="")))
    assert len(csv_rows) == 2 and csv_rows[1]["error"].startswith("boom\\x1b[2J")
    assert "\nline two" in csv_rows[1]["error"]
    assert outputs[4][1].count("\nError      boom") == 1 and "\n           line two" in outputs[4][1]


def test_format_csv__guards_formulas_also_after_spaces():
    rows = list(csv.DictReader(io.StringIO(format_csv([record(model="  =1+1", image=" @SUM(A1)", schedules="-2")]),
                                           newline="")))
    assert rows[0]["model"] == "'  =1+1" and rows[0]["image"] == "' @SUM(A1)" and rows[0]["schedules"] == "'-2"
    assert rows[0]["opt_level"] == "3"  # numbers stay numbers


# -- fleet device names, lineages and the shortcuts -------------------------------------------------------------


def test_cli_list__a_fleet_device_by_its_name_and_names_not_cut_alike(capsys, store_root, ledger):
    a = record(NOW - dt.timedelta(hours=1), device="tracker 127.0.0.1:9170 key=dev-a", device_name="dev-a")
    b = record(NOW, device="tracker 127.0.0.1:9170 key=dev-b", device_name="dev-b")
    single = record(NOW - dt.timedelta(hours=2), device="tracker 127.0.0.1:9170 key=dev-c")
    write(ledger, a, b, single)
    code, out, _ = history(capsys, store_root, "--device", "dev-b", "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)["runs"]] == [b.id]
    code, out, _ = history(capsys, store_root, "--device", "key=dev-c", "--json")  # its address still matches
    assert [r["id"] for r in json.loads(out)["runs"]] == [single.id]
    code, out, _ = history(capsys, store_root)
    devices = [line.split("  ")[4] for line in out.splitlines()[1:]]
    assert [d.strip() for d in re.split(r"\s{2,}", out.splitlines()[3])][4] == "tracker 127.0.0.1:9170 key=dev-c"
    assert "dev-a" in out and "dev-b" in out and len(set(devices)) == 3


def test_cli__lineage_and_series_filters_and_compare_shortcuts(capsys, store_root, ledger):
    first = record(NOW - dt.timedelta(hours=3))
    other = record(NOW - dt.timedelta(hours=2), model="resnet18_v2")
    second = record(NOW - dt.timedelta(hours=1), build_key="cd" * 32, schedules="tvm-default",
                    latency_ms=latency(250.0))
    newest = record(NOW, model="resnet18_v2", build_key="ee" * 32)
    write(ledger, first, other, second, newest)
    code, out, _ = history(capsys, store_root, "--lineage", first.lineage_id[:6], "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)["runs"]] == [second.id, first.id]
    code, out, _ = history(capsys, store_root, "--series", second.series, "--json")
    assert [r["id"] for r in json.loads(out)["runs"]] == [second.id]
    code, out, _ = history(capsys, store_root, "compare", "previous", "latest", "--json")
    data = json.loads(out)
    assert code == 0 and (data["a"], data["b"]) == (other.id, newest.id)  # latest: the newest; previous: its lineage's
    code, out, _ = history(capsys, store_root, "--model", "efficientnet", "compare", "latest", "previous")
    assert code == 0 and out.startswith(f"A          {first.id}") and f"B          {second.id}" in out
    assert "schedules" in out.split("Same")[0] and "slower by 112.9%" in out
    code, _, err = history(capsys, store_root, "compare", "previous", first.id)
    assert code == 2 and f"run {first.id} is the first of its lineage" in err
    code, _, err = history(capsys, store_root, "compare", "previous", "previous")
    assert code == 2 and "previous means the run before the other run named" in err
    code, out, _ = history(capsys, store_root, "show", "latest", "--model", "efficient")
    assert code == 0 and out.startswith(f"Run        {second.id}") and f"Lineage    {second.lineage_id}" in out
