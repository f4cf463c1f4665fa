"""Tests of pipeline.device without a device: spec validation, the version rule, what a probe's answer may
hold. (Real rpc_server / rpc_tracker processes: tests/integration/test_device.py.)
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from pipeline.device import DeviceInfo, DeviceSpec, EmbeddedServer, open_session
from pipeline.device.probe import (
    check_versions,
    device_arch,
    parse_device_info,
    parse_file_info,
    parse_load,
    parse_memory,
)
from pipeline.errors import UsageError, VersionSkew

pytest.importorskip("tvm")  # the version rule compares with the installed apache-tvm


# ------------------------------------------------------------------------------------ DeviceSpec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (DeviceSpec(host="10.0.0.2"), "needs --port"),
        (DeviceSpec(host=" ", port=9090), "--host is empty"),
        (DeviceSpec(port=9090), "needs --host"),
        (DeviceSpec(host="10.0.0.2", port=70000), "1 to 65535"),
        (DeviceSpec(tracker="10.0.0.2", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker="10.0.0.2:port", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker=":9190", key="k"), "not HOST:PORT"),
        (DeviceSpec(tracker="10.0.0.2:9190"), "needs --key"),
        (DeviceSpec(key="k"), "needs --tracker"),
        (DeviceSpec(host="10.0.0.2", port=9090, tracker="10.0.0.2:9190", key="k"), "not both"),
        (DeviceSpec(call_timeout=0), "call_timeout"),
        (DeviceSpec(connect_timeout=-1), "connect_timeout"),
        (DeviceSpec(request_timeout=math.nan), "request_timeout"),
        (DeviceSpec(call_timeout=math.inf), "call_timeout"),
        (DeviceSpec(session_timeout=-1), "session_timeout"),
        (DeviceSpec(connect_timeout="10"), "connect_timeout"),  # type: ignore[arg-type]
    ],
)
def test_validate__bad_spec(spec: DeviceSpec, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        spec.validate()


@pytest.mark.parametrize(
    ("spec", "kind", "description"),
    [
        (DeviceSpec(), "local", "embedded rpc_server"),
        (DeviceSpec(host="127.0.0.1", port=9090), "host", "127.0.0.1:9090"),
        (DeviceSpec(tracker="127.0.0.1:9190", key="xyz"), "tracker", "tracker 127.0.0.1:9190 key=xyz"),
        (DeviceSpec(tracker="[::1]:9190", key="xyz", session_timeout=0), "tracker", "tracker [::1]:9190 key=xyz"),
    ],
)
def test_validate__good_spec(spec: DeviceSpec, kind: str, description: str) -> None:
    spec.validate()
    assert spec.kind == kind
    assert spec.describe() == description


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        (DeviceSpec(), 360.0),
        (DeviceSpec(call_timeout=10), 70.0),
        (DeviceSpec(call_timeout=10, session_timeout=5), 5.0),
        (DeviceSpec(session_timeout=0), 0.0),
    ],
)
def test_session_seconds__derived_from_call_timeout(spec: DeviceSpec, seconds: float) -> None:
    spec.validate()
    assert spec.session_seconds == seconds


def test_tracker_address__ipv6_brackets() -> None:
    assert DeviceSpec(tracker="[::1]:9190", key="k").tracker_address == ("::1", 9190)


def test_embedded_server__tracker_needs_key() -> None:
    with pytest.raises(UsageError):
        EmbeddedServer(tracker="127.0.0.1:9190")


def test_open_session__local_without_server() -> None:
    with pytest.raises(UsageError, match="No device given"):
        open_session(DeviceSpec())


# ------------------------------------------------------------------------------------- version rule


def _info(tvm_version: str | None, ffi: str | None = None) -> DeviceInfo:
    return DeviceInfo(tvm_version=tvm_version, tvm_ffi_version=ffi, address="10.0.0.7:9090")


def test_check_versions__equal() -> None:
    assert check_versions(_info("0.27.0.post1"), "0.27.0.post1") is None


@pytest.mark.parametrize(("theirs", "ours"), [("0.27.1", "0.27.0"), ("0.27.0", "0.27.0.post1"),
                                              ("0.27.0.post2", "0.27.0.post1"), ("0.27.0rc1", "0.27.0")])
def test_check_versions__patch_warns(theirs: str, ours: str) -> None:
    warning = check_versions(_info(theirs), ours)
    assert warning is not None and theirs in warning and ours in warning and "patch" in warning
    assert "10.0.0.7:9090" in warning


@pytest.mark.parametrize(("theirs", "ours"), [("0.26.0", "0.27.0.post1"), ("1.27.0", "0.27.0"), ("0.28", "0.27.0")])
def test_check_versions__minor_refused(theirs: str, ours: str) -> None:
    with pytest.raises(VersionSkew) as refused:
        check_versions(_info(theirs), ours, device="tracker 10.0.0.1:9190 key=rpi4")
    message = str(refused.value)
    assert theirs in message and ours in message and "--allow-version-skew" in message
    assert "tracker 10.0.0.1:9190 key=rpi4" in message
    assert (refused.value.device_version, refused.value.local_version) == (theirs, ours)
    assert refused.value.exit_code == 1


def test_check_versions__allow_skew_warns() -> None:
    warning = check_versions(_info("0.26.0"), "0.27.0.post1", allow_skew=True)
    assert warning is not None and "0.26.0" in warning and "0.27.0.post1" in warning
    assert "--allow-version-skew" in warning


def test_check_versions__unknown_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    """A stock rpc_server tells no version: nothing to check, no warning, a debug line only."""
    with caplog.at_level(logging.DEBUG, logger="pipeline.device.probe"):
        assert check_versions(_info(None), "0.27.0.post1") is None
        assert check_versions(_info(None), "0.27.0.post1", allow_skew=True) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


def test_check_versions__unparsable_and_ffi_warn() -> None:
    assert "cannot be compared" in check_versions(_info("git 1a2b3c"), "0.27.0.post1")
    from importlib import metadata

    ours_ffi = metadata.version("apache-tvm-ffi")
    warning = check_versions(_info("0.27.0.post1", ffi="0.1.9"), "0.27.0.post1")
    assert warning is not None and "0.1.9" in warning and ours_ffi in warning
    assert check_versions(_info("0.27.0.post1", ffi=ours_ffi), "0.27.0.post1") is None


def test_check_versions__default_is_our_installed_tvm() -> None:
    from importlib import metadata

    assert check_versions(_info(metadata.version("apache-tvm"))) is None


def test_device_arch__triple_first_then_machine() -> None:
    assert device_arch(DeviceInfo(triple="aarch64-unknown-linux-gnu", machine="aarch64")) == "aarch64"
    assert device_arch(DeviceInfo(machine="arm64")) == "aarch64"
    assert device_arch(DeviceInfo(machine="AMD64")) == "x86_64"
    assert device_arch(DeviceInfo(triple="arm-linux-gnueabihf", machine="aarch64")) == "arm"
    assert device_arch(DeviceInfo()) is None


def test_parse_device_info__untrusted_answer_stays_data() -> None:
    good = {"machine": "aarch64", "tvm": "0.27.0.post1", "hostname": "pi\x1b[31m" + "x" * 500, "cuda": "yes",
            "runtime_only": True, "bundle": ["not", "a", "string"], "extra": {"ignored": 1}}
    fields = parse_device_info(json.dumps(good))
    assert fields["machine"] == "aarch64" and fields["tvm"] == "0.27.0.post1"
    assert fields["hostname"].startswith("pi[31m") and len(fields["hostname"]) == 100
    assert fields["cuda"] is None and fields["runtime_only"] is True and fields["bundle"] is None
    assert parse_device_info("[1, 2]") is None and parse_device_info("not json") is None
    assert parse_device_info(json.dumps({"machine": "x" * (1 << 17)})) is None


def test_parse_answers__nesting_too_deep_for_the_parser_is_no_answer() -> None:
    """Every probe's answer is untrusted: JSON nested past the parser's recursion limit (well inside the size
    limit) is no answer, not a RecursionError out of the run."""
    deep = "[" * 20000 + "]" * 20000
    assert len(deep) < 1 << 16
    for parse in (parse_device_info, parse_file_info, parse_load, parse_memory):
        assert parse(deep) is None, parse.__name__
