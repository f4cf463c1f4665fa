"""The flow end to end: the CLI in separate processes against a real Prefect server and real RPC devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support import COMPILE, DEVICE, STAGES, cli_json, make_tiny_onnx, run_cli
from support import free_port as _free_port
from pipeline.device import EmbeddedServer, start_tracker
from pipeline.store import ArtifactStore

KEYS = {"model", "model_digest", "target", "opt_level", "build_key", "artifact", "device", "stages", "top5", "latency_ms"}


def statuses(summary, names):
    return {summary["stages"][n] for n in names}


def test_flow__second_run_in_new_process_is_cached_but_device_stages_run(prefect_api, store_root, tiny_onnx):
    first = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert KEYS <= first.keys()
    assert list(first["stages"]) == list(STAGES)
    assert first["stages"]["tune"] == "skipped" and first["tuning_key"] is None
    assert first["check"]["passed"] and first["check"]["max_abs_diff"] <= 1e-4
    assert statuses(first, COMPILE + DEVICE) == {"ran"}
    assert len(first["top5"]) == 5 and {"class", "label", "prob"} <= first["top5"][0].keys()
    assert set(first["latency_ms"]) == {"mean", "median", "p90", "p99", "min", "max", "std", "cv"}
    assert first["artifact"].startswith(str(store_root)) and first["artifact"].endswith("model.so")
    assert first["device"].startswith("embedded 127.0.0.1:")

    assert first["upload"]["reused"] is False and first["upload"]["mb_per_s"] > 0

    second = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert statuses(second, COMPILE) == {"cached"}
    assert statuses(second, DEVICE) == {"ran"}
    assert second["build_key"] == first["build_key"] and second["top5"] == first["top5"]
    # The embedded device kept the library (in the store's .device/): nothing was sent the second time.
    assert second["upload"]["reused"] is True and second["upload"]["mb_per_s"] is None
    assert second["upload"]["remote_name"] == first["upload"]["remote_name"]

    # The kept copy vanished on the device: the device's file check says so before loading, the run uploads
    # again and passes.
    Path(second["upload"]["remote_name"]).unlink()
    proc = run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--json", "--repeat", "2",
                   env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 0, proc.stderr[-4000:]
    third = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cannot be read there" in proc.stderr and "uploading the library again" in proc.stderr
    assert third["upload"]["reused"] is False and third["check"]["passed"]
    assert Path(third["upload"]["remote_name"]).exists()


def test_flow__what_changes_rebuilds(prefect_api, store_root, tmp_path):
    model = make_tiny_onnx(tmp_path / "m.onnx", seed=3)
    base = cli_json(prefect_api, store_root, "--model", str(model))

    opt2 = cli_json(prefect_api, store_root, "--model", str(model), "--opt-level", "2")
    assert opt2["stages"]["import-model"] == "cached" and opt2["stages"]["build"] == "ran"
    assert opt2["build_key"] != base["build_key"]

    seed_target = cli_json(prefect_api, store_root, "--model", str(model), "--target", "llvm -target=x86_64-pc-linux-gnu")
    assert seed_target["stages"]["build"] == "ran" and '"mtriple":"x86_64-pc-linux-gnu"' in seed_target["target"]

    # Same bytes at another path: same model, nothing rebuilt. New bytes at the same path: rebuilt.
    copy = tmp_path / "copy" / "m.onnx"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    moved = cli_json(prefect_api, store_root, "--model", str(copy))
    assert statuses(moved, COMPILE) == {"cached"} and moved["model_digest"] == base["model_digest"]
    make_tiny_onnx(model, seed=4)
    changed = cli_json(prefect_api, store_root, "--model", str(model))
    assert statuses(changed, COMPILE) == {"ran"} and changed["model_digest"] != base["model_digest"]


def test_flow__deleted_or_corrupted_artifacts_are_rebuilt(prefect_api, store_root, tiny_onnx):
    first = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    store = ArtifactStore(store_root)
    shutil.rmtree(store.path(first["library_key"]))
    after_delete = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert after_delete["stages"]["export-library"] == "ran"
    assert after_delete["stages"]["build"] == "cached"

    tar = store.path(first["build_key"]) / "build.tar"
    tar.write_bytes(b"corrupt" + tar.read_bytes()[7:])
    after_corrupt = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert after_corrupt["stages"]["build"] == "ran"
    assert store.get(first["build_key"]) is not None

    refreshed = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--refresh")
    assert statuses(refreshed, COMPILE) == {"ran"}

    shutil.rmtree(store_root)  # the whole store gone: everything rebuilt
    fresh = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert statuses(fresh, COMPILE) == {"ran"}


def test_flow__host_port_device(prefect_api, store_root, tiny_onnx, tmp_path):
    device_dir = tmp_path / "on-device"
    device_dir.mkdir()
    with EmbeddedServer() as server:
        host, port = server.address
        summary = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--host", host, "--port", str(port),
                           "--device-cache", str(device_dir))
    assert summary["device"] == f"{host}:{port}"
    assert statuses(summary, DEVICE) == {"ran"}
    assert Path(summary["upload"]["remote_name"]).parent == device_dir and not summary["upload"]["reused"]


def test_flow__tracker_device(prefect_api, store_root, tiny_onnx):
    with start_tracker() as tracker:
        th, tp = tracker.address
        with EmbeddedServer(tracker=f"{th}:{tp}", key="tiny-x86"):
            summary = cli_json(prefect_api, store_root, "--model", str(tiny_onnx),
                               "--tracker", f"{th}:{tp}", "--key", "tiny-x86")
    assert "tiny-x86" in summary["device"]
    assert statuses(summary, DEVICE) == {"ran"}
    # A device other than the embedded one keeps nothing by default (its /tmp is no place to trust a library
    # from): the library goes to the session's directory.
    assert summary["upload"]["remote_name"].startswith("tvmrp-") and not summary["upload"]["reused"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "alexnet"], 2, "efficientnet_lite0"),
        (["--model", "/nonexistent/model.onnx"], 2, "/nonexistent/model.onnx"),
        (["--target", "llvm -mcpu"], 2, "-key=value"),
        (["--target", "opencl"], 2, "llvm"),
        (["--target=llvm -mattr=aaaa"], 2, "closest: "),  # refused before Prefect is imported
        (["--opt-level", "7"], 2, "0, 1, 2, 3"),
        (["--image", "/nonexistent/cat.jpg"], 2, "/nonexistent/cat.jpg"),
        (["--number", "0"], 2, "--number must be a whole number from 1"),
        (["--host", "127.0.0.1"], 2, "--port"),
        (["--device-cache", "cache"], 2, "absolute directory on the device"),
        (["--bogus"], 2, "unrecognized arguments"),
    ],
)
def test_cli__bad_usage_exits_2_with_error_line(args, code, message, store_root):
    proc = run_cli(*args, "--artifacts", str(store_root), timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "Error: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli__image_that_is_not_an_image_exits_2(tmp_path, store_root):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    proc = run_cli("--image", str(bad), "--artifacts", str(store_root), timeout=120)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_cli__device_not_listening_exits_1_naming_it(prefect_api, store_root, tiny_onnx):
    port = _free_port()
    proc = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--host", "127.0.0.1", "--port", str(port),
                    expect=1)
    assert f"127.0.0.1:{port}" in proc.stderr and "Error: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flow__loads_from_its_deployment_entrypoint_without_side_effects():
    from prefect.flows import load_flow_from_entrypoint

    loaded = load_flow_from_entrypoint("flows/resnet_remote.py:resnet_remote")
    assert loaded.name == "resnet-remote"
    assert {"model", "target", "opt_level", "host", "port", "tracker", "key", "artifacts"} <= set(loaded.parameters.properties)


def test_flow__concurrent_runs_of_one_key_build_once(prefect_api, store_root, tmp_path):
    import subprocess
    import sys

    from support import REPO

    model = make_tiny_onnx(tmp_path / "c.onnx", seed=7)
    env = {**__import__("os").environ, "PREFECT_API_URL": prefect_api}
    args = [sys.executable, "-m", "flows.resnet_remote", "--model", str(model), "--artifacts", str(store_root),
            "--json", "--repeat", "1"]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    failed = [err[-6000:] for p, (_, err) in zip(procs, outputs) if p.returncode != 0]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n----\n".join(failed)
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for stage in COMPILE:
        assert sorted(s["stages"][stage] for s in summaries) == ["cached", "cached", "ran"], stage
    assert len({s["build_key"] for s in summaries}) == 1
    store = ArtifactStore(store_root)
    assert store.get(summaries[0]["build_key"]) is not None
    assert not list((store_root / ".tmp").iterdir())


def test_flow__check_fails_when_the_library_holds_other_weights(prefect_api, store_root, tmp_path):
    right = cli_json(prefect_api, store_root, "--model", str(make_tiny_onnx(tmp_path / "a.onnx", seed=0)))
    wrong = cli_json(prefect_api, store_root, "--model", str(make_tiny_onnx(tmp_path / "b.onnx", seed=1)))
    store = ArtifactStore(store_root)
    impostor = Path(wrong["artifact"]).read_bytes()
    inputs = store.get(right["library_key"]).inputs
    store.discard(right["library_key"])
    store.put(right["library_key"], "library", lambda d: (d / "model.so").write_bytes(impostor), inputs)

    proc = cli_json(prefect_api, store_root, "--model", str(tmp_path / "a.onnx"), expect=1)
    assert "Error: check failed" in proc.stderr and "max abs diff" in proc.stderr and "--no-check" in proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the run's figures are still reported
    assert summary["check"]["passed"] is False and summary["check"]["max_abs_diff"] > 1e-4
    assert "Check      FAILED" in proc.stdout

    skipped = cli_json(prefect_api, store_root, "--model", str(tmp_path / "a.onnx"), "--no-check")
    assert skipped["check"] is None
    assert skipped["stages"]["reference"] == skipped["stages"]["check"] == "skipped"


def test_flow__tuned_build_is_cached_and_a_new_budget_retunes(prefect_api, store_root, tmp_path):
    model = make_tiny_onnx(tmp_path / "t.onnx", seed=5)
    untuned = cli_json(prefect_api, store_root, "--model", str(model))
    first = cli_json(prefect_api, store_root, "--model", str(model), "--tune-trials", "4")
    assert first["stages"]["tune"] == "ran" and first["stages"]["build"] == "ran"
    assert first["build_key"] != untuned["build_key"] and first["check"]["passed"]
    assert not any("untuned" in note for note in first["notes"])
    assert any("untuned" in note for note in untuned["notes"])
    second = cli_json(prefect_api, store_root, "--model", str(model), "--tune-trials", "4")
    assert second["stages"]["tune"] == second["stages"]["build"] == "cached"
    assert second["tuning_key"] == first["tuning_key"]
    other = cli_json(prefect_api, store_root, "--model", str(model), "--tune-trials", "8")
    assert other["stages"]["tune"] == "ran" and other["tuning_key"] != first["tuning_key"]


def test_cli_prefect_settings__no_heartbeats_unless_the_user_set_them(monkeypatch):
    from prefect.settings import get_current_settings

    from flows._cli import cli_prefect_settings

    for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(name, raising=False)
    default = get_current_settings().flows.heartbeat_frequency
    with cli_prefect_settings():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")  # the user asked for them: left as they are
    with cli_prefect_settings():
        assert get_current_settings().flows.heartbeat_frequency == default is not None
