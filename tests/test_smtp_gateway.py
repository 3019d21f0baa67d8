"""The SMTP gateway end to end over loopback: real clients (smtplib, raw sockets, stdlib ssl)
against the gateway, relaying to the test sink upstream."""
from __future__ import annotations

import smtplib
import socket

import pytest
import trio

from fake_upstream import scripted_upstream
from harness import (client_context, config_dict, in_thread, listener_dict, raw_starttls,
                     running_gateway, running_sink, server_ssl_context, smtp_send)

BODY = b"Subject: test\r\nFrom: alice@client.test\r\n\r\nhello\r\n..dot line\r\nbye\r\n"


def _strip_received(data: bytes) -> bytes:
    assert data.startswith(b"Received: from ")
    end = data.index(b"\r\n", data.index(b"; "))       # the header ends on the date line
    return data[end + 2:]


async def test_smtplib_starttls_relays_and_logs_client_tls(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)
            with trio.fail_after(30):
                code, _ = await in_thread(lambda: smtp_send(port, starttls=True, ctx=ctx,
                                                            body=BODY))
                await sink.wait_for_messages(1)
    assert code == 250
    msg = sink.messages[0]
    assert _strip_received(msg.data) == BODY      # smtplib stuffs, the sink un-stuffs
    assert b"with ESMTPS" in msg.data and b"using TLSv1.3" in msg.data
    assert msg.mail_from == "alice@client.test" and msg.rcpts == ["bob@example.test"]
    tls = logs.of("tls", side="client")
    assert tls and tls[0]["version"] == "TLSv1.3" and tls[0]["cipher"]
    assert logs.of("message", result="accepted")
    assert logs.of("conn_close")


async def test_smtplib_implicit_tls(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict("smtps", upstream_port=sink.port, cert="main",
                                          tls="implicit", client_tls="required")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtps"][1]
            ctx = client_context(server_cert.ca)
            with trio.fail_after(30):
                code, _ = await in_thread(lambda: smtp_send(port, implicit=True, ctx=ctx))
                await sink.wait_for_messages(1)
    assert code == 250
    assert logs.of("tls", side="client")[0]["version"].startswith("TLSv1.")


async def test_required_gates_mail_before_starttls(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          client_tls="required")], server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def plaintext():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    code, msg = s.ehlo("client.test")
                    assert code == 250 and s.has_extn("starttls")
                    assert s.noop()[0] == 250
                    assert s.rset()[0] == 250
                    mail = s.mail("alice@client.test")
                    rcpt = s.docmd("RCPT TO:<bob@example.test>")
                    data = s.docmd("DATA")
                    return mail, rcpt, data
            with trio.fail_after(30):
                mail, rcpt, data_reply = await in_thread(plaintext)
                ok = await in_thread(lambda: smtp_send(port, starttls=True,
                                                       ctx=client_context(server_cert.ca)))
    for code, text in (mail, rcpt, data_reply):
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert ok[0] == 250
    assert len(sink.messages) == 1


async def test_level_none_never_offers_starttls():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def talk():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    return s.has_extn("starttls"), s.docmd("STARTTLS")
            with trio.fail_after(30):
                offered, reply = await in_thread(talk)
                code, _ = await in_thread(lambda: smtp_send(port))
    assert offered is False
    assert reply == (502, b"5.5.1 STARTTLS not available")
    assert code == 250


async def test_verify_level_needs_a_client_certificate(server_cert, client_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          client_tls="verify", profile="testca")],
                           server_cert=server_cert, ca_file=server_cert.ca)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            anon = client_context(server_cert.ca)
            with_cert = client_context(server_cert.ca)
            with_cert.load_cert_chain(str(client_cert.cert), str(client_cert.key))

            def no_cert():
                with smtplib.SMTP("localhost", port, timeout=20) as s:
                    s.starttls(context=anon)
                    s.ehlo("client.test")
                    reply = s.docmd("MAIL FROM:<alice@client.test>")
                    try:
                        s.noop()
                        closed = False
                    except smtplib.SMTPServerDisconnected:
                        closed = True
                    return reply, closed
            with trio.fail_after(30):
                reply, closed = await in_thread(no_cert)
                ok = await in_thread(lambda: smtp_send(port, starttls=True, ctx=with_cert))
    assert reply == (421, b"4.7.1 Unverified client certificate")
    assert closed
    assert ok[0] == 250
    assert logs.of("tls", side="client", verified=True)


