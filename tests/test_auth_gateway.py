"""AUTH for submission through the gateway (SPEC §4.6) against the sink's AUTH PLAIN/LOGIN:
the offer only over TLS, 538 before TLS, the relayed exchange, failures, the bound leg, the
`auth` event and counter, and no secret in any log line."""
from __future__ import annotations

import base64
import json
import re
import smtplib
import socket
import ssl

import trio

from fake_upstream import hang_up, scripted_upstream
from harness import (client_context, config_dict, in_thread, listener_dict, running_gateway,
                     running_sink, server_ssl_context)

USER, PASSWORD = "alice", "s3cret pass+/="


def _config(sink, server_cert, **listener):
    extra = {"auth": "passthrough", **listener}
    return config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                      upstream_tls="required", **extra)],
                       server_cert=server_cert)


async def test_auth_offered_after_starttls_and_relayed(server_cert, upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={USER: PASSWORD}) as sink:
        async with running_gateway(_config(sink, server_cert)) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session(mechanism):
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    before = s.has_extn("auth")
                    early = s.docmd("AUTH PLAIN " + base64.b64encode(
                        f"\0{USER}\0{PASSWORD}".encode()).decode())
                    s.starttls(context=ctx)
                    s.ehlo("client.test")
                    offered = s.esmtp_features.get("auth", "")
                    s.user, s.password = USER, PASSWORD
                    auth = s.auth(mechanism, getattr(s, "auth_" + mechanism.lower()),
                                  initial_response_ok=mechanism == "PLAIN")
                    again = s.docmd("AUTH PLAIN")
                    s.sendmail("alice@client.test", ["bob@remote.example"],
                               b"Subject: submitted\r\n\r\nhello\r\n")
                    return before, early, offered, auth, again

            with trio.fail_after(30):
                plain = await in_thread(session, "PLAIN")
                login = await in_thread(session, "LOGIN")
    for before, early, offered, auth, again in (plain, login):
        assert not before
        assert early == (538, b"5.7.11 Encryption required for requested authentication "
                              b"mechanism")
        assert offered.split() == ["PLAIN", "LOGIN"]
        assert auth[0] == 235
        assert again[0] == 503
    assert [m.auth_user for m in sink.messages] == [USER, USER]
    events = logs.of("auth")
    assert [(e["mechanism"], e["user"], e["result"]) for e in events] == [
        ("PLAIN", USER, "success"), ("LOGIN", USER, "success")]
    secret_b64 = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for line in map(json.dumps, logs.events):
        assert PASSWORD not in line and secret_b64 not in line
        assert base64.b64encode(PASSWORD.encode()).decode() not in line


async def test_wrong_password_closes_the_leg_and_three_failures_end_the_session(
        server_cert, upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={USER: PASSWORD}) as sink:
        async with running_gateway(_config(sink, server_cert)) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session():
                replies = []
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.starttls(context=ctx)
                    s.ehlo("client.test")
                    bad = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
                    replies.append(s.docmd("AUTH PLAIN " + bad))
                    replies.append(s.docmd("AUTH LOGIN"))       # 334 Username:
                    replies.append(s.docmd("*"))                # cancelled: not a failure
                    replies.append(s.docmd("AUTH PLAIN " + bad))
                    replies.append(s.docmd("AUTH PLAIN " + bad))
                    replies.append(s.getreply())                # 421 follows the third 535
                return replies

            with trio.fail_after(30):
                replies = await in_thread(session)
    codes = [code for code, _ in replies]
    assert codes == [535, 334, 501, 535, 535, 421]
    assert replies[-1][1] == b"4.7.0 Too many authentication failures"
    results = [e["result"] for e in logs.of("auth")]
    assert results == ["failure", "cancelled", "failure", "failure"]
    assert sink.messages == []


