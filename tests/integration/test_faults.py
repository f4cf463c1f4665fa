"""Faults, provoked for real: stalled and killed devices, wrong architectures, killed builds, full disks.

Every wait here is bounded; only processes these tests started (or their descendants) are signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support import REPO
from pipeline.device import EmbeddedServer, start_tracker
from pipeline.errors import StoreError
from pipeline.store import ArtifactStore
from support import cli_json

LONG_RUN = ("--number", "2000000", "--repeat", "1")  # ~40 s of tiny-model invocations in one remote call


class Cli:
    """The CLI in its own process group, its stderr read line by line (bounded waits)."""

    def __init__(self, prefect_api: str | None, *args: str) -> None:
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # None: a temporary server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.resnet_remote", *args, "--json"],
            cwd=REPO, env={**env, **({"PREFECT_API_URL": prefect_api} if prefect_api else {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: list[str] = []

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stderr.fileno(), False)
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if line:
                self.lines.append(line)
                if text in line:
                    return
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; stderr so far:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.lines) + (err or "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            # The CLI's embedded rpc_server has a process group of its own: end it too, or it outlives the test.
            servers = descendant_servers(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for server in servers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)


def descendant_servers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "tvm.exec.rpc_server" in " ".join(p.cmdline())]


# 1. device not listening ------------------------------------------------------------------------

def test_device_not_listening__error_names_address_within_10s(prefect_api, store_root, tiny_onnx):
    with EmbeddedServer() as server:
        host, port = server.address
    start = time.monotonic()
    proc = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--host", host, "--port", str(port), expect=1)
    assert f"{host}:{port}" in proc.stderr and "Error: " in proc.stderr
    assert time.monotonic() - start < 60  # includes process start and compiling; the connect itself fails at once


# 2. tracker has no device for the key -----------------------------------------------------------

def test_tracker_without_device_for_key__bounded_and_lists_known_keys(prefect_api, store_root, tiny_onnx):
    with start_tracker() as tracker:
        th, tp = tracker.address
        with EmbeddedServer(tracker=f"{th}:{tp}", key="rpi4-known"):
            start = time.monotonic()
            proc = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--tracker", f"{th}:{tp}",
                            "--key", "no-such-board", "--request-timeout", "3", expect=1)
            elapsed = time.monotonic() - start
    assert "no-such-board" in proc.stderr and "rpi4-known" in proc.stderr
    assert elapsed < 60


# 3. device stalls mid-run -----------------------------------------------------------------------

def test_device_stalls_mid_run__fails_at_call_timeout(prefect_api, store_root, tiny_onnx):
    with EmbeddedServer() as server:
        host, port = server.address
        cli = Cli(prefect_api, "--model", str(tiny_onnx), "--artifacts", str(store_root), "--host", host,
                  "--port", str(port), "--call-timeout", "5", *LONG_RUN)
        try:
            cli.wait_for_line("Task run 'set-input' - Finished")
            os.killpg(server.pgid, signal.SIGSTOP)
            stopped = time.monotonic()
            code, _, err = cli.finish(timeout=120)
            waited = time.monotonic() - stopped
        finally:
            cli.kill()
            os.killpg(server.pgid, signal.SIGCONT)
    assert code == 1, err[-3000:]
    assert "did not answer within 5 s" in err and "Traceback" not in err
    assert 4 < waited < 30


# 4. device killed mid-run -----------------------------------------------------------------------

def test_embedded_device_killed_mid_run__restarted_and_retried(prefect_api, store_root, tiny_onnx):
    cli = Cli(prefect_api, "--model", str(tiny_onnx), "--artifacts", str(store_root),
              "--number", "200000", "--repeat", "1")
    try:
        cli.wait_for_line("Task run 'set-input' - Finished")
        time.sleep(1)
        servers = descendant_servers(cli.proc.pid)
        assert servers, "the embedded rpc_server should be a descendant of the CLI"
        os.killpg(os.getpgid(servers[0].pid), signal.SIGKILL)
        code, out, err = cli.finish(timeout=300)
    finally:
        cli.kill()
    assert code == 0, err[-3000:]
    assert "retrying on a fresh session" in err and "restarting the embedded rpc_server" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stages"]["run"] == "ran" and len(summary["top5"]) == 5


def test_remote_device_killed_mid_run__retried_then_clear_error(prefect_api, store_root, tiny_onnx):
    with EmbeddedServer() as server:
        host, port = server.address
        cli = Cli(prefect_api, "--model", str(tiny_onnx), "--artifacts", str(store_root), "--host", host,
                  "--port", str(port), "--connect-timeout", "3", *LONG_RUN)
        try:
            cli.wait_for_line("Task run 'set-input' - Finished")
            os.killpg(server.pgid, signal.SIGKILL)
            code, _, err = cli.finish(timeout=120)
        finally:
            cli.kill()
    assert code == 1, err[-3000:]
    assert "retrying on a fresh session" in err
    assert "Error: " in err and f"{host}:{port}" in err and "Traceback" not in err
    # The retry's own failure (nothing listens any more) is not the cause: the error names the loss first.
    [error] = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert "the connection was lost" in error.split(";")[0] and "then failed: Nothing accepts connections" in error


# 5. library for another architecture ------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="scripts/setup --dev installs the cross compiler")
def test_wrong_architecture__refused_before_upload_naming_both(prefect_api, store_root, tiny_onnx):
    proc = cli_json(prefect_api, store_root, "--model", str(tiny_onnx),
                    "--target", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", expect=1)
    assert "aarch64" in proc.stderr and "x86_64" in proc.stderr and "Error: " in proc.stderr
    assert "Task run 'upload' - Finished in state Completed" not in proc.stderr


# 6/7. corrupted or deleted library --------------------------------------------------------------

def test_corrupted_library__rebuilt_and_only_the_good_copy_uploaded(prefect_api, store_root, tiny_onnx):
    first = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    library = Path(first["artifact"])
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    second = cli_json(prefect_api, store_root, "--model", str(tiny_onnx))
    assert second["stages"]["export-library"] == "ran"
    assert ArtifactStore(store_root).get(first["library_key"]) is not None
    assert second["top5"] == first["top5"]


# 8. a build killed midway -----------------------------------------------------------------------

@pytest.mark.slow
def test_build_killed_midway__no_partial_artifact_and_next_run_succeeds(prefect_api, store_root):
    cli = Cli(prefect_api, "--model", "resnet18_v2", "--weights", "random", "--artifacts", str(store_root))
    try:
        cli.wait_for_line("Task run 'import-model' - Finished", timeout=300)
        time.sleep(0.5)  # compiling now
    finally:
        cli.kill()
    assert list((store_root / ".tmp").iterdir()), "the kill should have interrupted a build in progress"
    store = ArtifactStore(store_root)
    for key_dir in store_root.glob("[0-9a-f][0-9a-f]/*"):
        assert store.check(key_dir.parent.name + key_dir.name)[0] is not None, f"partial artifact {key_dir}"
    summary = cli_json(prefect_api, store_root, "--model", "resnet18_v2", "--weights", "random")
    assert summary["stages"]["import-model"] == "cached" and summary["stages"]["export-library"] == "ran"
    assert not list((store_root / ".tmp").iterdir()), "the killed build's temporary directory was swept"


# 9-11. bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, payload", [("corrupt.onnx", b"\x08\x07garbage" * 100), ("empty.pt2", b"")])
def test_corrupt_model_file__exit_2_naming_it(tmp_path, store_root, name, payload):
    from support import run_cli

    bad = tmp_path / name
    bad.write_bytes(payload)
    proc = run_cli("--model", str(bad), "--artifacts", str(store_root), timeout=120)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_image__resized_by_preprocessing(prefect_api, store_root, tiny_onnx, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (5, 7), (200, 30, 30)).save(small)
    # A flat image through the tiny random net differs from onnxruntime by ~1.2e-4 (float32 rounding on
    # logits of ~4): loosen the check, which tests/test_check.py covers; the subject here is the resize.
    summary = cli_json(prefect_api, store_root, "--model", str(tiny_onnx), "--image", str(small),
                       "--max-abs-diff", "1e-3")
    assert summary["image"] == str(small) and len(summary["top5"]) == 5


# 12. disk full, read-only store -----------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (needs root, as CI has)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _big(directory: Path) -> None:
    (directory / "big.bin").write_bytes(os.urandom(2 << 20))


def _small(directory: Path) -> None:
    (directory / "small.bin").write_bytes(b"x" * 1000)


def test_disk_full__store_error_and_store_unchanged(tmpfs):
    store = ArtifactStore(tmpfs / "store")
    good = store.put("aa" + "0" * 62, "build", _small)
    with pytest.raises(StoreError, match="disk is full"):
        store.put("bb" + "0" * 62, "build", _big)
    assert store.get(good.key) == good
    assert not store.path("bb" + "0" * 62).exists()
    assert not list((tmpfs / "store" / ".tmp").iterdir())


def test_read_only_store__store_error_reads_still_work(tmpfs, prefect_api, tiny_onnx):
    store = ArtifactStore(tmpfs / "store")
    good = store.put("aa" + "0" * 62, "build", _small)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(StoreError, match="read-only"):
        store.put("bb" + "0" * 62, "build", _small)
    assert store.get(good.key) == good
    proc = cli_json(prefect_api, tmpfs / "store", "--model", str(tiny_onnx), expect=1)
    assert "read-only" in proc.stderr and "--artifacts" in proc.stderr and "Traceback" not in proc.stderr


def test_stress_script__small_run_finds_no_corrupt_artifacts(tmp_path):
    # The full run (>= 200 trials) is bench/stress_store.py; this keeps the script honest in CI.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "stress_store.py"), "--trials", "12",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: OK, 0 corrupt or partial artifacts" in proc.stdout
    assert "killed_mid_write     0" not in proc.stdout


def test_cli_terminated__embedded_device_is_stopped_not_orphaned(prefect_api, store_root, tiny_onnx):
    cli = Cli(prefect_api, "--model", str(tiny_onnx), "--artifacts", str(store_root), *LONG_RUN)
    try:
        cli.wait_for_line("Task run 'set-input' - Finished")
        servers = descendant_servers(cli.proc.pid)
        assert servers
        cli.proc.send_signal(signal.SIGTERM)
        code, _, err = cli.finish(timeout=60)
    finally:
        cli.kill()
    assert code == 130 and "Error: interrupted" in err
    deadline = time.monotonic() + 15
    while any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers), "rpc_server orphaned"


@pytest.mark.parametrize(("api", "stage"), [
    (None, "Beginning flow run"),  # Prefect's temporary uvicorn server is up, the embedded device starting
    ("server", "Task run 'set-input' - Finished"),  # the embedded rpc_server and its worker busy
])
def test_cli_killed__no_process_of_the_run_survives(prefect_api, store_root, tiny_onnx, api, stage):
    """kill -9 of the CLI (the OOM killer, a CI timeout): its lifeline ends everything it started."""
    cli = Cli(prefect_api if api else None, "--model", str(tiny_onnx), "--artifacts", str(store_root), *LONG_RUN)
    tree: list[psutil.Process] = []
    try:
        cli.wait_for_line(stage)
        time.sleep(1.0)  # the watchdog lists the CLI's descendants every 0.3 s
        tree = psutil.Process(cli.proc.pid).children(recursive=True)
        assert tree, "the run has started no process yet"
        cli.proc.send_signal(signal.SIGKILL)
        cli.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=5)
    finally:
        for proc in tree:  # never leave one behind, whatever the assertion says
            with contextlib.suppress(psutil.Error):
                proc.kill()
        cli.kill()
    assert not alive, [(p.pid, " ".join(p.cmdline())[:120]) for p in alive if p.is_running()]
