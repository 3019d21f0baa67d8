"""Production faults of milter listeners found by trials (issue #21), end to end: smtplib or a
raw client -> gateway -> sink, with the scripted test milter of tests/milters.py (and real
rspamd where the fault was seen with it).

- the DATA clock with milters: the grace of `data` seconds and the `data_min_rate` floor hold
  exactly as without milters (SPEC §9), for a body sent in parts with pauses;
- metric labels: a milter's refusal is counted as `milter_<result>`, never by its words, and
  an upstream's relayed refusal is not a policy rejection (SPEC §11);
- macros as Postfix sends them: {daemon_name} the gateway's hostname, {cert_subject} and
  {cert_issuer} of a trusted client certificate, {auth_author} (SPEC §4.7);
- a milter's changes are bounded: too many headers or recipients, a too-long header, a new
  body or added headers past max_message_size fail the milter (default_action), nothing
  oversized goes upstream, and reading stops at the bound (SPEC §4.7).
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

    from gateway.observe.logs import EventLog
    from gateway.config import parse_config
    from gateway.serve.runtime import WorkerState
    from gateway.serve.server import serve
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


# --- item 9: a milter's changes are bounded (SPEC §4.7) --------------------------------------

TEMPFAIL_471 = (451, b"4.7.1 Service unavailable - try again later")


def _cut_off(packets, sent):
    """An end-of-message answer that writes *packets* until the gateway stops reading
    (counted in *sent*), then CONTINUE."""
    async def eom(peer):
        try:
            for packet in packets:
                await peer.send(packet)
                sent.append(len(packet))
            await peer.send(CONTINUE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True                  # the gateway hung up: stop serving
    return eom


def _no_data_upstream(sink) -> bool:
    return sink.messages == [] and not any(
        line.upper().startswith(b"DATA") for s in sink.sessions for line in s)


@pytest.mark.parametrize("case", ["headers", "long_header", "recipients"])
async def test_changes_beyond_the_bounds_fail_the_milter_and_nothing_goes_upstream(
        tmp_path, case):
    from milters import addheader, addrcpt
    packets = {
        "headers": [addheader("X-Many", str(i)) for i in range(1001)],
        "long_header": [addheader("X-Long", "x" * 65536)],
        "recipients": [addrcpt(f"<r{i}@example.test>") for i in range(1001)],
    }[case]
    sent: list[int] = []
    script = Script(on={b"E": _cut_off(packets, sent)})
    end, sink, logs = await _run(tmp_path, script, send=lambda port: _send_in_parts(
        port, [BODY], 0))
    assert end == TEMPFAIL_471
    assert _no_data_upstream(sink)
    [event] = logs.of("milter", stage="eom")
    assert event["result"] == "error" and event["milter"] == "m0"


async def test_changes_at_the_bounds_are_applied(tmp_path):
    from milters import addheader, addrcpt
    packets = ([addheader("X-Many", str(i)) for i in range(999)]
               + [addheader("X-Long", "x" * (65536 - len("X-Long:")))]
               + [addrcpt(f"<r{i}@example.test>") for i in range(1000)])
    sent: list[int] = []
    script = Script(on={b"E": _cut_off(packets, sent)})
    end, sink, logs = await _run(tmp_path, script, send=lambda port: _send_in_parts(
        port, [BODY], 0))
    assert end[0] == 250, end
    [msg] = sink.messages
    assert len(msg.rcpts) == 1001
    assert msg.data.count(b"\r\nX-Many: ") == 999 and b"\r\nX-Long: xxx" in msg.data


async def test_a_body_replacement_over_max_message_size_is_cut_off_unread(tmp_path):
    """The milter offers 64 MB of replacement body against max_message_size = 1 MB: the
    gateway stops reading soon after the bound (its memory and spool stay bounded), the
    milter counts as failed (451 4.7.1) and the upstream gets nothing."""
    from milters import replbody
    piece = replbody(b"y" * 65000 + b"\r\n")
    sent: list[int] = []
    script = Script(on={b"E": _cut_off([piece] * 1000, sent)})
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, [BODY], 0),
        gateway={"listener": {"max_message_size": 1000000}, "milter_memory": 65536})
    assert end == TEMPFAIL_471
    assert _no_data_upstream(sink)
    assert len(sent) < 1000 and sum(sent) < 8_000_000      # not read to the end
    [event] = logs.of("milter", stage="eom")
    assert event["result"] == "error"


async def test_added_headers_that_take_the_message_over_max_message_size_fail(tmp_path):
    from milters import addheader
    # the message is ~1.7 KB, the bound 3000 octets; 20 headers of 100 octets go past it
    packets = [addheader(f"X-Pad{i}", "p" * 90) for i in range(20)]
    sent: list[int] = []
    script = Script(on={b"E": _cut_off(packets, sent)})
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, [BODY], 0),
        gateway={"listener": {"max_message_size": 3000}})
    assert len(BODY) < 3000
    assert end == TEMPFAIL_471
    assert _no_data_upstream(sink)


@pytest.mark.parametrize("default", ["accept", "reject"])
async def test_a_milter_over_the_bounds_gets_its_default_action(tmp_path, default):
    """accept: the message goes on without that milter's changes; reject: 550 5.7.1."""
    from milters import addheader
    packets = [addheader("X-Many", str(i)) for i in range(1001)]
    sent: list[int] = []
    script = Script(on={b"E": _cut_off(packets, sent)})
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, [BODY], 0),
        milter_extra={"default_action": default})
    if default == "accept":
        assert end[0] == 250, end
        [msg] = sink.messages
        assert b"X-Many" not in msg.data and msg.data.endswith(BODY)
    else:
        assert end == (550, b"5.7.1 Message content rejected")
        assert _no_data_upstream(sink)


async def test_a_replacement_body_beyond_milter_memory_goes_to_the_spool(tmp_path,
                                                                         monkeypatch):
    from gateway.relay import spool as spool_mod
    from milters import replbody
    opened = []
    real = spool_mod._unlinked_file

    def unlinked(directory):
        fd = real(directory)
        opened.append(fd)
        return fd
    monkeypatch.setattr(spool_mod, "_unlinked_file", unlinked)
    lines = b"".join(b"replaced line %06d\n" % i for i in range(40000))     # ~800 KB, LF
    pieces = [replbody(lines[i:i + 60000]) for i in range(0, len(lines), 60000)]
    script = Script(eom=pieces)
    end, sink, logs = await _run(
        tmp_path, script, send=lambda port: _send_in_parts(port, [BODY], 0),
        gateway={"milter_memory": 65536})
    assert end[0] == 250, end
    assert opened                                     # the new body went to a spool file
    body = sink.messages[0].data.partition(b"\r\n\r\n")[2]
    assert body == lines.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("pieces", [
    [b"a\r", b"\nb\r", b"c\0d"], [b"x\n\n", b"\r", b"\r\n", b"y"], [b"\r"], [b""], [b"ok\r\n"],
    [b"\0", b"\n"], [b"a\r\r\n", b"\r"],
])
def test_a_streamed_replacement_body_is_cleaned_as_the_whole_would_be(tmp_path, pieces):
    from gateway.proto.message import clean_body
    from gateway.relay.held_message import ReplacementBody
    body = ReplacementBody(str(tmp_path), 4, 1000)       # 4 octets in memory: a file soon
    try:
        for piece in pieces:
            body.write(piece)
        body.finish()
        spool = body.take()
        assert b"".join(spool.chunks()) == clean_body(b"".join(pieces))
        assert spool.size == len(clean_body(b"".join(pieces)))
        spool.close()
    finally:
        body.close()
