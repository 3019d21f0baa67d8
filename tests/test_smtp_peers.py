"""The SMTP gateway with real peers written by others: Postfix (sending MTA and upstream),
swaks and openssl s_client, all private instances on loopback ports."""
from __future__ import annotations

import re
import smtplib

import pytest
import trio

from harness import (client_context, config_dict, in_thread, listener_dict, running_gateway,
                     running_sink, smtp_send)
from peers import (PostfixInstance, free_port, instance_dir, openssl_s_client_starttls_async,
                   parse_tls_version, require, run_swaks_async)

pytestmark = pytest.mark.peers

MESSAGE = (b"From: alice@client.test\r\nTo: bob@example.test\r\nSubject: intact?\r\n"
           b"Message-ID: <m1@client.test>\r\nDate: Tue, 24 Nov 2026 00:00:00 +0000\r\n\r\n"
           b"line one\r\n.leading dot\r\n..two dots\r\ntrailing space \r\n" + b"x" * 900 +
           b"\r\n\r\nend\r\n")


def _body_lines(raw: bytes) -> list[bytes]:
    """The delivered message without the trace headers peers add (SPEC §4.4 'intact')."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    out, in_trace = [], False
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and in_trace:
            continue
        in_trace = line.split(b":")[0].lower() in (b"received", b"return-path", b"delivered-to",
                                                      b"x-original-to")
        if not in_trace:
            out.append(line)
    return out


async def test_postfix_through_gateway_to_postfix_verified(pubdir, server_cert, upstream_cert):
    require("postfix")
    up_port, sender_port = free_port(), free_port()
    upstream = PostfixInstance.upstream(instance_dir(pubdir, "up"), up_port,
                                        cert=upstream_cert.cert, key=upstream_cert.key)
    async with upstream:
        data = config_dict([listener_dict(upstream_port=up_port, cert="main",
                                          client_tls="required", upstream_tls="verify",
                                          upstream={"server_name": "upstream.test",
                                                    "profile": "testca"})],
                           server_cert=server_cert, ca_file=server_cert.ca)
        async with running_gateway(data) as (gw, logs):
            gw_port = gw.addresses["smtp"][1]
            sender = PostfixInstance.sender(instance_dir(pubdir, "send"), sender_port,
                                            "localhost", gw_port, tls_level="encrypt",
                                            ca=server_cert.ca)
            async with sender:
                def inject():
                    with smtplib.SMTP("127.0.0.1", sender_port, timeout=20) as s:
                        s.sendmail("alice@client.test", ["bob@example.test"], MESSAGE)
                with trio.fail_after(60):
                    await in_thread(inject)
                    delivered = await upstream.wait_for_messages_async(1, timeout=45)
                    await sender.wait_for_log_async(r"status=sent", timeout=30)
                sender_log = sender.log_text()
    assert _body_lines(delivered[0]) == _body_lines(MESSAGE)
    assert b"(mail-tls-gateway) with ESMTPS" in delivered[0]
    client_leg = logs.of("tls", side="client")
    upstream_leg = logs.of("tls", side="upstream")
    assert client_leg and client_leg[0]["version"].startswith("TLSv1.")
    assert upstream_leg and upstream_leg[0]["version"].startswith("TLSv1.")
    assert upstream_leg[0]["verified"] is True
    assert "TLS connection established" in sender_log
    message = logs.of("message", result="accepted")[0]
    assert message["client_tls"].startswith("TLSv1.") and message["upstream_tls"].startswith("TLSv1.")


async def test_postfix_upstream_connection_is_reused_and_stays_verified(pubdir, server_cert,
                                                                       upstream_cert):
    """Two client sessions, one verified TLS connection to Postfix (SPEC §4.4 pool): the
    second session takes the idle leg (no new connect or handshake) and both arrive intact."""
    require("postfix")
    up_port = free_port()
    upstream = PostfixInstance.upstream(instance_dir(pubdir, "up"), up_port,
                                        cert=upstream_cert.cert, key=upstream_cert.key)
    async with upstream:
        data = config_dict([listener_dict(upstream_port=up_port, cert="main",
                                          upstream_tls="verify",
                                          upstream={"server_name": "upstream.test",
                                                    "profile": "testca"})],
                           server_cert=server_cert, ca_file=server_cert.ca)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)
            with trio.fail_after(60):
                replies = [await in_thread(lambda: smtp_send(port, starttls=True, ctx=ctx,
                                                             body=MESSAGE))
                           for _ in range(2)]
                delivered = await upstream.wait_for_messages_async(2, timeout=45)
            upstream_log = upstream.log_text()
    assert [r[0] for r in replies] == [250, 250]
    assert all(_body_lines(m) == _body_lines(MESSAGE) for m in delivered)
    legs = logs.of("tls", side="upstream")
    assert [leg.get("reused") for leg in legs] == [None, True]
    assert all(leg["verified"] is True for leg in legs)
    # one TLS connection (the other "connect from" is the port probe), two messages on it
    assert upstream_log.count("TLS connection established from") == 1
    smtpd = re.findall(r"postfix/smtpd\[(\d+)\]: \w+: client=", upstream_log)
    assert len(smtpd) == 2 and smtpd[0] == smtpd[1]


async def test_upstream_postfix_without_starttls_required_level(pubdir):
    require("postfix")
    up_port = free_port()
    async with PostfixInstance.upstream(instance_dir(pubdir, "plain"), up_port):
        data = config_dict([listener_dict(upstream_port=up_port, upstream_tls="required")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def send():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    return s.rcpt("bob@example.test")
            with trio.fail_after(30):
                reply = await in_thread(send)
    assert reply == (451, b"4.7.5 TLS is required, but was not offered by host")
    assert logs.of("tls_alert")


async def test_swaks_tls_through_gateway(server_cert):
    require("swaks")
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                result = await run_swaks_async(
                    "--server", f"127.0.0.1:{port}", "--tls", "--to", "bob@example.test",
                    "--from", "alice@client.test", "--helo", "client.test")
                await sink.wait_for_messages(1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    assert logs.of("tls", side="client")[0]["version"].startswith("TLSv1.")


async def test_openssl_s_client_starttls(server_cert):
    require("openssl")
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                out = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", cafile=server_cert.ca,
                    servername="localhost", input_bytes=b"EHLO client.test\r\nQUIT\r\n")
    assert parse_tls_version(out) in ("TLSv1.2", "TLSv1.3")
    assert "Verification: OK" in out
    # the EHLO reply over TLS ends the dialogue's output and no longer offers STARTTLS
    assert "250 SMTPUTF8" in out and "STARTTLS" not in out.split("Verification: OK")[1]
