"""Milters through the gateway end to end (SPEC §4.7): smtplib -> gateway -> sink, with the
scripted test milter of tests/milters.py for every verdict and change, broken milters, the
spool, and real rspamd and OpenDKIM."""
from __future__ import annotations

import os
import smtplib
import struct

import pytest
import trio

from gateway.proto import milter as M
from harness import config_dict, in_thread, listener_dict, running_gateway, running_sink

from milters import (ACCEPT, CONTINUE, DISCARD, GTUBE, PROGRESS, REJECT, TEMPFAIL, FilterPeer,
                     OpenDKIMInstance, RspamdInstance, addheader, addrcpt, chgfrom, chgheader,
                     delrcpt, insheader, make_message, quarantine, replbody, replycode,
                     scripted_milter)

BODY = (b"Subject: test\r\nFrom: alice@client.test\r\nX-Old: 1\r\n\r\nhello\r\n"
        b"..dot line\r\nbye\r\n")
# BODY's body as a milter gets it (smtplib stuffs it, the gateway un-stuffs it)
BODY_TEXT = b"hello\r\n..dot line\r\nbye\r\n"


class Script:
    """A milter answering CONTINUE to every command, except `at[command]` (reply packets);
    at end of message `eom` (packets, then CONTINUE unless a verdict is among them). It
    records what it received: macros per command, headers, the body, envelope args."""

    def __init__(self, *, at=None, eom=(), actions=M.ALL_ACTIONS, protocol=0, symlists=None,
                 on=None):
        self.at = dict(at or {})
        self.eom = list(eom)
        self.actions = actions
        self.protocol = protocol
        self.symlists = symlists
        self.on = on or {}              # command -> async callable(peer) run instead
        self.macros: dict[bytes, dict[str, str]] = {}
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.commands: list[bytes] = []
        self.args: dict[bytes, list[list[str]]] = {}
        self.connections = 0
        self.closed = trio.Event()
        self.sessions: list[dict[bytes, dict[str, str]]] = []   # the macros per connection
        self.macro_log: list[tuple[bytes, dict[str, str]]] = []  # every MACRO packet, in order

    async def __call__(self, peer: FilterPeer) -> None:
        self.connections += 1
        mine: dict[bytes, dict[str, str]] = {}
        self.sessions.append(mine)
        try:
            await peer.negotiate(actions=self.actions, protocol=self.protocol,
                                 symlists=self.symlists)
            while (packet := await peer.recv()) is not None:
                cmd, data = packet
                if cmd == b"D":
                    parts = data[1:].split(b"\0")[:-1]
                    pairs = {parts[i].decode(): parts[i + 1].decode()
                             for i in range(0, len(parts) - 1, 2)}
                    self.macros.setdefault(data[:1], {}).update(pairs)
                    mine.setdefault(data[:1], {}).update(pairs)
                    self.macro_log.append((data[:1], pairs))
                    continue
                self.commands.append(cmd)
                if cmd in self.on:
                    if await self.on[cmd](peer) is not None:
                        return
                    continue
                if cmd in (b"A", b"Q", b"K"):
                    continue
                if cmd == b"L":
                    name, value, _ = data.split(b"\0")
                    self.headers.append((name.decode(), value.decode()))
                elif cmd == b"B":
                    self.body += data
                elif cmd in (b"M", b"R"):
                    self.args.setdefault(cmd, []).append(
                        [a.decode() for a in data.split(b"\0")[:-1]])
                if self._no_reply(cmd):
                    continue
                if cmd == b"E":
                    out = list(self.eom)
                    if not any(p[4:5] in b"acrtdy" for p in out):
                        out.append(CONTINUE)
                    await peer.send(*out)
                    continue
                await peer.send(self.at.get(cmd, CONTINUE))
        finally:
            self.closed.set()

    def _no_reply(self, cmd: bytes) -> bool:
        flags = {b"C": M.P_NR_CONN | M.P_NOCONNECT, b"H": M.P_NR_HELO | M.P_NOHELO,
                 b"M": M.P_NR_MAIL | M.P_NOMAIL, b"R": M.P_NR_RCPT | M.P_NORCPT,
                 b"T": M.P_NR_DATA | M.P_NODATA, b"L": M.P_NR_HDR | M.P_NOHDRS,
                 b"N": M.P_NR_EOH | M.P_NOEOH, b"B": M.P_NR_BODY | M.P_NOBODY}
        return bool(self.protocol & flags.get(cmd, 0))