async def test_upstream_required_without_starttls_tempfails_and_sends_nothing(server_cert):
    async with running_sink(offer_starttls=False) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="required")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port))
    assert reply == (451, b"4.7.5 TLS is required, but was not offered by host")
    sent = [line for session in sink.sessions for line in session]
    assert not any(line.upper().startswith((b"MAIL", b"RCPT", b"DATA")) for line in sent)
    assert sink.messages == []
    alerts = logs.of("tls_alert")
    assert alerts and alerts[0]["domains"] == "example.test"


async def test_upstream_response_injection_aborts_the_leg(upstream_cert):
    ctx = server_ssl_context(upstream_cert)
    async with running_sink(ssl_context=ctx, starttls_reply=b"220 go\r\n250-injected\r\n") as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="required")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port))
    assert reply[0] == 451 and reply[1].startswith(b"4.7.5")
    assert sink.messages == []
    assert "injection" in logs.of("upstream_error")[0]["reason"]


async def test_upstream_preferred_uses_tls_when_offered(upstream_cert):
    ctx = server_ssl_context(upstream_cert)
    async with running_sink(ssl_context=ctx) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port))
                await sink.wait_for_messages(1)
    assert reply[0] == 250
    assert sink.messages[0].tls
    assert logs.of("tls", side="upstream")


async def test_upstream_verify_with_untrusted_certificate(upstream_cert, pubdir):
    import trustme
    other_ca = trustme.CA()
    ca_path = pubdir / "other-ca.pem"
    other_ca.cert_pem.write_to_path(str(ca_path))
    ctx = server_ssl_context(upstream_cert)
    async with running_sink(ssl_context=ctx) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="verify",
                                          upstream={"server_name": "upstream.test",
                                                    "profile": "testca"})],
                           ca_file=ca_path)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port))
    assert reply == (451, b"4.7.5 Server certificate not trusted")
    assert sink.messages == []
    assert logs.of("tls_alert")


async def test_upstream_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    data = config_dict([listener_dict(upstream_port=dead_port)])
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["smtp"][1]
        with trio.fail_after(30):
            reply = await in_thread(lambda: smtp_send(port))
    assert reply == (451, b"4.4.1 Upstream server unavailable")


