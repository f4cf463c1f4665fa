"""Section 1 as users see it: the warm command line against a plain TVM script, whole processes.

Each measurement is a fresh process, timed from outside (start to exit), so interpreter start, imports, the
embedded device's start and Prefect's own start are all counted. The commands alternate, one of each per
repeat, so a drift of the shared machine hits them alike. Every command line runs the README's main command
(``--model efficientnet_lite0 --target llvm``) on the default path, no ``PREFECT_API_URL``, in a stack
directory and on a port of the bench's own:

* ``cli``: the local Prefect server already up (started by the priming run): rows P1 and P1';
* ``cli_no_server``: no server beforehand (it is stopped, untimed, before each of these runs): the run starts
  the local server, waits for it and leaves it running: row P1'';
* ``cli_temporary``: the opt-out, ``TVMRP_PREFECT_SERVER=temporary``: Prefect's temporary server per run (the
  default before the local server);
* ``plain``: ``bench/plain_demo.py``, the same device steps as a plain TVM script written as usual;
* ``plain_lean``: the same script importing TVM without torch in both its processes, as the pipeline does.

All do the demo's warm work: builds cached (the command line verifies them), the device keeps the library
(the plain script loads the copy the command line's embedded device kept), 5 latency samples after a warm-up.

    .venv/bin/python bench/processes.py --artifacts STORE [--repeats 5] [--json OUT]

runs this section alone (the store must hold the demo's builds, or the priming run makes them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLOW_MODEL = "efficientnet_lite0"
FLOW_TARGET = "llvm"


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_server(home: Path, env: dict[str, str]) -> None:
    """Stop the bench stack's local server (untimed), if it runs."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "stack.py"), "down"], cwd=REPO, env=env,
                   capture_output=True, text=True, timeout=120, check=True)


def bench_processes(store_root: str, model: str = FLOW_MODEL, target: str = FLOW_TARGET,
                    repeats: int = 5) -> dict[str, Any]:
    """Medians (s) and min/max of the commands, and the ratios of the command lines to the plain script."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "TVMRP_PREFECT_SERVER", "TVMRP_STACK_DIR", "TVMRP_STACK_PORT")}
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as home:
        local = {**base, "TVMRP_STACK_DIR": home, "TVMRP_STACK_PORT": str(_free_port())}
        temporary = {**base, "TVMRP_PREFECT_SERVER": "temporary"}
        cli = [sys.executable, "-m", "flows.resnet_remote", "--model", model, "--target", target, "--artifacts",
               store_root, "--repeat", "5"]
        try:
            # Prime: the builds, the reference, the device keeps the library; the local server starts.
            _, out = _timed([*cli, "--json"], local)
            library = json.loads(out.strip().splitlines()[-1])["upload"]["remote_name"]
            plain = [sys.executable, str(REPO / "bench" / "plain_demo.py"), library, "--repeat", "5"]
            commands = {"cli": (cli, local), "cli_no_server": (cli, local), "cli_temporary": (cli, temporary),
                        "plain": (plain, base), "plain_lean": ([*plain, "--lean"], base)}
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(repeats + 1):  # the first round warms file caches up and is not counted
                for name, (argv, env) in commands.items():
                    if name == "cli_no_server":
                        _stop_server(Path(home), local)
                    samples[name].append(_timed(argv, env)[0])
        finally:
            _stop_server(Path(home), local)
    rows: dict[str, Any] = {name: _summary(values[1:]) for name, values in samples.items()}
    for name in ("cli", "cli_no_server", "cli_temporary"):
        for baseline in ("plain", "plain_lean"):
            rows[f"{name}/{baseline}"] = statistics.median(
                a / b for a, b in zip(samples[name][1:], samples[baseline][1:]))
    rows["samples"] = samples
    return rows


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="the artifact store (the demo's builds, or made now)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    rows = bench_processes(str(Path(args.artifacts).resolve()), repeats=args.repeats)
    text = json.dumps(rows, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    for name in ("cli", "cli_no_server", "cli_temporary"):
        print(f"{name}: {rows[name]['median']:.2f} s; /plain {rows[name + '/plain']:.2f}x, "
              f"/plain_lean {rows[name + '/plain_lean']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
