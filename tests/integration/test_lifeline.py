"""Tests of pipeline.processes: stopping a process tree, and the lifeline that ends our children when we die.

Real processes and signals: small Python scripts run as subprocesses, an embedded TVM rpc_server, ``sleep``
grandchildren in sessions of their own. Every wait is bounded; each test ends what it started.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from support import REPO
from support import read_line as _read_line

from pipeline.processes import stop_process_tree

# A grandchild in a session of its own: out of reach of any signal to our process group.
_DETACHED_SLEEP = (
    "import subprocess, sys; "
    "p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
    "print(p.pid, flush=True); p.wait()"
)

_CLI = f"""
import json, subprocess, sys, time
from pipeline.device import EmbeddedServer
from pipeline.processes import start_lifeline

lifeline = start_lifeline()
server = EmbeddedServer()
server.wait_ready(timeout=120)
sleeper = subprocess.Popen([sys.executable, "-c", {_DETACHED_SLEEP!r}], stdout=subprocess.PIPE, text=True)
grandchild = int(sleeper.stdout.readline())
time.sleep(1.0)  # a few listings of the watchdog
print(json.dumps({{"lifeline": lifeline.pid, "server": server.pgid, "sleeper": sleeper.pid,
                  "grandchild": grandchild}}), flush=True)
time.sleep(300)
"""

_CLEAN_EXIT = f"""
import json, subprocess, sys, time
from pipeline.processes import Lifeline

with Lifeline() as lifeline:
    stopped = subprocess.Popen(["sleep", "300"])
    left = subprocess.Popen([sys.executable, "-c", {_DETACHED_SLEEP!r}], stdout=subprocess.PIPE, text=True)
    grandchild = int(left.stdout.readline())
    time.sleep(1.0)
    stopped.terminate()
    stopped.wait()
    print(json.dumps({{"lifeline": lifeline.pid, "left": left.pid, "grandchild": grandchild}}), flush=True)
print("closed", flush=True)
"""


def _start(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)


def _snapshot(pids: list[int]) -> list[psutil.Process]:
    """psutil handles (they keep each start time: a reused pid does not count as alive)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def _wait_all_gone(procs: list[psutil.Process], within: float) -> float:
    started = time.monotonic()
    while _alive(procs) and time.monotonic() - started < within:
        time.sleep(0.05)
    return time.monotonic() - started


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in _alive(procs):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
        except psutil.Error:
            lines.append(f"{proc.pid} (gone)")
    return "; ".join(lines)


# ------------------------------------------------------------------------------------ process tree


