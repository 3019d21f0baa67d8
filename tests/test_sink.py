"""The test sink (gateway.sink) driven by stdlib smtplib and raw sockets."""
from __future__ import annotations

import os
import smtplib
import socket
import ssl

import trio

from gateway.sink import Sink, SinkMessage, main_sink  # noqa: F401

BODY = b"Subject: hi\r\n\r\nhello\r\n"


class running:
    """`async with running(**kw) as sink`: a Sink served on a free loopback port."""

    def __init__(self, **kw):
        self.sink = Sink(**kw)

    async def __aenter__(self):
        self._cm = trio.open_nursery()
        self.nursery = await self._cm.__aenter__()
        self.sink.port = await self.nursery.start(self.sink.serve, "127.0.0.1", 0)
        return self.sink

    async def __aexit__(self, *exc):
        self.nursery.cancel_scope.cancel()
        return await self._cm.__aexit__(*exc)


def _server_context(server_cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(server_cert.cert), str(server_cert.key))
    return ctx


def _send(port, body=BODY, rcpts=("bob@example.test",), starttls_ctx=None):
    with smtplib.SMTP("localhost" if starttls_ctx else "127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        if starttls_ctx is not None:
            assert s.has_extn("starttls")
            s.starttls(context=starttls_ctx)
            s.ehlo("client.test")
            assert not s.has_extn("starttls")
        s.mail("alice@client.test")
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code != 250:
                return code, msg
        return s.data(body)


def _raw(port, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(payload)
        return f.read()


async def test_plain_send(tmp_path):
    with trio.fail_after(20):
        async with running(maildir=tmp_path / "md") as sink:
            code, _ = await trio.to_thread.run_sync(_send, sink.port)
            await sink.wait_for_messages(1)
    assert code == 250
    assert sink.connections == 1
    msg = sink.messages[0]
    assert msg == SinkMessage("alice@client.test", ["bob@example.test"], BODY, False, None, {},
                              "client.test")
    names = os.listdir(tmp_path / "md" / "new")
    assert len(names) == 1
    assert (tmp_path / "md" / "new" / names[0]).read_bytes() == BODY
    assert set(os.listdir(tmp_path / "md")) == {"new", "tmp", "cur"}


async def test_starttls(server_cert):
    client = ssl.create_default_context(cafile=str(server_cert.ca))
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert)) as sink:
            code, _ = await trio.to_thread.run_sync(
                lambda: _send(sink.port, starttls_ctx=client))
            await sink.wait_for_messages(1)
    assert code == 250
    msg = sink.messages[0]
    assert msg.tls is True
    assert msg.tls_version and msg.tls_version.startswith("TLSv1.")
    assert msg.helo == "client.test"
    assert b"STARTTLS" in sink.sessions[0]


async def test_no_starttls_offered_without_context_or_when_disabled(server_cert):
    def ehlo(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
            s.ehlo("c.test")
            return s.has_extn("starttls"), s.has_extn("xclient")

    with trio.fail_after(20):
        async with running() as sink:
            assert await trio.to_thread.run_sync(ehlo, sink.port) == (False, False)
        async with running(ssl_context=_server_context(server_cert), offer_starttls=False,
                           xclient=True) as sink:
            assert await trio.to_thread.run_sync(ehlo, sink.port) == (False, True)


async def test_starttls_reply_override(server_cert):
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert),
                           starttls_reply=b"454 4.7.0 TLS not available\r\n") as sink:
            out = await trio.to_thread.run_sync(
                _raw, sink.port, b"EHLO c.test\r\nSTARTTLS\r\nQUIT\r\n")
    assert b"\r\n454 4.7.0 TLS not available\r\n221 2.0.0 Bye\r\n" in out


async def test_dot_stuffing_removed():
    body = b"Subject: x\r\n\r\n..x\r\nend\r\n"
    with trio.fail_after(20):
        async with running() as sink:
            # raw: the wire carries "..x"
            out = await trio.to_thread.run_sync(
                _raw, sink.port,
                b"EHLO c.test\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
                + body + b".\r\nQUIT\r\n")
            await sink.wait_for_messages(1)
            # and through smtplib, which dot-stuffs ".x" to "..x" on the wire
            code, _ = await trio.to_thread.run_sync(
                _send, sink.port, b"Subject: y\r\n\r\n.x\r\n")
            await sink.wait_for_messages(2)
    assert b"250 2.0.0 Ok: queued as " in out
    assert code == 250
    assert sink.messages[0].data == b"Subject: x\r\n\r\n.x\r\nend\r\n"
    assert sink.messages[1].data == b"Subject: y\r\n\r\n.x\r\n"


