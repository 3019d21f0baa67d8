"""gateway.tls: profiles → contexts, certificates, and the TLSStream over real and fake wires."""
from __future__ import annotations

import functools
import os
import socket
import ssl
import stat
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509

from gateway.errors import TLSError
from gateway.tls import certs
from gateway.tls.context import client_context, server_context
from gateway.tls.profiles import PREDEFINED, Profile, clone, validate_profile
from gateway.tls.stream import TLSInfo, TLSStream

DEFAULT = PREDEFINED["default"]
TIMEOUT = 20


# --- helpers -----------------------------------------------------------------------------------

def profile(**kw) -> Profile:
    return clone(DEFAULT, "test", **kw)


@pytest.fixture
def server_ctx(server_cert):
    return server_context(DEFAULT, str(server_cert.cert), str(server_cert.key))


@pytest.fixture
def verify_profile(server_cert):
    return profile(ca_file=str(server_cert.ca))


@asynccontextmanager
async def tcp_pair():
    """A connected (server_side, client_side) pair of trio SocketStreams on loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
        async with server, client:
            yield server, client
    finally:
        for listener in listeners:
            await listener.aclose()


async def handshake_both(server: TLSStream, client: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)


async def exchange(a: TLSStream, b: TLSStream, payload: bytes) -> None:
    """a → b and b → a with *payload*, both directions at the same time."""
    received = {}

    async def pump(src: TLSStream, dst: TLSStream, key: str):
        async def sender():
            view = memoryview(payload)
            while view:              # several send_all calls, uneven sizes
                await src.send_all(view[:100_003])
                view = view[100_003:]

        async def receiver():
            got = bytearray()
            while len(got) < len(payload):
                chunk = await dst.receive_some(65536)
                assert chunk, "unexpected end of stream"
                got += chunk
            received[key] = bytes(got)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, "a->b")
        nursery.start_soon(pump, b, a, "b->a")
    assert received["a->b"] == payload and received["b->a"] == payload


def pair(transport_pair, server_ctx, client_ctx, **client_kw):
    s, c = transport_pair
    return (TLSStream(s, server_ctx, server_side=True),
            TLSStream(c, client_ctx, server_side=False, **client_kw))


# --- handshake and data ------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_handshake_and_concurrent_megabyte_each_way(server_ctx, version):
    ctx = client_context(profile(min_version=version, max_version=version))
    payload = os.urandom(1 << 20)
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as wire:
            server, client = pair(wire, server_ctx, ctx, server_hostname="mx.test")
            await handshake_both(server, client)
            for side in (server, client):
                assert isinstance(side.info, TLSInfo)
                assert side.info.version == version
                assert side.info.bits >= 128 and side.info.cipher
            assert client.info.peer_subject and client.info.peer_cert_present
            assert not client.info.verified       # verification not asked for
            assert server.info.peer_subject is None and not server.info.peer_cert_present
            await exchange(server, client, payload)
            await client.aclose()
            assert await server.receive_some() == b""
            assert not server.unclean_eof
            assert await server.receive_some() == b""   # stays at EOF
            await server.aclose()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("make_pair", [trio.testing.memory_stream_pair,
                                       trio.testing.lockstep_stream_pair])
async def test_in_memory_wires_do_not_deadlock(server_ctx, version, make_pair):
    """The lockstep pair has no buffering at all: any ordering mistake hangs here."""
    ctx = client_context(profile(min_version=version, max_version=version))
    with trio.fail_after(TIMEOUT):
        server, client = pair(make_pair(), server_ctx, ctx)
        # No explicit handshake: the first send/receive runs it on each side.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"x" * 50_000)
            got = bytearray()
            while len(got) < 50_000:
                got += await server.receive_some()
        await exchange(server, client, os.urandom(200_000))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some(10) == b""
        await server.aclose()


async def test_client_only_sends_after_tls13_handshake(server_ctx):
    """The server's TLS 1.3 session tickets must not block a client that never reads."""
    ctx = client_context(profile(min_version="TLSv1.3"))
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.lockstep_stream_pair(), server_ctx, ctx)
        await handshake_both(server, client)

        async def server_reads():
            got = bytearray()
            while len(got) < 30_000:
                got += await server.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_reads)
            await client.send_all(b"y" * 30_000)
        # The held-back tickets go out in front of the server's next data.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"reply")
            assert await client.receive_some() == b"reply"


