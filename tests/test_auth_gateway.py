"""AUTH for submission through the gateway (SPEC §4.6) against the sink's AUTH PLAIN/LOGIN:
the offer only over TLS, 538 before TLS, the relayed exchange, failures, the bound leg, the
`auth` event and counter, and no secret in any log line."""
from __future__ import annotations

import base64
import json
import smtplib
import ssl

import trio

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
    async def upstream(stream):
        await stream.send_all(b"220 up ESMTP\r\n")
        buf = b""
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                verb = line.split(b" ")[0].upper()
                if verb == b"EHLO":
                    await stream.send_all(b"250-up\r\n250 AUTH PLAIN\r\n")
                elif verb == b"AUTH":
                    await stream.send_all(b"235 2.7.0 Authentication successful\r\n")
                elif verb == b"MAIL":
                    await stream.aclose()          # the upstream goes away mid-session
                    return
                else:
                    await stream.send_all(b"250 2.0.0 ok\r\n")

    listeners = await nursery.start(trio.serve_tcp, upstream, 0)
    up_port = listeners[0].socket.getsockname()[1]
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
