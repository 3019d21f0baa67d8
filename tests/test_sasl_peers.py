"""The AUTH tests' submission server itself (tests/submission.py), talked to directly, without
the gateway: Postfix with Dovecot SASL answers smtplib and swaks as a submission server does,
so that tests through the gateway can count on these answers."""
from __future__ import annotations

import base64
import smtplib

import pytest

from peers import run_swaks
from submission import submission_upstream  # noqa: F401 - the fixture

pytestmark = pytest.mark.peers


def _message(sender: str, rcpt: str, tag: str) -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@client.test>\r\n\r\nbody of {tag}\r\n").encode()


def test_auth_offered_only_after_starttls(submission_upstream):
    sub = submission_upstream
    with smtplib.SMTP(sub.host, sub.port, timeout=20) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth") and s.has_extn("starttls")
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{sub.user}\0{sub.password}".encode()).decode())
        assert (code, text) == (503, b"5.5.1 Error: authentication not enabled")
    with sub.smtp() as s:
        assert s.has_extn("auth")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_login_then_relay_to_remote(submission_upstream, mechanism):
    sub = submission_upstream
    before = len(sub.remote_messages())
    logins = sub.sasl_logins().count((mechanism, sub.user))
    rcpt = f"bob@{sub.remote_domain}"
    with sub.smtp() as s:
        s.user, s.password = sub.user, sub.password
        method = s.auth_plain if mechanism == "PLAIN" else s.auth_login
        code, text = s.auth(mechanism, method)
        assert code == 235, text
        refused = s.sendmail("alice@client.test", [rcpt], _message(
            "alice@client.test", rcpt, f"smtplib-{mechanism}"))
        assert refused == {}
    msgs = sub.wait_remote(before + 1)
    assert any(f"smtplib-{mechanism}".encode() in m and
               f"(Authenticated sender: {sub.user})".encode() in m for m in msgs)
    assert sub.sasl_logins().count((mechanism, sub.user)) == logins + 1


def test_smtplib_login_delivers_locally(submission_upstream):
    sub = submission_upstream
    before = len(sub.local_messages())
    rcpt = f"carol@{sub.local_domain}"
    with sub.smtp() as s:
        s.login(sub.user, sub.password)
        s.sendmail("alice@client.test", [rcpt], _message("alice@client.test", rcpt, "local"))
    msgs = sub.wait_local(before + 1)
    assert any(b"Subject: local" in m and b"Delivered-To: carol@example.test" in m
               for m in msgs)


def test_wrong_password_gets_535(submission_upstream):
    sub = submission_upstream
    failures = sub.auth_failures()
    with sub.smtp() as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login(sub.user, sub.password + "x")
        assert exc.value.smtp_code == 535
        # the session goes on unauthenticated: relaying stays closed
        s.mail("alice@client.test")
        code, text = s.rcpt(f"bob@{sub.remote_domain}")
        assert code == 554 and b"Relay access denied" in text
    assert sub.auth_failures() >= failures + 1


def test_unauthenticated_session_may_not_relay(submission_upstream):
    sub = submission_upstream
    denials = sub.relay_denials()
    with sub.smtp() as s:
        s.mail("mallory@client.test")
        code, text = s.rcpt(f"bob@{sub.remote_domain}")
        assert (code, text.split(b" ", 1)[0]) == (554, b"5.7.1")
        assert text.endswith(b"Relay access denied")
        code, _ = s.rcpt(f"carol@{sub.local_domain}")     # its own domain: accepted
        assert code == 250
    assert sub.relay_denials() == denials + 1


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_tls_auth(submission_upstream, mechanism):
    sub = submission_upstream
    before = len(sub.remote_messages())
    proc = run_swaks("--server", f"{sub.host}:{sub.port}", "--tls",
                     "--auth", mechanism, "--auth-user", sub.user,
                     "--auth-password", sub.password,
                     "--from", "alice@client.test", "--to", f"dave@{sub.remote_domain}",
                     "--header", f"Subject: swaks-{mechanism}", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<~  235 2.7.0 Authentication successful" in proc.stdout
    msgs = sub.wait_remote(before + 1)
    assert any(f"Subject: swaks-{mechanism}".encode() in m for m in msgs)


def test_swaks_wrong_password(submission_upstream):
    sub = submission_upstream
    proc = run_swaks("--server", f"{sub.host}:{sub.port}", "--tls", "--auth", "PLAIN",
                     "--auth-user", sub.user, "--auth-password", "wrong",
                     "--from", "alice@client.test", "--to", f"dave@{sub.remote_domain}",
                     timeout=60)
    assert proc.returncode != 0
    assert "<~* 535 5.7.8 Error: authentication failed" in proc.stdout


def test_xclient_then_auth(submission_upstream):
    """What the gateway with forward_client does: XCLIENT after STARTTLS, then AUTH."""
    sub = submission_upstream
    before = len(sub.remote_messages())
    rcpt = f"erin@{sub.remote_domain}"
    with sub.smtp() as s:
        assert s.has_extn("xclient")
        code, _ = s.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=[UNAVAILABLE]")
        assert code == 220
        s.ehlo("client.test")
        assert s.has_extn("auth")                       # still TLS after XCLIENT
        s.login(sub.user, sub.password)
        s.sendmail("alice@client.test", [rcpt], _message("alice@client.test", rcpt, "xclient"))
    sub.wait_remote(before + 1)
    sub.postfix.wait_for_log(
        rf"client=unknown\[192\.0\.2\.7\], sasl_method=PLAIN, sasl_username={sub.user}")


def test_sessions_show_transactions_per_authenticated_connection(submission_upstream):
    sub = submission_upstream
    before = len(sub.remote_messages())
    rcpt = f"frank@{sub.remote_domain}"
    with sub.smtp() as s:
        for _ in range(3):                  # NOOP x3 marks this connection's log line
            assert s.noop()[0] == 250
        s.login(sub.user, sub.password)
        for tag in ("first", "second"):
            s.sendmail("alice@client.test", [rcpt], _message("alice@client.test", rcpt, tag))
    sub.wait_remote(before + 2)
    sub.postfix.wait_for_log(r"disconnect from .* noop=3 ")
    mine = [d for d in sub.sessions() if d.get("noop") == "3"]
    assert len(mine) == 1
    assert (mine[0]["auth"], mine[0]["mail"], mine[0]["data"]) == ("1", "2", "2")