async def test_do_handshake_is_idempotent_and_shared(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(server.do_handshake)      # waits for the first
            nursery.start_soon(client.do_handshake)
        info = client.info
        await client.do_handshake()
        assert client.info is info


async def test_info_before_handshake_is_an_error(server_ctx):
    server, _ = pair(trio.testing.memory_stream_pair(), server_ctx, client_context(DEFAULT))
    with pytest.raises(RuntimeError):
        server.info


async def test_concurrent_same_direction_is_busy(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.lockstep_stream_pair(), server_ctx,
                              client_context(DEFAULT))
        await handshake_both(server, client)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            # A send from another task while a receive is pending is fine.
            async with trio.open_nursery() as inner:
                inner.start_soon(client.send_all, b"ok")
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"z" * 100_000)   # blocks: nobody reads
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.send_all(b"more")
            nursery.cancel_scope.cancel()


async def test_unclean_eof_after_handshake(server_ctx):
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as (s, c):
            server, client = pair((s, c), server_ctx, client_context(DEFAULT))
            await handshake_both(server, client)
            await client.send_all(b"last words")
            await c.aclose()                  # transport gone, no close_notify
            got = b""
            while True:
                chunk = await server.receive_some()
                if not chunk:
                    break
                got += chunk
            assert got == b"last words"
            assert server.unclean_eof
            assert await server.receive_some() == b""      # stays at EOF
            await server.aclose()


async def test_aclose_semantics(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT))
        await handshake_both(server, client)
        await client.aclose()
        await client.aclose()                  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        assert await server.receive_some() == b""
        # Closing a stream that never did a handshake just closes the transport.
        s, c = trio.testing.memory_stream_pair()
        fresh = TLSStream(s, server_ctx, server_side=True)
        await fresh.aclose()
        assert await c.receive_some() == b""


class TrickleStream(trio.abc.Stream):
    """Hands the reader at most one byte per receive: every TLS record arrives in pieces."""

    def __init__(self, inner):
        self.inner = inner

    async def send_all(self, data):
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(1)

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_one_byte_at_a_time(server_ctx, version):
    s, c = trio.testing.memory_stream_pair()
    ctx = client_context(profile(min_version=version, max_version=version))
    with trio.fail_after(TIMEOUT):
        server, client = pair((TrickleStream(s), TrickleStream(c)), server_ctx, ctx)
        await handshake_both(server, client)
        await exchange(server, client, os.urandom(5000))


async def test_cancelled_receive_leaves_the_stream_usable(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT))
        await handshake_both(server, client)
        with trio.move_on_after(0.05) as scope:
            await server.receive_some()
        assert scope.cancelled_caught
        await client.send_all(b"after the timeout")
        assert await server.receive_some() == b"after the timeout"


async def test_verify_hostname_without_verifying_context_is_not_verified(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT), server_hostname="mx.test",
                              verify_hostname=True)
        await handshake_both(server, client)
        assert not client.info.verified and "not enabled" in client.info.verify_error


# --- handshake failures ------------------------------------------------------------------------

async def test_plaintext_peer_gets_tls_error_with_reason(server_ctx):
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as (s, c):
            server = TLSStream(s, server_ctx, server_side=True)
            await c.send_all(b"EHLO client.test\r\nMAIL FROM:<a@b>\r\n")
            with pytest.raises(TLSError) as info:
                await server.do_handshake()
            assert info.value.reason and "version" in info.value.reason
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()
            await server.aclose()


async def test_peer_closing_during_handshake(server_ctx):
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as (s, c):
            server = TLSStream(s, server_ctx, server_side=True)
            await c.aclose()
            with pytest.raises(TLSError, match="connection closed during handshake"):
                await server.do_handshake()


