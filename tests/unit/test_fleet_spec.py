"""The fleet without devices: its file's validation, resolving it into pairs and plans, the result table.
(Whole fleet runs: tests/integration/test_fleet.py, tests/system/test_fleet_aarch64.py.)"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from support import AARCH64, REPO, make_summary, make_tiny_onnx
from pipeline.errors import UsageError
from pipeline.latency import Latency, Verdict
from pipeline.results import BuildCounts, CheckResult, FleetSummary, PairResult
from pipeline.thresholds import Thresholds
from pipeline.views.fleet import change_text, format_markdown, format_text
from pipeline.fleet.spec import DEFAULT_REQUEST_TIMEOUT, fleet_from_mapping, load_fleet, parse_fleet

EXAMPLE = """\
tracker: 127.0.0.1:9190          # optional default for devices
devices:
  - key: local-x86               # tracker key (or host/port)
    target: llvm
  - key: rpi4
    target: "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"
    tracker: 10.0.0.5:9190        # per-device override
models:
  - efficientnet_lite0
  - {model: resnet18_v2, weights: random}
  - {model: path/to/net.onnx, image: data/dog.jpg}
"""


def parse(text: str, base: Path | None = None):
    return parse_fleet(textwrap.dedent(text), "fleet.yaml", base=base)


def error_of(text: str) -> str:
    with pytest.raises(UsageError) as caught:
        parse(text)
    return str(caught.value)


# -- the fleet file --------------------------------------------------------------------------------------


def test_parse_fleet__the_issue_example(tmp_path):
    spec = parse(EXAMPLE, base=tmp_path)
    assert [d.name for d in spec.devices] == ["local-x86", "rpi4"]
    assert [d.target for d in spec.devices] == ["llvm", AARCH64]
    assert spec.devices[0].spec.tracker == "127.0.0.1:9190" and spec.devices[1].spec.tracker == "10.0.0.5:9190"
    assert spec.devices[1].spec.key == "rpi4" and spec.devices[1].line == 5
    assert all(d.spec.request_timeout == DEFAULT_REQUEST_TIMEOUT == 10.0 for d in spec.devices)
    assert [m.source for m in spec.models] == ["efficientnet_lite0", "resnet18_v2", str(tmp_path / "path/to/net.onnx")]
    assert spec.models[1].weights == "random" and spec.models[2].image == str(tmp_path / "data/dog.jpg")
    shared = spec.shared
    assert (shared.opt_level, shared.tune_trials, shared.number, shared.repeat, shared.check) == (3, 0, 1, None, True)
    assert shared.schedules == "rules" and shared.request_timeout == DEFAULT_REQUEST_TIMEOUT


def test_parse_fleet__options_and_host_port_devices():
    spec = parse("""\
        opt_level: 2
        repeat: 5
        request_timeout: 4
        concurrency: 2
        check: false
        schedules: none
        devices:
          - {host: 192.168.1.20, port: 9090, target: llvm}
          - {host: 192.168.1.21, port: 9090, name: bench-2, call_timeout: 60}
        models: [efficientnet_lite0]
    """)
    assert [d.name for d in spec.devices] == ["192.168.1.20:9090", "bench-2"]
    assert spec.devices[0].spec.kind == "host" and spec.devices[0].spec.request_timeout == 4
    assert spec.devices[1].spec.call_timeout == 60 and spec.devices[1].target == "llvm"
    shared = spec.shared
    assert (shared.opt_level, shared.repeat, spec.concurrency, shared.check, shared.schedules) == (2, 5, 2, False, "none")


def test_parse_fleet__unknown_key_names_line_field_and_the_closest_key():
    message = error_of(EXAMPLE.replace("    target: llvm", "    targt: llvm"))
    assert message.startswith("fleet.yaml:4: devices[0].targt: unknown key; did you mean 'target'?"), message
    message = error_of(EXAMPLE + "concurency: 4\n")
    assert message.startswith("fleet.yaml:12: concurency: unknown key; did you mean 'concurrency'?"), message
    message = error_of(EXAMPLE.replace("weights: random", "weight: random"))
    assert "fleet.yaml:10: models[1].weight: unknown key; did you mean 'weights'?" in message


@pytest.mark.parametrize("text, expected", [
    ("models: [efficientnet_lite0]\n", "fleet.yaml:1: devices: missing"),
    ("devices: []\nmodels: [efficientnet_lite0]\n", "fleet.yaml:1: devices: is empty"),
    ("devices:\n  - {host: h, port: 1}\n", "fleet.yaml:1: models: missing"),
    ("devices:\n  - {host: h, port: 1}\nmodels:\n", "fleet.yaml:1: models: missing"),
    ("devices: local-x86\nmodels: [m]\n", "fleet.yaml:1: devices: must be a list"),
    ("", "fleet.yaml: the file is empty"),
    ("- a\n- b\n", "fleet.yaml:1: the file must be a mapping"),
])
def test_parse_fleet__missing_devices_or_models(text, expected):
    assert error_of(text).startswith(expected), error_of(text)


def test_parse_fleet__duplicate_device_names_name_both_lines():
    message = error_of("""\
        tracker: 127.0.0.1:9190
        devices:
          - {key: a, name: bench}
          - {key: b}
          - {key: c, name: bench}
        models: [efficientnet_lite0]
    """)
    assert message.startswith("fleet.yaml:5: devices[2].name: 'bench' already names devices[0] (line 3)"), message
    same = error_of("""\
        tracker: 127.0.0.1:9190
        devices:
          - {key: a}
          - {key: a, name: again}
        models: [efficientnet_lite0]
    """)
    assert same.startswith("fleet.yaml:4: devices[1]: the same device as devices[0] (line 3)"), same


@pytest.mark.parametrize("device, expected", [
    ("{key: a}", "fleet.yaml:2: devices[0].key: needs a tracker"),
    ("{target: llvm}", "fleet.yaml:2: devices[0]: needs key:"),
    ("{host: h}", "fleet.yaml:2: devices[0].port: missing"),
    ("{key: a, host: h, port: 1, tracker: 't:1'}", "fleet.yaml:2: devices[0].host: give either key:"),
    ("{host: h, port: 70000}", "fleet.yaml:2: devices[0].port: must be a whole number from 1 to 65535, not 70000"),
    ("{host: h, port: '1', target: ''}", "fleet.yaml:2: devices[0].port: must be a whole number"),
    ("{key: a, tracker: nowhere}", "fleet.yaml:2: devices[0].tracker: 'nowhere' is not HOST:PORT"),
    ("{key: a, tracker: 't:1', request_timeout: 0}", "fleet.yaml:2: devices[0].request_timeout: must be a number of seconds"),
    ("{key: [a], tracker: 't:1'}", "fleet.yaml:2: devices[0].key: must be text, not a list"),
])
def test_parse_fleet__bad_device_names_line_and_field(device, expected):
    message = error_of(f"devices:\n  - {device}\nmodels: [efficientnet_lite0]\n")
    assert message.startswith(expected), message


@pytest.mark.parametrize("line, expected", [
    ("opt_level: 7", "fleet.yaml:4: opt_level: must be a whole number from 0 to 3, not 7"),
    ("repeat: 0", "fleet.yaml:4: repeat: must be a whole number from 1"),
    ("check: maybe", "fleet.yaml:4: check: must be true or false"),
    ("schedules: fast", "fleet.yaml:4: schedules: must be rules or none, not 'fast'"),
    ("max_abs_diff: -1", "fleet.yaml:4: max_abs_diff: must be a positive number"),
    ("tracker: 'x'", "fleet.yaml:4: tracker: 'x' is not HOST:PORT"),
    ("models: [m]", "fleet.yaml:4: models: given twice (first on line 3)"),
    ("devices: [", "fleet.yaml:5: not valid YAML"),
])
def test_parse_fleet__bad_options_name_line_and_field(line, expected):
    message = error_of(f"devices:\n  - {{host: h, port: 1}}\nmodels: [efficientnet_lite0]\n{line}\n")
    assert message.startswith(expected), message


def test_parse_fleet__text_fields_are_taken_as_written():
    spec = parse("devices:\n  - {key: no, tracker: '127.0.0.1:9190', name: 1:30}\nmodels: [efficientnet_lite0]\n")
    assert spec.devices[0].spec.key == "no" and spec.devices[0].name == "1:30"  # not False, not 90


def test_parse_fleet__a_bomb_of_aliases_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    assert "too large or too deeply nested" in error_of("\n".join(lines) + "\n")


def test_fleet_from_mapping__inline_spec_names_the_field_without_a_line():
    spec = fleet_from_mapping({"tracker": "127.0.0.1:9190", "devices": [{"key": "x"}], "models": ["efficientnet_lite0"]})
    assert spec.devices[0].spec.key == "x" and spec.source == "fleet spec"
    with pytest.raises(UsageError, match=r"^fleet spec: devices\[0\]\.kye: unknown key; did you mean 'key'\?"):
        fleet_from_mapping({"tracker": "127.0.0.1:9190", "devices": [{"kye": "x"}], "models": ["m"]})


def test_load_fleet__missing_file_and_the_repository_example(tmp_path):
    with pytest.raises(UsageError, match="fleet file not found"):
        load_fleet(tmp_path / "nope.yaml")
    spec = load_fleet(REPO / "fleet.yaml")  # what the fleet-nightly deployment runs
    assert [(d.name, d.spec.tracker, d.spec.key, d.target) for d in spec.devices] == [
        ("local-x86", "127.0.0.1:9190", "local-x86", "llvm")]
    assert [m.source for m in spec.models] == ["efficientnet_lite0"]


def test_resolve_fleet__a_bad_model_or_target_names_its_entry(tmp_path):
    from pipeline.fleet.plan import resolve_fleet

    model = make_tiny_onnx(tmp_path / "tiny.onnx")
    text = f"devices:\n  - {{host: h, port: 1, target: 'llvm -mcpu=nosuchcpu'}}\nmodels:\n  - {model}\n  - missing.onnx\n"
    with pytest.raises(UsageError) as bad_target:
        resolve_fleet(parse_fleet(text, "f.yaml", base=tmp_path), str(tmp_path / "store"))
    assert str(bad_target.value).startswith("f.yaml:2: devices[0].target (h:1): "), bad_target.value
    with pytest.raises(UsageError) as bad_model:
        resolve_fleet(parse_fleet(text.replace(" -mcpu=nosuchcpu", ""), "f.yaml", base=tmp_path), str(tmp_path / "store"))
    assert str(bad_model.value).startswith("f.yaml:5: models[1] ("), bad_model.value
    assert str(tmp_path / "missing.onnx") in str(bad_model.value)
    twice = text.replace(" -mcpu=nosuchcpu", "").replace("missing.onnx", f"{{model: {model.name}}}")
    with pytest.raises(UsageError, match=r"^f\.yaml:5: models\[1\]: the same model"):
        resolve_fleet(parse_fleet(twice, "f.yaml", base=tmp_path), str(tmp_path / "store"))


def test_resolve_fleet__devices_by_models_share_one_plan_per_model_and_target(tmp_path):
    from pipeline.fleet.plan import resolve_fleet

    models = [make_tiny_onnx(tmp_path / f"m{seed}.onnx", seed=seed) for seed in (0, 1)]
    text = (f"devices:\n  - {{host: a, port: 1}}\n  - {{host: b, port: 2}}\n"
            f"models:\n  - {models[0].name}\n  - {models[1].name}\n")
    fleet = resolve_fleet(parse_fleet(text, "f.yaml", base=tmp_path), str(tmp_path / "store"))
    assert [pair.name for pair in fleet.pairs] == ["m0.onnx on a:1", "m1.onnx on a:1", "m0.onnx on b:2", "m1.onnx on b:2"]
    assert all(pair.plan is not None and pair.unplanned is None for pair in fleet.pairs)
    assert len(fleet.builds()) == 2 and len(fleet.references()) == 2
    assert {pair.request.tune_trials for pair in fleet.pairs} == {0}
    assert {pair.plan.build.applied for pair in fleet.pairs} == {"rules"}
    plain = resolve_fleet(parse_fleet(text + "schedules: none\n", "f.yaml", base=tmp_path), str(tmp_path / "store"))
    assert {pair.plan.build.applied for pair in plain.pairs} == {"tvm-default"}
    assert {pair.request.schedules for pair in plain.pairs} == {"none"}


def _result(device: str, model: str, **extra) -> PairResult:
    verdict = Verdict(False, 0.031, 1.2, 0.1, 3, "+3.1%")
    checked = CheckResult(1e-6, 1e-5, 1.0, 120.0, True, True, True, "ok", Thresholds())
    passed = make_summary(latency=Latency(1.3, 1.25, 1.5, 1.5, 1.2, 1.5, 0.1, 0.07, 1, 10), check=checked,
                          regression=verdict)
    fields = dict(target="llvm", target_canonical="{}", summary=passed, build_key="b" * 64,
                  run_id="20260101T000000Z-abcdef", device_address=device)
    return PairResult(device=device, model=model, **{**fields, **extra})


def test_format_text__the_device_by_model_table():
    summary = FleetSummary("20260101T000000Z-000000", "fleet.yaml", (
        _result("a", "m0"),
        _result("ghost", "m0", summary=None, error="no device for key 'ghost'", error_type="DeviceUnavailable"),
    ), BuildCounts(ran=1, cached=0), 12.5)
    text = format_text(summary)
    assert "1 passed, 1 failed" in text and "Builds     1 ran, 0 cached" in text
    header, first, second = text.splitlines()[-3:]
    assert header.split() == ["device", "model", "status", "median", "ms", "p90", "ms", "check", "change", "error"]
    assert first.split() == ["a", "m0", "passed", "1.25", "1.5", "passed", "+3.1%"]
    assert second.split()[:7] == ["ghost", "m0", "FAILED", "-", "-", "-", "-"] and second.endswith("key 'ghost'")
    assert "| ghost | m0 | **failed** |" in format_markdown(summary)
    assert json.loads(json.dumps(summary.as_json()))["builds"] == {"ran": 1, "cached": 0, "failed": 0}
    assert change_text(Verdict(True, 0.2, 1.0, 0.1, 3, "")) == "REGRESSION +20.0%"
    assert change_text(Verdict(False, None, None, None, 0, "")) == "first run"


def test_fleet__loads_from_its_deployment_entrypoint_without_side_effects():
    from prefect.flows import load_flow_from_entrypoint

    loaded = load_flow_from_entrypoint("flows/fleet.py:fleet")
    assert loaded.name == "fleet"
    assert {"fleet_file", "artifacts", "spec"} <= set(loaded.parameters.properties)


def test_prefect_yaml__fleet_nightly_deployment():
    import yaml

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in project["deployments"] if d["name"] == "fleet-nightly"]
    assert deployment["entrypoint"] == "flows/fleet.py:fleet" and deployment["work_pool"]["name"] == "process"
    assert deployment["parameters"] == {"fleet_file": "fleet.yaml"}
    (schedule,) = deployment["schedules"]
    assert schedule["cron"].split()[2:] == ["*", "*", "*"] and schedule["timezone"] == "Europe/Berlin"


def test_parse_fleet__the_store_may_be_named_a_bucket_or_a_directory_of_the_files(tmp_path):
    text = "devices: [{{host: h, port: 1}}]\nmodels: [efficientnet_lite0]\nartifacts: {}\n"
    assert parse_fleet(text.format("s3://team-store/tvmrp")).shared.artifacts == "s3://team-store/tvmrp"
    assert parse_fleet(text.format("store"), base=tmp_path).shared.artifacts == str(tmp_path / "store")
    with pytest.raises(UsageError, match=r"^fleet.yaml:3: artifacts: 's3://Team/x': 'Team' is not a bucket name"):
        parse_fleet(text.format("s3://Team/x"))
def test_parse_fleet__device_names_and_threads_reach_each_pairs_request(tmp_path):
    text = textwrap.dedent("""\
        tracker: 127.0.0.1:9190
        threads: 2
        devices:
          - {key: dev-a, target: llvm}
          - {key: dev-b, target: llvm, name: bench-b, threads: 1}
          - {host: 10.0.0.5, port: 9090}
        models: [efficientnet_lite0]
    """)
    spec = parse_fleet(text)
    requests = [spec.request(device, spec.models[0]) for device in spec.devices]
    assert [r.device_name for r in requests] == ["dev-a", "bench-b", "10.0.0.5:9090"]
    assert [r.threads for r in requests] == [2, 1, 2]
    with pytest.raises(UsageError, match=r"^fleet.yaml:3: devices\[0\].name: must be at most 100 printable"):
        parse_fleet("tracker: 1.2.3.4:9\ndevices:\n  - {key: a, name: \"x\\e[2J\"}\nmodels: [m]\n")
    with pytest.raises(UsageError, match=r"^fleet.yaml:1: threads: must be a whole number from 1 to 1024, not 0$"):
        parse_fleet("threads: 0\ndevices: [{host: h, port: 1}]\nmodels: [m]\n")


def test_parse_fleet__profile_is_a_fleet_wide_option():
    text = "profile: {}\ndevices: [{{host: h, port: 1}}]\nmodels: [efficientnet_lite0]\n"
    spec = parse_fleet(text.format("true"))
    assert spec.request(spec.devices[0], spec.models[0]).profile is True
    assert parse_fleet(text.format("false")).shared.profile is False
    with pytest.raises(UsageError, match=r"^fleet.yaml:1: profile: must be true or false"):
        parse_fleet(text.format("3"))
    with pytest.raises(UsageError, match=r"devices\[0\].profile: unknown key"):
        parse_fleet("devices: [{host: h, port: 1, profile: true}]\nmodels: [m]\n")


def _verdict(decision: str, change: float, changes=()) -> Verdict:
    from pipeline.latency import Change

    return Verdict(decision == "regression", change, 1.0, 0.1, 3, f"{decision} {change}", decision, (change - 0.2,
                   change + 0.2), "bootstrap", "previous build" if changes else "same build",
                   tuple(Change(*c) for c in changes))


def test_format_text__marks_inconclusive_and_build_changes_as_the_history_does_and_escapes_names():
    noisy = _result("a", "m0", summary=make_summary(regression=_verdict("inconclusive", 1.083)))
    changed = _result("b\x1b[2J", "m1\r", summary=make_summary(regression=_verdict(
        "regression", 1.4, [("schedules", "rules", "tvm-default")])))
    summary = FleetSummary("20260101T000000Z-000000", "fleet.yaml", (noisy, changed), BuildCounts(ran=2), 3.0)
    text, markdown = format_text(summary), format_markdown(summary)
    assert "+108.3% inconclusive" in text and "REGRESSION +140.0% [schedules]" in text and "1 regressed" in text
    assert "\x1b" not in text + markdown and "\r" not in text + markdown
    assert "b\\x1b[2J" in text and "m1\\r" in text


def test_format_junit__one_case_per_pair_failures_for_stages_checks_and_regressions():
    import xml.etree.ElementTree as ET

    from pipeline.views.fleet import format_junit

    failed_check = CheckResult(0.5, 0.5, 0.9, 20.0, False, False, False, "max abs diff 0.5 > 1e-4", Thresholds())
    summary = FleetSummary("20260101T020000Z-000000", "lab.yaml", (
        _result("a", "m0"),
        _result("a", "m1", summary=make_summary(regression=_verdict("regression", 1.4, [("schedules", "rules", "x")]))),
        _result("ghost\x07", "m0", summary=None, error="no device for key 'ghost'\x1b[31m",
                error_type="DeviceUnavailable"),
        _result("b", "m0", error="check failed: max abs diff 0.5", error_type="CheckFailed",
                summary=make_summary(check=failed_check)),
    ), BuildCounts(ran=2), 12.5)
    text = format_junit(summary)
    root = ET.fromstring(text.encode())  # valid XML: control characters escaped
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>') and root.tag == "testsuites"
    (suite,) = root
    assert suite.tag == "testsuite" and suite.get("tests") == "4" and suite.get("failures") == "3"
    assert suite.get("errors") == "0" and suite.get("timestamp") == "2026-01-01T02:00:00"
    assert suite.get("time") == "12.500"
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("fleet.a", "m0"), ("fleet.a", "m1"), ("fleet.ghost\\x07", "m0"), ("fleet.b", "m0")]
    assert all(set(c.attrib) == {"classname", "name", "time"} and float(c.get("time")) >= 0 for c in cases)
    kinds = [[(f.get("type"), f.get("message")[:12]) for f in c.findall("failure")] for c in cases]
    assert kinds == [[], [("LatencyRegression", "regression 1")], [("DeviceUnavailable", "no device fo")],
                     [("CheckFailed", "check failed")]]
    assert "\\x1b[31m" in cases[2].find("failure").get("message")
    assert all(c.find("system-out") is not None and "run 20260101T000000Z-abcdef" in c.find("system-out").text
               for c in cases)


def test_raise_if_failed__a_failed_pair_is_exit_1_a_regression_exit_3_only_when_asked():
    from flows.fleet import raise_if_failed
    from pipeline.errors import FleetFailed, RegressionFound

    verdict = _verdict("regression", 1.4, [("schedules", "r", "x")])
    regressed = _result("a", "m1", summary=make_summary(regression=verdict))
    ghost = _result("ghost", "m0", summary=None, error="no device", error_type="DeviceUnavailable")
    both = FleetSummary("20260101T000000Z-000000", "f.yaml", (_result("a", "m0"), regressed, ghost), BuildCounts(), 1.0)
    only = FleetSummary("20260101T000000Z-000000", "f.yaml", (_result("a", "m0"), regressed), BuildCounts(), 1.0)
    with pytest.raises(FleetFailed, match=r"^1 of 3 pairs failed \(m0 on ghost\)") as failed:
        raise_if_failed(both, fail_on_regression=True)
    assert failed.value.exit_code == 1 and failed.value.summary is both
    raise_if_failed(only)  # a regression alone fails nothing unless asked
    with pytest.raises(RegressionFound, match=r"^latency regression in 1 of 2 pairs \(--fail-on-regression\): m1 on a"):
        raise_if_failed(only, fail_on_regression=True)
