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
