"""The scripted fake upstream (tests/fake_upstream.py) itself: what the other tests rely on it
for — STARTTLS with a given certificate, EHLO extensions, and each line kept with its state."""
from __future__ import annotations

import smtplib

import trio

from fake_upstream import scripted_upstream
from harness import (config_dict, in_thread, listener_dict, running_gateway,
                     server_ssl_context, smtp_send)


async def test_the_gateway_starts_tls_with_the_fake_and_it_records_each_state(upstream_cert):
    ctx = server_ssl_context(upstream_cert)
    async with scripted_upstream(starttls=ctx, ehlo=["PIPELINING", "8BITMIME"]) as up:
        data = config_dict([listener_dict(upstream_port=up.port, client_tls="none",
                                          upstream_tls="required", profile="testca")],
                           ca_file=upstream_cert.ca)
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(gw.addresses["smtp"][1]))
    assert reply[0] == 250
    [conn] = up.connections
    assert conn.tls
    verbs = conn.verbs()
    assert verbs[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]
    assert verbs[3:7] == [b"MAIL", b"RCPT", b"DATA", b"."]
    states = [state for state, _ in conn.lines]
    assert states[states.index("data"):].count("end") == 1
    assert up.messages[0].endswith(b"\r\nhello\r\n")
    [leg] = logs.of("tls", side="upstream")
    assert leg["version"] == "TLSv1.3"


async def test_sasl_responses_are_recorded_apart_from_commands():
    async with scripted_upstream(users={"alice": "secret"}) as up:
        def client():
            with smtplib.SMTP("127.0.0.1", up.port, timeout=10) as s:
                s.ehlo("client.test")
                assert s.has_extn("auth") and not s.has_extn("starttls")
                s.login("alice", "secret")
                return s.docmd("AUTH", "PLAIN"), s.docmd("*")
        with trio.fail_after(30):
            cont, aborted = await in_thread(client)
    assert cont == (334, b"") and aborted[0] == 501
    [conn] = up.connections
    # smtplib's login sends an initial response (a command); "*" answered the 334
    assert [state for state, _ in conn.lines if state != "command"] == ["sasl"]
    assert up.sasl_lines() == [b"*"]
    assert [v for v in conn.verbs() if v == b"AUTH"] == [b"AUTH", b"AUTH"]
