"""gateway.net.proxy_protocol: the sans-IO PROXY protocol v1/v2 parser, builders and trust check."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net.proxy_protocol import (MAX_HEADER, V2_SIGNATURE, ProxyHeaderError, ProxyInfo,
                                    build_v1, build_v2, is_trusted, parse_proxy_header)

SIG = V2_SIGNATURE
V4 = (("192.0.2.1", 40000), ("198.51.100.2", 25))
V6 = (("2001:db8::1", 40000), ("2001:db8::2", 25))


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", n) + body


V4_BODY = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 40000, 25)
V6_BODY = (ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("2001:db8::2").packed
           + struct.pack("!HH", 40000, 25))


# --- valid headers ----------------------------------------------------------------------------

VALID = [
    ("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n",
     ProxyInfo(1, "PROXY", ("192.0.2.1", 40000), ("198.51.100.2", 25))),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n",
     ProxyInfo(1, "PROXY", ("2001:db8::1", 40000), ("2001:db8::2", 25))),
    ("v1-tcp6-normalised", b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:10.0.0.1 0 65535\r\n",
     ProxyInfo(1, "PROXY", ("2001:db8::1", 0), ("::ffff:a00:1", 65535))),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", ProxyInfo(1, "PROXY", None, None)),
    ("v1-unknown-with-rest", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
     ProxyInfo(1, "PROXY", None, None)),
    ("v1-max-length",
     b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
     b" 65535 65535\r\n",
     ProxyInfo(1, "PROXY", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
               ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))),
    ("v2-ipv4", v2(0x21, 0x11, V4_BODY), ProxyInfo(2, "PROXY", *V4)),
    ("v2-ipv6", v2(0x21, 0x21, V6_BODY), ProxyInfo(2, "PROXY", *V6)),
    ("v2-local", v2(0x20, 0x00, b""), ProxyInfo(2, "LOCAL", None, None)),
    ("v2-local-ignores-addresses", v2(0x20, 0x11, V4_BODY), ProxyInfo(2, "LOCAL", None, None)),
    ("v2-unspec", v2(0x21, 0x00, b""), ProxyInfo(2, "PROXY", None, None)),
    ("v2-unspec-with-bytes", v2(0x21, 0x00, b"\x04\x00\x00"), ProxyInfo(2, "PROXY", None, None)),
    ("v2-ipv4-tlv", v2(0x21, 0x11, V4_BODY + b"\x01\x00\x04smtp"), ProxyInfo(2, "PROXY", *V4)),
    ("v2-ipv6-tlv", v2(0x21, 0x21, V6_BODY + b"\x04\x00\x00"), ProxyInfo(2, "PROXY", *V6)),
    ("v2-max-size", v2(0x21, 0x11, V4_BODY + b"\x04" + struct.pack("!H", MAX_HEADER - 31)
                       + bytes(MAX_HEADER - 31)),
     ProxyInfo(2, "PROXY", *V4)),
]


@pytest.mark.parametrize("header,expected", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid(header, expected):
    assert parse_proxy_header(header) == (expected, len(header))


@pytest.mark.parametrize("header,expected", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_byte_at_a_time_and_trailing_bytes(header, expected):
    rest = b"EHLO client.example\r\n"
    data = header + rest
    for i in range(len(header)):
        assert parse_proxy_header(data[:i]) is None, i
    info, used = parse_proxy_header(data)
    assert info == expected and used == len(header) and data[used:] == rest
    # a bytearray / memoryview works the same
    assert parse_proxy_header(bytearray(data)) == (expected, len(header))
    assert parse_proxy_header(memoryview(data)) == (expected, len(header))


def test_v2_trailing_bytes_look_like_header():
    header = build_v2(*V4)
    data = header + header
    assert parse_proxy_header(data) == (ProxyInfo(2, "PROXY", *V4), len(header))


@pytest.mark.parametrize("prefix", [b"", b"P", b"PROX", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2",
                                    SIG[:1], SIG[:5], SIG, SIG + b"\x21", SIG + b"\x21\x11\x00"])
def test_prefixes_need_more(prefix):
    assert parse_proxy_header(prefix) is None


# --- malformed --------------------------------------------------------------------------------

MALFORMED = [
    # not a PROXY header at all: raise on the first bytes
    ("ehlo", b"EHLO"), ("ehlo-1", b"E"), ("http", b"GET / HTTP/1.1\r\n"), ("lower", b"proxy "),
    ("proxz", b"PROXZ"), ("no-space", b"PROXY\t"), ("cr-only", b"\r\n\r\n\x01"),
    ("tls", b"\x16\x03\x01"),
    # v1
    ("v1-too-long-no-crlf", b"PROXY " + b"x" * 200),
    ("v1-107-no-crlf", b"PROXY UNKNOWN " + b"x" * 93),
    ("v1-crlf-after-107", b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n"),
    ("v1-lf-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("v1-lf-only-partial", b"PROXY TCP4 1.2.3.4\n"),
    ("v1-cr-not-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
    ("v1-tcp5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-lowercase-proto", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-no-proto", b"PROXY \r\n"),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("v1-missing-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("v1-tcp4-v6-dst", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n"),
    ("v1-tcp4-v6-src", b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n"),
    ("v1-tcp6-v4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-bad-ip", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
    ("v1-ip-leading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
    ("v1-zone-id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("v1-non-ascii", b"PROXY TCP4 1.2.3.\xc3\xa9 5.6.7.8 1 2\r\n"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
    ("v1-port-00", b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n"),
    ("v1-port-too-big", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n"),
    ("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x19 2\r\n"),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n"),
    ("v1-port-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode()),
    # v2
    ("v2-bad-signature", SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12)),
    ("v2-bad-signature-early", b"\r\n\r\n\x01"),
    ("v2-version-1", v2(0x11, 0x11, V4_BODY)),
    ("v2-version-3", v2(0x31, 0x11, V4_BODY)),
    ("v2-version-0-partial", SIG + b"\x01"),
    ("v2-command-partial", SIG + b"\x23"),
    ("v2-udp-partial", SIG + b"\x21\x12"),
    ("v2-unix-partial", SIG + b"\x21\x31\x00"),
    ("v2-command-2", v2(0x22, 0x11, V4_BODY)),
    ("v2-command-f", v2(0x2F, 0x11, V4_BODY)),
    ("v2-udp4", v2(0x21, 0x12, V4_BODY)),
    ("v2-udp6", v2(0x21, 0x22, V6_BODY)),
    ("v2-unix-stream", v2(0x21, 0x31, bytes(216))),
    ("v2-unix-dgram", v2(0x21, 0x32, bytes(216))),
    ("v2-inet-unspec-transport", v2(0x21, 0x10, V4_BODY)),
    ("v2-family-4", v2(0x21, 0x41, V4_BODY)),
    ("v2-transport-3", v2(0x21, 0x13, V4_BODY)),
    ("v2-ipv4-short", v2(0x21, 0x11, V4_BODY[:4])),
    ("v2-ipv4-11", v2(0x21, 0x11, V4_BODY[:11])),
    ("v2-ipv6-short", v2(0x21, 0x21, V6_BODY[:12])),
    ("v2-ipv6-35", v2(0x21, 0x21, V6_BODY[:35])),
    ("v2-ipv6-len-only", SIG + b"\x21\x21\x00\x0c"),          # raises before the body arrives
    ("v2-too-long", SIG + b"\x21\x11\xff\xff"),               # raises before the body arrives
    ("v2-4097", SIG + b"\x21\x11" + struct.pack("!H", MAX_HEADER - 15)),
    ("v2-local-too-long", SIG + b"\x20\x00" + struct.pack("!H", MAX_HEADER)),
]


@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_raises(data):
    with pytest.raises(ProxyHeaderError) as exc:
        parse_proxy_header(data)
    assert str(exc.value)
    # more bytes never turn a malformed header into a valid one
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data + b"\r\n" + bytes(5000))


def test_error_messages_say_what():
    def msg(data):
        with pytest.raises(ProxyHeaderError) as exc:
            parse_proxy_header(data)
        return str(exc.value).lower()

    assert "port" in msg(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n")
    assert "address" in msg(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n")
    assert "crlf" in msg(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")
    assert "udp" in msg(v2(0x21, 0x12, V4_BODY)) or "tcp" in msg(v2(0x21, 0x12, V4_BODY))
    assert "unix" in msg(v2(0x21, 0x31, bytes(216)))
    assert "version" in msg(v2(0x11, 0x11, V4_BODY))
    assert "command" in msg(v2(0x22, 0x11, V4_BODY))
    assert "short" in msg(v2(0x21, 0x11, V4_BODY[:4]))
    assert "4096" in msg(SIG + b"\x21\x11\xff\xff")
    assert "signature" in msg(SIG[:11] + b"X")


# --- builders ---------------------------------------------------------------------------------

def test_builders():
    assert build_v1(*V4) == b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n"
    assert build_v1(*V6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n"
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert build_v2(*V4) == v2(0x21, 0x11, V4_BODY)
    assert build_v2(*V6) == v2(0x21, 0x21, V6_BODY)
    assert build_v2(*V4, command="LOCAL") == v2(0x20, 0x00, b"")
    assert build_v2(None, None) == v2(0x21, 0x00, b"")
    assert build_v2(*V4, tlvs=[(0x01, b"smtp")]) == v2(0x21, 0x11, V4_BODY + b"\x01\x00\x04smtp")
    with pytest.raises(ValueError):
        build_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        build_v2(("1.2.3.4", 70000), ("5.6.7.8", 2))
    with pytest.raises(ValueError):
        build_v2(*V4, command="HEALTH")


def test_build_v2_with_tlvs_parses():
    header = build_v2(*V6, tlvs=[(0x01, b"h2"), (0x02, b"mx.example"), (0x04, b"")])
    assert parse_proxy_header(header + b"QUIT\r\n") == (ProxyInfo(2, "PROXY", *V6), len(header))


ips = st.ip_addresses(v=4) | st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@settings(max_examples=300)
@given(st.data(), ips, ports, ports, st.booleans(), st.binary(max_size=40))
def test_round_trip(data, src_ip, sport, dport, use_v2, rest):
    dst_ip = data.draw(st.ip_addresses(v=src_ip.version))
    src, dst = (str(src_ip), sport), (str(dst_ip), dport)
    header = (build_v2 if use_v2 else build_v1)(src, dst)
    info, used = parse_proxy_header(header + rest)
    assert used == len(header)
    assert info == ProxyInfo(2 if use_v2 else 1, "PROXY", src, dst)
    assert ipaddress.ip_address(info.source[0]) == src_ip


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if result is not None:
        info, used = result
        assert 0 < used <= len(data) and info.version in (1, 2)


@given(st.binary(min_size=1, max_size=60))
def test_mutated_v2_never_crashes(tail):
    base = build_v2(*V6)
    data = base[:12] + tail
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    # a v2 signature, then whatever: incomplete (None), or a v2 header within what was read,
    # whose length field says how much it used
    if result is not None:
        info, used = result
        assert info.version == 2 and 16 <= used <= len(data)
        assert used == 16 + int.from_bytes(data[14:16], "big")


# --- trust ------------------------------------------------------------------------------------

NETS = ("127.0.0.1/32", "10.0.0.0/8", "::1/128")


@pytest.mark.parametrize("addr,expected", [
    ("127.0.0.1", True), ("127.0.0.2", False), ("10.0.0.1", True), ("10.255.255.255", True),
    ("11.0.0.1", False), ("::1", True), ("::2", False), ("192.0.2.1", False),
    ("::ffff:127.0.0.1", True), ("::ffff:10.1.2.3", True), ("::ffff:192.0.2.1", False),
    ("[::1]", True), ("garbage", False), ("", False), ("10.0.0.1.5", False),
])
def test_is_trusted(addr, expected):
    assert is_trusted(addr, NETS) is expected


def test_is_trusted_variants():
    assert is_trusted("fe80::1%eth0", ["fe80::/10"])
    assert is_trusted("2001:db8::5", ["2001:db8::/32"]) and not is_trusted("2001:db9::5",
                                                                            ["2001:db8::/32"])
    assert is_trusted("::ffff:10.0.0.1", ["::ffff:0:0/96"])      # a mapped network matches too
    assert is_trusted("10.1.2.3", iter(["10.0.0.0/8"]))          # any iterable
    assert is_trusted("10.1.2.3", "10.0.0.0/8")                  # a single string
    assert is_trusted("10.1.2.3", ["10.1.2.0/16"])                # host bits are tolerated
    assert not is_trusted("10.1.2.3", [])
    assert not is_trusted("10.1.2.3", ["::/0"]) and is_trusted("10.1.2.3", ["0.0.0.0/0"])
