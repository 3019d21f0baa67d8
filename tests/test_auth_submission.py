"""Submission through the gateway to a real Postfix with Dovecot SASL (SPEC §4.6, issue #15):
swaks and smtplib on a STARTTLS listener and an implicit one, PLAIN and LOGIN, Postfix's own
refusals relayed, and no authenticated upstream connection ever serving another session."""
from __future__ import annotations

import base64
import json
import re
import smtplib

import pytest
import trio

from harness import client_context, config_dict, in_thread, listener_dict, running_gateway
from peers import run_swaks_async
from submission import submission_upstream  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.peers


def _config(sub, server_cert, *, pool=True, **gateway):
    upstream = {"server_name": sub.server_name, "profile": "testca",
                "pool_size": 16 if pool else 0}
    listeners = [
        listener_dict("submission", upstream_port=sub.port, cert="main",
                      client_tls="required", upstream_tls="verify", auth="passthrough",
                      upstream=dict(upstream)),
        listener_dict("smtps", upstream_port=sub.port, tls="implicit", cert="main",
                      client_tls="required", upstream_tls="verify", auth="required",
                      forward_client=True, upstream=dict(upstream)),
    ]
    data = config_dict(listeners, server_cert=server_cert, ca_file=sub.ca_file, **gateway)
    return data


async def test_swaks_and_smtplib_submit_through_both_listeners(submission_upstream,
                                                                server_cert, tmp_path):
    sub = submission_upstream
    before = len(sub.remote_messages())
    tracking = tmp_path / "tracking.jsonl"
    async with running_gateway(_config(sub, server_cert, tracking_log=str(tracking))) \
            as (gw, logs):
        starttls_port = gw.addresses["submission"][1]
        implicit_port = gw.addresses["smtps"][1]
        ctx = client_context(server_cert.ca)
        with trio.fail_after(90):
            for mech in ("PLAIN", "LOGIN"):
                out = await run_swaks_async(
                    "--server", f"127.0.0.1:{starttls_port}", "--tls", "--auth", mech,
                    "--auth-user", sub.user, "--auth-password", sub.password,
                    "--from", "alice@example.test", "--to", f"bob@{sub.remote_domain}",
                    "--header", f"Subject: swaks {mech}")
                assert out.returncode == 0, out.stdout + out.stderr

            def implicit():
                with smtplib.SMTP_SSL("127.0.0.1", implicit_port, context=ctx,
                                      timeout=20) as s:
                    s.login(sub.user, sub.password)
                    s.sendmail("alice@example.test", [f"carol@{sub.remote_domain}"],
                               b"Subject: implicit\r\n\r\nhello\r\n")
            await in_thread(implicit)
            got = await sub.wait_remote_async(before + 3)
    subjects = b"".join(got[before:])
    for subject in (b"swaks PLAIN", b"swaks LOGIN", b"implicit"):
        assert subject in subjects
    assert subjects.count(b"(Authenticated sender: alice)") == 3
    assert [(e["mechanism"], e["user"], e["result"]) for e in logs.of("auth")] == [
        ("PLAIN", "alice", "success"), ("LOGIN", "alice", "success"),
        ("PLAIN", "alice", "success")]
    secrets = (sub.password, base64.b64encode(sub.password.encode()).decode(),
               base64.b64encode(f"\0{sub.user}\0{sub.password}".encode()).decode())
    records = tracking.read_text().splitlines()
    assert len(records) == 3
    assert [json.loads(r)["auth_user"] for r in records] == ["alice"] * 3
    for line in [*map(json.dumps, logs.events), *records]:
        assert not any(secret in line for secret in secrets)
    # forward_client on the implicit listener: XCLIENT went before AUTH on that connection
    assert any("xclient" in s and s.get("auth") == "1" for s in sub.sessions())


async def test_postfix_refusals_are_relayed(submission_upstream, server_cert):
    sub = submission_upstream
    async with running_gateway(_config(sub, server_cert)) as (gw, logs):
        port = gw.addresses["submission"][1]
        ctx = client_context(server_cert.ca)

        def session():
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.starttls(context=ctx)
                s.ehlo("client.test")
                s.user, s.password = sub.user, "wrong password"
                try:
                    s.auth("PLAIN", s.auth_plain)
                    wrong = None
                except smtplib.SMTPAuthenticationError as exc:
                    wrong = (exc.smtp_code, exc.smtp_error)
                s.mail("mallory@client.test")
                relay = s.rcpt(f"x@{sub.remote_domain}")
                return wrong, relay

        with trio.fail_after(60):
            wrong, relay = await in_thread(session)
    assert wrong[0] == 535 and wrong[1].startswith(b"5.7.8")
    assert relay[0] == 554 and b"Relay access denied" in relay[1]
    assert [e["result"] for e in logs.of("auth")] == ["failure"]


