"""Stage ``tune`` on a tiny real ONNX model: a real MetaSchedule tuning (a few trials), a real store, a real
TVM RPC server; the tuned build must still compute what the model's own framework computes.

A larger budget continues from the largest database of the same family (tuned 5, then 10: 5 reused + 5 new),
MetaSchedule's own logging goes to the artifact's ``tuning.log`` and not to stderr, and SIGINT or SIGTERM
ends a tuning as an interrupt (exit 130 from a script that does what the command line does) with no
MetaSchedule worker left. (The family index, ``--tune-more`` and the report's rules without a tuning run:
``tests/unit/test_tuning_parts.py``.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support import REPO, make_tiny_onnx, run_cli
from pipeline.planning import keys
from pipeline.device import DeviceSpec, EmbeddedServer, open_session, start_tracker
from pipeline.errors import UsageError
from pipeline.models import ModelSpec, ResolvedModel, reference_forward, resolve_model
from pipeline.latency import Timing
from pipeline.planning.plan import StageKey, plan_build
from pipeline.store import MANIFEST, Artifact, ArtifactStore
from pipeline.targets import TargetInfo, parse_target
from pipeline.store.layout import RECORD_FILE, TUNING_DATABASE_FILES, TUNING_LOG_FILE, TUNING_REPORT_FILE
from pipeline.tuning import (
    SPACE,
    tracker_runner,
    tune_inputs,
)
from tasks._live import opened
from tasks.build import build
from tasks.export_library import export_library
from tasks.import_model import import_model
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.tune import read_report, tune
from tasks.upload import upload

TRIALS = 5  # the tiny model has 5 tasks in the NHWC space: each measured at least once


def tune_key(model_digest, target, trials):
    return keys.key_of(tune_inputs(model_digest, target, trials))


def tune_stage(model, target, trials, runner="local"):
    """The plan's tune key for ``trials`` (the manifest then records where it measured)."""
    return plan_build(model, target, 3, trials, runner).tune


@dataclasses.dataclass(frozen=True)
class Tuned:
    root: Path
    model: ResolvedModel
    target: TargetInfo
    imported: Artifact
    tuning: Artifact
    built: bool


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Tuned:
    """The tiny model imported and tuned once (TRIALS trials, local runner) in a store of this module."""
    work = tmp_path_factory.mktemp("tune")
    root = work / "artifacts"
    root.mkdir()
    model = resolve_model(ModelSpec(str(make_tiny_onnx(work / "tiny.onnx"))))
    target = parse_target("llvm")
    imported = import_model(model, plan_build(model, target, 3).imported, ArtifactStore(root))
    result = tune(imported.artifact, target, TRIALS, tune_stage(model, target, TRIALS), ArtifactStore(root))
    return Tuned(root, model, target, imported.artifact, result.artifact, result.built)


def test_tune__stores_the_database_with_a_manifest(tuned):
    assert tuned.built
    store = ArtifactStore(tuned.root)
    assert store.get(tuned.tuning.key) == tuned.tuning
    assert tuned.tuning.kind == "tuning"
    assert {f.name for f in tuned.tuning.files} == {*TUNING_DATABASE_FILES, TUNING_REPORT_FILE, TUNING_LOG_FILE}
    manifest = json.loads((store.path(tuned.tuning.key) / MANIFEST).read_text())
    inputs = manifest["inputs"]
    assert inputs["stage"] == "tune" and inputs["trials"] == TRIALS and inputs["space"] == SPACE
    assert inputs["model"] == tuned.model.digest and inputs["target"] == tuned.target.canonical
    assert inputs["runner"] == "local" and "num-cores" in inputs["tuning_target"]
    records = store.file(tuned.tuning, RECORD_FILE).read_text().splitlines()
    assert 1 <= len(records) <= TRIALS
    report = read_report(tuned.tuning, ArtifactStore(tuned.root))
    assert report["trials"] == TRIALS and report["seconds"] > 0 and report["runner"] == "local"
    assert report["tasks"] and all(t["name"] for t in report["tasks"])


def test_tune__second_call_reuses_the_stored_database(tuned):
    again = tune(tuned.imported, tuned.target, TRIALS, tune_stage(tuned.model, tuned.target, TRIALS), ArtifactStore(tuned.root))
    assert not again.built and again.seconds == 0.0
    assert again.artifact == tuned.tuning


