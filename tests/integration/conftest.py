"""Fixtures of the integration tier only (the shared ones are in tests/conftest.py).

``server``: one embedded rpc_server on 127.0.0.1 per test module that asks for it, stopped with the module.
test_device.py has its own ``server`` (one of its module's stack of servers), which overrides this one there.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server():
    from pipeline.device import EmbeddedServer

    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
def small_disk(tmp_path):
    """A function that mounts a tmpfs of ``size`` (``"1m"``) for the test and returns its path (needs root, as CI
    has; skips otherwise); ``support.fill_disk`` fills one."""
    import subprocess

    mounts = []

    def mount(size: str = "1m"):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)