async def test_pipelined_commands_in_one_write():
    payload = (b"EHLO c.test\r\nMAIL FROM:<a@x> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<b@y>\r\n"
               b"RCPT TO:<c@y>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\nRSET\r\nQUIT\r\n")
    with trio.fail_after(20):
        async with running() as sink:
            out = await trio.to_thread.run_sync(_raw, sink.port, payload)
    codes = [line[:3] for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"250", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"221"]
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert len(sink.messages) == 1
    assert sink.messages[0].rcpts == ["b@y", "c@y"]
    assert sink.messages[0].data == b"hello\r\n"
    assert sink.messages[0].mail_from == "a@x"


async def test_reject_rcpt_gives_550():
    with trio.fail_after(20):
        async with running(reject_rcpt={"nobody@example.test"}) as sink:
            reply = await trio.to_thread.run_sync(
                lambda: _send(sink.port, rcpts=("nobody@example.test",)))
            out = await trio.to_thread.run_sync(
                _raw, sink.port,
                b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nQUIT\r\n")
    assert reply == (550, b"5.1.1 No such user")
    assert b"550 5.1.1 No such user\r\n554 5.5.1 Error: no valid recipients\r\n" in out
    assert sink.messages == []


async def test_data_reply_override():
    with trio.fail_after(20):
        async with running(data_reply=b"452 4.3.1 Insufficient system storage\r\n") as sink:
            reply = await trio.to_thread.run_sync(_send, sink.port)
    assert reply == (452, b"4.3.1 Insufficient system storage")
    assert len(sink.messages) == 1


async def test_sessions_record_command_lines_not_data():
    with trio.fail_after(20):
        async with running() as sink:
            await trio.to_thread.run_sync(_send, sink.port, b"Subject: s\r\n\r\nMAIL FROM:<z>\r\n")
            await trio.to_thread.run_sync(_raw, sink.port, b"BOGUS\r\nQUIT\r\n")
    assert sink.connections == 2
    first, second = sink.sessions
    upper = [line.upper() for line in first]
    assert any(line.startswith(b"MAIL FROM:<ALICE@CLIENT.TEST>") for line in upper)
    assert any(line.startswith(b"RCPT TO:<BOB@EXAMPLE.TEST>") for line in upper)
    assert b"DATA" in upper
    assert not any(b"<z>" in line for line in first)     # data lines are not commands
    assert second == [b"BOGUS", b"QUIT"]


async def test_unknown_command_and_bare_lf():
    with trio.fail_after(20):
        async with running() as sink:
            out = await trio.to_thread.run_sync(
                _raw, sink.port, b"HELO c.test\nVRFY x\r\nQUIT\n")
    assert out == (b"250 sink.test\r\n502 5.5.2 Error: command not recognized\r\n"
                   b"221 2.0.0 Bye\r\n")


async def test_xclient_recorded():
    with trio.fail_after(20):
        async with running(xclient=True, hostname="up.test") as sink:
            out = await trio.to_thread.run_sync(
                _raw, sink.port,
                b"EHLO gw\r\nXCLIENT ADDR=192.0.2.1 PORT=4567 NAME=[UNAVAILABLE]\r\n"
                b"EHLO c.test\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
            await sink.wait_for_messages(1)
    assert b"250 XCLIENT ADDR PORT NAME HELO\r\n" in out
    assert b"\r\n220 up.test ESMTP sink\r\n" in out
    msg = sink.messages[0]
    assert msg.xclient == {"ADDR": "192.0.2.1", "PORT": "4567", "NAME": "[UNAVAILABLE]"}
    assert msg.helo == "c.test"


async def test_wait_for_messages_wakes_on_new_message():
    with trio.fail_after(20):
        async with running() as sink:
            done = trio.Event()

            async def waiter():
                await sink.wait_for_messages(2)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.to_thread.run_sync(_send, sink.port)
                await trio.sleep(0.05)
                assert not done.is_set()
                await trio.to_thread.run_sync(_send, sink.port)
                await done.wait()
            await sink.wait_for_messages(1)      # already satisfied: returns at once
    assert len(sink.messages) == 2


def _bad_handshake(port) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"STARTTLS\r\n")
        assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        s.sendall(b"\x00garbage\r\n" * 10)
        return f.read()      # the server ends the connection


async def test_on_message_callback_and_bad_tls_client_ends_quietly(server_cert):
    seen = []
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert),
                           on_message=seen.append) as sink:
            # a client that says STARTTLS and then sends garbage instead of a handshake
            out = await trio.to_thread.run_sync(_bad_handshake, sink.port)
            assert b"250" not in out     # at most a TLS alert, then the server hangs up
            await trio.to_thread.run_sync(_send, sink.port)
            await sink.wait_for_messages(1)
    assert seen == sink.messages