def test_tune_key__changes_with_budget_target_and_model(tuned):
    digest, target = tuned.model.digest, tuned.target
    key = tune_key(digest, target, TRIALS)
    assert key == tuned.tuning.key == tune_key(digest, target, TRIALS)
    assert tune_key(digest, target, TRIALS + 1) != key
    assert tune_key(digest, parse_target("llvm -mcpu=znver4"), TRIALS) != key
    assert tune_key("0" * 64, target, TRIALS) != key
    assert keys.tune_inputs(digest, target.canonical, TRIALS, 2, SPACE) != keys.tune_inputs(
        digest, target.canonical, TRIALS, 4, SPACE
    )


@pytest.mark.parametrize(("trials", "runner", "message"), [
    (0, "local", "trial budget"),
    (-3, "local", "trial budget"),
    (4, "somewhere", "neither 'local' nor"),
    (4, "127.0.0.1/key", "not HOST:PORT"),
])
def test_tune__rejects_bad_budget_or_runner(tuned, trials, runner, message):
    with pytest.raises(UsageError, match=message):
        tune(tuned.imported, tuned.target, trials, StageKey("c" * 64, {}), ArtifactStore(tuned.root), runner=runner)
    assert ArtifactStore(tuned.root).get("c" * 64) is None


def test_build__with_tuning_is_keyed_apart_and_matches_reference_on_device(tuned):
    root, model, target = ArtifactStore(tuned.root), tuned.model, tuned.target
    plan = plan_build(model, target, 3, TRIALS)
    plain_key = keys.key_of(keys.build_inputs(model.digest, target.canonical, 3))
    tuned_key = keys.key_of(keys.build_inputs(model.digest, target.canonical, 3, tuned.tuning.key))
    assert tuned_key != plain_key and plan.build.key == tuned_key
    built = build(tuned.imported, target, 3, plan.build, root, tuning=tuned.tuning)
    assert built.built and built.artifact.inputs["tuning"] == tuned.tuning.key
    # Applying the database must not touch the stored copy (MetaSchedule's JSON database appends on queries).
    assert root.get(tuned.tuning.key) == tuned.tuning
    library = export_library(built.artifact, target, plan.toolchain, plan.library, root)
    x = np.random.default_rng(2).standard_normal(model.input_shape).astype(np.float32)
    with EmbeddedServer() as server, open_session(DeviceSpec(), server) as session, opened(session) as ref:
        loaded = load(upload(ref, library.artifact, root, target.arch), root)
        result = run(set_input(loaded, x), Timing(repeat=2))
    np.testing.assert_allclose(result.output, reference_forward(model, x), atol=1e-4, rtol=1e-4)


def _copy_of(tuned: Tuned, tmp_path: Path) -> ArtifactStore:
    """A copy of the module's store (the other tests keep using the original)."""
    shutil.copytree(tuned.root, tmp_path / "copy", symlinks=True)
    return ArtifactStore(tmp_path / "copy")


def test_tune__a_tampered_tuning_is_tuned_again_on_refresh(tuned, tmp_path):
    """A tuning database changed in the store with its manifest rewritten to match (anyone who can write the
    store can) does not authenticate: the build never applies it, and the run (here with --refresh) tunes
    again."""
    import hashlib

    from tasks.chains import compile_chain, run_plain

    store = _copy_of(tuned, tmp_path)
    planted = b'[0, [[[\"planted\"]]]]\n'
    (store.path(tuned.tuning.key) / RECORD_FILE).write_bytes(planted)
    manifest = json.loads((store.path(tuned.tuning.key) / MANIFEST).read_text())
    manifest["files"][RECORD_FILE] = {"sha256": hashlib.sha256(planted).hexdigest(), "size": len(planted)}
    (store.path(tuned.tuning.key) / MANIFEST).write_text(json.dumps(manifest))
    assert store.get(tuned.tuning.key) is None

    compiled = compile_chain(plan_build(tuned.model, tuned.target, 3, TRIALS), store, refresh=True, run=run_plain)
    assert compiled.stages["tune"] == "ran" and compiled.stages["build"] == "ran"
    assert store.read_verified(tuned.tuning.key, RECORD_FILE)[0] != planted


def test_build__a_tuning_that_does_not_apply_blames_the_tuning(tuned, tmp_path):
    """A tuning that authenticates (written by a holder of the store key) but whose database TVM cannot read
    fails the build naming the tuning and how to tune again, not as a compiler failure."""
    from pipeline.errors import BuildError
    from pipeline.store.layout import TUNING

    store = _copy_of(tuned, tmp_path)
    store.discard(tuned.tuning.key)

    def damaged(directory: Path) -> None:
        for name in (*TUNING_DATABASE_FILES, TUNING_REPORT_FILE, TUNING_LOG_FILE):
            (directory / name).write_text("not a database\n")

    tuning = store.put(tuned.tuning.key, TUNING, damaged, tuned.tuning.inputs)
    plan = plan_build(tuned.model, tuned.target, 3, TRIALS)
    with pytest.raises(BuildError, match="tuning .* could not be applied.*not the compiler: remove") as caught:
        build(tuned.imported, tuned.target, 3, plan.build, store, refresh=True, tuning=tuning)
    assert "TVM failed to compile" not in str(caught.value)


