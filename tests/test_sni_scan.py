"""The SNI scanner (SPEC §3.3, §3.4): the server name read from the ClientHello bytes before a
TLS connection is built. The native function and its pure-Python twin, against real
ClientHellos (pyOpenSSL and the stdlib's), every prefix, any record fragmentation, and each
other on generated input."""
from __future__ import annotations

import os
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from gateway.native import scanner, scanner_py

REQUIRE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"
NATIVE = scanner.native_backend
needs_native = pytest.mark.skipif(NATIVE is None and not REQUIRE, reason="native core not built")
BACKENDS = [pytest.param(scanner_py, id="python"),
            pytest.param(NATIVE, id="native", marks=needs_native)]
MORE, NONE = scanner_py.SNI_MORE, scanner_py.SNI_NONE


def openssl_hello(name: str | None, *, max_version=SSL.TLS1_3_VERSION) -> bytes:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(max_version)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if name is not None:
        conn.set_tlsext_host_name(name.encode())
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(1 << 17)


def stdlib_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, sizes) -> bytes:
    """The same handshake bytes in records of the given payload sizes (the last takes the
    rest)."""
    payload, out, pos = b"", [], 0
    while pos < len(hello):                  # the handshake bytes of every record
        length = int.from_bytes(hello[pos + 3:pos + 5], "big")
        payload += hello[pos + 5:pos + 5 + length]
        pos += 5 + length
    for size in sizes:
        if not payload:
            break
        size = max(1, size)
        piece, payload = payload[:size], payload[size:]
        out.append(b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece)
    if payload:
        out.append(b"\x16\x03\x01" + len(payload).to_bytes(2, "big") + payload)
    return b"".join(out)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("make", [openssl_hello, stdlib_hello])
def test_real_client_hellos(b, make):
    hello = make("mail.example.org")
    assert b.server_name(hello) == (16, b"mail.example.org")
    assert b.server_name(hello + b"\x17\x03\x03 anything after") == (16, b"mail.example.org")
    assert b.server_name(bytearray(hello)) == (16, b"mail.example.org")
    assert b.server_name(memoryview(hello)) == (16, b"mail.example.org")
    assert b.server_name(make(None)) == (NONE, b"")


@pytest.mark.parametrize("b", BACKENDS)
def test_every_prefix_asks_for_more_until_the_name_is_read(b):
    hello = openssl_hello("mx.example.com")
    end = hello.index(b"mx.example.com") + len("mx.example.com")
    for cut in range(end):
        assert b.server_name(hello[:cut]) == (MORE, b""), cut
    for cut in (end, end + 1, len(hello)):
        assert b.server_name(hello[:cut]) == (14, b"mx.example.com")


@pytest.mark.parametrize("b", BACKENDS)
def test_without_sni_every_prefix_is_more_until_the_extensions_end(b):
    hello = openssl_hello(None)
    assert b.server_name(hello) == (NONE, b"")
    assert b.server_name(hello[:-1]) == (MORE, b"")


@pytest.mark.parametrize("b", BACKENDS)
def test_tls12_hello_and_fragmented_records(b):
    hello = openssl_hello("a.example", max_version=SSL.TLS1_2_VERSION)
    assert b.server_name(hello) == (9, b"a.example")
    for sizes in ([1] * 2000, [7, 3, 100], [40, 40], [4]):
        again = refragment(hello, sizes)
        assert again != hello
        assert b.server_name(again) == (9, b"a.example"), sizes


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("data", [
    b"", b"EHLO client.example\r\n", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x40\x01" + b"\x01",
    b"\x15\x03\x03\x00\x02\x02\x28", b"\x16\x02\x00\x00\x05\x01\x00\x00\x01\x00",
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",                  # a ServerHello
    b"\x16\x03\x01\x00\x04\x01\x01\x00\x01",                  # a ClientHello over 64 KiB
])
def test_not_a_client_hello(b, data):
    status, name = b.server_name(data)
    assert name == b"" and status == (MORE if data == b"" else NONE)


@pytest.mark.parametrize("b", BACKENDS)
def test_a_name_longer_than_cap_is_none(b):
    long = ".".join(["a" * 60] * 4)              # 243 characters
    hello = openssl_hello(long)
    assert b.server_name(hello) == (243, long.encode())
    assert b.server_name(hello, 242) == (NONE, b"")
    assert b.server_name(hello, 243) == (243, long.encode())
    with pytest.raises(ValueError):
        b.server_name(hello, -1)
    with pytest.raises(TypeError):
        b.server_name("text")


def test_the_facade_exports_the_active_backend():
    assert scanner.server_name(openssl_hello("x.test")) == (6, b"x.test")
    assert (scanner.SNI_MORE, scanner.SNI_NONE) == (MORE, NONE)


# --- native and python on generated input --------------------------------------------------

HELLOS = [openssl_hello("mx.example.com"), openssl_hello(None),
          openssl_hello("b.test", max_version=SSL.TLS1_2_VERSION)]


@st.composite
def mutated_hellos(draw):
    """A real ClientHello, refragmented, then with a few bytes changed, cut or inserted."""
    data = bytearray(draw(st.sampled_from(HELLOS)))
    if draw(st.booleans()):
        data = bytearray(refragment(bytes(data),
                                    draw(st.lists(st.integers(1, 300), max_size=8))))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["set", "cut", "insert"]))
        byte = draw(st.sampled_from([0, 1, 2, 3, 0x16, 0x20, 0x40, 0xFF]))
        if how == "set":
            data[pos] = byte
        elif how == "cut":
            del data[pos:pos + draw(st.integers(1, 40))]
        else:
            data.insert(pos, byte)
        if not data:
            break
    return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@needs_native
@settings(max_examples=1500, deadline=None)
@given(data=st.one_of(mutated_hellos(), st.binary(max_size=200),
                      st.binary(max_size=60).map(lambda b: b"\x16\x03\x01" + b)),
       cap=st.sampled_from([0, 3, 14, 255]))
def test_native_and_python_agree(data, cap):
    expect = scanner_py.server_name(data, cap)
    assert NATIVE.server_name(data, cap) == expect
    status, name = expect
    assert status in (MORE, NONE) or (status == len(name) and 1 <= status <= cap)
