"""The local stack's pieces a command line relies on, without starting a server: ports, pid records, the lock,
which Prefect server a command line picks, how Prefect's failures are recognised, and the one-line results of
the flow runs' final states."""

from __future__ import annotations

import fcntl
import socket

import psutil
import pytest

from pipeline import local_stack
from pipeline.errors import OrchestrationError, UsageError
from support import make_summary


def _config(tmp_path, port: int = 4200) -> local_stack.Config:
    return local_stack.Config(home=tmp_path, port=port, pool="process", tracker_port=9190, device_key="k",
                              artifacts=tmp_path / "artifacts")


def test_free_port_from__the_port_when_free_else_the_next_free_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        assert local_stack.free_port_from(taken) != taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert local_stack.free_port_from(free) == free


def test_config__on_the_running_servers_port_from_its_record(tmp_path):
    cfg = _config(tmp_path)
    assert cfg.on_server_port() == cfg  # no record
    me = psutil.Process()
    local_stack.record(cfg, "server", me.pid, ["prefect", "server", "start"], port=4211)  # a live process
    assert cfg.on_server_port().port == 4211 and cfg.on_server_port().api_url == "http://127.0.0.1:4211/api"
    stale = local_stack.Record("server", me.pid, me.create_time() - 1000, ["x"], 4212)  # its pid, another start
    local_stack.write_record(cfg.pidfile("server"), stale)
    assert cfg.on_server_port() == cfg
    assert local_stack.running(cfg, "server") is None and not cfg.pidfile("server").exists()


def test_config__home_from_the_environment_else_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMRP_STACK_DIR", str(tmp_path / "s"))
    assert local_stack.default_home() == (tmp_path / "s").resolve()
    monkeypatch.delenv("TVMRP_STACK_DIR")
    assert local_stack.default_home() == local_stack.REPO / ".stack"


def test_locked__a_bounded_wait_says_what_holds_it(tmp_path):
    cfg = _config(tmp_path)
    with open(tmp_path / "lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: another holder, as another process would be
        with pytest.raises(local_stack.StackError, match="stayed locked"):
            with local_stack.locked(cfg, timeout=0.3):
                pass
    with local_stack.locked(cfg, timeout=0.3):
        pass
    assert isinstance(local_stack.StackError("x"), OrchestrationError)  # exit 1 with one Error: line


def test_server_mode__local_by_default_temporary_on_request_else_a_usage_error(monkeypatch):
    from flows import _cli

    monkeypatch.delenv(_cli.SERVER_ENV, raising=False)
    assert _cli._server_mode() == "local"
    monkeypatch.setenv(_cli.SERVER_ENV, "Temporary")
    assert _cli._server_mode() == "temporary"
    monkeypatch.setenv(_cli.SERVER_ENV, "ephemeral")
    with pytest.raises(UsageError, match="TVMRP_PREFECT_SERVER must be one of local, temporary"):
        _cli._server_mode()


def test_profile_api_url__read_from_the_active_profile_without_prefect(tmp_path, monkeypatch):
    from flows import _cli

    profiles = tmp_path / "profiles.toml"
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    assert not _cli._profile_api_url()  # no file
    profiles.write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://srv:4200/api"\n'
                        '[profiles.local]\n')
    assert _cli._profile_api_url()
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert not _cli._profile_api_url()
    profiles.write_text("not toml [")
    assert not _cli._profile_api_url()


def test_prefect_api_failure__every_way_prefect_reports_a_failed_api():
    import httpx

    from flows import _cli

    timed_out = RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server. stderr: ...")
    assert _cli._prefect_api_failure(timed_out) is timed_out
    assert "temporary server for this run did not start" in str(_cli._orchestration_error(timed_out))
    connect = httpx.ConnectError("All connection attempts failed")
    try:
        try:
            raise connect
        except httpx.ConnectError as exc:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:9/api/") from exc
    except RuntimeError as wrapped:
        assert _cli._prefect_api_failure(wrapped) is connect
    error = _cli._orchestration_error(connect, "http://127.0.0.1:9/api")
    assert "the Prefect API (http://127.0.0.1:9/api) failed: ConnectError" in str(error)
    assert _cli._prefect_api_failure(RuntimeError("something else")) is None
    assert _cli._prefect_api_failure(ValueError("Failed to reach API at x")) is None


def test_state_message__each_result_in_one_line():
    from pipeline.latency import Verdict
    from pipeline.views.run import state_message

    summary = make_summary()
    assert state_message(summary) == "median 118.970 ms, check skipped, top-1 285 cat 0"
    slower = make_summary(regression=Verdict(True, 0.123, 100.0, 0.05, 5, "slower"))
    assert state_message(slower).endswith(", REGRESSION +12.3%")
    assert state_message(summary.build).startswith("built efficientnet_lite0: library efefefefefefefef (20.0 MB), ")
    assert "\n" not in state_message(summary)
