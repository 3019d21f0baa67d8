"""Encryption rules, client rules and TLS alerts end to end (SPEC §4.3, §7, §8): smtplib
clients through the gateway to the test sink or a real Postfix upstream, over loopback."""
from __future__ import annotations

import json
import smtplib

import pytest
import trio

from harness import (client_context, config_dict, in_thread, listener_dict, running_gateway,
                     running_sink, server_ssl_context)
from peers import PostfixInstance, free_port, instance_dir, require

BODY = b"Subject: rules\r\n\r\nhello\r\n"


def rule(recipient="*", sender="*", sender_encryption="optional",
         recipient_encryption="preferred", enabled=True) -> dict:
    return {"sender": sender, "recipient": recipient, "enabled": enabled,
            "sender_encryption": sender_encryption,
            "recipient_encryption": recipient_encryption}


async def test_sender_encryption_required_gets_530_in_plaintext_and_passes_after_starttls(
        server_cert):
    rules = [rule("secure.test", sender_encryption="required", recipient_encryption="none"),
             rule("*.secure.test", sender_encryption="required", enabled=False)]
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main", rules=rules)],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)

            def session(tls: bool):
                with smtplib.SMTP("localhost", port, timeout=20) as s:
                    s.ehlo("client.test")
                    if tls:
                        s.starttls(context=ctx)
                        s.ehlo("client.test")
                    assert s.mail("alice@client.test")[0] == 250
                    secure = s.rcpt("bob@Secure.Test.")            # normalised before matching
                    sub = s.rcpt("carol@mx.secure.test")           # its rule is disabled
                    other = s.rcpt("dave@other.test")
                    return secure, sub, other, s.data(BODY)
            with trio.fail_after(30):
                plain = await in_thread(session, False)
                tls = await in_thread(session, True)
                await sink.wait_for_messages(2)
    secure, sub, other, done = plain
    assert secure == (530, b"5.7.0 Must use TLS")
    assert sub[0] == 250 and other[0] == 250 and done[0] == 250
    assert sink.messages[0].rcpts == ["carol@mx.secure.test", "dave@other.test"]
    secure, sub, other, done = tls
    assert secure[0] == 250 and done[0] == 250
    assert sink.messages[1].rcpts == ["bob@Secure.Test.", "carol@mx.secure.test",
                                      "dave@other.test"]
    assert logs.of("reject", code=530)