def test_tune__measures_on_a_device_through_the_tracker(tuned):
    """MetaSchedule's RPC runner: candidates are measured on the server the tracker hands out."""
    tracker = start_tracker()
    device = None
    try:
        tracker.wait_ready()
        device = EmbeddedServer(tracker=tracker.spec_address, key="tune-test")
        device.wait_ready()
        runner = tracker_runner(tracker.spec_address, "tune-test")
        model, target = tuned.model, tuned.target
        result = tune(tuned.imported, target, 2, tune_stage(model, target, 2, runner), ArtifactStore(tuned.root), runner=runner)
    finally:
        for process in (device, tracker):
            if process is not None:
                process.stop()
    report = read_report(result.artifact, ArtifactStore(tuned.root))
    assert result.built and report["runner"] == runner and result.artifact.inputs["runner"] == runner
    assert any(t["best_ms"] is not None for t in report["tasks"])  # something was measured on the device


def test_tune_task__second_run_is_cached_by_prefect(tuned, prefect_api):
    from prefect import flow

    from tasks._cache import store_cache_options
    from tasks.tune import tune_task

    store = ArtifactStore(tuned.root)

    @flow
    def tune_twice() -> list[str]:
        names = []
        for _ in range(2):
            stage = tune_stage(tuned.model, tuned.target, TRIALS)
            state = tune_task.with_options(**store_cache_options(store, False, stage.key))(
                module=tuned.imported, target=tuned.target, trials=TRIALS, stage=stage, store=store,
                return_state=True,
            )
            assert state.result().artifact == tuned.tuning
            names.append(state.name)
        return names

    assert tune_twice()[1] == "Cached"


# -- continuing a smaller tuning, interrupts, the command line -----------------------------------------------


TUNE_SCRIPT = """
import logging, signal, sys, os
sys.path.insert(0, os.getcwd())

def interrupt(signum, _frame):  # what the command line does (flows/_cli.py)
    raise KeyboardInterrupt(f"signal {signum}")

signal.signal(signal.SIGTERM, interrupt)
# Ctrl-C as a terminal gives it: a suite started in the background (`cmd &` without job control, nohup) passes
# SIGINT down ignored, and the tuning rightly keeps an ignored signal ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)d %(name)s: %(message)s")
try:
    from pipeline.models import ModelSpec, resolve_model
    from pipeline.planning.plan import plan_build
    from pipeline.store import ArtifactStore
    from pipeline.targets import parse_target
    from tasks.import_model import import_model
    from tasks.tune import tune

    model_path, root, trials = sys.argv[1], ArtifactStore(sys.argv[2]), int(sys.argv[3])
    model, target = resolve_model(ModelSpec(model_path)), parse_target("llvm")
    imported = import_model(model, plan_build(model, target, 3).imported, root).artifact
    logging.getLogger("script").info("the tune stage starts")
    tune(imported, target, trials, plan_build(model, target, 3, trials).tune, root)
except KeyboardInterrupt as exc:
    print(f"Error: interrupted ({exc})", file=sys.stderr)
    sys.exit(130)
"""