def _config(sink, milters, tmp_path, **gateway):
    spool = tmp_path / "spool"
    gateway.setdefault("spool_dir", str(spool))
    listener = listener_dict(upstream_port=sink.port, tls="off", client_tls="none",
                             milters=milters, timeouts=gateway.pop("timeouts", {}),
                             **gateway.pop("listener", {}))
    return config_dict([listener], **gateway)


def _milter(address, name="m", **extra):
    return {"name": name, "address": address, "command_timeout": 5, "content_timeout": 5,
            "connect_timeout": 5, **extra}


def _send(port, *, mail_from="alice@client.test", rcpts=("bob@example.test",), body=BODY):
    """One transaction; (MAIL reply, [RCPT replies], DATA-end reply or None)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        mail = s.mail(mail_from)
        if mail[0] != 250:
            return mail, [], None
        replies = [s.rcpt(r) for r in rcpts]
        if not any(code == 250 for code, _ in replies):
            return mail, replies, None
        try:
            end = s.data(body)
        except smtplib.SMTPDataError as exc:
            end = (exc.smtp_code, exc.smtp_error)
        return mail, replies, end


def _headers(data: bytes) -> list[bytes]:
    head = data.partition(b"\r\n\r\n")[0]
    return head.split(b"\r\n")


async def _run(tmp_path, script_or_scripts, *, send=None, gateway=None, sink_kw=None,
               milter_extra=None):
    """Start sink, milters and gateway; run *send(port)* in a thread. Returns
    (result, sink, logs)."""
    scripts = script_or_scripts if isinstance(script_or_scripts, list) else [script_or_scripts]
    send = send or _send
    async with running_sink(**(sink_kw or {})) as sink:
        async with trio.open_nursery() as nursery:
            addresses = []
            for script in scripts:
                cm = scripted_milter(script)
                addresses.append(await nursery.start(_serve_milter, cm))
            milters = [_milter(a, name=f"m{i}", **(milter_extra or {}))
                       for i, a in enumerate(addresses)]
            async with running_gateway(_config(sink, milters, tmp_path,
                                               **(gateway or {}))) as (gw, logs):
                port = gw.addresses["smtp"][1]
                with trio.fail_after(40):
                    result = await in_thread(lambda: send(port))
                    for script in scripts:
                        if script.connections:
                            await script.closed.wait()
            nursery.cancel_scope.cancel()
    return result, sink, logs


async def _serve_milter(cm, task_status=trio.TASK_STATUS_IGNORED):
    async with cm as address:
        task_status.started(address)
        await trio.sleep_forever()


# --- verdicts ------------------------------------------------------------------------------

async def test_continue_everywhere_relays_the_message_and_the_milter_sees_it_all(tmp_path):
    script = Script()
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250 and b"queued as" in end[1]     # the upstream's own final reply
    [msg] = sink.messages
    assert msg.data.endswith(BODY)
    assert script.body == BODY_TEXT                      # not dot-stuffed
    names = [n for n, _ in script.headers]
    assert names == ["Received", "Subject", "From", "X-Old"]   # the gateway's Received first
    assert script.commands[:6] == [b"C", b"H", b"M", b"R", b"T", b"L"]
    assert script.commands[-2:] == [b"E", b"Q"]
    assert script.args[b"M"] == [["<alice@client.test>"]]
    assert script.args[b"R"] == [["<bob@example.test>"]]
    c = script.macros[b"C"]
    # {daemon_name} is the gateway's hostname (Postfix's $myhostname), not the listener
    assert c["j"] == "mx.test" and c["{daemon_name}"] == "mx.test"
    assert c["{client_addr}"] == "127.0.0.1" and c["_"] == "unknown [127.0.0.1]"
    assert c["v"].startswith("mail-tls-gateway")
    assert script.macros[b"M"]["{mail_addr}"] == "alice@client.test"
    assert script.macros[b"M"]["i"] == script.macros[b"E"]["i"]
    assert script.macros[b"R"]["{rcpt_addr}"] == "bob@example.test"
    [event] = logs.of("milter", stage="eom")
    assert (event["milter"], event["result"]) == ("m0", "continue")
    assert logs.of("message", result="accepted")


async def test_one_id_per_transaction_for_the_milter_tracking_received_and_log(tmp_path):
    """Each transaction has one id, made at MAIL FROM: the milter's `i` macro, the tracking
    record's id, the `id` of the Received header the upstream gets and the `message` event's
    id are the same; a refused transaction between two messages has its own (§4.7, §7)."""
    import json
    import re

    def send(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.sendmail("alice@client.test", ["bob@example.test"], BODY)
            assert s.mail("alice@client.test")[0] == 250
            assert s.rcpt("nobody@example.test")[0] == 550      # the sink refuses it
            s.rset()
            s.sendmail("alice@client.test", ["bob@example.test"], BODY)

    script = Script()
    track = tmp_path / "track.log"
    _, sink, logs = await _run(tmp_path, script, send=send,
                               sink_kw={"reject_rcpt": {"nobody@example.test"}},
                               gateway={"tracking_log": str(track)})
    at_mail = [m["i"] for cmd, m in script.macro_log if cmd == b"M"]
    at_eom = [m["i"] for cmd, m in script.macro_log if cmd == b"E"]
    assert len(at_mail) == 3 and len(set(at_mail)) == 3 and all(at_mail), at_mail
    first, refused, last = at_mail
    assert at_eom == [first, last]
    received = [re.search(rb"\(mail-tls-gateway\) with \S+ id (\S+)", m.data).group(1).decode()
                for m in sink.messages]
    assert received == [first, last]
    tracked = [json.loads(line) for line in track.read_text().splitlines()]
    assert [(r["id"], r["result"]) for r in tracked] == [
        (first, "accepted"), (refused, "rejected"), (last, "accepted")]
    assert [(e.get("id"), e["result"]) for e in logs.of("message")] == [
        (first, "accepted"), (refused, "rejected"), (last, "accepted")]


@pytest.mark.parametrize("stage,packet,expect", [
    (b"M", REJECT, (550, b"5.7.1 Command rejected")),
    (b"M", TEMPFAIL, (451, b"4.7.1 Service unavailable - try again later")),
    (b"E", replycode("554 5.7.1 Go away"), (554, b"5.7.1 Go away")),
    (b"E", TEMPFAIL, (451, b"4.7.1 Service unavailable - try again later")),
    (b"B", REJECT, (550, b"5.7.1 Command rejected")),
    (b"T", replycode("451 4.3.0 Later"), (451, b"4.3.0 Later")),
])
async def test_refusals_answer_the_transaction_and_nothing_reaches_the_upstream(
        tmp_path, stage, packet, expect):
    script = Script(at={stage: packet}, eom=[packet] if stage == b"E" else [])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    got = mail if stage == b"M" else end
    assert got == expect
    assert sink.messages == []
    if stage not in (b"M",):
        # the leg never got DATA: RSET instead
        lines = b"".join(b"".join(s) for s in sink.sessions)
        assert b"DATA" not in lines
    result = {REJECT: "reject", TEMPFAIL: "tempfail"}.get(packet, "replycode")
    assert logs.of("milter", result=result)


async def test_a_refused_recipient_never_enters_the_upstream_envelope(tmp_path):
    async def rcpt(peer):
        data = peer.received[-1][1]
        await peer.send(REJECT if b"evil" in data else CONTINUE)

    script = Script(on={b"R": rcpt})
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script, send=lambda port: _send(
            port, rcpts=("bob@example.test", "evil@example.test", "carol@example.test")))
    assert [c for c, _ in rcpts] == [250, 550, 250]
    assert end[0] == 250
    [msg] = sink.messages
    assert msg.rcpts == ["bob@example.test", "carol@example.test"]


async def test_discard_answers_250_2_7_0_and_the_upstream_gets_rset(tmp_path, monkeypatch):
    script = Script(eom=[DISCARD])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end == (250, b"2.7.0 Message discarded")
    assert sink.messages == []
    assert any(line.upper().startswith(b"RSET") for s in sink.sessions for line in s)
    assert logs.of("message", result="discarded")
    assert logs.of("milter", result="discard")


async def test_discard_at_rcpt_drops_the_whole_message(tmp_path):
    script = Script(at={b"R": DISCARD})
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert rcpts[0][0] == 250 and end == (250, b"2.7.0 Message discarded")
    assert sink.messages == []


async def test_quarantine_relays_with_the_gateway_header(tmp_path):
    script = Script(eom=[quarantine("looks like phishing")])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250
    [msg] = sink.messages
    assert b"X-Gateway-Quarantine: m0: looks like phishing\r\n" in msg.data
    assert msg.data.endswith(BODY)
    assert logs.of("milter", result="quarantine")


async def test_accept_at_connect_leaves_the_milter_out(tmp_path):
    script = Script(at={b"C": ACCEPT})
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250 and len(sink.messages) == 1
    assert script.commands[:2] == [b"C", b"Q"]


async def test_reject_at_connect_refuses_every_mail(tmp_path):
    script = Script(at={b"C": REJECT})
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert mail == (550, b"5.7.1 Command rejected")
    assert sink.messages == []


_AFTER_REFUSAL = [("MAIL", "FROM:<alice@client.test>"), ("RCPT", "TO:<bob@example.test>"),
                  ("DATA", ""), ("VRFY", "bob"), ("STARTTLS", ""), ("BDAT", "5 LAST"),
                  ("AUTH", "PLAIN AGFsaWNlAHNlY3JldA=="), ("XYZZY", ""), ("NOOP", ""),
                  ("RSET", ""), ("HELO", "again.test"), ("NOOP", "")]


@pytest.mark.parametrize("stage,packet,reply", [
    (b"C", REJECT, (550, b"5.7.1 Command rejected")),
    (b"C", TEMPFAIL, (451, b"4.7.1 Service unavailable - try again later")),
    (b"H", REJECT, (550, b"5.7.1 Command rejected")),
    (b"H", replycode("554 5.7.1 Go away"), (554, b"5.7.1 Go away")),
])
async def test_a_refusal_at_connect_or_helo_answers_every_later_command(
        tmp_path, stage, packet, reply):
    """SPEC §4.7: a milter's refusal at connect or HELO answers every later command but
    QUIT, NOOP and RSET with its reply, as Postfix does; nothing of the session goes
    upstream (the sink sees no connection) and the milter gets no envelope."""
    script = Script(at={stage: packet})

    def send(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            got = [("EHLO", s.ehlo("client.test"))]
            got += [(cmd, s.docmd(cmd, arg)) for cmd, arg in _AFTER_REFUSAL]
            got.append(("QUIT", s.docmd("QUIT")))
            return got

    got, sink, logs = await _run(tmp_path, script, send=send)
    served = {"NOOP": 250, "RSET": 250, "QUIT": 221}
    for cmd, answer in got:
        if cmd in served:
            assert answer[0] == served[cmd], (cmd, answer)
        elif cmd == "EHLO" and stage == b"H":
            assert answer[0] == 250               # the HELO the milter refused was answered
        else:
            assert answer == reply, (cmd, answer)
    assert sink.connections == 0 and sink.messages == []
    assert b"M" not in script.commands and b"R" not in script.commands
    [event] = logs.of("milter", stage={b"C": "connect", b"H": "helo"}[stage])
    assert event["result"] in ("reject", "tempfail", "replycode")
    # counted once, under its fixed label (never the milter's words)
    assert len([e for e in logs.of("reject") if e["code"] == reply[0]]) == 1


# --- changes --------------------------------------------------------------------------------

async def test_header_changes_and_progress(tmp_path):
    script = Script(eom=[PROGRESS, addheader("X-Added", "yes"), insheader(1, "X-Inserted", "1"),
                         chgheader(1, "Subject", "changed"), chgheader(1, "X-Old", ""),
                         PROGRESS])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250
    headers = _headers(sink.messages[0].data)
    assert headers[0].startswith(b"Received: ")
    names = [h.split(b":")[0] for h in headers if not h[:1].isspace()]
    assert names == [b"Received", b"X-Inserted", b"Subject", b"From", b"X-Added"]
    assert b"Subject: changed" in headers and b"X-Added: yes" in headers
    assert sink.messages[0].data.endswith(b"\r\n\r\n" + BODY.partition(b"\r\n\r\n")[2])


async def test_replaced_body_goes_upstream_stuffed_and_with_crlf(tmp_path):
    new = b"new body\n.starts with a dot\nlast"
    script = Script(eom=[replbody(new[:10]), replbody(new[10:])])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250
    body = sink.messages[0].data.partition(b"\r\n\r\n")[2]
    assert body == b"new body\r\n.starts with a dot\r\nlast\r\n"   # the sink un-stuffs
    raw = b"".join(b"".join(s) for s in sink.sessions)
    assert b"X-Old: 1" in sink.messages[0].data


async def test_envelope_changes_are_applied_on_the_leg(tmp_path):
    script = Script(eom=[chgfrom("<bounce@client.test>"), addrcpt("<archive@example.test>"),
                         delrcpt("<carol@example.test>")])
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script,
        send=lambda port: _send(port, rcpts=("bob@example.test", "carol@example.test")))
    assert end[0] == 250
    [msg] = sink.messages
    assert msg.mail_from == "bounce@client.test"
    assert msg.rcpts == ["bob@example.test", "archive@example.test"]


async def test_an_added_recipient_the_upstream_refuses_is_dropped_and_tracked(tmp_path):
    script = Script(eom=[addrcpt("<nobody@example.test>")])
    track = tmp_path / "track.log"
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script, sink_kw={"reject_rcpt": {"nobody@example.test"}},
        gateway={"tracking_log": str(track)})
    assert end[0] == 250
    assert sink.messages[0].rcpts == ["bob@example.test"]
    [dropped] = logs.of("milter_rcpt_dropped")
    assert dropped["rcpt"] == "nobody@example.test" and dropped["milter"] == "m0"
    import json
    [record] = [json.loads(line) for line in track.read_text().splitlines()]
    assert {"milter": "m0", "stage": "eom", "result": "continue"} in record["milter"]
    assert any(e.get("result") == "rcpt_dropped" for e in record["milter"])


async def test_a_refused_changed_sender_is_451_4_7_1(tmp_path):
    # the sink refuses a SIZE over its limit: the changed sender's parameters carry one
    script = Script(eom=[chgfrom("<bounce@client.test>", "SIZE=999999999")])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script, sink_kw={"max_size": 1000})
    assert end == (451, b"4.7.1 Service unavailable - try again later")
    assert sink.messages == []
    assert logs.of("milter_sender_refused", mail_from="bounce@client.test")


async def test_two_milters_the_second_sees_the_first_ones_changes(tmp_path):
    first = Script(eom=[addheader("X-First", "1"), replbody(b"replaced\r\n")])
    second = Script(eom=[addheader("X-Second", "2")])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, [first, second])
    assert end[0] == 250
    assert ("X-First", "1") in second.headers
    assert second.body == b"replaced\r\n" and first.body == BODY_TEXT
    data = sink.messages[0].data
    assert b"X-First: 1\r\n" in data and b"X-Second: 2\r\n" in data
    assert data.endswith(b"\r\n\r\nreplaced\r\n")


async def test_no_reply_flags_are_honoured(tmp_path):
    flags = (M.P_NR_CONN | M.P_NR_HELO | M.P_NR_MAIL | M.P_NR_RCPT | M.P_NR_DATA | M.P_NR_HDR
             | M.P_NR_EOH | M.P_NR_BODY)
    script = Script(protocol=flags, eom=[addheader("X-NR", "1")])
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250 and b"X-NR: 1" in sink.messages[0].data


async def test_setsymlist_is_honoured(tmp_path):
    script = Script(symlists={M.M_ENVFROM: "{client_addr} i", M.M_CONNECT: "j"})
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250
    assert set(script.macros[b"C"]) == {"j"}
    assert set(script.macros[b"M"]) == {"{client_addr}", "i"}
    assert b"R" not in script.macros


# --- failures -------------------------------------------------------------------------------

async def _until_eof(peer):
    """Hold on until the gateway hangs up (what a stuck milter looks like)."""
    while await peer.recv() is not None:
        pass
    return True


async def _stall(peer):
    return await _until_eof(peer)


async def _close(peer):
    await peer.stream.aclose()
    return True


async def _garbage(peer):
    await peer.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    return await _until_eof(peer)


@pytest.mark.parametrize("behaviour,cmd,result", [
    (_stall, b"E", "timeout"), (_close, b"B", "error"), (_garbage, b"M", "error"),
])
@pytest.mark.parametrize("default,expect", [
    ("tempfail", (451, b"4.7.1 Service unavailable - try again later")),
    ("reject", (550, b"5.7.1 Message content rejected")),
    ("accept", None),
])
async def test_a_broken_milter_gets_its_default_action(tmp_path, behaviour, cmd, result,
                                                       default, expect):
    script = Script(on={cmd: behaviour})
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script, milter_extra={"default_action": default, "command_timeout": 0.5,
                                        "content_timeout": 0.5})
    got = mail if cmd == b"M" else end
    if expect is None:
        assert end[0] == 250 and len(sink.messages) == 1
    else:
        assert got == expect and sink.messages == []
    assert logs.of("milter", result=result)


async def test_an_unreachable_milter_tempfails_mail(tmp_path):
    from peers import free_port

    async with running_sink() as sink:
        milters = [_milter(f"inet:127.0.0.1:{free_port()}")]
        async with running_gateway(_config(sink, milters, tmp_path)) as (gw, logs):
            with trio.fail_after(30):
                mail, _, _ = await in_thread(lambda: _send(gw.addresses["smtp"][1]))
    assert mail == (451, b"4.7.1 Service unavailable - try again later")
    [event] = logs.of("milter", stage="connect")
    assert event["result"] == "error"


async def test_the_deadline_after_the_final_dot_cuts_a_slow_milter_short(tmp_path):
    async def slow(peer):
        try:
            for _ in range(100):          # progress keeps its own timeout alive ...
                await trio.sleep(0.1)
                await peer.send(PROGRESS)
        except trio.BrokenResourceError:  # the gateway gave up and hung up
            return True
        await peer.send(CONTINUE)

    script = Script(on={b"E": slow})
    start = trio.current_time()
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script, gateway={"timeouts": {"upstream_data_done": 1}})
    assert end == (451, b"4.7.1 Service unavailable - try again later")   # ... not this one
    assert trio.current_time() - start < 8
    assert sink.messages == []
    assert logs.of("milter", stage="eom", result="timeout")


async def test_the_upstream_leg_gets_noop_while_milters_work(tmp_path, monkeypatch):
    from gateway.relay import milter_data
    monkeypatch.setattr(milter_data, "NOOP_INTERVAL", 0.1)

    async def slow(peer):
        await trio.sleep(0.5)
        await peer.send(CONTINUE)

    script = Script(on={b"E": slow})
    (mail, rcpts, end), sink, logs = await _run(tmp_path, script)
    assert end[0] == 250
    lines = [line for s in sink.sessions for line in s]
    assert sum(1 for line in lines if line.upper().startswith(b"NOOP")) >= 2


# --- holding --------------------------------------------------------------------------------

async def test_a_3_mb_message_over_a_64_kib_memory_arrives_intact_and_leaves_no_file(
        tmp_path, monkeypatch):
    from gateway.relay import spool as spool_mod
    opened = []
    real = spool_mod._unlinked_file

    def unlinked(directory):
        fd = real(directory)
        opened.append(fd)
        assert os.listdir(directory) == []           # no name, from the start
        return fd
    monkeypatch.setattr(spool_mod, "_unlinked_file", unlinked)

    lines = b"".join(b"%07d " % i + b"x" * 90 + b"\r\n" for i in range(31000))
    body = b"Subject: big\r\n\r\n" + lines + b".leading dot\r\n"
    script = Script(eom=[addheader("X-Seen", str(0))])
    (mail, rcpts, end), sink, logs = await _run(
        tmp_path, script, send=lambda port: _send(port, body=body),
        gateway={"milter_memory": 65536})
    assert end[0] == 250
    assert len(body) > 3_000_000 and opened
    assert sink.messages[0].data.endswith(body.partition(b"\r\n\r\n")[2])
    assert script.body == body.partition(b"\r\n\r\n")[2]
    assert os.listdir(tmp_path / "spool") == []
    assert oct(os.stat(tmp_path / "spool").st_mode & 0o777) == "0o700"


async def test_a_message_refused_for_bare_lf_is_aborted_to_the_milters(tmp_path):
    script = Script()

    def send(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("alice@client.test")
            s.rcpt("bob@example.test")
            s.putcmd("DATA")
            assert s.getreply()[0] == 354
            s.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n")
            return None, None, s.getreply()

    (_, _, end), sink, logs = await _run(tmp_path, script, send=send)
    assert end == (550, b"5.5.2 Bare CR or LF not allowed")
    assert sink.messages == []
    assert b"A" in script.commands and b"E" not in script.commands


async def test_without_milters_data_is_relayed_as_before(tmp_path):
    async with running_sink() as sink:
        listener = listener_dict(upstream_port=sink.port, tls="off", client_tls="none")
        async with running_gateway(config_dict([listener])) as (gw, logs):
            with trio.fail_after(30):
                _, _, end = await in_thread(lambda: _send(gw.addresses["smtp"][1]))
    assert end[0] == 250 and not logs.of("milter")
    assert not (tmp_path / "spool").exists()


# --- real milters ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rspamd():
    """One private rspamd for this module: it needs ~15 s to compile its regexps."""
    with RspamdInstance() as instance:
        yield instance


@pytest.fixture(scope="module")
def opendkim():
    with OpenDKIMInstance(domain="example.com") as instance:
        yield instance


REAL = {"connect_timeout": 5, "command_timeout": 20, "content_timeout": 30}


async def _through(tmp_path, milters, message, *, mail_from, rcpt="bob@example.net"):
    async with running_sink() as sink:
        async with running_gateway(_config(sink, milters, tmp_path)) as (gw, logs):
            with trio.fail_after(90):
                result = await in_thread(lambda: _send(
                    gw.addresses["smtp"][1], mail_from=mail_from, rcpts=(rcpt,),
                    body=message))
    return result, sink, logs


@pytest.mark.peers
async def test_rspamd_rejects_gtube_with_its_own_reply_and_nothing_reaches_the_upstream(
        tmp_path, rspamd):
    message = make_message(subject="test", body=b"Hello\r\n" + GTUBE + b"\r\n")
    (mail, rcpts, end), sink, logs = await _through(
        tmp_path, [{"name": "rspamd", "address": rspamd.address, **REAL}], message,
        mail_from="alice@example.com")
    assert end == (554, b"5.7.1 Gtube pattern")
    assert sink.messages == []
    assert logs.of("milter", milter="rspamd", stage="eom", result="replycode")


@pytest.mark.peers
async def test_rspamd_clean_mail_arrives_with_its_header(tmp_path, rspamd):
    message = make_message()
    (mail, rcpts, end), sink, logs = await _through(
        tmp_path, [{"name": "rspamd", "address": rspamd.address, **REAL}], message,
        mail_from="alice@example.com")
    assert end[0] == 250
    [msg] = sink.messages
    assert b"\r\nX-Spamd-Result: default: False [" in msg.data
    assert msg.data.endswith(message.partition(b"\r\n\r\n")[2])


def _dkim():
    try:
        import dkim
    except ImportError:
        msg = "dkimpy not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return dkim


@pytest.mark.peers
async def test_opendkim_listed_after_rspamd_signs_the_final_message(tmp_path, rspamd,
                                                                     opendkim):
    dkim = _dkim()
    body = b"".join(b"line %d of a message long enough for two body packets\r\n" % i
                    for i in range(2000))
    message = make_message(sender=f"alice@{opendkim.domain}", body=body)
    milters = [{"name": "rspamd", "address": rspamd.address, **REAL},
               {"name": "opendkim", "address": opendkim.address, **REAL}]
    (mail, rcpts, end), sink, logs = await _through(
        tmp_path, milters, message, mail_from=f"alice@{opendkim.domain}")
    assert end[0] == 250
    [msg] = sink.messages
    assert b"DKIM-Signature:" in msg.data and b"X-Spamd-Result:" in msg.data
    assert dkim.verify(msg.data, dnsfunc=opendkim.dnsfunc)
    assert not dkim.verify(msg.data.replace(b"line 7 of", b"line 8 of"),
                           dnsfunc=opendkim.dnsfunc)


# --- a worker killed mid-message ------------------------------------------------------------

async def test_a_worker_killed_mid_message_leaves_no_spool_file(tmp_path):
    """`gateway run` with one worker; the milter holds the message at its end while the
    worker has it in the spool (an open file without a name); kill -9 the worker: nothing is
    left in spool_dir."""
    import signal
    from test_supervisor import GatewayProcess
    from peers import free_port

    at_eom = trio.Event()

    async def hold(peer):
        at_eom.set()
        return await _until_eof(peer)

    script = Script(on={b"E": hold})
    spool = tmp_path / "spool"
    port = free_port()
    body = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % i for i in range(20000))
    async with running_sink() as sink, scripted_milter(script) as address:
        config = tmp_path / "gateway.toml"
        config.write_text(f"""
