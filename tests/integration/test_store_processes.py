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


_WRITER = """
import sys
from pipeline.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
artifact = store.put(sys.argv[2], "build", lambda d: (d / "a.bin").write_text(sys.argv[2]))
print(store.store_key().id, flush=True)
"""


def test_store_key__processes_that_create_it_at_once_all_use_one_key(tmp_path, monkeypatch):
    """Eight processes start with no key: the first to link its key into place wins, every one signs with it,
    and each reads the others' artifacts."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TVMRP_STORE_KEY", raising=False)
    monkeypatch.delenv("TVMRP_STORE_KEY_FILE", raising=False)
    keys = [f"{i:02x}" + "3" * 62 for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "store"), key],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for key in keys]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert sorted(p.name for p in (tmp_path / "config" / "tvmrp").iterdir()) == ["store.key"]
    store = ArtifactStore(tmp_path / "store")
    assert all(store.get(key) is not None for key in keys)