async def test_second_waiter_sees_the_handshake_failure(server_ctx):
    with trio.fail_after(TIMEOUT):
        s, c = trio.testing.memory_stream_pair()
        server = TLSStream(s, server_ctx, server_side=True)
        errors = []

        async def attempt():
            try:
                await server.do_handshake()
            except TLSError as exc:
                errors.append(exc.reason)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt)
            nursery.start_soon(attempt)
            await trio.testing.wait_all_tasks_blocked()
            await c.send_all(b"GET / HTTP/1.0\r\n\r\n")
        assert len(errors) == 2 and errors[0] == errors[1] and errors[0]


# --- verification ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mx.test", "localhost", "127.0.0.1"])
async def test_client_verifies_chain_and_name(server_ctx, verify_profile, name):
    ctx = client_context(verify_profile, verify=True)
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as wire:
            server, client = pair(wire, server_ctx, ctx, server_hostname=name,
                                  verify_hostname=True)
            await handshake_both(server, client)
            assert client.info.verified, client.info.verify_error
            assert client.info.verify_error is None
            # SNI is sent for names, never for an IP literal.
            expected_sni = None if name == "127.0.0.1" else name.encode()
            assert server._conn.get_servername() == expected_sni


async def test_client_wrong_name_is_not_verified(server_ctx, verify_profile):
    ctx = client_context(verify_profile, verify=True)
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as wire:
            server, client = pair(wire, server_ctx, ctx, server_hostname="other.test",
                                  verify_hostname=True)
            await handshake_both(server, client)      # the handshake itself succeeds
            assert not client.info.verified
            assert "other.test" in client.info.verify_error
            await exchange(server, client, b"still usable")


async def test_client_unknown_ca_is_not_verified(server_ctx, tmp_path):
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    ctx = client_context(profile(ca_file=str(tmp_path / "other-ca.pem")), verify=True)
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx, ctx,
                              server_hostname="mx.test", verify_hostname=True)
        await handshake_both(server, client)
        assert not client.info.verified
        # OpenSSL's verify result (the last error of the chain check, as `openssl s_client`
        # reports it): the leaf's issuer is unknown, so the first certificate cannot be verified
        assert client.info.verify_error == "unable to verify the first certificate"


async def test_client_without_verify_reports_unverified(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT), server_hostname="mx.test")
        await handshake_both(server, client)
        assert not client.info.verified and client.info.peer_cert_present


def test_verify_hostname_needs_a_name(server_ctx):
    s, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError):
        TLSStream(s, client_context(DEFAULT), server_side=False, verify_hostname=True)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("present", ["trusted", "none", "untrusted"])
async def test_server_requests_client_certificate(server_cert, client_cert, tmp_path,
                                                  version, present):
    sctx = server_context(profile(ca_file=str(server_cert.ca)), str(server_cert.cert),
                          str(server_cert.key), request_client_cert=True)
    if present == "trusted":
        cctx = client_context(profile(max_version=version), cert_path=str(client_cert.cert),
                              key_path=str(client_cert.key))
    elif present == "untrusted":
        rogue = trustme.CA().issue_cert("client.test")
        rogue.cert_chain_pems[0].write_to_path(str(tmp_path / "rogue.crt"))
        rogue.private_key_pem.write_to_path(str(tmp_path / "rogue.key"))
        cctx = client_context(profile(max_version=version), cert_path=str(tmp_path / "rogue.crt"),
                              key_path=str(tmp_path / "rogue.key"))
    else:
        cctx = client_context(profile(max_version=version))
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as wire:
            server, client = pair(wire, sctx, cctx)
            await handshake_both(server, client)       # never a TLS alert
            info = server.info
            assert info.version == version
            if present == "trusted":
                assert info.verified and info.verify_error is None
                assert info.peer_subject and info.peer_cert_present
            elif present == "none":
                assert not info.verified and not info.peer_cert_present
                assert info.verify_error == "no client certificate"
            else:
                assert not info.verified and info.peer_cert_present
                assert info.verify_error
            await exchange(server, client, b"hello")


def test_client_cert_request_needs_a_ca(server_cert):
    with pytest.raises(ValueError, match="ca_file or ca_path"):
        server_context(DEFAULT, str(server_cert.cert), str(server_cert.key),
                       request_client_cert=True)


# --- interop with Python's ssl (system OpenSSL) ------------------------------------------------