[gateway]
hostname = "mx.test"
workers = 1
metrics = ""
spool_dir = "{spool}"
milter_memory = 4096

[[listeners]]
name = "mx"
bind = "127.0.0.1:{port}"
tls = "off"
client_tls = "none"

[listeners.upstream]
address = "127.0.0.1:{sink.port}"
tls = "none"

[[listeners.milters]]
name = "holder"
address = "{address}"
content_timeout = 60
""")
        gw = GatewayProcess(config)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                [worker] = gw.worker_pids()
                outcome = []

                def client():
                    try:
                        outcome.append(_send(port, body=body))
                    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                        outcome.append(type(exc).__name__)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(in_thread, client)
                    await at_eom.wait()
                    fds = [os.readlink(f"/proc/{worker}/fd/{fd}")
                           for fd in os.listdir(f"/proc/{worker}/fd")]
                    held = [t for t in fds if t.startswith(str(spool))]
                    assert held and all(t.endswith("(deleted)") for t in held), fds
                    assert os.listdir(spool) == []
                    os.kill(worker, signal.SIGKILL)
                assert outcome == ["SMTPServerDisconnected"], outcome   # never a 250
                await in_thread(lambda: gw.wait_for(r"event=worker_exit"))
        finally:
            await in_thread(gw.stop)
    assert os.listdir(spool) == []
    assert sink.messages == []
