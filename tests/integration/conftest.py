"""Fixtures of the integration tier only (the shared ones are in tests/conftest.py).

``server``: one embedded rpc_server on 127.0.0.1 per test module that asks for it, stopped with the module.
test_device.py has its own ``server`` (one of its module's stack of servers), which overrides this one there.

``local_stack``: the command lines' default path (no ``PREFECT_API_URL``: the local Prefect server, started by
the first run that needs it) in a stack directory and on a port of the session's own, stopped at the end of the
session; ``fresh_local_stack``: the same for one test, with nothing running yet.
"""

from __future__ import annotations

import pytest

from support import LocalStack, start_local_stack


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


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    stack = start_local_stack(tmp_path_factory.mktemp("local-stack"))
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def fresh_local_stack(tmp_path) -> LocalStack:
    stack = start_local_stack(tmp_path / "stack")
    try:
        yield stack
    finally:
        stack.down()