def stdlib_client(port: int, ca: str, *, maximum=None, minimum=None) -> tuple[str, bytes]:
    ctx = ssl.create_default_context(cafile=ca)
    if maximum:
        ctx.maximum_version = maximum
    if minimum:
        ctx.minimum_version = minimum
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"ping")
            data = b""
            while len(data) < 4:
                chunk = tls.recv(100)
                if not chunk:
                    break
                data += chunk
            version = tls.version()
            tls.unwrap()
            return version, data


async def serve_one(ctx, result=None, *, task_status=trio.TASK_STATUS_IGNORED):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    transport = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    server = TLSStream(transport, ctx, server_side=True)
    try:
        data = await server.receive_some()
        await server.send_all(data.upper())
        if result is not None:
            result["info"] = server.info
        assert await server.receive_some() == b""
        if result is not None:
            result["unclean"] = server.unclean_eof
    finally:
        await server.aclose()


async def test_stdlib_client_against_tlsstream_server(server_ctx, server_cert):
    result = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_one, server_ctx, result)
            version, data = await trio.to_thread.run_sync(stdlib_client, port,
                                                          str(server_cert.ca))
    assert data == b"PING"
    assert version == result["info"].version
    assert result["unclean"] is False                      # stdlib sent close_notify


async def test_tlsstream_client_against_trio_sslstream_server(server_cert, verify_profile):
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(server_cert.cert), str(server_cert.key))

    async def handler(transport):
        stream = trio.SSLStream(transport, sctx, server_side=True)
        data = await stream.receive_some()
        await stream.send_all(data[::-1])
        await stream.aclose()

    cctx = client_context(verify_profile, verify=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                               host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            client = TLSStream(transport, cctx, server_side=False, server_hostname="mx.test",
                               verify_hostname=True)
            await client.send_all(b"abc")
            assert await client.receive_some() == b"cba"
            assert client.info.verified
            assert await client.receive_some() == b""
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_tlsstream_client_against_stdlib_thread_server(server_cert, verify_profile):
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(str(server_cert.cert), str(server_cert.key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        with listener:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with sctx.wrap_socket(conn, server_side=True) as tls:
                data = tls.recv(100)
                tls.sendall(b"<" + data + b">")
                return tls.version()

    cctx = client_context(verify_profile, verify=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            versions = []

            async def run_server():
                versions.append(await trio.to_thread.run_sync(serve))

            nursery.start_soon(run_server)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            client = TLSStream(transport, cctx, server_side=False, server_hostname="localhost",
                               verify_hostname=True)
            await client.send_all(b"hi")
            got = b""
            while len(got) < 4:
                chunk = await client.receive_some()
                assert chunk
                got += chunk
            assert got == b"<hi>"
            assert client.info.verified
            await client.aclose()
    assert versions == [client.info.version]


# --- profiles ----------------------------------------------------------------------------------

def offered(ctx) -> list[str]:
    """The suites a context offers, as OpenSSL lists them (TLS 1.3 first)."""
    from OpenSSL import SSL
    return SSL.Connection(ctx, None).get_cipher_list()


@pytest.mark.parametrize("name", sorted(PREDEFINED))
def test_predefined_profiles_build(name, server_cert):
    from OpenSSL import SSL

    from gateway.tls.grades import expand
    prof = PREDEFINED[name]
    validate_profile(prof)
    server = server_context(prof, str(server_cert.cert), str(server_cert.key))
    asking = server_context(clone(prof, "with-ca", ca_file=str(server_cert.ca)),
                            str(server_cert.cert), str(server_cert.key),
                            request_client_cert=True)
    client = client_context(prof)
    verifying = client_context(prof, verify=True)
    # each context offers the profile's suites, in its order: TLS 1.3, then its TLS 1.2 list
    suites = prof.ciphersuites.split(":") + list(expand(prof.ciphers))
    for ctx in (server, asking, client, verifying):
        assert offered(ctx) == suites, name
    assert server.get_verify_mode() == client.get_verify_mode() == SSL.VERIFY_NONE
    assert asking.get_verify_mode() & SSL.VERIFY_PEER
    assert verifying.get_verify_mode() == SSL.VERIFY_PEER


def test_default_profile_groups_are_the_mozilla_ones():
    assert DEFAULT.groups == "X25519MLKEM768:X25519:prime256v1:secp384r1"
    assert (DEFAULT.min_version, DEFAULT.max_version) == ("TLSv1.2", "TLSv1.3")
    assert PREDEFINED["strict"].min_version == "TLSv1.3"
    assert PREDEFINED["compatible"].min_version == "TLSv1"
    assert "@SECLEVEL=0" in PREDEFINED["compatible"].ciphers


async def test_default_profile_negotiates_the_hybrid_group(server_ctx):
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), server_ctx,
                              client_context(DEFAULT))
        await handshake_both(server, client)
        assert server._conn.get_group_name() == "X25519MLKEM768"


async def test_compatible_allows_tls12_only_peer(server_cert):
    ctx = server_context(PREDEFINED["compatible"], str(server_cert.cert), str(server_cert.key))
    result = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_one, ctx, result)
            version, data = await trio.to_thread.run_sync(
                lambda: stdlib_client(port, str(server_cert.ca),
                                      maximum=ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2" and data == b"PING"


async def test_compatible_allows_tls10_between_gateways(server_cert):
    compatible = PREDEFINED["compatible"]
    sctx = server_context(compatible, str(server_cert.cert), str(server_cert.key))
    cctx = client_context(clone(compatible, "legacy", max_version="TLSv1"))
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), sctx, cctx)
        await handshake_both(server, client)
        assert server.info.version == "TLSv1"
        await exchange(server, client, b"old but working")


async def test_strict_refuses_tls12_only_peer(server_cert):
    ctx = server_context(PREDEFINED["strict"], str(server_cert.cert), str(server_cert.key))
    with trio.fail_after(TIMEOUT):
        async with tcp_pair() as (s, c):
            server = TLSStream(s, ctx, server_side=True)
            client_ssl = ssl.create_default_context(cafile=str(server_cert.ca))
            client_ssl.maximum_version = ssl.TLSVersion.TLSv1_2
            client = trio.SSLStream(c, client_ssl, server_hostname="mx.test")
            async with trio.open_nursery() as nursery:
                async def client_side():
                    with pytest.raises(trio.BrokenResourceError):
                        await client.do_handshake()
                nursery.start_soon(client_side)
                with pytest.raises(TLSError) as info:
                    await server.do_handshake()
            assert "protocol" in info.value.reason     # "unsupported protocol"


async def test_strict_client_refuses_tls12_only_server(server_cert):
    sctx = server_context(profile(max_version="TLSv1.2"), str(server_cert.cert),
                          str(server_cert.key))
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), sctx,
                              client_context(PREDEFINED["strict"]))
        reasons = []

        async def attempt(stream):
            with pytest.raises(TLSError) as info:
                await stream.do_handshake()
            reasons.append(info.value.reason)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, server)
            nursery.start_soon(attempt, client)
        assert any("protocol" in r for r in reasons), reasons


