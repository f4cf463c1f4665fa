"""Stress the artifact store with random kills and concurrent writers; count corrupt or partial artifacts.

    .venv/bin/python bench/stress_store.py [--trials 200] [--seed 0] [--store DIR]

Each trial is one of:
  kill        a writer producing a multi-MB artifact (slowly, in chunks) is SIGKILLed at a random moment;
  concurrent  2-4 writers ensure() the same key at once; exactly one may produce it.
After every trial every artifact directory in the store must pass its digest check (a directory at a key's
path that fails is "corrupt or partial"), and the temporary directories of dead writers must be swept by
the next put. Writers are child processes of this script, on this machine; every wait is bounded.
Exit status 1 if any violation was found.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.store import ArtifactStore  # noqa: E402

WRITER = r"""
import os, sys, time
from pathlib import Path
from pipeline.store import ArtifactStore
root, key, size_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])

def produce(directory: Path) -> None:
    chunk = os.urandom(1 << 20)
    with open(directory / "model.so", "wb") as f:
        for _ in range(size_mb):
            f.write(chunk)
            time.sleep(0.03)
    (directory / "meta.txt").write_text(key)

artifact, produced = ArtifactStore(root).ensure(key, "stress", produce, {"trial": key})
print("produced" if produced else "reused", flush=True)
"""

KEYS = [f"{i:02x}" + "e" * 62 for i in range(8)]


def writer(root: Path, key: str, size_mb: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, str(size_mb)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def violations(store: ArtifactStore) -> list[str]:
    bad = []
    for directory in store.root.glob("[0-9a-f][0-9a-f]/*"):
        key = directory.parent.name + directory.name
        artifact, reason = store.check(key)
        if artifact is None:
            bad.append(f"{key[:12]}: {reason}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: a new temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = args.store or Path(tempfile.mkdtemp(prefix="stress-store-"))
    store = ArtifactStore(root)
    counts = {"kill": 0, "concurrent": 0, "killed_mid_write": 0, "produced": 0, "reused": 0,
              "double_builds": 0, "corrupt_or_partial": 0, "unswept_tmp": 0}
    problems: list[str] = []
    start = time.monotonic()
    for trial in range(args.trials):
        key = rng.choice(KEYS)
        if rng.random() < 0.5:
            counts["kill"] += 1
            store.discard(key)  # so that the writer really produces
            proc = writer(root, key, size_mb=rng.randint(4, 10))
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                counts["killed_mid_write"] += 1
            proc.communicate(timeout=60)
        else:
            counts["concurrent"] += 1
            store.discard(key)
            procs = [writer(root, key, size_mb=rng.randint(1, 3)) for _ in range(rng.randint(2, 4))]
            results = [p.communicate(timeout=120) for p in procs]
            outcomes = [out.strip() for out, _ in results]
            for p, (out, err) in zip(procs, results):
                if p.returncode != 0:
                    problems.append(f"trial {trial}: writer failed: {err.strip()[-300:]}")
            counts["produced"] += outcomes.count("produced")
            counts["reused"] += outcomes.count("reused")
            if outcomes.count("produced") != 1:
                counts["double_builds"] += 1
                problems.append(f"trial {trial}: {outcomes.count('produced')} writers produced {key[:12]}")
        bad = violations(store)
        counts["corrupt_or_partial"] += len(bad)
        problems += [f"trial {trial}: {b}" for b in bad]
    # One more put sweeps every dead writer's temporary directory.
    store.put("ff" + "e" * 62, "stress", lambda d: (d / "x").write_text("x"))
    counts["unswept_tmp"] = len(list((root / ".tmp").iterdir()))
    elapsed = time.monotonic() - start
    print(f"store stress: {args.trials} trials in {elapsed:.0f} s (seed {args.seed}, store {root})")
    for name, value in counts.items():
        print(f"  {name:20s} {value}")
    for problem in problems[:20]:
        print("  PROBLEM", problem)
    ok = not problems and counts["unswept_tmp"] == 0
    print("result: OK, 0 corrupt or partial artifacts" if ok else "result: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
