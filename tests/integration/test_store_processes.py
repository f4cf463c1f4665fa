"""The artifact store's lock across processes. (Puts, digests, keys: tests/unit/test_store.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.errors import StoreError
from pipeline.store import ArtifactStore

KEY = "ab" + "0" * 62
OTHER = "cd" + "1" * 62

_HOLDER = """
import sys, time
from pipeline.store import ArtifactStore
with ArtifactStore(sys.argv[1]).lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock__excludes_other_processes_and_is_released_when_holder_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), KEY], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        store = ArtifactStore(tmp_path)
        with pytest.raises(StoreError, match="held the lock"):
            with store.lock(KEY, timeout=0.5):
                pass
        with store.lock(OTHER, timeout=0.5):  # other keys are independent
            pass
        proc.kill()  # the holder dies without releasing: the kernel drops its flock
        proc.wait(10)
        start = time.monotonic()
        with store.lock(KEY, timeout=5):
            pass
        assert time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait(10)
