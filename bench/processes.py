"""Section 1 as users see it: the warm command line against a plain TVM script, whole processes.

Each measurement is a fresh process, timed from outside (start to exit), so interpreter start, imports, the
embedded device's start and Prefect's own start are all counted. The four commands alternate, one of each
per repeat, so a drift of the shared machine hits them alike:

* ``cli``: ``python -m flows.resnet_remote`` with a persistent Prefect server (``PREFECT_API_URL``);
* ``cli_no_server``: the same with no server and no local stack: Prefect starts a temporary one per run;
* ``plain``: ``bench/plain_demo.py``, the same device steps as a plain TVM script written as usual;
* ``plain_lean``: the same script importing TVM without torch in both its processes, as the pipeline does.

All four do the demo's warm work: builds cached (the command line verifies them), the device keeps the
library (the plain script loads the copy the command line's embedded device kept), 5 latency samples after a
warm-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def bench_processes(store_root: str, api_url: str, model: str, target: str, repeats: int) -> dict[str, Any]:
    """Medians (s) and min/max of the four commands, and the ratios of the command line to the plain script."""
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    with tempfile.TemporaryDirectory(prefix="bench-nostack-") as nostack:
        # No server, and no local stack to fall back on: the command line starts a temporary server.
        no_server = {**base, "TVMRP_STACK_DIR": nostack, "PREFECT_HOME": str(Path(nostack) / "prefect")}
        with_server = {**base, "PREFECT_API_URL": api_url}
        cli = [sys.executable, "-m", "flows.resnet_remote", "--model", model, "--target", target, "--artifacts",
               store_root, "--repeat", "5"]
        _, out = _timed([*cli, "--json"], with_server)  # prime: builds, reference, the device keeps the library
        library = json.loads(out.strip().splitlines()[-1])["upload"]["remote_name"]
        plain = [sys.executable, str(REPO / "bench" / "plain_demo.py"), library, "--repeat", "5"]
        commands = {"cli": (cli, with_server), "cli_no_server": (cli, no_server), "plain": (plain, base),
                    "plain_lean": ([*plain, "--lean"], base)}
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats + 1):  # the first round warms file caches up and is not counted
            for name, (argv, env) in commands.items():
                samples[name].append(_timed(argv, env)[0])
    rows = {name: _summary(values[1:]) for name, values in samples.items()}
    for name in ("cli", "cli_no_server"):
        for baseline in ("plain", "plain_lean"):
            rows[f"{name}/{baseline}"] = statistics.median(
                a / b for a, b in zip(samples[name][1:], samples[baseline][1:]))
    return rows


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
