"""Twenty command lines failing at once (the tracker is down): each ends with exactly one ``Error:`` line, last,
exit 1, and no traceback, however Prefect's background work interleaves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from support import REPO

RUNS = 20


def test_twenty_concurrent_failing_runs__one_error_line_each_no_traceback(prefect_api, store_root, tiny_onnx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: the "tracker" is down
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    argv = [sys.executable, "-m", "flows.resnet_remote", "--model", str(tiny_onnx), "--artifacts", str(store_root),
            "--tracker", f"127.0.0.1:{port}", "--key", "gone", "--no-check"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(RUNS)]
    outputs = [p.communicate(timeout=900) for p in procs]  # reads both pipes while waiting: no deadlock
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    for code, _, err in results:
        lines = err.rstrip().splitlines()
        errors = [line for line in lines if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1, err[-3000:]
        assert lines[-1] == errors[0] and f"127.0.0.1:{port}" in errors[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