def test_bad_groups_raise_value_error():
    with pytest.raises(ValueError, match="X25519:bogus"):
        client_context(profile(groups="X25519:bogus"))
    with pytest.raises(ValueError, match="groups"):
        client_context(profile(groups=""))


def test_bad_ciphers_and_suites_raise_value_error(server_cert):
    with pytest.raises(ValueError, match="NOT-A-CIPHER"):
        server_context(profile(ciphers="NOT-A-CIPHER"), str(server_cert.cert),
                       str(server_cert.key))
    with pytest.raises(ValueError, match="ciphersuites"):
        client_context(profile(ciphersuites="TLS_NOPE"))


def test_cipher_strength_grades_build(server_cert):
    """A grade builds into contexts that offer the graded list: the operator's MEDIUM suite
    (CCM8) only at `medium`; Mozilla's intermediate list (all HIGH) unchanged at either."""
    from gateway.tls.grades import expand
    tls13 = DEFAULT.ciphersuites.split(":")
    own = clone(DEFAULT, "own", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-CCM8:"
                                        "AES256-SHA:@SECLEVEL=0")
    expect = {"medium": ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM8",
                         "AES256-SHA"],
              "high": ["ECDHE-ECDSA-AES128-GCM-SHA256", "AES256-SHA"]}
    for strength in ("medium", "high"):
        graded = clone(own, strength, cipher_strength=strength)
        server = server_context(graded, str(server_cert.cert), str(server_cert.key))
        assert offered(client_context(graded)) == offered(server) == tls13 + expect[strength]
        default = clone(DEFAULT, strength, cipher_strength=strength)
        assert offered(client_context(default)) == tls13 + list(expand(DEFAULT.ciphers))