def start_tune_script(tmp_path: Path, model_path: Path, root: Path, trials: int) -> subprocess.Popen:
    """A process that runs the tune stage (stderr: its log lines, unbuffered; Prefect's API unreachable)."""
    script = tmp_path / "tune_script.py"
    script.write_text(TUNE_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    return subprocess.Popen([sys.executable, str(script), str(model_path), str(root), str(trials)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@dataclasses.dataclass(frozen=True)
class Continued:
    tuning: Artifact
    stderr: str


@pytest.fixture(scope="module")
def continued(tuned) -> Continued:
    """The tiny model tuned again with 2 x TRIALS in ``tuned``'s store, in a process of its own (stderr kept)."""
    model_path = Path(tuned.model.spec.source)
    proc = start_tune_script(tuned.root.parent, model_path, tuned.root, 2 * TRIALS)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    artifact = ArtifactStore(tuned.root).get(tune_stage(tuned.model, tuned.target, 2 * TRIALS).key)
    assert artifact is not None
    return Continued(artifact, stderr)


def test_tune__larger_budget_continues_from_the_largest_database(tuned, continued):
    root = ArtifactStore(tuned.root)
    before, after = read_report(tuned.tuning, root), read_report(continued.tuning, root)
    assert (after["trials"], after["trials_reused"], after["trials_new"]) == (2 * TRIALS, TRIALS, TRIALS)
    assert after["base"] == tuned.tuning.key and before["trials_reused"] == 0
    assert [h["trials"] for h in after["history"]] == [TRIALS, 2 * TRIALS] and after["converged"] is False
    assert after["history"][0] == before["history"][0]
    # The old records are kept as they were; the new ones come after them.
    store = root
    old = store.file(tuned.tuning, RECORD_FILE).read_text().splitlines()
    new = store.file(continued.tuning, RECORD_FILE).read_text().splitlines()
    assert new[: len(old)] == old and len(old) < len(new) <= len(old) + TRIALS and after["measured"] == len(new)
    # The best of every task is the best over both runs: never worse than before.
    for was, now in zip(before["tasks"], after["tasks"]):
        assert was["name"] == now["name"]
        if was["best_ms"] is not None:
            assert now["best_ms"] <= was["best_ms"]
    assert after["estimated_ms"] <= before["estimated_ms"]


def test_tune__continuation_measures_no_candidate_of_the_earlier_database_again(tuned, continued, tmp_path):
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    def candidates(artifact: Artifact) -> dict[int, list[int]]:
        """Per workload: the structural hash of every record's candidate (on a copy: queries append)."""
        work = tmp_path / artifact.key
        work.mkdir()
        for name in TUNING_DATABASE_FILES:
            shutil.copyfile(ArtifactStore(tuned.root).file(artifact, name), work / name)
        database = ms.database.JSONDatabase(work_dir=str(work), module_equality="anchor-block")
        found: dict[int, list[int]] = {}
        for record in database.get_all_tuning_records():
            workload = tvm_ffi.structural_hash(record.workload.mod)
            found.setdefault(workload, []).append(tvm_ffi.structural_hash(record.as_measure_candidate().sch.mod))
        return found

    before, after = candidates(tuned.tuning), candidates(continued.tuning)
    for workload, hashes in after.items():
        assert len(hashes) == len(set(hashes)), "a candidate was measured twice"
        assert set(before.get(workload, [])) <= set(hashes)


def test_tune__metaschedule_logs_go_to_the_artifact_and_progress_to_the_log(tuned, continued):
    chatter = ("Evolve iter", "Design space", "task_scheduler.cc", "evolutionary_search.cc", "meta_schedule",
               "LocalBuilder", "ir_module", "Segfault")
    assert not [line for line in continued.stderr.splitlines() if any(c in line for c in chatter)]
    log_text = ArtifactStore(tuned.root).file(continued.tuning, TUNING_LOG_FILE).read_text()
    assert "Evolve iter" in log_text and "Design space" in log_text and "Picked top" in log_text
    lines = continued.stderr.splitlines()
    progress = [line for line in lines if " tasks.progress: tuning tiny.onnx" in line]
    assert progress and f"({2 * TRIALS} trials, {TRIALS} reused)" in progress[0]
    started = int(next(line for line in lines if "the tune stage starts" in line).split()[0])
    assert int(progress[0].split()[0]) - started < 5000  # shown within 5 s of the stage starting
    assert f"{TRIALS}/{TRIALS} trials" in progress[-1] and "estimated " in progress[-1]
    assert "25/24" not in continued.stderr and " 0.000 ms" not in continued.stderr


def test_build__applies_the_continued_database(tuned, continued):
    root, model, target = ArtifactStore(tuned.root), tuned.model, tuned.target
    plan = plan_build(model, target, 3, 2 * TRIALS)
    assert plan.tune.key == continued.tuning.key and plan.build.inputs["tuning"] == continued.tuning.key
    built = build(tuned.imported, target, 3, plan.build, root, tuning=continued.tuning)
    assert built.built and built.artifact.inputs["tuning"] == continued.tuning.key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tune__a_signal_ends_the_tuning_as_an_interrupt_with_no_worker_left(tmp_path, signum):
    import psutil

    root = tmp_path / "artifacts"
    root.mkdir()
    proc = start_tune_script(tmp_path, make_tiny_onnx(tmp_path / "tiny.onnx"), root, 64)
    lines: list[str] = []
    tuning = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "pipeline.tuning: tune: " in line and " tasks, " in line:
                tuning.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert tuning.wait(180), "".join(lines)[-4000:]
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while not parent.children() and time.monotonic() < deadline:  # MetaSchedule's first workers
            time.sleep(0.2)
        time.sleep(2)  # into the search and the first builds
        children = parent.children(recursive=True)
        assert children, "no MetaSchedule worker started"
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    text = "".join(lines)
    assert code == 130 and waited < 20, f"exit {code} after {waited:.1f} s\n{text[-4000:]}"
    assert f"Error: interrupted (signal {int(signum)})" in text
    assert "Traceback" not in text and "Segfault" not in text and "failed: RuntimeError" not in text
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.pid for p in alive]
    # What was recorded before the signal, if anything, is kept as a tuning of that many trials; nothing else.
    kept = [json.loads(p.read_text())["tunings"] for p in (root / ".tuning").glob("*.json")]
    assert all(int(trials) < 64 for tunings in kept for trials in tunings), kept
    assert ("kept as a tuning of" in text) == bool(kept)
    assert not list(root.glob(".tmp/*"))  # no half of one


def test_cli__a_larger_budget_tunes_only_the_difference(prefect_api, store_root, tiny_onnx):
    """The issue: --tune-trials 64 then 128 tunes 64 new trials the second time (here 8 then 16)."""

    def cli(trials: int) -> dict:
        proc = run_cli("--model", str(tiny_onnx), "--tune-trials", str(trials), "--artifacts", str(store_root),
                       "--json", "--repeat", "2", env={"PREFECT_API_URL": prefect_api})
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
        assert "Evolve iter" not in proc.stderr and "Design space" not in proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = cli(8), cli(16)
    assert first["stages"]["tune"] == second["stages"]["tune"] == "ran"
    store = ArtifactStore(store_root)
    tuning = store.get(second["tuning_key"])
    assert tuning is not None and tuning.inputs["trials"] == 16
    assert store.get(second["build_key"]).inputs["tuning"] == second["tuning_key"] != first["tuning_key"]
    assert second["check"]["passed"]
    report = read_report(tuning, ArtifactStore(store_root))
    assert (report["trials"], report["trials_reused"], report["trials_new"]) == (16, 8, 8)
    assert report["base"] == first["tuning_key"]
    assert (first["tuning"]["trials"], first["tuning"]["trials_reused"], first["tuning"]["trials_new"]) == (8, 0, 8)
    assert (second["tuning"]["trials"], second["tuning"]["trials_reused"], second["tuning"]["trials_new"]) == (16, 8, 8)


# A terminal's Ctrl-C: exec'd with SIGINT at its default (a suite run in the background passes it down ignored).
_AS_A_TERMINAL_STARTS_IT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                            "os.execv(sys.executable, [sys.executable, '-m', 'flows.resnet_remote', *sys.argv[1:]])")


def test_cli__ctrl_c_to_the_process_group_while_tuning__130_at_once_and_the_next_tune_more_reuses_the_trials(
        local_stack, store_root, tiny_onnx):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group (the command line, its
    embedded device, MetaSchedule's workers). The default path's local server runs in a session of its own."""
    import re

    import psutil

    from support import wait_until

    args = ["--model", str(tiny_onnx), "--artifacts", str(store_root), "--no-check", "--repeat", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _AS_A_TERMINAL_STARTS_IT, *args, "--tune-trials", "8"],
                            cwd=REPO, env={**local_stack.env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    recorded = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"\((\d+) recorded\)", line)
            if found and int(found.group(1)) > 0:  # a search round joined: its trials are in the database
                recorded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert recorded.wait(300), "".join(lines)[-4000:]
        server = psutil.Process(local_stack.server_record()["pid"])  # this run may have started it: it stays
        kept_running = {server.pid, *(p.pid for p in server.children(recursive=True))}
        tree = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid not in kept_running]
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(5)
    text = "".join(lines)
    assert code == 130 and waited < 5, f"exit {code} after {waited:.1f} s\n{text[-4000:]}"  # measured: ~1 s
    assert text.rstrip().splitlines()[-1].startswith("Error: interrupted (signal 2)") and "Traceback" not in text
    assert wait_until(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 5)
    found = re.search(r"kept as a tuning of (\d+) trials", text)
    assert found, text[-4000:]  # 5 or more: the first round measured one trial of each of the 5 tasks
    kept = int(found.group(1))
    records = list(ArtifactStore(store_root).ledger.records())
    assert [r.status for r in records] == ["interrupted"] and records[0].exit_code == 130

    more = local_stack.cli(*args, "--tune-more", "1", "--json")
    assert more.returncode == 0, more.stderr[-4000:]
    tuning = json.loads(more.stdout.strip().splitlines()[-1])["tuning"]
    assert (tuning["trials"], tuning["trials_reused"], tuning["trials_new"]) == (kept + 1, kept, 1)
