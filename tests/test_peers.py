"""The peer helpers themselves work: real Postfix-to-Postfix and swaks-to-Postfix delivery."""
from __future__ import annotations

import pathlib
import re
import smtplib
import socket
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from peers import (  # noqa: E402
    PostfixError,
    PostfixInstance,
    free_port,
    instance_dir,
    openssl_s_client_starttls,
    openssl_s_client_starttls_async,
    parse_tls_version,
    require,
    run_swaks,
    run_swaks_async,
)

pytestmark = pytest.mark.peers


@pytest.fixture
def postfix_bin():
    require("postfix")


@pytest.fixture
def tls_upstream(postfix_bin, pubdir, upstream_cert):
    """A Postfix upstream offering STARTTLS with the test CA's upstream certificate."""
    with PostfixInstance.upstream(instance_dir(pubdir, "upstream"), free_port(),
                                  cert=upstream_cert.cert, key=upstream_cert.key) as pf:
        yield pf
    assert pf.instance_pids() == [], "postfix processes left behind"


def test_swaks_starttls_to_postfix_upstream(tls_upstream):
    require("swaks")
    res = run_swaks(
        "--server", "127.0.0.1", "--port", str(tls_upstream.port), "--tls",
        "--helo", "client.test", "--from", "alice@client.test", "--to", "bob@example.test",
        "--header", "Subject: swaks peer test", "--body", "hello from swaks",
        "--timeout", "20", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"=== TLS started with cipher TLSv1\.[23]", res.stdout), res.stdout
    (msg,) = tls_upstream.wait_for_messages(1, timeout=30)
    assert b"Delivered-To: bob@example.test\n" in msg
    assert b"Subject: swaks peer test\n" in msg
    assert b"\nhello from swaks\n" in msg
    # smtpd_tls_received_header: the Received header records the TLS session
    assert re.search(rb"\(using TLSv1\.[23] with cipher ", msg), msg
    tls_upstream.wait_for_log(PostfixInstance.TLS_SERVER_RE, timeout=10)


def test_postfix_sender_relays_over_tls_to_postfix_upstream(tls_upstream, pubdir,
                                                             upstream_cert):
    sender_port = free_port()
    original = (
        b"From: Alice <alice@sender.test>\r\n"
        b"To: Bob <bob@example.test>\r\n"
        b"Subject: relay peer test\r\n"
        b"Message-ID: <peers-relay-1@sender.test>\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"first line\r\n"
        b".a line starting with a dot\r\n"
        b"..two dots\r\n"
        b"trailing space \r\n"
        b"\r\n"
        b"x" * 900 + b"\r\n"
        b"last line\r\n"
    )
    with PostfixInstance.sender(instance_dir(pubdir, "sender"), sender_port,
                                "127.0.0.1", tls_upstream.port,
                                tls_level="encrypt", ca=upstream_cert.ca) as sender:
        with smtplib.SMTP("127.0.0.1", sender_port, local_hostname="client.test",
                          timeout=20) as smtp:
            refused = smtp.sendmail("alice@sender.test", ["bob@example.test"], original)
        assert refused == {}
        (msg,) = tls_upstream.wait_for_messages(1, timeout=30)
        sent = sender.wait_for_log(r"to=<bob@example\.test>, relay=\S+, .*status=sent",
                                   timeout=30)
        tls = sender.wait_for_log(PostfixInstance.TLS_CLIENT_RE, timeout=10)
    assert sender.instance_pids() == [], "postfix processes left behind"

    assert f"127.0.0.1[127.0.0.1]:{tls_upstream.port}" in sent.group(0)
    kind, peer, version, cipher = tls.groups()
    assert kind == "Trusted", tls.group(0)  # verified against the test CA
    assert peer == f"127.0.0.1[127.0.0.1]:{tls_upstream.port}"
    assert version in ("TLSv1.2", "TLSv1.3")

    # Maildir files use LF; the upstream only prepends Return-Path/Delivered-To/Received.
    expected = original.replace(b"\r\n", b"\n")
    assert msg.endswith(expected), msg
    head, _, body = msg.partition(b"\n\n")
    assert body.split(b"\n") == expected.partition(b"\n\n")[2].split(b"\n")
    prepended = head[: len(head) - len(expected.partition(b"\n\n")[0])]
    assert prepended.startswith(b"Return-Path: <alice@sender.test>\n")
    assert b"Delivered-To: bob@example.test\n" in prepended
    assert prepended.count(b"\nReceived: ") == 2  # sender's smtpd, then upstream's smtpd
    assert re.search(rb"by upstream\.test \(Postfix\) with ESMTPS", prepended), prepended
    assert re.search(rb"\(using " + version.encode() + rb" with cipher ", prepended), prepended


def test_openssl_s_client_starttls_against_postfix_upstream(tls_upstream, upstream_cert):
    require("openssl")
    out = openssl_s_client_starttls("127.0.0.1", tls_upstream.port, "smtp",
                                    cafile=upstream_cert.ca, timeout=30)
    assert re.search(r"Protocol version: TLSv1\.[23]", out), out
    assert "Verification: OK" in out, out
    assert parse_tls_version(out) in ("TLSv1.2", "TLSv1.3")


def test_upstream_without_tls_offers_no_starttls(postfix_bin, pubdir):
    port = free_port()
    with PostfixInstance.upstream(instance_dir(pubdir, "plain"), port) as pf:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@client.test", ["c@example.test"], b"Subject: plain\r\n\r\nhi\r\n")
        (msg,) = pf.wait_for_messages(1, timeout=30)
        assert msg.endswith(b"\n\nhi\n")
    assert pf.instance_pids() == []


async def test_async_helpers_do_not_block_trio(postfix_bin, pubdir, upstream_cert):
    """The trio variants, as used by tests whose gateway runs in the same event loop."""
    import trio

    require("swaks")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    port = free_port()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with PostfixInstance.upstream(instance_dir(pubdir, "async"), port,
                                            cert=upstream_cert.cert,
                                            key=upstream_cert.key) as pf:
            res = await run_swaks_async("--server", "127.0.0.1", "--port", str(port), "--tls",
                                        "--to", "carol@example.test", "--timeout", "20")
            assert res.returncode == 0, res.stdout + res.stderr
            (msg,) = await pf.wait_for_messages_async(1, timeout=30)
            assert b"Delivered-To: carol@example.test\n" in msg
            m = await pf.wait_for_log_async(PostfixInstance.TLS_SERVER_RE, timeout=10)
            assert m.group(3) in ("TLSv1.2", "TLSv1.3")
            out = await openssl_s_client_starttls_async("127.0.0.1", port,
                                                        cafile=upstream_cert.ca)
            assert "Verification: OK" in out, out
        nursery.cancel_scope.cancel()
    assert pf.instance_pids() == []
    assert ticks > 5  # the event loop kept running while the helpers waited


def test_start_fails_cleanly_when_port_is_taken(postfix_bin, pubdir):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        pf = PostfixInstance.upstream(instance_dir(pubdir, "taken"), blocker.getsockname()[1])
        with pytest.raises(PostfixError, match="Address already in use"):
            with pf:
                pass
    assert not pf.running
    assert pf.instance_pids() == []


@pytest.mark.parametrize("ci", [None, "1"])
def test_a_missing_peer_fails_wherever_the_suite_runs(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as info:
        require("no-such-peer-binary-xyz")
    assert "'no-such-peer-binary-xyz' not found" in str(info.value)
    assert "bash .ci/install-peers.sh" in str(info.value)
    assert require("sh").endswith("/sh")