async def test_required_refuses_mail_before_auth_and_the_leg_is_never_pooled(
        server_cert, upstream_cert):
    """After an authenticated session, unauthenticated sessions (pool on) never travel on
    the authenticated connection."""
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={USER: PASSWORD}) as sink:
        async with running_gateway(_config(sink, server_cert)) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def authenticated():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.starttls(context=ctx)
                    s.login(USER, PASSWORD)
                    s.sendmail("alice@client.test", ["bob@remote.example"],
                               b"Subject: one\r\n\r\nhello\r\n")

            def anonymous(n):
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.starttls(context=ctx)
                    s.ehlo("client.test")
                    s.sendmail("mallory@client.test", ["x@remote.example"],
                               f"Subject: anon {n}\r\n\r\nhello\r\n".encode(),
                               mail_options=["AUTH=mallory@client.test"])

            with trio.fail_after(30):
                await in_thread(authenticated)
                for n in range(3):
                    await in_thread(anonymous, n)
    assert [m.auth_user for m in sink.messages] == [USER, None, None, None]
    # RFC 4954 §5: an unauthenticated session's AUTH= goes upstream as AUTH=<>
    assert all("AUTH=<>" in m.mail_params.split() for m in sink.messages[1:])


async def test_auth_required_listener_and_auth_parameter(server_cert, upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={USER: PASSWORD}) as sink:
        async with running_gateway(_config(sink, server_cert, auth="required")) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.starttls(context=ctx)
                    s.ehlo("client.test")
                    refused = s.mail("alice@client.test")
                    s.rset()
                    s.login(USER, PASSWORD)
                    s.sendmail("alice@client.test", ["bob@remote.example"],
                               b"Subject: x\r\n\r\nhello\r\n", mail_options=["AUTH=alice"])
                return refused

            with trio.fail_after(30):
                refused = await in_thread(session)
    assert refused == (530, b"5.7.0 Authentication required")
    assert "AUTH=alice" in sink.messages[0].mail_params.split()


async def test_at_verify_the_certificate_is_checked_before_credentials_go_upstream(
        server_cert, upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={USER: PASSWORD}) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          client_tls="verify", profile="testca",
                                          upstream_tls="required", auth="passthrough")],
                           server_cert=server_cert, ca_file=server_cert.ca)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.starttls(context=ctx)             # no client certificate
                    s.ehlo("client.test")
                    return s.docmd("AUTH PLAIN " + base64.b64encode(
                        f"\0{USER}\0{PASSWORD}".encode()).decode())

            with trio.fail_after(30):
                reply = await in_thread(session)
    assert reply == (421, b"4.7.1 Unverified client certificate")
    assert not any(line.upper().startswith(b"AUTH") for s in sink.sessions for line in s)


async def test_a_broken_authenticated_leg_ends_the_session_with_421(nursery):
    """No credentials are kept to log in again: when the authenticated leg breaks, the
    session gets 421 4.4.2 and closes (SPEC §4.6)."""
    up = await nursery.start(_serve_upstream, dict(
        ehlo=["AUTH PLAIN"], on={b"AUTH": b"235 2.7.0 Authentication successful\r\n",
                                 b"MAIL": hang_up()}))    # goes away mid-session
    up_port = up.port
    data = config_dict([listener_dict(upstream_port=up_port, tls="implicit", auth="required",
                                      upstream={"tls": "none", "plaintext_auth": True})])
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["smtp"][1]
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE      # the demo certificate

        def session():
            with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20) as s:
                s.user, s.password = USER, PASSWORD
                s.ehlo("client.test")
                auth = s.auth("PLAIN", s.auth_plain)
                s.mail("alice@client.test")
                rcpt = s.docmd("RCPT TO:<bob@remote.example>")
                closing = s.getreply()
                return auth, rcpt, closing

        with trio.fail_after(30):
            auth, rcpt, closing = await in_thread(session)
    assert auth[0] == 235
    assert rcpt == (451, b"4.4.2 Upstream connection lost")
    assert closing == (421, b"4.4.2 Upstream connection lost")


async def _serve_upstream(script: dict, *, task_status=trio.TASK_STATUS_IGNORED):
    """A fake upstream (tests/fake_upstream.py) for the rest of the test's nursery."""
    async with scripted_upstream(**script) as up:
        task_status.started(up)
        await trio.sleep_forever()