async def test_recipients_with_different_upstream_levels_split_into_transactions(
        server_cert, upstream_cert):
    """First recipient needs TLS upstream, the second must go in plaintext: 452 4.5.3 for
    the second, and the client's next transaction delivers it over a plaintext leg."""
    rules = [rule("secure.test", recipient_encryption="required"),
             rule("legacy.test", recipient_encryption="none")]
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main", rules=rules,
                                          upstream_tls="preferred")],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("localhost", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    first = s.rcpt("bob@secure.test")
                    second = s.rcpt("carol@legacy.test")
                    done1 = s.data(BODY)
                    s.mail("alice@client.test")
                    retry = s.rcpt("carol@legacy.test")
                    done2 = s.data(BODY)
                    return first, second, done1, retry, done2
            with trio.fail_after(30):
                first, second, done1, retry, done2 = await in_thread(session)
                await sink.wait_for_messages(2)
    assert first[0] == 250
    assert second == (452, b"4.5.3 Recipient needs a different TLS policy, send it in a new "
                           b"transaction")
    assert done1[0] == 250 and retry[0] == 250 and done2[0] == 250
    # the upstream's view: each recipient arrived over the leg its rule asked for
    by_rcpt = {tuple(m.rcpts): m for m in sink.messages}
    assert by_rcpt[("bob@secure.test",)].tls is True
    assert by_rcpt[("carol@legacy.test",)].tls is False
    assert [e["side"] for e in logs.of("tls")].count("upstream") == 1


async def test_rule_can_exempt_a_partner_from_required_upstream_tls(server_cert):
    """A rule may lower the level below upstream.tls: the legacy partner goes in plaintext
    to an upstream without STARTTLS while everyone else is refused."""
    rules = [rule("legacy.test", recipient_encryption="none")]
    async with running_sink() as sink:                  # no STARTTLS at all
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="required",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("localhost", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    return s.rcpt("bob@legacy.test"), s.data(BODY)
            with trio.fail_after(30):
                rcpt, done = await in_thread(session)
                await sink.wait_for_messages(1)
    assert rcpt[0] == 250 and done[0] == 250
    assert sink.messages[0].tls is False


async def test_required_rule_to_postfix_without_starttls_tempfails_alerts_and_tracks(
        pubdir, tmp_path):
    require("postfix")
    up_port = free_port()
    tracking = tmp_path / "tracking.jsonl"
    rules = [rule("example.test", recipient_encryption="required")]
    async with PostfixInstance.upstream(instance_dir(pubdir, "rules-plain"), up_port) as pf:
        data = config_dict([listener_dict(upstream_port=up_port, upstream_tls="preferred",
                                          rules=rules)],
                           tracking_log=str(tracking),
                           alert_recipients=["postmaster@example.test"],
                           state_dir=str(tmp_path / "state"))
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def send():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    replies = []
                    for _ in range(2):                      # the second alert is held back
                        s.mail("alice@client.test")
                        replies.append(s.rcpt("bob@example.test"))
                        s.rset()
                    return replies
            with trio.fail_after(60):
                replies = await in_thread(send)
                # the alert e-mail travels through the same upstream (plaintext: it names
                # domains, not mail), at most once per domain and reason
                messages = await pf.wait_for_messages_async(1, timeout=30)
    assert replies == [(451, b"4.7.5 TLS is required, but was not offered by host")] * 2
    alerts = logs.of("tls_alert")
    assert len(alerts) == 2 and alerts[0]["domains"] == "example.test"
    assert alerts[0]["reason"] == "STARTTLS not offered"
    assert len(logs.of("alert_mail")) == 1
    assert len(messages) == 1
    assert b"Subject: TLS alert: tls_not_offered for example.test" in messages[0]
    records = [json.loads(line) for line in tracking.read_text().splitlines()]
    assert [r["result"] for r in records] == ["tempfail", "tempfail"]
    assert records[0]["recipients"] == ["bob@example.test"]
    assert records[0]["reply"].startswith("451 4.7.5")
    assert records[0]["upstream_tls"] is None


async def test_client_rule_by_network_tightens_the_listener(server_cert):
    client_rules = [{"match": "127.0.0.0/8", "client_tls": "required"}]
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          client_tls="optional", client_rules=client_rules)],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def plaintext():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    return s.mail("alice@client.test")
            with trio.fail_after(30):
                reply = await in_thread(plaintext)
    assert reply == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert logs.of("client_rule", match="127.0.0.0/8")


async def test_client_rule_by_network_can_relax_to_none(server_cert):
    client_rules = [{"match": "::1/128", "client_tls": "verify"},
                    {"match": "127.0.0.1", "client_tls": "none"}]
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          client_tls="required", client_rules=client_rules)],
                           server_cert=server_cert, ca_file=server_cert.ca)
        data["listeners"][0]["profile"] = "testca"
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def plaintext():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    starttls = s.has_extn("starttls")
                    s.mail("alice@client.test")
                    return starttls, s.rcpt("bob@example.test"), s.data(BODY)
            with trio.fail_after(30):
                starttls, rcpt, done = await in_thread(plaintext)
    assert starttls is False
    assert rcpt[0] == 250 and done[0] == 250


