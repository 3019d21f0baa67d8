"""Production faults of milter listeners found by trials (issue #21), end to end: smtplib or a
raw client -> gateway -> sink, with the scripted test milter of tests/milters.py (and real
rspamd where the fault was seen with it).

- the DATA clock with milters: the grace of `data` seconds and the `data_min_rate` floor hold
  exactly as without milters (SPEC §9), for a body sent in parts with pauses;
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
