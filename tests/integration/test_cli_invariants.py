"""What every command line guarantees, seen from outside: one lifeline watchdog per run, and the accuracy tool
going through the same device path as a single run (the device keeps the library it loaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from support import REPO, make_tiny_onnx


def _lifelines(pid: int) -> set[int]:
    """The lifeline watchdogs among ``pid``'s children."""
    found = set()
    try:
        for child in psutil.Process(pid).children():
            try:
                if "pipeline.lifeline" in " ".join(child.cmdline()):
                    found.add(child.pid)
            except psutil.Error:
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def test_cli__one_lifeline_per_run(prefect_api, store_root, tiny_onnx):
    """Every lifeline the command starts is seen while it runs (it starts one per run, before the heavy imports)."""
    argv = [sys.executable, "-m", "flows.resnet_remote", "--model", str(tiny_onnx), "--artifacts", str(store_root),
            "--build-only"]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:  # bounded: the build of a tiny model
            seen |= _lifelines(proc.pid)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) == 1, f"lifelines seen: {sorted(seen)}"


def test_accuracy__runs_through_the_device_path_and_reuses_the_kept_library(prefect_api, tmp_path, store_root,
                                                                               capsys):
    import json

    from flows.accuracy import main

    model_file = make_tiny_onnx(tmp_path / "m.onnx", seed=0, classes=1000)
    runs = []
    for _ in range(2):
        code = main(["--model", str(model_file), "--artifacts", str(store_root), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, out + err
        runs.append(json.loads(out.strip().splitlines()[-1]))
    first, second = runs
    assert not first["upload"]["reused"] and second["upload"]["reused"]  # the embedded device kept it
    assert second["stages"]["build"] == "cached" and second["device"].startswith("embedded")
    assert first["agreement"]["count"] == len(first["images"]) > 1