def test_stop_process_tree__ends_group_and_detached_descendants() -> None:
    tree: list[psutil.Process] = []
    leader = subprocess.Popen(
        ["sh", "-c", f"sleep 300 & {sys.executable} -c \"{_DETACHED_SLEEP}\" & wait"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        grandchild = int(_read_line(leader, timeout=30))
        tree = [psutil.Process(leader.pid), *psutil.Process(leader.pid).children(recursive=True)]
        assert grandchild in {proc.pid for proc in tree} and len(tree) == 4
        started = time.monotonic()
        result = stop_process_tree(leader.pid, tree[0].create_time(), grace=5.0, popen=leader)
        print(f"stopped {result} in {time.monotonic() - started:.2f} s")
        assert result.signalled == 4 and result.survivors == ()
        assert not _alive(tree)
        assert leader.returncode is not None  # reaped
        assert stop_process_tree(leader.pid, tree[0].create_time()).signalled == 0  # idempotent
    finally:
        _kill_all(tree)
        leader.kill()
        leader.wait(timeout=10)


def test_stop_process_tree__other_start_time_is_not_ours() -> None:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        started = psutil.Process(proc.pid).create_time()
        result = stop_process_tree(proc.pid, started - 10.0, grace=0.5)
        assert result.signalled == 0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------- lifeline


@pytest.mark.timeout(300)
def test_lifeline__sigkill_of_the_cli_ends_its_process_trees() -> None:
    """SIGKILL of the CLI: its rpc_server (own session, with TVM's popen_worker) and a sleep grandchild in
    a session of its own are gone within seconds, and so is the watchdog."""
    cli = _start(_CLI)
    procs: list[psutil.Process] = []
    try:
        pids = json.loads(_read_line(cli, timeout=180))
        procs = _snapshot([child.pid for child in psutil.Process(cli.pid).children(recursive=True)])
        print(f"the CLI's descendants: {_describe(procs)}")
        assert {pids["lifeline"], pids["server"], pids["sleeper"], pids["grandchild"]} <= {p.pid for p in procs}
        assert len(procs) >= 5  # lifeline, rpc_server (+ its workers), sleeper, grandchild
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        elapsed = _wait_all_gone(procs, within=5.0)
        alive = _alive(procs)
        print(f"{len(procs)} descendants, all gone {elapsed:.2f} s after SIGKILL" if not alive else "")
        assert not alive, f"alive 5 s after SIGKILL of the CLI: {_describe(alive)}"
    finally:
        cli.kill()
        cli.wait(timeout=10)
        _kill_all(procs)


_FORKING_CLI = """
import json, os, subprocess, time
from pipeline.processes import start_lifeline

lifeline = start_lifeline()
forked = os.fork()  # inherits the pipe's write end: the watchdog sees no EOF when the CLI dies
if forked == 0:
    time.sleep(300)
    os._exit(0)
sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
time.sleep(1.0)
print(json.dumps({"lifeline": lifeline.pid, "forked": forked, "sleeper": sleeper.pid}), flush=True)
time.sleep(300)
"""


def test_lifeline__cli_death_noticed_without_eof() -> None:
    """A child forked without exec keeps the pipe open; the watchdog still notices the CLI's death."""
    cli = _start(_FORKING_CLI)
    procs: list[psutil.Process] = []
    try:
        pids = json.loads(_read_line(cli, timeout=60))
        procs = _snapshot(list(pids.values()))
        assert len(procs) == 3
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        elapsed = _wait_all_gone(procs, within=5.0)
        assert not _alive(procs), f"alive 5 s after SIGKILL of the CLI: {_describe(_alive(procs))}"
        print(f"all gone {elapsed:.2f} s after SIGKILL")
    finally:
        cli.kill()
        cli.wait(timeout=10)
        _kill_all(procs)


def test_lifeline__clean_exit_ends_only_what_the_cli_left() -> None:
    """On close, the watchdog ends what the CLI left running and exits; others' processes are untouched."""
    bystander = subprocess.Popen(["sleep", "300"])  # ours, not the CLI's
    cli = _start(_CLEAN_EXIT)
    procs: list[psutil.Process] = []
    try:
        pids = json.loads(_read_line(cli, timeout=60))
        procs = _snapshot([pids["lifeline"], pids["left"], pids["grandchild"]])
        assert _read_line(cli, timeout=30) == "closed"
        assert cli.wait(timeout=30) == 0
        assert _wait_all_gone(procs, within=5.0) < 5.0, f"still alive: {_describe(_alive(procs))}"
        assert bystander.poll() is None
    finally:
        cli.kill()
        cli.wait(timeout=10)
        _kill_all(procs)
        bystander.kill()
        bystander.wait(timeout=10)


def test_lifeline__pipe_is_not_inherited() -> None:
    """Children started with exec do not hold the pipe's write end (else the watchdog could not see EOF)."""
    script = (
        "import os, subprocess, sys, time\n"
        "from pipeline.processes import Lifeline\n"
        "with Lifeline(poll_s=0.1) as lifeline:\n"
        "    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "    child = subprocess.Popen(['sleep', '300'], close_fds=False, **quiet)\n"
        "    time.sleep(0.5)\n"
        "    print(lifeline.pid, child.pid, flush=True)\n"
        "    fds = os.listdir(f'/proc/{child.pid}/fd')\n"
        "    print(' '.join(sorted(os.readlink(f'/proc/{child.pid}/fd/{fd}') for fd in fds)), flush=True)\n"
        "    child.kill(); child.wait()\n"
    )
    cli = _start(script)
    try:
        _read_line(cli, timeout=60)
        links = _read_line(cli, timeout=30).split()
        assert not [link for link in links if link.startswith("pipe:")], links
        assert cli.wait(timeout=30) == 0
    finally:
        cli.kill()
        cli.wait(timeout=10)


_KEEPS_DETACHED = """
import json, os, subprocess, sys, time
from pipeline.processes import detached, start_lifeline

lifeline = start_lifeline()
ended = subprocess.Popen(["sleep", "300"], start_new_session=True)
kept = subprocess.Popen(["sleep", "300"], start_new_session=True, env=detached(dict(os.environ)))
time.sleep(1.0)  # a few listings of the watchdog: both seen as descendants
print(json.dumps({"ended": ended.pid, "kept": kept.pid}), flush=True)
time.sleep(300)
"""


def test_lifeline__leaves_a_child_started_to_outlive_the_run() -> None:
    """The local Prefect server a command line starts for later runs too survives the command's SIGKILL; its
    other children do not."""
    proc = _start(_KEEPS_DETACHED)
    procs: list[psutil.Process] = []
    try:
        pids = json.loads(_read_line(proc, timeout=60))
        procs = _snapshot([pids["ended"], pids["kept"]])
        assert len(procs) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        ended, kept = procs
        _wait_all_gone([ended], within=10)
        assert not _alive([ended]), "the lifeline left a child of the run running"
        time.sleep(1.0)  # the watchdog is done by now
        assert _alive([kept]), "the lifeline ended the child started to outlive the run"
    finally:
        _kill_all(procs)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