async def test_no_session_ever_gets_an_authenticated_leg(submission_upstream, server_cert):
    """With the pool on (its default), an authenticated session's connection is never handed
    to a later unauthenticated session: each of those is refused relaying by Postfix."""
    sub = submission_upstream
    before = len(sub.remote_messages())
    denials = sub.relay_denials()
    async with running_gateway(_config(sub, server_cert)) as (gw, logs):
        port = gw.addresses["submission"][1]
        ctx = client_context(server_cert.ca)

        def authenticated():
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.starttls(context=ctx)
                s.login(sub.user, sub.password)
                s.sendmail("alice@example.test", [f"bob@{sub.remote_domain}"],
                           b"Subject: authenticated\r\n\r\nhello\r\n")

        def anonymous(n):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.starttls(context=ctx)
                s.ehlo("client.test")
                s.mail("mallory@client.test")
                return s.rcpt(f"victim{n}@{sub.remote_domain}")

        with trio.fail_after(90):
            await in_thread(authenticated)
            refused = [await in_thread(anonymous, n) for n in range(4)]
            await sub.wait_remote_async(before + 1)
            while sub.relay_denials() < denials + 4:      # Postfix logs asynchronously
                await trio.sleep(0.05)
    assert all(code == 554 for code, _ in refused)
    assert sub.relay_denials() - denials == 4
    assert len(sub.remote_messages()) == before + 1


def _abandon(port: int, ctx, how: str) -> list[tuple[int, bytes]]:
    """STARTTLS, then begin a SASL exchange and go away in the middle of it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=ctx)
        s.ehlo("client.test")
        if how == "plain":
            got = [s.docmd("AUTH PLAIN")]
        else:
            got = [s.docmd("AUTH LOGIN")]
            if how == "user":
                got.append(s.docmd(base64.b64encode(b"alice").decode()))
        s.sock.close()                       # no QUIT: the client is simply gone
        s.sock = s.file = None
        return got


async def test_abandoned_exchanges_never_reach_later_sessions(submission_upstream,
                                                               server_cert):
    """SPEC §4.6 with the pool on: 8 SASL exchanges abandoned after a 334 (AUTH LOGIN,
    AUTH PLAIN without an initial response, LOGIN after the user name), then 6 ordinary
    sessions: each gets 250 to MAIL and RCPT and its message delivered by Postfix, and
    Postfix never took a command of theirs for a user name or password (no failed AUTH, no
    connection that saw AUTH carried a MAIL)."""
    sub = submission_upstream
    before = len(sub.local_messages())
    failures = sub.auth_failures()
    sessions = len(sub.sessions())
    async with running_gateway(_config(sub, server_cert)) as (gw, logs):
        port = gw.addresses["submission"][1]
        ctx = client_context(server_cert.ca)

        def ordinary(n):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.starttls(context=ctx)
                s.ehlo("client.test")
                mail = s.mail("carol@client.test")
                rcpt = s.rcpt(f"dave{n}@{sub.local_domain}")
                try:
                    data = s.data(f"Subject: ordinary {n}\r\n\r\nhello {n}\r\n".encode())
                except smtplib.SMTPDataError as exc:
                    data = (exc.smtp_code, exc.smtp_error)
                return mail, rcpt, data

        with trio.fail_after(90):
            hows = (["login", "plain", "user"] * 3)[:8]
            abandoned = []
            for i, how in enumerate(hows):
                abandoned.append(await in_thread(_abandon, port, ctx, how))
                while len(logs.of("conn_close")) < i + 1:   # its leg released before the next
                    await trio.sleep(0.01)
            results = [await in_thread(ordinary, n) for n in range(6)]
    assert all(code == 334 for replies in abandoned for code, _ in replies)
    for mail, rcpt, data in results:
        assert mail[0] == 250, mail
        assert rcpt[0] == 250, rcpt
        assert data[0] == 250, data
    with trio.fail_after(30):
        got = await sub.wait_local_async(before + 6)
        # the 8 connections that saw AUTH are closed: Postfix logs them (asynchronously)
        while sum("auth" in s for s in sub.sessions()[sessions:]) < 8:
            await trio.sleep(0.05)
    bodies = b"".join(got[before:])
    assert all(f"hello {n}".encode() in bodies for n in range(6))
    assert sub.auth_failures() == failures
    new = sub.sessions()[sessions:]
    assert sum("auth" in s for s in new) == 8
    assert not [s for s in new if "auth" in s and "mail" in s]
    assert [e["result"] for e in logs.of("auth")] == ["cancelled"] * 8


async def test_received_header_says_esmtpsa_after_auth(submission_upstream, server_cert):
    """The gateway's Received header names the protocol as Postfix does (SPEC §4.4):
    `ESMTPSA` for an authenticated TLS session, `ESMTPS` for an unauthenticated one."""
    sub = submission_upstream
    remote = len(sub.remote_messages())
    local = len(sub.local_messages())
    async with running_gateway(_config(sub, server_cert)) as (gw, logs):
        port = gw.addresses["submission"][1]
        ctx = client_context(server_cert.ca)

        def session(login: bool, rcpt: str, subject: str):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.starttls(context=ctx)
                s.ehlo("client.test")
                if login:
                    s.user, s.password = sub.user, sub.password
                    s.auth("PLAIN", s.auth_plain)
                s.sendmail("alice@example.test", [rcpt],
                           f"Subject: {subject}\r\n\r\nhello\r\n".encode())

        with trio.fail_after(60):
            await in_thread(session, True, f"bob@{sub.remote_domain}", "authenticated")
            await in_thread(session, False, f"erin@{sub.local_domain}", "anonymous")
            authenticated = (await sub.wait_remote_async(remote + 1))[remote]
            anonymous = (await sub.wait_local_async(local + 1))[local]
    by = re.compile(rb"\n\s+by mx\.test \(mail-tls-gateway\) with (\S+) id ")
    assert b"Subject: authenticated" in authenticated
    assert by.findall(authenticated) == [b"ESMTPSA"]
    assert b"Subject: anonymous" in anonymous
    assert by.findall(anonymous) == [b"ESMTPS"]