async def test_upstream_replies_pass_through_unchanged():
    async with running_sink(reject_rcpt={"nobody@example.test"},
                            data_reply=b"452 4.3.1 Insufficient system storage\r\n") as sink:
        data = config_dict([listener_dict(upstream_port=sink.port)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                rcpt = await in_thread(lambda: smtp_send(port, rcpts=("nobody@example.test",)))
                data_reply = await in_thread(lambda: smtp_send(port))
    assert rcpt == (550, b"5.1.1 No such user")
    # never a 250 for DATA before the upstream's own answer
    assert data_reply == (452, b"4.3.1 Insufficient system storage")
    assert logs.of("message", result="tempfail")


def _raw_session(port: int, payload: bytes, timeout: float = 20) -> bytes:
    """Send EHLO, then *payload* in one write, and read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(payload)
        return f.read()


SMUGGLE = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_smuggling_never_yields_two_messages(mode):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          bare_newline=mode)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            for seq in SMUGGLE:
                payload = (b"MAIL FROM:<alice@client.test>\r\nRCPT TO:<bob@example.test>\r\n"
                           b"DATA\r\n")
                message = (b"Subject: one\r\n\r\nfirst" + seq +
                           b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@example.test>\r\n"
                           b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n")
                with trio.fail_after(30):
                    out = await in_thread(_raw_session, port, payload + message)
                if mode == "reject":
                    assert b"550 5.5.2 Bare CR or LF not allowed" in out
                else:
                    assert b"250 " in out.split(b"354 ")[1]
                assert out.rstrip().endswith(b"221 2.0.0 Bye")
    rcpts = [m.rcpts for m in sink.messages]
    assert ["victim@example.test"] not in rcpts
    if mode == "reject":
        assert sink.messages == []
    else:
        assert len(sink.messages) == len(SMUGGLE)
        for m in sink.messages:
            assert b"Subject: smuggled" in m.data      # smuggled text stayed inside message one


async def test_long_command_line_is_refused_and_session_goes_on():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                out = await in_thread(_raw_session, port,
                                      b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\nQUIT\r\n")
    assert out == b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


def _starttls_injection(port: int, ca) -> tuple[bytes, bytes]:
    ctx = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        ready = f.readline()
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"NOOP\r\n")
            first = tls.recv(4096)
            return ready, first


async def test_starttls_command_injection_is_discarded(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                ready, first = await in_thread(_starttls_injection, port, server_cert.ca)
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    # the only reply after the handshake is NOOP's: RSET was never executed
    assert first == b"250 2.0.0 Ok\r\n"
    assert logs.of("starttls_injection")[0]["discarded"] == len(b"RSET\r\n")


async def test_message_over_size_limit():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          max_message_size=1000)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port, body=b"x" * 2000 + b"\r\n"))
    assert reply == (552, b"5.3.4 Message size exceeds fixed limit")
    assert sink.messages == []


async def test_pipelined_transactions_on_one_connection():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            payload = b"".join(
                b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b%d@example.test>\r\nDATA\r\n" % i
                for i in range(1))
            with trio.fail_after(30):
                out = await in_thread(
                    _raw_session, port,
                    payload + b"one\r\n.\r\nMAIL FROM:<a@client.test>\r\n"
                    b"RCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n"
                    b"two\r\n.\r\nQUIT\r\n")
    assert out.count(b"354 ") == 2
    assert [m.rcpts for m in sink.messages] == [["b0@example.test"],
                                                ["c@example.test", "d@example.test"]]
    assert sink.connections == 1        # the leg is reused for the second transaction


async def test_upstream_preferred_falls_back_to_plaintext_once(upstream_cert):
    ctx = server_ssl_context(upstream_cert)
    async with running_sink(ssl_context=ctx,
                            starttls_reply=b"454 4.7.0 TLS not available\r\n") as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port))
                await sink.wait_for_messages(1)
    assert reply[0] == 250
    assert sink.connections == 2 and not sink.messages[0].tls
    assert logs.of("tls_error", side="upstream", fallback="plaintext")
    assert not logs.of("tls_alert")


async def test_idle_client_gets_421_timeout():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          timeouts={"command": 0.3})])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                out = await in_thread(_raw_session, port, b"")
    assert out == b"421 4.4.2 Timeout exceeded\r\n"


async def test_stalled_data_gets_421_timeout_and_nothing_is_delivered():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          timeouts={"data": 0.3, "command": 30})])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            payload = (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                       b"Subject: half\r\n\r\nand then nothing")
            with trio.fail_after(30):
                out = await in_thread(_raw_session, port, payload)
    assert out.endswith(b"421 4.4.2 Timeout exceeded\r\n") and b"354 " in out
    assert not sink.messages
    assert logs.of("reject", code=421, reason="timeout")


async def test_over_max_connections_gets_421():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          max_connections=1)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def two():
                with socket.create_connection(("127.0.0.1", port), timeout=20) as first:
                    assert first.makefile("rb").readline().startswith(b"220 ")
                    with socket.create_connection(("127.0.0.1", port), timeout=20) as second:
                        return second.makefile("rb").read()
            with trio.fail_after(30):
                out = await in_thread(two)
    assert out == b"421 4.7.0 Too many connections, try again later\r\n"


async def _drop_mid_message(conn, line):
    """DATA: 354, then the upstream dies mid-message."""
    await conn.send(b"354 go ahead\r\n")
    await conn.receive_some(10)
    await conn.close()


async def test_upstream_lost_mid_message():
    async with scripted_upstream(on={b"DATA": _drop_mid_message}) as up:
        data = config_dict([listener_dict(upstream_port=up.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(port,
                                                          body=b"x" * 300_000 + b"\r\n"))
    assert reply == (451, b"4.4.2 Upstream connection lost")
    assert logs.of("message", result="tempfail")


def _data_reply_seen_by_client(port: int) -> bytes:
    out = _raw_session(port, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n"
                             b"DATA\r\nhi\r\n.\r\nQUIT\r\n")
    return out.split(b"\r\n")[3]        # after 250 MAIL, 250 RCPT, 354


async def test_relayed_reply_gets_enhanced_code_and_no_bare_cr():
    async with running_sink(data_reply=b"250 queued\rinjected\r\n") as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                line = await in_thread(_data_reply_seen_by_client, port)
    assert line == b"250 2.0.0 queued injected"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_upstream_refusal_of_mail_answers_every_rcpt(pipelining):
    """MAIL is replayed with the first RCPT (pipelined when the upstream offers PIPELINING);
    the upstream's refusal of MAIL answers that RCPT and every later one (SPEC §4.4), and
    without PIPELINING no RCPT follows the refused MAIL."""
    need_mail = dict.fromkeys([b"RCPT", b"DATA", b"RSET", b"NOOP"], b"503 5.5.1 Need MAIL\r\n")
    script = dict(ehlo=["PIPELINING", "8BITMIME"] if pipelining else ["8BITMIME"],
                  on={b"MAIL": b"550 5.7.1 Sender blocked here\r\n", **need_mail})
    async with scripted_upstream(**script) as up:
        data = config_dict([listener_dict(upstream_port=up.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    return s.rcpt("bob@example.test"), s.rcpt("carol@example.test")
            with trio.fail_after(30):
                first, second = await in_thread(session)
    assert first == second == (550, b"5.7.1 Sender blocked here")
    verbs = [line.split(b" ")[0].split(b":")[0] for line in up.commands()]
    assert verbs.count(b"MAIL") == 1
    assert verbs.count(b"RCPT") == (1 if pipelining else 0)


async def test_quit_over_tls_gets_221_then_a_clean_close_notify(server_cert):
    """The 221 and the close_notify leave in one write (SMTPSession._flush(last=True)); a
    client that treats a close without close_notify as an error sees a clean end."""
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session() -> bytes:
                with raw_starttls(port, ctx, suppress_ragged_eofs=False) as tls:
                    tls.sendall(b"QUIT\r\n")
                    got = b""
                    while True:
                        chunk = tls.recv(4096)      # SSLEOFError without close_notify
                        if not chunk:
                            return got
                        got += chunk
            with trio.fail_after(30):
                reply = await in_thread(session)
    assert reply.startswith(b"221 ") and reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
    assert logs.of("conn_close")


async def test_smtputf8_towards_an_upstream_without_it_is_refused_at_rcpt():
    """SPEC §4.1: a transaction that uses SMTPUTF8 on a leg whose upstream lacks it gets
    `553 5.6.7` at RCPT, a verdict of the RCPT stage (logged as a reject); without
    SMTPUTF8 the same upstream relays."""
    async with running_sink(smtputf8=False) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def talk():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    mail = s.docmd("MAIL", "FROM:<alice@client.test> SMTPUTF8")
                    return mail, s.docmd("RCPT", "TO:<bob@example.test>")
            with trio.fail_after(30):
                mail, rcpt = await in_thread(talk)
                code, _ = await in_thread(lambda: smtp_send(port))
    assert mail[0] == 250
    assert rcpt == (553, b"5.6.7 SMTPUTF8 not supported by the upstream server")
    assert [e["code"] for e in logs.of("reject")] == [553]
    assert code == 250 and len(sink.messages) == 1
