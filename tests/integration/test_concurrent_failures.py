"""Twenty command lines failing at once (the tracker is down), through the default path (the local Prefect
server, in a stack of the tests' own): each ends with exactly one ``Error:`` line, last, exit 1, no traceback,
however Prefect's background work interleaves, and each is in the run ledger. A Prefect API that fails (503, or
nothing listening) ends a run the same way, its record written by the command line."""

from __future__ import annotations

import socket
import subprocess
import sys

from pipeline.store import ArtifactStore
from support import REPO, run_cli

RUNS = 20


def test_twenty_concurrent_failing_runs__one_error_line_and_a_record_each_no_traceback(local_stack, store_root,
                                                                                       tiny_onnx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: the "tracker" is down
    argv = [sys.executable, "-m", "flows.resnet_remote", "--model", str(tiny_onnx), "--artifacts", str(store_root),
            "--tracker", f"127.0.0.1:{port}", "--key", "gone", "--no-check"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=local_stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(RUNS)]
    outputs = [p.communicate(timeout=900) for p in procs]  # reads both pipes while waiting: no deadlock
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    for code, _, err in results:
        lines = err.rstrip().splitlines()
        errors = [line for line in lines if line.startswith("Error:")]
        assert code == 1 and len(errors) == 1, err[-3000:]
        # The tracker's error; or, should twenty clients overload the SQLite Prefect server past its client's
        # retries, the Prefect API's: either way one clean line.
        assert lines[-1] == errors[0] and (f"127.0.0.1:{port}" in errors[0] or "the Prefect API" in errors[0]), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    assert any(f"127.0.0.1:{port}" in err for _, _, err in results)  # the server was not down for all of them
    records = list(ArtifactStore(store_root).ledger.records())
    assert len(records) == RUNS and all(r.status == "failed" and r.exit_code == 1 for r in records)


def test_prefect_api_failing__one_error_line_naming_it_no_traceback(tmp_path, store_root, tiny_onnx):
    """A Prefect server that answers 503 (overloaded) or nothing at all: ``Error:`` naming the API, exit 1."""
    import http.server
    import threading

    class Overloaded(http.server.BaseHTTPRequestHandler):
        def _unavailable(self) -> None:
            body = b'{"exception_message": "Service Unavailable"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _unavailable

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ledger = ArtifactStore(store_root).ledger
    try:
        for port, expected in ((server.server_port, "answered 503 Service Unavailable"), (down, "ConnectError")):
            before = {r.id for r in ledger.records()}
            proc = run_cli("--model", str(tiny_onnx), "--artifacts", str(store_root), "--no-check", timeout=300,
                           env={"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_CLIENT_MAX_RETRIES": "0"})
            lines = proc.stderr.rstrip().splitlines()
            assert proc.returncode == 1 and lines[-1].startswith("Error: the Prefect API"), proc.stderr[-3000:]
            assert expected in lines[-1] and f"127.0.0.1:{port}" in lines[-1], lines[-1]
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            # The flow run was never created, so the flow recorded nothing: the command line did, with its error.
            new = [r for r in ledger.records() if r.id not in before]
            assert len(new) == 1 and new[0].status == "failed" and new[0].error == lines[-1].removeprefix("Error: ")
    finally:
        server.shutdown()
        server.server_close()
