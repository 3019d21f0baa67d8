"""Production faults of milter listeners found by trials (issue #21), end to end: smtplib or a
raw client -> gateway -> sink, with the scripted test milter of tests/milters.py (and real
rspamd where the fault was seen with it).

- the DATA clock with milters: the grace of `data` seconds and the `data_min_rate` floor hold
  exactly as without milters (SPEC §9), for a body sent in parts with pauses;
- metric labels: a milter's refusal is counted as `milter_<result>`, never by its words, and
  an upstream's relayed refusal is not a policy rejection (SPEC §11);
- macros as Postfix sends them: {daemon_name} the gateway's hostname, {cert_subject} and
  {cert_issuer} of a trusted client certificate, {auth_author} (SPEC §4.7);
"""
from __future__ import annotations

import smtplib
import time

import pytest
import trio

from milters import CONTINUE, make_message
from test_milter_gateway import REAL, Script, _config, _milter, _run, rspamd  # noqa: F401
from harness import in_thread, running_gateway, running_sink

BODY = (b"Subject: parts\r\nFrom: alice@client.test\r\n\r\n"
        + b"".join(b"line %03d of a message sent in parts\r\n" % i for i in range(40)))


def _parts(body: bytes, n: int) -> list[bytes]:
    step = -(-len(body) // n)
    return [body[i:i + step] for i in range(0, len(body), step)]


def _send_in_parts(port, parts, pause, *, rcpt="bob@example.test"):
    """DATA sent as *parts* with *pause* seconds between them (the client's own pace), the
    final dot right after the last. Returns the reply to the dot."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("alice@client.test")[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        try:
            for i, part in enumerate(parts):
                if i:
                    time.sleep(pause)
                s.send(part + (b".\r\n" if i == len(parts) - 1 else b""))
        except (smtplib.SMTPServerDisconnected, OSError):
            pass                   # cut off: the reply the gateway sent before closing
        if s.sock is None and s.file is None:
            return (0, b"disconnected without a reply")
        try:
            return s.getreply()
        except smtplib.SMTPServerDisconnected:
            return (0, b"disconnected without a reply")


# --- item 1: the DATA clock with milters (SPEC §9) ------------------------------------------

async def test_a_body_sent_in_parts_with_pauses_passes_a_milter_listener_within_the_grace(
        tmp_path):
    # 5 parts, 0.3 s apart: 1.5 s in all, inside the 3 s grace, far below the rate floor
    script = Script()
    parts = _parts(BODY, 5)
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, parts, 0.3),
        gateway={"timeouts": {"data": 3, "data_min_rate": 100000}})
    assert logs.of("reject", code=421) == []
    assert end[0] == 250, end
    [msg] = sink.messages
    assert msg.data.endswith(BODY)
    assert script.body == BODY.partition(b"\r\n\r\n")[2]


async def test_time_blocked_on_a_milter_does_not_count_against_the_client(tmp_path):
    # the milter takes 1.5 s over the first body chunk: longer than the 1 s grace; the
    # client, quick itself (parts at 0, 0.9 and 1.8 s, the dot with the last), must not pay
    # for it (as for time blocked on the upstream, §9)
    stalled = []

    async def slow_body(peer):
        if not stalled:
            stalled.append(True)
            await trio.sleep(1.5)
        await peer.send(CONTINUE)

    script = Script(on={b"B": slow_body})
    parts = _parts(BODY, 3)
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, parts, 0.9),
        gateway={"timeouts": {"data": 1, "data_min_rate": 100000}})
    assert logs.of("reject", code=421) == []
    assert end[0] == 250, end
    assert sink.messages[0].data.endswith(BODY)


async def test_the_rate_floor_still_applies_with_milters(tmp_path):
    """After the grace, a client below data_min_rate gets 421 4.4.2 and the upstream never
    gets the message, milters or not."""
    script = Script()
    got = []

    async def trickle_client(port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.receive_some(4096)
            for line in (b"EHLO c\r\n", b"MAIL FROM:<a@b.test>\r\n",
                         b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"):
                await stream.send_all(line)
                reply = b""
                while not reply.endswith(b"\r\n") or reply.split(b"\r\n")[-2][3:4] == b"-":
                    reply += await stream.receive_some(4096)
                assert reply[:1] in (b"2", b"3"), reply
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                async def trickle():
                    # 20 bytes every 0.2 s = 100 bytes/s, each read well inside `data`
                    for _ in range(100):
                        try:
                            await stream.send_all(b"x" * 18 + b"\r\n")
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                        await trio.sleep(0.2)
                nursery.start_soon(trickle)
                data = b""
                while True:
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    data += chunk
                nursery.cancel_scope.cancel()
            got.append((data, trio.current_time() - start))

    async with running_sink() as sink:
        async with trio.open_nursery() as nursery:
            from test_milter_gateway import _serve_milter
            from milters import scripted_milter
            address = await nursery.start(_serve_milter, scripted_milter(script))
            config = _config(sink, [_milter(address)], tmp_path,
                             timeouts={"data": 1, "data_min_rate": 1000})
            async with running_gateway(config) as (gw, logs):
                with trio.fail_after(20):
                    await trickle_client(gw.addresses["smtp"][1])
            nursery.cancel_scope.cancel()
    [(data, took)] = got
    # the 421 is sent; a reset for our unread bytes may beat it to the reader
    assert data in (b"421 4.4.2 Timeout exceeded\r\n", b""), data
    assert logs.of("reject", code=421, reason="timeout")
    assert 0.9 < took < 4, took                 # not before the grace of `data` seconds
    assert sink.messages == []


@pytest.mark.peers
async def test_a_trickled_message_passes_real_rspamd(tmp_path, rspamd):  # noqa: F811
    message = make_message()
    parts = _parts(message, 6)
    async with running_sink() as sink:
        milters = [{"name": "rspamd", "address": rspamd.address, **REAL}]
        config = _config(sink, milters, tmp_path,
                         timeouts={"data": 3, "data_min_rate": 100000})
        async with running_gateway(config) as (gw, logs):
            with trio.fail_after(60):
                end = await in_thread(lambda: _send_in_parts(
                    gw.addresses["smtp"][1], parts, 0.3, rcpt="bob@example.net"))
    assert end[0] == 250, end
    [msg] = sink.messages
    assert b"\r\nX-Spamd-Result: default: False [" in msg.data
    assert msg.data.endswith(message.partition(b"\r\n\r\n")[2])


# --- item 8: metric labels never come from client, milter or upstream text (SPEC §11) ------

# every reason a milter's refusal may be counted under (milter_<result>), and only those
MILTER_REASONS = {"milter_reject", "milter_tempfail", "milter_replycode", "milter_error",
                  "milter_timeout"}


async def test_a_milter_refusing_many_recipients_in_its_own_words_adds_no_series(tmp_path):
    """A milter answers each of 150 recipients with its own text (`550 <addr> unknown here`,
    the trial's case) or a plain reject/tempfail, and refuses two messages at their end with
    varied text; the upstream refuses the third with its own words. A real /metrics scrape
    of `gateway run` shows gateway_policy_rejections_total only under milter_<result>."""
    from peers import free_port
    from supervised import GatewayProcess, scrape, samples_of
    from milters import REJECT, TEMPFAIL, replycode, scripted_milter

    counter = {"rcpt": 0, "eom": 0}

    async def rcpt(peer):
        counter["rcpt"] += 1
        n = counter["rcpt"]
        address = peer.received[-1][1].split(b"\0")[0].decode()
        if n % 10 == 1:
            await peer.send(REJECT)
        elif n % 10 == 2:
            await peer.send(TEMPFAIL)
        elif n % 10 == 3:
            await peer.send(CONTINUE)            # 5 recipients a message are accepted
        elif n % 2:
            await peer.send(replycode(f"550 {address} unknown here"))
        else:
            await peer.send(replycode(f"550 5.1.{n % 7} {address} unknown, ref {n}"))

    async def eom(peer):
        counter["eom"] += 1
        if counter["eom"] < 3:
            await peer.send(replycode(f"554 5.7.{counter['eom']} spam score {counter['eom']}"))
        else:
            await peer.send(CONTINUE)

    script = Script(on={b"R": rcpt, b"E": eom})
    port, metrics_port = free_port(), free_port()

    def client():
        replies = []
        for m in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.ehlo("client.test")
                assert s.mail("alice@client.test")[0] == 250
                codes = [s.rcpt(f"user{m}x{i}@example.test")[0] for i in range(50)]
                try:
                    end = s.data(b"Subject: x\r\n\r\nbody\r\n")
                except smtplib.SMTPDataError as exc:
                    end = (exc.smtp_code, exc.smtp_error)
                replies.append((codes, end))
        return replies

    async with running_sink(data_reply=b"554 5.7.9 upstream <zz@example.test> says no 17\r\n"
                            ) as sink, scripted_milter(script) as address:
        config = tmp_path / "gateway.toml"
        config.write_text(f"""
[gateway]
hostname = "mx.test"
workers = 1
metrics = "127.0.0.1:{metrics_port}"
spool_dir = "{tmp_path / 'spool'}"

[[listeners]]
name = "mx"
bind = "127.0.0.1:{port}"
tls = "off"
client_tls = "none"

[listeners.upstream]
address = "127.0.0.1:{sink.port}"
tls = "none"

[[listeners.milters]]
name = "varied"
address = "{address}"
""")
        gw = GatewayProcess(config, tmpdir=tmp_path)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                replies = await in_thread(client)
                samples = await in_thread(lambda: scrape(metrics_port))
        finally:
            await in_thread(gw.stop)
    assert [end[0] for _, end in replies] == [554, 554, 554]
    refused = sum(1 for codes, _ in replies for c in codes if c != 250)
    assert refused == 135
    reasons = {dict(labels)["reason"]: value for (name, labels), value in samples.items()
               if name == "gateway_policy_rejections_total"
               and dict(labels)["listener"] == "mx"}
    # per message: 5 reject, 5 tempfail, 35 replycode at RCPT; two replycodes at the end;
    # the upstream's own refusal of the third message is not a policy rejection
    assert reasons == {"milter_reject": 15, "milter_tempfail": 15,
                       "milter_replycode": 105 + 2}
    assert set(reasons) <= MILTER_REASONS
    assert samples_of(samples, "gateway_messages_total", listener="mx", result="rejected") \
        == [3]


@pytest.mark.parametrize("behaviour,expect", [("close", "milter_error"),
                                              ("stall", "milter_timeout")])
async def test_a_failed_milters_default_action_is_counted_as_milter_error_or_timeout(
        tmp_path, behaviour, expect):
    from functools import partial

    from gateway.logs import EventLog
    from gateway.config import parse_config
    from gateway.runtime import WorkerState
    from gateway.server import serve
    from harness import LogCapture
    from milters import scripted_milter
    from test_imap_gateway import RecordingMetrics
    from test_milter_gateway import _serve_milter, _until_eof

    async def close(peer):
        await peer.stream.aclose()
        return True

    script = Script(on={b"M": close if behaviour == "close" else _until_eof})
    metrics = RecordingMetrics()
    async with running_sink() as sink, trio.open_nursery() as nursery:
        address = await nursery.start(_serve_milter, scripted_milter(script))
        config = parse_config(_config(sink, [_milter(address, command_timeout=0.5)], tmp_path))
        gw = await nursery.start(partial(serve, config, EventLog(fmt="json", stream=LogCapture()),
                                         state=WorkerState(metrics=metrics)))
        with trio.fail_after(20):
            mail = await in_thread(lambda: _mail_only(gw.addresses["smtp"][1]))
        nursery.cancel_scope.cancel()
    assert mail == (451, b"4.7.1 Service unavailable - try again later")
    reasons = {k[1][1]: v for k, v in metrics.values.items()
               if k[0] == "policy_rejections_total"}
    assert reasons == {expect: 1}


def _mail_only(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        return s.mail("alice@client.test")


# --- item 15: macros as Postfix sends them (SPEC §4.7) ---------------------------------------

async def test_macros_name_the_hostname_the_client_certificate_and_the_auth_author(
        tmp_path, ca, server_cert, upstream_cert):
    """{daemon_name} is the gateway's hostname; with a verified client certificate
    {cert_subject} is its CN and {cert_issuer} its issuer's CN, else the issuer's O (as
    Postfix's tls_issuer_CN); on an authenticated session MAIL FROM's AUTH= value is
    {auth_author} (Postfix's sasl_sender), on an unauthenticated one it is not sent."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    from harness import client_context, config_dict, listener_dict, server_ssl_context

    issued = ca.issue_cert("client.test", common_name="Client Test CN")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    [org] = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert not ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)

    script = Script()
    ctx = client_context(server_cert.ca)
    ctx.load_cert_chain(str(cert), str(key))

    def sessions(port):
        with smtplib.SMTP("localhost", port, timeout=30) as s:     # authenticated
            s.starttls(context=ctx)
            s.ehlo("client.test")
            s.user, s.password = "alice", "s3cret"
            assert s.auth("PLAIN", s.auth_plain)[0] == 235
            assert s.mail("alice@client.test", ["AUTH=<alice@client.test>"])[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            assert s.data(b"Subject: one\r\n\r\nbody\r\n")[0] == 250
        with smtplib.SMTP("localhost", port, timeout=30) as s:     # not authenticated
            s.starttls(context=ctx)
            s.ehlo("client.test")
            assert s.mail("carol@client.test", ["AUTH=<carol@client.test>"])[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            assert s.data(b"Subject: two\r\n\r\nbody\r\n")[0] == 250

    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={"alice": "s3cret"}) as sink:
        async with trio.open_nursery() as nursery:
            from test_milter_gateway import _serve_milter
            from milters import scripted_milter
            address = await nursery.start(_serve_milter, scripted_milter(script))
            listener = listener_dict(upstream_port=sink.port, cert="main", client_tls="verify",
                                     profile="testca", upstream_tls="required",
                                     auth="passthrough", milters=[_milter(address)])
            config = config_dict([listener], server_cert=server_cert,
                                 ca_file=server_cert.ca, spool_dir=str(tmp_path / "spool"))
            async with running_gateway(config) as (gw, logs):
                with trio.fail_after(30):
                    await in_thread(lambda: sessions(gw.addresses["smtp"][1]))
                    while len([s for s in script.sessions if b"E" in s]) < 2:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    first, second = script.sessions
    assert first[b"C"]["{daemon_name}"] == "mx.test" and first[b"C"]["j"] == "mx.test"
    helo = first[b"H"]
    assert helo["{cert_subject}"] == "Client Test CN"
    assert helo["{cert_issuer}"] == org.value
    assert helo["{tls_version}"].startswith("TLSv1")
    mail = first[b"M"]
    assert (mail["{auth_type}"], mail["{auth_authen}"]) == ("PLAIN", "alice")
    assert mail["{auth_author}"] == "<alice@client.test>"
    assert second[b"H"]["{cert_issuer}"] == org.value
    for name in ("{auth_type}", "{auth_authen}", "{auth_author}"):
        assert name not in second[b"M"]
    assert [m.auth_user for m in sink.messages] == ["alice", None]


@pytest.mark.peers
async def test_rspamd_authentication_results_name_the_gateways_hostname(
        tmp_path, rspamd):  # noqa: F811
    message = make_message()
    async with running_sink() as sink:
        milters = [{"name": "rspamd", "address": rspamd.address, **REAL}]
        # the listener is called "inbound": rspamd must not take it for the authserv-id
        config = _config(sink, milters, tmp_path)
        config["listeners"][0]["name"] = "inbound"
        async with running_gateway(config) as (gw, logs):
            with trio.fail_after(60):
                end = await in_thread(lambda: _send_in_parts(
                    gw.addresses["inbound"][1], [message], 0, rcpt="bob@example.net"))
    assert end[0] == 250, end
    [msg] = sink.messages
    head = msg.data.partition(b"\r\n\r\n")[0]
    assert b"\r\nAuthentication-Results: mx.test;" in head, head
    assert b"inbound" not in head