async def test_client_rule_by_sender_domain(server_cert, client_cert):
    client_rules = [{"match": "tight.test", "client_tls": "required"},
                    {"match": "*.certs.test", "client_tls": "verify"}]
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main",
                                          profile="testca", client_rules=client_rules)],
                           server_cert=server_cert, ca_file=server_cert.ca)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session(tls: bool, sender: str, with_cert: bool = False):
                c = client_context(server_cert.ca)
                if with_cert:
                    c.load_cert_chain(str(client_cert.cert), str(client_cert.key))
                with smtplib.SMTP("localhost", port, timeout=20) as s:
                    s.ehlo("client.test")
                    if tls:
                        s.starttls(context=c)
                        s.ehlo("client.test")
                    return s.mail(sender)
            with trio.fail_after(30):
                plain_tight = await in_thread(session, False, "a@tight.test")
                plain_other = await in_thread(session, False, "a@other.test")
                tls_tight = await in_thread(session, True, "a@tight.test")
                tls_nocert = await in_thread(session, True, "a@mx.certs.test")
                tls_cert = await in_thread(session, True, "a@mx.certs.test", True)
    assert plain_tight == (530, b"5.7.0 Must use TLS")
    assert plain_other[0] == 250 and tls_tight[0] == 250
    assert tls_nocert == (421, b"4.7.1 Unverified client certificate")
    assert tls_cert[0] == 250


@pytest.mark.parametrize("esmtp_level", ["required", "verify"])
def test_esmtp_false_with_required_tls_is_a_config_error(esmtp_level):
    from gateway.config import parse_config
    from gateway.errors import ConfigError
    data = config_dict([listener_dict(upstream_port=25, client_tls=esmtp_level, esmtp=False)])
    if esmtp_level == "verify":
        data["tls_profiles"] = {"ca": {"clone": "default", "ca_file": "/etc/hostname"}}
        data["listeners"][0]["profile"] = "ca"
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "listeners[0].esmtp" in str(err.value)


def test_esmtp_false_on_optional_listener_warns():
    from gateway.config import parse_config
    config = parse_config(config_dict([listener_dict(upstream_port=25, esmtp=False)]))
    assert any("esmtp = false disables STARTTLS" in w for w in config.warnings)


async def test_esmtp_false_answers_ehlo_502_and_helo_works():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          esmtp=False)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    ehlo = s.docmd("EHLO client.test")
                    helo = s.docmd("HELO client.test")
                    s.mail("alice@client.test")
                    s.rcpt("bob@example.test")
                    return ehlo, helo, s.data(BODY)
            with trio.fail_after(30):
                ehlo, helo, done = await in_thread(session)
                await sink.wait_for_messages(1)
    assert ehlo[0] == 502 and helo[0] == 250 and done[0] == 250


async def test_received_header_off_and_xclient_forwarding():
    async with running_sink(xclient=True) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          received_header=False, forward_client=True)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    s.rcpt("bob@example.test")
                    return s.data(BODY)
            with trio.fail_after(30):
                done = await in_thread(session)
                await sink.wait_for_messages(1)
    assert done[0] == 250
    msg = sink.messages[0]
    assert msg.data == BODY                       # no Received header added
    assert msg.xclient.get("ADDR") == "127.0.0.1" and msg.xclient.get("HELO") == "client.test"


def _data(s: smtplib.SMTP):
    """DATA and the message; a refusal as (code, text) instead of smtplib's exception."""
    try:
        return s.data(BODY)
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error


def _one_transaction(port: int, *rcpts: str):
    """One plaintext transaction from alice@client.test: each RCPT's reply, then DATA's."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        replies = [s.rcpt(r) for r in rcpts]
        return replies, _data(s)


async def test_failed_required_recipient_holds_no_later_recipient_hostage():
    """§4.3: a recipient whose `required` leg could not be had (the upstream offers no
    STARTTLS) gets its own 451 4.7.5; the next recipient is decided on its own: a `preferred`
    one opens a plaintext leg and is delivered. A `required` recipient before that gets the
    same 451 4.7.5 without the gateway trying (and alerting) again in that transaction; one
    after it can't ride the plaintext leg the `preferred` one fixed: 452 4.5.3."""
    rules = [rule("secure.test", recipient_encryption="required")]
    async with running_sink() as sink:                  # no STARTTLS at all
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                replies, done = await in_thread(
                    _one_transaction, port, "bob@secure.test", "dave@secure.test",
                    "carol@other.test", "erin@secure.test")
                assert done[0] == 250, (replies, done)
                await sink.wait_for_messages(1)
    not_offered = (451, b"4.7.5 TLS is required, but was not offered by host")
    assert replies[:2] == [not_offered, not_offered]
    assert replies[2][0] == 250
    assert replies[3] == (452, b"4.5.3 Recipient needs a different TLS policy, send it in a "
                               b"new transaction")
    assert sink.messages[0].rcpts == ["carol@other.test"] and sink.messages[0].tls is False
    assert len(logs.of("tls_alert")) == 1 and len(logs.of("upstream_error")) == 1