def _sasl_upstream(nursery):
    """An upstream with AUTH PLAIN/LOGIN (no TLS: the gateway's leg says `plaintext_auth`)
    that records every line it read with its state ("sasl" for a SASL response)."""
    return nursery.start(_serve_upstream, dict(users={USER: PASSWORD}, name="up.test"))


class RawClient:
    """A blocking TLS client that sends raw bytes and reads whole replies (code, text)."""

    def __init__(self, port: int, *, timeout: float = 10):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE    # the demo certificate
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("connection closed by the gateway")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(ln[4:] for ln in lines)

    def send(self, data: bytes) -> tuple[int, bytes]:
        self.sock.sendall(data)
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def _sasl_config(up_port: int, **upstream) -> dict:
    return config_dict([listener_dict(upstream_port=up_port, tls="implicit", auth="passthrough",
                                      upstream={"tls": "none", "plaintext_auth": True,
                                                **upstream})])


async def _wait_for(predicate) -> None:
    """Poll *predicate* (logs or the upstream's records) until true; the caller bounds it."""
    while not predicate():
        await trio.sleep(0.01)


def _ordinary_session(port: int, n: int):
    """EHLO, MAIL, RCPT, DATA over implicit TLS: every reply as the client got it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as s:
        s.ehlo("client.test")
        mail = s.mail("carol@client.test")
        rcpt = s.rcpt(f"dave{n}@example.test")
        try:
            data = s.data(f"Subject: ordinary {n}\r\n\r\nhello {n}\r\n".encode())
        except smtplib.SMTPDataError as exc:
            data = (exc.smtp_code, exc.smtp_error)
    return mail, rcpt, data


def _abandon(port: int, how: str) -> list[tuple[int, bytes]]:
    """Begin a SASL exchange, then go away without ending it."""
    c = RawClient(port)
    try:
        got = [c.send(b"EHLO client.test\r\n")]
        if how == "login":
            got.append(c.send(b"AUTH LOGIN\r\n"))
        elif how == "plain":
            got.append(c.send(b"AUTH PLAIN\r\n"))
        else:                                       # after the user name
            got.append(c.send(b"AUTH LOGIN\r\n"))
            got.append(c.send(base64.b64encode(USER.encode()) + b"\r\n"))
        return got
    finally:
        c.close()


async def test_an_abandoned_sasl_exchange_never_reaches_another_session(nursery):
    """SPEC §4.6: a leg that carried any part of a SASL exchange is never pooled. With the
    pool on, 8 exchanges abandoned after a 334 are followed by 6 ordinary sessions: each gets
    its own 250s and its message through, and the upstream never reads a MAIL FROM (or any
    command) as a SASL response."""
    up = await _sasl_upstream(nursery)
    async with running_gateway(_sasl_config(up.port, pool_size=16)) as (gw, logs):
        port = gw.addresses["smtp"][1]
        with trio.fail_after(60):
            hows = ["login", "plain", "user"] * 3
            for i, how in enumerate(hows[:8]):
                got = await in_thread(_abandon, port, how)
                assert [code for code, _ in got][1:] == [334] * (len(got) - 1)
                # the session is over at the gateway (its leg released) before the next
                await _wait_for(lambda: len(logs.of("conn_close")) == i + 1)
            ordinary = [await in_thread(_ordinary_session, port, n) for n in range(6)]
            await _wait_for(lambda: up.closed >= 8)
    for mail, rcpt, data in ordinary:
        assert mail[0] == 250, mail
        assert rcpt[0] == 250, rcpt
        assert data[0] == 250, data
    assert len(up.messages) == 6
    assert all(f"hello {n}".encode() in m for n, m in enumerate(up.messages))
    # nothing but base64 (or "*") was ever read as a SASL response
    for line in up.sasl_lines():
        assert not line.upper().startswith((b"MAIL", b"RCPT", b"DATA", b"RSET", b"EHLO")), line
    # a connection that saw AUTH never carried a transaction
    for conn in up.connections:
        verbs = {line.split(b" ")[0].upper() for line in conn.commands()}
        assert not ({b"AUTH"} <= verbs and verbs & {b"MAIL", b"RCPT"}), conn.lines
    assert [e["result"] for e in logs.of("auth")] == ["cancelled"] * 8


BAD_RESPONSE = (501, b"5.5.2 Syntax error in SASL response")


def _message(c: "RawClient", subject: str) -> tuple[int, bytes]:
    for line in (b"MAIL FROM:<carol@client.test>\r\n", b"RCPT TO:<dave@example.test>\r\n",
                 b"DATA\r\n"):
        c.send(line)
    return c.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())


def _bad_responses(port: int) -> list:
    """Bare CR, NUL and bare LF in a response and in an initial response, each followed by
    a successful AUTH and a message, or a message, in the same session."""
    user = base64.b64encode(USER.encode())
    out = []
    for bad in (user[:4] + b"\r" + user[4:] + b"\r\n",         # bare CR
                user[:4] + b"\0" + user[4:] + b"\r\n",         # NUL
                user + b"\n"):                                 # a bare LF ends it
        c = RawClient(port)
        try:
            c.send(b"EHLO client.test\r\n")
            out.append(("response", c.send(b"AUTH LOGIN\r\n"), c.send(bad),
                        c.send(b"AUTH PLAIN " + _plain(USER, PASSWORD) + b"\r\n"),
                        _message(c, "authenticated")))
        finally:
            c.close()
    plain = _plain(USER, PASSWORD)
    for bad in (plain[:8] + b"\r" + plain[8:], plain[:8] + b"\0" + plain[8:]):
        c = RawClient(port)
        try:
            c.send(b"EHLO client.test\r\n")
            out.append(("initial", c.send(b"AUTH PLAIN " + bad + b"\r\n"),
                        _message(c, "anonymous")))
        finally:
            c.close()
    return out


async def test_bare_cr_nul_or_lf_in_a_sasl_response_gets_501_and_the_session_goes_on(nursery):
    """SPEC §4.6: `501 5.5.2 Syntax error in SASL response` from the gateway, nothing of the
    line upstream, `*` ending the exchange in progress there, an `auth` event, and the
    session goes on (a new AUTH succeeds; after a bad initial response mail still flows)."""
    up = await _sasl_upstream(nursery)
    async with running_gateway(_sasl_config(up.port)) as (gw, logs):
        port = gw.addresses["smtp"][1]
        with trio.fail_after(60):
            got = await in_thread(_bad_responses, port)
            await _wait_for(lambda: len(logs.of("conn_close")) == 5)
    for kind, first, bad, after, sent in got[:3]:
        assert first[0] == 334
        assert bad == BAD_RESPONSE
        assert after[0] == 235                        # the session went on: AUTH again
        assert sent[0] == 250
    for kind, bad, sent in got[3:]:
        assert bad == BAD_RESPONSE
        assert sent[0] == 250
    # the Received header names the protocol as Postfix does (§4.4): ESMTPSA after AUTH
    by = re.compile(rb"by mx\.test \(mail-tls-gateway\) with (\S+) id ")
    assert [by.findall(m) for m in up.messages] == [[b"ESMTPSA"]] * 3 + [[b"ESMTPS"]] * 2
    # upstream: "*" ended each exchange in progress, and nothing of a bad line arrived
    assert up.sasl_lines() == [b"*"] * 3
    for line in up.commands():
        assert b"\r" not in line and b"\0" not in line and b"YWxp" not in line
    # the bad initial responses never went upstream: only the good AUTHs did
    assert sorted(line for line in up.commands() if line.startswith(b"AUTH")) == (
        [b"AUTH LOGIN"] * 3 + [b"AUTH PLAIN " + _plain(USER, PASSWORD)] * 3)
    results = [(e["mechanism"], e["result"]) for e in logs.of("auth")]
    assert results == [("LOGIN", "error"), ("PLAIN", "success")] * 3 + [("PLAIN", "error")] * 2