# --- the sink against the gateway's own sans-IO client core -----------------------------------

from gateway.proto.smtp_client import Reply, SMTPClient  # noqa: E402


class _Leg:
    """A minimal upstream leg: trio TCP stream + SMTPClient (what relay/upstream does)."""

    def __init__(self, stream):
        self.stream = stream
        self.client = SMTPClient()

    async def reply(self) -> Reply:
        while (r := self.client.next_reply()) is None:
            self.client.receive_data(await self.stream.receive_some(65536))
        return r

    async def command(self, line: str) -> Reply:
        await self.stream.send_all(self.client.send(line))
        return await self.reply()


async def test_injected_starttls_reply_is_seen_as_leftover(server_cert):
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert),
                           starttls_reply=b"220 go\r\n250-injected\r\n") as sink:
            leg = _Leg(await trio.open_tcp_stream("127.0.0.1", sink.port))
            assert (await leg.reply()).code == 220
            ehlo = await leg.command("EHLO gw.test")
            assert "STARTTLS" in SMTPClient.parse_ehlo(ehlo)
            assert await leg.command("STARTTLS") == Reply(220, ("go",))
            if not leg.client.has_leftover():          # the rest may come in a later segment
                with trio.move_on_after(2):
                    leg.client.receive_data(await leg.stream.receive_some(65536))
            assert leg.client.has_leftover()
            assert leg.client.take_leftover() == b"250-injected\r\n"
            await leg.stream.aclose()
    assert not any(line.upper().startswith((b"MAIL", b"RCPT", b"DATA"))
                   for line in sink.sessions[0])


async def test_client_core_relays_a_message_over_starttls(server_cert):
    client_ctx = ssl.create_default_context(cafile=str(server_cert.ca))
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert)) as sink:
            leg = _Leg(await trio.open_tcp_stream("127.0.0.1", sink.port))
            await leg.reply()
            await leg.command("EHLO gw.test")
            assert (await leg.command("STARTTLS")).code == 220
            assert not leg.client.has_leftover()
            leg.stream = trio.SSLStream(leg.stream, client_ctx, server_hostname="localhost")
            await leg.stream.do_handshake()
            leg.client.reset()
            ext = SMTPClient.parse_ehlo(await leg.command("EHLO gw.test"))
            assert "STARTTLS" not in ext and {"PIPELINING", "SIZE", "8BITMIME",
                                               "ENHANCEDSTATUSCODES", "SMTPUTF8"} <= set(ext)
            # pipelined: MAIL, RCPT x2, DATA in one write
            await leg.stream.send_all(b"".join(leg.client.send(c) for c in (
                "MAIL FROM:<a@gw.test> SIZE=20", "RCPT TO:<b@up.test>", "RCPT TO:<c@up.test>",
                "DATA")))
            codes = [(await leg.reply()).code for _ in range(4)]
            assert codes == [250, 250, 250, 354] and leg.client.pending == 0
            leg.client.message_data(b"Subject: t\r\n\r\n..dot\r\n")
            leg.client.end_message()            # the final dot: its reply is awaited
            await leg.stream.send_all(leg.client.data_to_send())
            done = await leg.reply()
            assert done.code == 250 and done.enhanced == "2.0.0"
            assert (await leg.command("QUIT")).code == 221
            await leg.stream.aclose()
    (msg,) = sink.messages
    assert msg.tls and msg.rcpts == ["b@up.test", "c@up.test"] and msg.helo == "gw.test"
    assert msg.data == b"Subject: t\r\n\r\n.dot\r\n"