@pytest.mark.parametrize("overrides, message", [
    ({"min_version": "SSLv3"}, "never enabled"),
    ({"max_version": "TLSv1.4"}, "max_version"),
    ({"min_version": "TLSv1.3", "max_version": "TLSv1.2"}, "above"),
    ({"verify_depth": -1}, "verify_depth"),
    ({"groups": "   "}, "groups"),
])
def test_validate_profile_rejects(overrides, message):
    bad = Profile(name="bad", **overrides)
    with pytest.raises(ValueError, match=message):
        validate_profile(bad)
    with pytest.raises(ValueError):
        client_context(bad)


# --- certificates ------------------------------------------------------------------------------

def test_demo_certificate_contents():
    cert_pem, key_pem = certs.demo_certificate("mx.example")
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.issuer == cert.subject
    assert b"PRIVATE KEY" in key_pem


async def test_demo_certificate_files_load_and_verify_own_name(tmp_path):
    cert_path, key_path = certs.write_demo_certificate(tmp_path, "gw.example")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    chain, key = certs.load_pem_files(cert_path, key_path)
    assert len(chain) == 1 and key is not None
    sctx = server_context(DEFAULT, cert_path, key_path)
    cctx = client_context(profile(ca_file=str(cert_path)), verify=True)
    for name, ok in (("gw.example", True), ("localhost", True), ("127.0.0.1", True),
                     ("elsewhere.example", False)):
        with trio.fail_after(TIMEOUT):
            server, client = pair(trio.testing.memory_stream_pair(), sctx, cctx,
                                  server_hostname=name, verify_hostname=True)
            await handshake_both(server, client)
            assert client.info.verified is ok, (name, client.info.verify_error)


async def test_demo_certificate_from_memory(tmp_path):
    cert_pem, key_pem = certs.demo_certificate("mem.example")
    sctx = server_context(DEFAULT, cert_pem=cert_pem, key_pem=key_pem)
    with trio.fail_after(TIMEOUT):
        server, client = pair(trio.testing.memory_stream_pair(), sctx, client_context(DEFAULT))
        await handshake_both(server, client)
        assert "mem.example" in client.info.peer_subject


def test_write_demo_certificate_tightens_existing_key_mode(tmp_path):
    key = tmp_path / "demo.key"
    key.write_text("old")
    os.chmod(key, 0o644)
    _, key_path = certs.write_demo_certificate(tmp_path, "h.example")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_load_pem_files_errors(tmp_path, server_cert, client_cert):
    with pytest.raises(ValueError, match="cannot read certificate file"):
        certs.load_pem_files(tmp_path / "missing.crt", server_cert.key)
    with pytest.raises(ValueError, match="cannot read key file"):
        certs.load_pem_files(server_cert.cert, tmp_path / "missing.key")
    with pytest.raises(ValueError, match="does not match"):
        certs.load_pem_files(server_cert.cert, client_cert.key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        certs.load_pem_files(junk, server_cert.key)
    with pytest.raises(ValueError, match="private key"):
        certs.load_pem_files(server_cert.cert, junk)
    with pytest.raises(ValueError, match="does not match"):
        server_context(DEFAULT, server_cert.cert, client_cert.key)
    with pytest.raises(ValueError, match="certificate"):
        server_context(DEFAULT)


def test_chain_file_with_intermediate(tmp_path):
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("chain.test")
    chain_path = tmp_path / "chain.pem"
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(chain_path), append=i > 0)
    leaf.private_key_pem.write_to_path(str(tmp_path / "chain.key"))
    chain, _ = certs.load_pem_files(chain_path, tmp_path / "chain.key")
    assert len(chain) == 2
    server_context(DEFAULT, chain_path, tmp_path / "chain.key")
