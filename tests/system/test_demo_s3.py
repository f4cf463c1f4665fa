"""The demo (EfficientNet-Lite0) against a team's store on S3-compatible object storage (a real SeaweedFS on
127.0.0.1): twice, the second all cached, then on a second "machine" (another local cache directory and Prefect
cache, the same bucket and team key) that builds nothing. Marked slow: ~2 minutes, most of it the first build.
(The same with a tiny model, in the integration tier: tests/integration/test_flow_s3.py.)"""

from __future__ import annotations

import json

import pytest
from support import COMPILE, run_cli

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat

pytestmark = pytest.mark.slow


def _demo(s3_store, env, prefect_api):
    proc = run_cli("--model", "efficientnet_lite0", "--target", "llvm", "--artifacts", s3_store.url, "--json",
                   "--repeat", "2", env={**env, "PREFECT_API_URL": prefect_api})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_demo__against_an_s3_store_twice_then_on_another_machine(prefect_api, s3_store, tmp_path):
    first = _demo(s3_store, s3_store.env, prefect_api)
    assert first["top5"][0]["class"] in CAT_CLASSES and first["check"]["passed"]
    assert [first["stages"][s] for s in (*COMPILE, "reference")] == ["ran"] * 4
    again = _demo(s3_store, s3_store.env, prefect_api)
    assert [again["stages"][s] for s in (*COMPILE, "reference")] == ["cached"] * 4 and again["upload"]["reused"]
    other = _demo(s3_store, s3_store.machine(tmp_path / "other-machine"), prefect_api)
    assert [other["stages"][s] for s in (*COMPILE, "reference")] == ["cached"] * 4
    assert other["build_key"] == first["build_key"] and other["top5"] == first["top5"]