async def test_preferred_recipient_on_plaintext_leg_then_required_gets_452():
    """§4.3, the other order: the first accepted recipient (`preferred`, no STARTTLS offered)
    fixes a plaintext leg; a `required` one after it can't ride it: 452 4.5.3, and the
    message goes to the first."""
    rules = [rule("secure.test", recipient_encryption="required")]
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                (first, second), done = await in_thread(_one_transaction, port,
                                                        "carol@other.test", "bob@secure.test")
                assert done[0] == 250, (first, second, done)
                await sink.wait_for_messages(1)
    assert first[0] == 250 and done[0] == 250
    assert second == (452, b"4.5.3 Recipient needs a different TLS policy, send it in a new "
                           b"transaction")
    assert sink.messages[0].rcpts == ["carol@other.test"] and sink.messages[0].tls is False
    assert not logs.of("tls_alert")


async def test_leg_with_no_accepted_recipient_is_replaced_for_the_next_one(upstream_cert):
    """§4.3: a transaction's leg is the one its first *accepted* recipient fixed. The upstream
    refused the first recipient (550, on a plaintext leg at `none`): a `required` recipient
    after it is not told 452 but carried on a TLS leg of its own."""
    rules = [rule("legacy.test", recipient_encryption="none"),
             rule("secure.test", recipient_encryption="required")]
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            reject_rcpt={"nobody@legacy.test"}) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                (first, second), done = await in_thread(_one_transaction, port,
                                                        "nobody@legacy.test", "bob@secure.test")
                assert done[0] == 250, (first, second, done)
                await sink.wait_for_messages(1)
    assert first == (550, b"5.1.1 No such user")
    assert second[0] == 250 and done[0] == 250
    assert sink.messages[0].rcpts == ["bob@secure.test"] and sink.messages[0].tls is True


async def test_postfix_sender_delivers_the_preferred_recipient_when_required_one_fails(
        pubdir):
    """The trial's fault with Postfix as the sending MTA: it sorts recipients (by domain),
    so the `required` one (a@alpha.test) comes first; its 451 4.7.5 defers only it, and the
    `preferred` one is delivered on that same attempt instead of being deferred with it."""
    require("postfix")
    sender_port = free_port()
    rules = [rule("alpha.test", recipient_encryption="required")]
    async with running_sink() as sink:                  # no STARTTLS at all
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            gw_port = gw.addresses["smtp"][1]
            sender = PostfixInstance.sender(instance_dir(pubdir, "hostage-send"), sender_port,
                                            "127.0.0.1", gw_port, tls_level="none")
            async with sender:
                def inject():
                    with smtplib.SMTP("127.0.0.1", sender_port, timeout=20) as s:
                        s.sendmail("alice@client.test", ["z@zulu.test", "a@alpha.test"],
                                   BODY)
                with trio.fail_after(60):
                    await in_thread(inject)
                    # each recipient's first attempt, as the sending Postfix logged it
                    zulu = await sender.wait_for_log_async(
                        r"to=<z@zulu\.test>.*status=(sent|deferred).*", timeout=30)
                    alpha = await sender.wait_for_log_async(
                        r"to=<a@alpha\.test>.*status=deferred.*", timeout=30)
                    assert zulu.group(1) == "sent", zulu.group(0)
                    await sink.wait_for_messages(1)
    assert "dsn=4.7.5" in alpha.group(0), alpha.group(0)
    assert "TLS is required, but was not offered by host" in alpha.group(0)
    assert sink.messages[0].rcpts == ["z@zulu.test"]
