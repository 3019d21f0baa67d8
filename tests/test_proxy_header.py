"""The sans-IO PROXY protocol parser, fed bytes directly."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.net.proxy_protocol import (ProxyHeaderError, ProxyInfo, build_v1, build_v2,
                                    is_trusted, parse_proxy_header)

V4 = (("192.0.2.1", 40000), ("198.51.100.2", 25))
V6 = (("2001:db8::1", 40000), ("2001:db8::2", 25))


@pytest.mark.parametrize("build", [build_v1, build_v2])
@pytest.mark.parametrize("addrs", [V4, V6])
def test_valid_headers_byte_at_a_time(build, addrs):
    header = build(*addrs)
    data = header + b"EHLO x\r\n"
    for i in range(len(header)):
        assert parse_proxy_header(data[:i]) is None
    info, used = parse_proxy_header(data)
    assert used == len(header) and data[used:] == b"EHLO x\r\n"
    assert (info.source, info.dest) == addrs
    assert info.version == (1 if build is build_v1 else 2)


def test_unknown_and_local():
    assert parse_proxy_header(b"PROXY UNKNOWN\r\nx") == (ProxyInfo(1, "PROXY", None, None), 15)
    info, used = parse_proxy_header(build_v2(*V4, command="LOCAL"))
    assert info.command == "LOCAL" and info.source is None and used == 16


@pytest.mark.parametrize("data", [
    b"EHLO x\r\n", b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY " + b"x" * 200,
    b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12),      # version 1 in a v2 header
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12),      # UDP
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),       # address block too short
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",                  # longer than 4096
])
def test_malformed_headers_raise(data):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


@given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(0, 65535),
       st.integers(0, 65535), st.booleans())
def test_round_trip(ip, sport, dport, v2):
    dst = "127.0.0.1" if ip.version == 4 else "::1"
    header = (build_v2 if v2 else build_v1)((str(ip), sport), (dst, dport))
    info, used = parse_proxy_header(header)
    assert used == len(header)
    assert ipaddress.ip_address(info.source[0]) == ip and info.source[1] == sport
    assert info.dest[1] == dport


def test_is_trusted():
    nets = ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert is_trusted("10.1.2.3", nets) and is_trusted("::1", nets)
    assert is_trusted("::ffff:127.0.0.1", nets)
    assert not is_trusted("192.0.2.1", nets) and not is_trusted("garbage", nets)
