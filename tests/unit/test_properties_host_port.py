"""Properties of ``HOST:PORT`` (pipeline.device.spec.split_host_port): what --tracker and the fleet file give."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.device.spec import check_port, split_host_port
from pipeline.errors import UsageError

FAST = settings(max_examples=200, deadline=None, database=None)

LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?"
NAMES = st.from_regex(rf"{LABEL}(\.{LABEL}){{0,3}}", fullmatch=True)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(min_value=1, max_value=65535)


@FAST
@given(st.one_of(NAMES, IPV4), PORTS)
def test_split_host_port__round_trips_names_and_ipv4(host, port):
    assert split_host_port(f"{host}:{port}") == (host, port)
    assert split_host_port(f" {host} : {port} ") == (host, port)


@FAST
@given(IPV6, PORTS)
def test_split_host_port__round_trips_bracketed_ipv6(host, port):
    assert split_host_port(f"[{host}]:{port}") == (host, port)


@FAST
@given(st.one_of(NAMES, IPV4), st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_split_host_port__port_out_of_range_names_the_range(host, port):
    try:
        split_host_port(f"{host}:{port}")
    except UsageError as exc:
        assert "1 to 65535" in str(exc) or "not HOST:PORT" in str(exc)  # a minus sign is no digit
        assert len(str(exc)) < 600
    else:
        raise AssertionError("accepted")


def _junk() -> st.SearchStrategy[str]:
    pieces = st.one_of(st.text(max_size=20), st.sampled_from([":", "[", "]", "::1", "9190", "0", "65536", " ", "\t",
                                                             "١٢", "²", "localhost", "\0", "\U000e0001", "-1"]))
    return st.one_of(st.text(), st.lists(pieces, max_size=8).map("".join))


@FAST
@given(_junk())
@example("h:" + "9" * 5000)
@example("h:²")
@example("h:١٢٣")
@example("[::1:9190")
@example("a b:9190")
@example("x" * 10_000 + ":1")
def test_split_host_port__anything_else_is_a_usage_error_with_a_short_message(text):
    try:
        host, port = split_host_port(text)
    except UsageError as exc:
        assert len(str(exc)) < 2 * 10 * 200 + 300  # at most ~200 characters of the text, repr'd
        if text.isascii() and text.isprintable():
            assert len(str(exc)) < 600
    else:
        assert 1 <= port <= 65535 and host and host.isprintable() and not any(c.isspace() for c in host)
        assert split_host_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") == (host, port)


@FAST
@given(st.one_of(st.integers(), st.floats(), st.text(max_size=10), st.none(), st.booleans()))
@example(10**5000)
def test_check_port__only_1_to_65535(port):
    try:
        check_port(port, "--port")
    except UsageError as exc:
        assert len(str(exc)) < 200
    else:
        assert type(port) is int and 1 <= port <= 65535
