"""A relayed IMAP session cut by a drain (SIGTERM, or a reload retiring the worker once
reload_grace has passed) gets `* BYE [UNAVAILABLE] Server shutting down` at a response
boundary, and nothing inside a response (SPEC §9, issue #14 item 8, issue #21 item 11)."""
from __future__ import annotations

import imaplib

import pytest
import trio

from gateway.proto.imap_boundary import ResponseBoundary
from fake_upstream import ImapUpstream, serving
from harness import client_context, in_thread, running_gateway
from test_imap_gateway import (T, dovecot, gateway_config,  # noqa: F401
                               imap_listener)

BYE = b"* BYE [UNAVAILABLE] Server shutting down\r\n"


@pytest.mark.parametrize("chunks,boundary", [
    ([b"* 1 EXISTS\r\n"], True),
    ([b"* 1 EXI"], False),
    ([b"* 1 FETCH (BODY[] {5}\r\n", b"ab"], False),
    ([b"* 1 FETCH (BODY[] {5}\r\n", b"abcde"], False),          # the line goes on
    ([b"* 1 FETCH (BODY[] {5}\r\nabcde)\r\n"], True),
    ([b"* 1 FETCH (BODY[] {5}\r\nab\r\n\r)\r\n"], True),         # CRLF inside the literal
    ([b"* 1 FETCH (BODY[] {", b"5}\r", b"\nabcde", b")\r\n"], True),
    ([b"* 1 FETCH (A {0}\r\n)\r\n"], True),
    ([b"* 1 FETCH (A {3}\r\n{9}\r\n"], True),        # literal bytes that look like one are not
    ([b"* 1 FETCH (A {3}\r\n{9})\r\n"], True),
    ([b"a OK " + b"x" * 100000 + b" {2}\r\n", b"zz\r\n"], True),
    ([b"* 1 X {99999999999999999999}\r\n"], False),             # lost track for good
])
def test_response_boundary(chunks, boundary):
    b = ResponseBoundary()
    for chunk in chunks:
        b.feed(chunk)
    assert b.at_boundary is boundary
    one = ResponseBoundary()                     # the same stream, a byte at a time
    for byte in b"".join(chunks):
        one.feed(bytes([byte]))
    assert one.at_boundary is boundary


def test_compress_means_never_again():
    b = ResponseBoundary()
    b.client_sent(b"c compress deflate\r\n")
    b.feed(b"c OK DEFLATE active\r\n")
    assert not b.at_boundary


@pytest.mark.parametrize("retire", [False, True], ids=["shutdown", "reload-retire"])
async def test_drain_says_bye_to_a_relayed_dovecot_session(dovecot, server_cert, retire):
    """A shutdown says BYE at once; a worker retired by a reload lets the session run for
    reload_grace (not shutdown_grace), then says BYE, logged and counted as a cut."""
    data = gateway_config(imap_listener("imap", dovecot.port), server_cert)
    data["gateway"]["shutdown_grace"] = 1
    data["gateway"]["reload_grace"] = 2
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imap"][1]
        ctx = client_context(server_cert.ca)
        logged_in = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def talk():
            c = imaplib.IMAP4("localhost", port, timeout=T)
            c.starttls(ssl_context=ctx)
            c.login(dovecot.user, dovecot.password)
            c.select("INBOX")
            trio.from_thread.run_sync(logged_in.set, trio_token=token)
            return c.readline()                 # what the gateway says when it drains

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                result = []

                async def client():
                    result.append(await in_thread(talk))
                nursery.start_soon(client)
                await logged_in.wait()
                start = trio.current_time()
                gw.stop_accepting(retire=retire)
            waited = trio.current_time() - start
    assert result == [BYE]
    assert (waited >= 2) is retire
    assert logs.of("reject", code="BYE", reason="shutting down")
    assert len(logs.of("reload_sessions_cut", reason="reload_grace", sessions=1)) == retire


async def test_drain_never_cuts_into_a_literal(server_cert):
    """The upstream stalls inside a literal: no BYE may be injected there; the session is
    closed without a word when shutdown_grace runs out."""
    async def stall_in_a_literal(fake, stream):
        await stream.send_all(fake.greeting)
        buf = b""
        while b"LOGIN" not in buf:
            buf += await stream.receive_some(4096)
        tag = buf.split(b" ", 1)[0]
        await stream.send_all(tag + b" OK done\r\n")
        while b"FETCH" not in buf:
            buf += await stream.receive_some(4096)
        await stream.send_all(b"* 1 FETCH (BODY[] {100}\r\n0123456789")
        await trio.sleep_forever()

    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n",
                        session=stall_in_a_literal)
    async with serving(fake) as up_port:
        data = gateway_config(imap_listener("imap", up_port, client_tls="optional",
                                            upstream_tls="none"), server_cert)
        data["gateway"]["shutdown_grace"] = 1
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["imap"][1]
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                got = b""
                for line in (b"a LOGIN alice secret\r\n", b"b FETCH 1 BODY[]\r\n"):
                    await stream.send_all(line)
                got = b""
                while b"0123456789" not in got:
                    got += await stream.receive_some(4096)
                gw.stop_accepting()
                try:
                    while chunk := await stream.receive_some(4096):
                        got += chunk
                except trio.BrokenResourceError:
                    pass
    assert got.endswith(b"0123456789")
    assert b"BYE [UNAVAILABLE]" not in got