# --- more knobs and bounds --------------------------------------------------------------------

def _starttls_with_pipelined_plaintext(port, ca) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n")
        while not f.readline().startswith(b"220 "):
            pass
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"NOOP\r\nQUIT\r\n")
            out = b""
            while chunk := tls.recv(4096):
                out += chunk
            return out


async def test_plaintext_pipelined_after_starttls_is_discarded(server_cert):
    with trio.fail_after(20):
        async with running(ssl_context=_server_context(server_cert)) as sink:
            out = await trio.to_thread.run_sync(
                _starttls_with_pipelined_plaintext, sink.port, server_cert.ca)
    assert out == b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    assert sink.sessions[0] == [b"EHLO c", b"STARTTLS", b"NOOP", b"QUIT"]


async def test_size_limit():
    big = b"Subject: big\r\n\r\n" + b"x" * 300 + b"\r\n"
    with trio.fail_after(20):
        async with running(max_size=200) as sink:
            out = await trio.to_thread.run_sync(
                _raw, sink.port,
                b"EHLO c\r\nMAIL FROM:<a@x> SIZE=201\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
                b"DATA\r\n" + big + b".\r\n"
                b"MAIL FROM:<a@x> SIZE=50\r\nRCPT TO:<b@y>\r\nDATA\r\nsmall\r\n.\r\nQUIT\r\n")
            await sink.wait_for_messages(1)
    assert b"250-SIZE 200\r\n" in out
    assert out.count(b"552 5.3.4 Message size exceeds fixed limit\r\n") == 2
    assert [m.data for m in sink.messages] == [b"small\r\n"]
    assert out.endswith(b"221 2.0.0 Bye\r\n")


async def test_size_limit_exact_boundary():
    body = b"y" * 198 + b"\r\n"            # 200 octets
    with trio.fail_after(20):
        async with running(max_size=200) as sink:
            code, _ = await trio.to_thread.run_sync(_send, sink.port, body)
            code2, _ = await trio.to_thread.run_sync(_send, sink.port, b"z" + body)
    assert (code, code2) == (250, 552)
    assert [m.data for m in sink.messages] == [body]


async def test_keep_messages_false_counts_only():
    with trio.fail_after(20):
        async with running(keep_messages=False) as sink:
            for _ in range(3):
                await trio.to_thread.run_sync(_send, sink.port)
            await sink.wait_for_messages(3)
    assert sink.message_count == 3 and sink.messages == [] and sink.connections == 3


async def test_long_command_line_closes():
    with trio.fail_after(20):
        async with running() as sink:
            out = await trio.to_thread.run_sync(_raw, sink.port, b"NOOP " + b"x" * 70000)
    assert out == b"500 5.5.2 Error: line too long\r\n"


async def test_idle_timeout_closes():
    with trio.fail_after(20):
        async with running(idle_timeout=0.3) as sink:
            out = await trio.to_thread.run_sync(_raw, sink.port, b"NOOP\r\n")
    assert out == b"250 2.0.0 Ok\r\n"          # then the server hung up on its own


def _readline(proc, timeout: float) -> bytes:
    import select
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no log line from the sink process"
    return proc.stdout.readline()


def test_main_sink_cli_entry(server_cert, tmp_path):
    import json
    import subprocess
    import sys

    code = ("import sys; from gateway.sink import main_sink; "
            "from gateway.observe.logs import EventLog;"
            f"main_sink('127.0.0.1', 0, {str(server_cert.cert)!r}, {str(server_cert.key)!r},"
            f" {str(tmp_path)!r}, EventLog('json', sys.stdout))")
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE,
                            env={**os.environ})
    try:
        listening = json.loads(_readline(proc, 20))
        assert listening["event"] == "listening" and listening["starttls"] is True
        ctx = ssl.create_default_context(cafile=str(server_cert.ca))
        assert _send(listening["port"], starttls_ctx=ctx)[0] == 250
        message = json.loads(_readline(proc, 20))
        assert message["event"] == "message" and message["size"] == len(BODY)
        assert message["tls"] is True and message["rcpts"] == "bob@example.test"
        (name,) = os.listdir(tmp_path / "new")
        assert (tmp_path / "new" / name).read_bytes() == BODY
    finally:
        proc.kill()
        proc.wait(10)
