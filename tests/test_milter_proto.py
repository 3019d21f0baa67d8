"""The sans-IO MTA side of the milter protocol (gateway/proto/milter.py), without sockets."""
from __future__ import annotations

import pathlib
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.proto import milter as M
from gateway.proto.milter import Action, NEED_DATA, ProtocolError

from milters import (ACCEPT, CONTINUE, DISCARD, PROGRESS, REJECT, SKIP, TEMPFAIL, addheader,
                     addrcpt, addrcpt_par, chgfrom, chgheader, cstrings, delrcpt, insheader,
                     optneg, quarantine, replbody, replycode)


def packets(data: bytes) -> list[tuple[bytes, bytes]]:
    dec = M.PacketDecoder()
    dec.receive_data(data)
    out = []
    while (p := dec.next_packet()) is not None:
        out.append(p)
    assert dec.buffered == 0
    return out


def feed(conn: M.MilterConnection, data: bytes, *, step: int | None = None):
    """Feed `data` (all at once, or `step` bytes at a time) and return the events up to and
    including the first Verdict/Negotiated."""
    events = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if not isinstance(ev, M.Progress):
                return events
    raise AssertionError(f"no verdict after {events}")


def negotiated(protocol: int = 0, actions: int = M.ALL_ACTIONS, **kwargs) -> M.MilterConnection:
    conn = M.MilterConnection()
    conn.negotiate()
    feed(conn, optneg(actions=actions, protocol=protocol, **kwargs))
    return conn


def connected(protocol: int = 0, actions: int = M.ALL_ACTIONS, **kw) -> M.MilterConnection:
    conn = negotiated(protocol, actions, **kw)
    conn.connect("client.test", "192.0.2.1", 4711)
    feed(conn, CONTINUE)
    return conn


def in_message(protocol: int = 0, actions: int = M.ALL_ACTIONS) -> M.MilterConnection:
    conn = connected(protocol, actions)
    for stage in (lambda: conn.mail(["<a@example.com>"]), lambda: conn.rcpt(["<b@example.net>"]),
                  conn.data):
        stage()
        feed(conn, CONTINUE)
    return conn


def verdict_now(conn: M.MilterConnection) -> M.Verdict:
    """The verdict of a stage that must not wait for any reply."""
    ev = conn.next_event()
    assert isinstance(ev, M.Verdict), ev
    return ev


# --- layering ----------------------------------------------------------------------------

def test_the_sans_io_module_imports_no_io():
    src = pathlib.Path(M.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(trio|socket|ssl|OpenSSL)\b", src, re.M)


# --- packets -----------------------------------------------------------------------------

def test_packet_round_trip_whole_and_byte_at_a_time():
    stream = (M.encode_packet(b"B", b"x" * 65535) + M.encode_packet(b"A")
              + M.encode_packet(b"D", b"Cj\0host\0"))
    assert packets(stream) == [(b"B", b"x" * 65535), (b"A", b""), (b"D", b"Cj\0host\0")]
    dec = M.PacketDecoder()
    got = []
    for i in range(len(stream)):
        dec.receive_data(stream[i:i + 1])
        while (p := dec.next_packet()) is not None:
            got.append(p)
    assert [c for c, _ in got] == [b"B", b"A", b"D"]
    assert dec.buffered == 0


def test_packet_length_zero_or_over_the_bound_is_refused_from_the_header_alone():
    for length in (0, M.MAX_PACKET + 1, 0xFFFFFFFF):
        dec = M.PacketDecoder()
        dec.receive_data(struct.pack("!I", length))
        with pytest.raises(ProtocolError):
            dec.next_packet()
    dec = M.PacketDecoder()
    dec.receive_data(struct.pack("!I", M.MAX_PACKET) + b"B")
    assert dec.next_packet() is None            # at the bound: just incomplete
    with pytest.raises(ValueError):
        M.encode_packet(b"B", b"x" * M.MAX_PACKET)


def test_eof_inside_a_packet_is_a_protocol_error():
    dec = M.PacketDecoder()
    dec.receive_data(M.encode_packet(b"c")[:-1])
    dec.receive_data(b"")
    with pytest.raises(ProtocolError):
        dec.next_packet()


def test_parse_address():
    assert M.parse_address("inet:127.0.0.1:11332") == ("inet", "127.0.0.1", 11332)
    assert M.parse_address("inet:[::1]:8891") == ("inet", "::1", 8891)
    assert M.parse_address("inet:localhost:1") == ("inet", "localhost", 1)
    assert M.parse_address("unix:/run/milter.sock") == ("unix", "/run/milter.sock")
    for bad in ("inet:127.0.0.1", "inet::25", "inet:h:0", "inet:h:65536", "inet:h:²",
                "unix:relative", "local:/x", "127.0.0.1:25", ""):
        with pytest.raises(ValueError):
            M.parse_address(bad)


# --- negotiation -------------------------------------------------------------------------

def test_negotiation_offers_version_6_all_actions_and_every_step_flag():
    conn = M.MilterConnection()
    [(cmd, data)] = packets(conn.negotiate())
    assert cmd == b"O"
    version, actions, protocol = struct.unpack("!III", data)
    assert (version, actions) == (6, 0x1FF)
    # every "don't send" and "no reply" flag, SKIP and leading spaces; not RCPT_REJ, no MDS
    assert protocol == 0x1FF7FF & ~M.P_RCPT_REJ
    assert conn.awaiting_reply


def test_negotiation_takes_the_milters_flags_and_symbol_lists():
    conn = M.MilterConnection()
    conn.negotiate()
    [ev] = feed(conn, optneg(actions=M.F_ADDHDRS | M.F_SETSYMLIST,
                             protocol=M.P_NOHELO | M.P_NR_CONN,
                             symlists={M.M_CONNECT: "j {client_addr} daemon_name",
                                       M.M_EOM: "i", 99: "ignored"}), step=1)
    assert ev == M.Negotiated(6, M.F_ADDHDRS | M.F_SETSYMLIST, M.P_NOHELO | M.P_NR_CONN,
                              {M.M_CONNECT: ("j", "{client_addr}", "{daemon_name}"),
                               M.M_EOM: ("i",)})
    assert conn.negotiated and not conn.awaiting_reply
    assert conn.may_change
    assert not conn.reply_expected(M.C_CONNECT) and not conn.reply_expected(M.C_HELO)
    assert conn.reply_expected(M.C_MAIL)


@pytest.mark.parametrize("reply", [
    optneg(version=7), optneg(version=1), optneg(actions=0x200),
    M.encode_packet(b"O", b"\0\0\0\6"),                         # too short
    M.encode_packet(b"O", struct.pack("!III", 6, 0, 0) + b"\0\0\0\0{j}"),  # unterminated
    CONTINUE,                                                  # not an OPTNEG
    optneg() + CONTINUE,                                       # data after the answer
])
def test_bad_negotiation_replies_are_protocol_errors(reply):
    conn = M.MilterConnection()
    conn.negotiate()
    conn.receive_data(reply)
    with pytest.raises(ProtocolError):
        conn.next_event()
    with pytest.raises(ProtocolError):              # and the connection stays broken
        conn.next_event()


def test_a_milter_with_actions_but_no_change_actions():
    conn = negotiated(actions=M.F_QUARANTINE | M.F_SETSYMLIST)
    assert not conn.may_change


# --- stages and flags ----------------------------------------------------------------------

def test_connect_wire_format_and_family_inference():
    cases = [
        (("[192.0.2.1]", "192.0.2.1", 25), b"[192.0.2.1]\0" + b"4" + struct.pack("!H", 25)
         + b"192.0.2.1\0"),
        (("h6", "2001:db8::1", 587), b"h6\0" + b"6" + struct.pack("!H", 587) + b"2001:db8::1\0"),
        (("local", "/run/s", 99), b"local\0L\0\0/run/s\0"),
        (("unknown", None, 0), b"unknown\0U"),
    ]
    for args, wire in cases:
        conn = negotiated()
        assert packets(conn.connect(*args)) == [(b"C", wire)]


def test_every_stage_without_flags_sends_its_packet_and_waits():
    conn = negotiated()
    sent = [conn.connect("c", "192.0.2.1", 1)]
    assert conn.awaiting_reply and conn.next_event() is NEED_DATA
    feed(conn, CONTINUE)
    for out in (lambda: conn.helo("client.test"),
                lambda: conn.mail(["<a@example.com>", "SIZE=10", "BODY=8BITMIME"]),
                lambda: conn.rcpt(["<b@example.net>", "NOTIFY=NEVER"]),
                conn.data,
                lambda: conn.header("Subject", " hello\r\n world"),
                conn.eoh,
                lambda: conn.body(b"line\r\n"),
                conn.eom):
        sent.append(out())
        assert conn.awaiting_reply
        [v] = feed(conn, CONTINUE)
        assert v.action is Action.CONTINUE and v.replied
    got = [packets(s) for s in sent]
    assert got == [
        [(b"C", b"c\x004\x00\x01192.0.2.1\0")],
        [(b"H", b"client.test\0")],
        [(b"M", b"<a@example.com>\0SIZE=10\0BODY=8BITMIME\0")],
        [(b"R", b"<b@example.net>\0NOTIFY=NEVER\0")],
        [(b"T", b"")],
        [(b"L", b"Subject\0hello\n world\0")],      # one leading space eaten, LF folding
        [(b"N", b"")],
        [(b"B", b"line\r\n")],
        [(b"E", b"")],
    ]
    [(cmd, _)] = packets(conn.abort())
    assert cmd == b"A"
    assert packets(conn.quit()) == [(b"Q", b"")]


def test_header_keeps_the_leading_space_when_the_milter_asks_for_it():
    conn = connected(M.P_HDR_LEADSPC)
    conn.mail(["<a@x>"]); feed(conn, CONTINUE)
    assert packets(conn.header("To", " b@y")) == [(b"L", b"To\0 b@y\0")]


def test_no_reply_flags_mean_no_wait_for_every_step():
    nr = M.P_NOREPLY_MASK
    conn = negotiated(nr)
    for stage in (lambda: conn.connect("c", "192.0.2.1", 1), lambda: conn.helo("h"),
                  lambda: conn.mail(["<a@x>"]), lambda: conn.rcpt(["<b@y>"]), conn.data,
                  lambda: conn.header("A", "b"), conn.eoh, lambda: conn.body(b"x\r\n")):
        out = stage()
        assert out and not conn.awaiting_reply          # sent ...
        v = verdict_now(conn)                           # ... and no reply awaited
        assert v.action is Action.CONTINUE and not v.replied
    conn.eom()
    assert conn.awaiting_reply                          # end of message is always answered
    assert conn.next_event() is NEED_DATA
    [v] = feed(conn, ACCEPT)
    assert v.action is Action.ACCEPT and v.stage == "eom"


def test_skipped_steps_send_only_their_macros():
    conn = negotiated(M.P_NOSEND_MASK)
    assert packets(conn.connect("c", "192.0.2.1", 1, macros={"j": "gw"})) == [
        (b"D", b"Cj\0gw\0")]
    assert not verdict_now(conn).replied
    assert conn.helo("h") == b""
    verdict_now(conn)
    for stage in (lambda: conn.mail(["<a@x>"]), lambda: conn.rcpt(["<b@y>"]), conn.data,
                  lambda: conn.header("A", "b"), conn.eoh, lambda: conn.body(b"x")):
        assert stage() == b""
        assert verdict_now(conn).action is Action.CONTINUE
    assert packets(conn.eom()) == [(b"E", b"")]
    feed(conn, CONTINUE)


def test_macros_are_sent_before_their_stage_with_the_stage_letter():
    conn = negotiated()
    out = conn.connect("c", "192.0.2.1", 1, macros={"j": "gw.test", "daemon_name": "smtp",
                                                    "{client_addr}": "192.0.2.1"})
    (cmd, data), (cmd2, _) = packets(out)
    assert cmd == b"D" and cmd2 == b"C"
    assert data == b"C" + cstrings("j", "gw.test", "{daemon_name}", "smtp",
                                   "{client_addr}", "192.0.2.1")


def test_setsymlist_is_honoured_per_stage():
    conn = negotiated(symlists={M.M_ENVFROM: "{mail_addr} i"})
    # no list for CONNECT: no macros at all there
    assert [c for c, _ in packets(conn.connect("c", "192.0.2.1", 1, macros={"j": "gw"}))] \
        == [b"C"]
    feed(conn, CONTINUE)
    out = conn.mail(["<a@x>"], macros={"i": "Q1", "{mail_addr}": "a@x", "j": "gw"})
    assert packets(out)[0] == (b"D", b"M" + cstrings("{mail_addr}", "a@x", "i", "Q1"))


def test_body_chunks_are_bounded():
    conn = in_message()
    assert packets(conn.body(b"y" * 65535)) == [(b"B", b"y" * 65535)]
    feed(conn, CONTINUE)
    for bad in (b"", b"y" * 65536):
        with pytest.raises(ValueError):
            conn.body(bad)


def test_a_new_mail_aborts_an_open_transaction_first():
    conn = in_message()
    assert [c for c, _ in packets(conn.mail(["<c@x>"]))] == [b"A", b"M"]
    feed(conn, CONTINUE)
    conn.rcpt(["<d@y>"]); feed(conn, CONTINUE)
    conn.data(); feed(conn, CONTINUE)
    conn.eom(); feed(conn, ACCEPT)
    assert [c for c, _ in packets(conn.mail(["<e@x>"]))] == [b"M"]   # closed by end of message


def test_a_stage_before_its_verdict_was_collected_is_a_caller_error():
    conn = negotiated()
    conn.connect("c", "192.0.2.1", 1)
    with pytest.raises(RuntimeError):
        conn.helo("h")


# --- replies -------------------------------------------------------------------------------

def test_reject_and_tempfail_carry_postfix_replies():
    conn = connected()
    conn.mail(["<a@x>"])
    [v] = feed(conn, REJECT)
    assert (v.action, v.reply, v.stage) == (Action.REJECT, (550, "5.7.1 Command rejected"), "mail")
    conn.abort()
    conn.mail(["<a@x>"])
    feed(conn, CONTINUE)
    conn.rcpt(["<b@y>"])
    [v] = feed(conn, TEMPFAIL)
    assert v.action is Action.TEMPFAIL
    assert v.reply == (451, "4.7.1 Service unavailable - try again later")
    conn.rcpt(["<c@y>"])                       # a refused recipient: the next one is asked
    assert conn.awaiting_reply
    [v] = feed(conn, CONTINUE)
    assert v.action is Action.CONTINUE


@pytest.mark.parametrize("text,reply", [
    ("554 5.7.1 Gtube pattern", (554, "5.7.1 Gtube pattern")),
    ("451 4.7.1 Try again", (451, "4.7.1 Try again")),
    ("550 100%% spam, 5%s off", (550, "100% spam, 5s off")),
    ("550-5.7.1 first\r\n550 5.7.1 second", (550, ("5.7.1 first", "5.7.1 second"))),
    ("550", (550, "")),
])
def test_replycode_is_relayed_as_given(text, reply):
    conn = in_message()
    conn.eom()
    [v] = feed(conn, replycode(text))
    assert (v.action, v.reply) == (Action.REPLYCODE, reply)


@pytest.mark.parametrize("text", [
    "250 2.0.0 ok", "354 go", "221 bye", "650 x", "55 short", "5500 x", "550x",
    "550-only continuation", "550 a\r\n451 b", "550-a\r\n550-b", "550 a\r\n550 b",
    "550 a\nRCPT TO:<x>", "550 a\r\n", "550 bell\x07", "",
])
def test_invalid_replycodes_are_protocol_errors(text):
    conn = in_message()
    conn.eom()
    conn.receive_data(replycode(text))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_replycode_with_a_nul_inside_is_a_protocol_error():
    conn = in_message()
    conn.eom()
    conn.receive_data(M.encode_packet(b"y", b"550 a\0b\0"))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_accept_at_connect_ends_the_connections_events():
    conn = negotiated()
    conn.connect("c", "192.0.2.1", 1)
    [v] = feed(conn, ACCEPT)
    assert v.action is Action.ACCEPT and not conn.active
    # every later stage is answered at once, without I/O, as "continue"
    conn2 = negotiated()
    conn2.connect("c", "192.0.2.1", 1)
    feed(conn2, ACCEPT)
    for stage in (lambda: conn2.helo("h"), lambda: conn2.mail(["<a@x>"]),
                  lambda: conn2.rcpt(["<b@y>"]), conn2.data, conn2.eom):
        assert stage() == b""
        v = verdict_now(conn2)
        assert v.action is Action.CONTINUE and not v.replied
    assert conn2.abort() == b""


def test_a_refusal_at_helo_is_repeated_for_every_later_stage():
    conn = connected()
    conn.helo("h")
    [v] = feed(conn, replycode("550 5.7.1 go away"))
    assert not conn.active
    assert conn.mail(["<a@x>"]) == b""
    again = verdict_now(conn)
    assert (again.action, again.reply, again.replied) == (Action.REPLYCODE,
                                                          (550, "5.7.1 go away"), False)


def test_accept_inside_the_transaction_ends_the_messages_events_until_abort():
    conn = connected()
    conn.mail(["<a@x>"])
    feed(conn, ACCEPT)
    for stage in (lambda: conn.rcpt(["<b@y>"]), conn.data, lambda: conn.header("A", "b"),
                  conn.eoh, lambda: conn.body(b"x"), conn.eom):
        assert stage() == b""
        assert verdict_now(conn).action is Action.CONTINUE
    assert conn.active
    assert [c for c, _ in packets(conn.mail(["<c@x>"]))] == [b"A", b"M"]
    assert conn.awaiting_reply


def test_discard_at_rcpt_discards_the_message_and_is_invalid_at_connect():
    conn = connected()
    conn.mail(["<a@x>"]); feed(conn, CONTINUE)
    conn.rcpt(["<b@y>"])
    [v] = feed(conn, DISCARD)
    assert v.action is Action.DISCARD
    conn.data()
    assert verdict_now(conn).action is Action.DISCARD
    conn2 = negotiated()
    conn2.connect("c", "192.0.2.1", 1)
    conn2.receive_data(DISCARD)
    with pytest.raises(ProtocolError):
        conn2.next_event()


def test_progress_events_come_before_the_verdict():
    conn = in_message()
    conn.eom()
    events = feed(conn, PROGRESS + PROGRESS + ACCEPT, step=3)
    assert [type(e) for e in events] == [M.Progress, M.Progress, M.Verdict]


def test_skip_stops_further_body_chunks_but_not_the_end_of_message():
    conn = in_message(M.P_SKIP)
    conn.body(b"a")
    [v] = feed(conn, SKIP)
    assert v.action is Action.CONTINUE and v.replied
    assert conn.body(b"b") == b""
    assert not verdict_now(conn).replied
    assert packets(conn.eom()) == [(b"E", b"")]
    conn.receive_data(SKIP)                      # SKIP is no answer to end of message
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_quarantine_with_accept_is_a_quarantine_verdict():
    conn = in_message()
    conn.eom()
    [v] = feed(conn, quarantine("looks phishy") + addheader("X-A", "1") + CONTINUE)
    assert (v.action, v.reason) == (Action.QUARANTINE, "looks phishy")
    assert v.modifications == (M.AddHeader("X-A", " 1"),)
    conn.mail(["<a@x>"]); feed(conn, CONTINUE)
    conn.eom()
    [v] = feed(conn, quarantine("x") + REJECT)   # a refusal wins, changes dropped
    assert v.action is Action.REJECT and v.reason is None and v.modifications == ()


def test_every_modification_is_parsed_in_order():
    conn = in_message()
    conn.eom()
    wire = (addheader("X-Spam", "yes")
            + insheader(0, "DKIM-Signature", "v=1;\n\tb=abc")
            + chgheader(2, "Subject", "[SPAM] hi")
            + chgheader(0, "X-Old", "")
            + chgfrom("<new@example.com>", "SIZE=10")
            + chgfrom("<other@example.com>")
            + addrcpt("<c@example.net>")
            + addrcpt_par("<d@example.net>", "NOTIFY=NEVER")
            + delrcpt("<b@example.net>")
            + replbody(b"new body\r\n") + replbody(b"part 2\r\n")
            + ACCEPT)
    [v] = feed(conn, wire, step=7)
    assert v.action is Action.ACCEPT
    assert v.modifications == (
        M.AddHeader("X-Spam", " yes"),
        M.InsertHeader(0, "DKIM-Signature", " v=1;\r\n\tb=abc"),
        M.ChangeHeader(2, "Subject", " [SPAM] hi"),
        M.ChangeHeader(1, "X-Old", ""),             # index 0 means 1; empty value deletes
        M.ChangeFrom("<new@example.com>", "SIZE=10"),
        M.ChangeFrom("<other@example.com>", None),
        M.AddRecipient("<c@example.net>"),
        M.AddRecipient("<d@example.net>", "NOTIFY=NEVER"),
        M.DeleteRecipient("<b@example.net>"),
        M.ReplaceBody(b"new body\r\n"),
        M.ReplaceBody(b"part 2\r\n"),
    )
    assert v.modifications[3].delete


def test_header_values_keep_their_own_leading_space_under_hdr_leadspc():
    conn = in_message(M.P_HDR_LEADSPC)
    conn.eom()
    [v] = feed(conn, addheader("X-A", " spaced") + addheader("X-B", "tight") + ACCEPT)
    assert v.modifications == (M.AddHeader("X-A", " spaced"), M.AddHeader("X-B", "tight"))


@pytest.mark.parametrize("wire", [
    addheader("X-A", "v\nInjected: yes"),          # a line break must fold
    addheader("X-A", "v\rx"),
    addheader("Bad Name", "v"), addheader("", "v"), addheader("A:B", "v"),
    M.encode_packet(b"h", cstrings("X-A")),       # one string
    M.encode_packet(b"h", b"X-A\0v"),             # unterminated
    M.encode_packet(b"i", b"\0\0"),               # too short
    chgheader(0x80000000, "X-A", "v"),
    chgfrom("<a@x>\r\nRCPT TO:<evil@x>"), addrcpt(""), delrcpt("<a@x>\n"),
    addrcpt_par("<a@x>", "A=1\r\nB"),
    M.encode_packet(b"e", cstrings("<a@x>", "A", "B")),
    quarantine("bad\nreason"),
    M.encode_packet(b"p", b"x"),                  # PROGRESS with data
    M.encode_packet(b"c", b"x"),                  # CONTINUE with data
    M.encode_packet(b"f"), M.encode_packet(b"4"), M.encode_packet(b"Z"),
    M.encode_packet(b"l", b"x"),
])
def test_malformed_end_of_message_replies_are_protocol_errors(wire):
    conn = in_message()
    conn.eom()
    conn.receive_data(wire + ACCEPT)
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_modifications_need_their_action_and_the_end_of_message():
    conn = in_message(actions=M.F_ADDHDRS)
    conn.eom()
    conn.receive_data(chgfrom("<x@y>") + ACCEPT)
    with pytest.raises(ProtocolError, match="without negotiating"):
        conn.next_event()
    conn = connected()
    conn.mail(["<a@x>"])
    conn.receive_data(addheader("X-A", "b") + CONTINUE)
    with pytest.raises(ProtocolError, match="in answer to mail"):
        conn.next_event()


def test_data_after_an_answer_and_eof_are_protocol_errors():
    conn = connected()
    conn.mail(["<a@x>"])
    conn.receive_data(CONTINUE + CONTINUE)
    with pytest.raises(ProtocolError, match="after its answer"):
        conn.next_event()
    conn = connected()
    conn.mail(["<a@x>"])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        conn.next_event()
    with pytest.raises(ProtocolError):
        conn.abort()


# --- garbage -------------------------------------------------------------------------------

def _fresh(state: str) -> M.MilterConnection:
    if state == "negotiate":
        conn = M.MilterConnection()
        conn.negotiate()
    elif state == "connect":
        conn = negotiated()
        conn.connect("c", "192.0.2.1", 1)
    else:
        conn = in_message()
        conn.eom()
    return conn


_REAL = [CONTINUE, ACCEPT, PROGRESS, SKIP, REJECT, addheader("X", "y"), chgheader(1, "A", ""),
         replycode("550 5.7.1 no"), quarantine("q"), replbody(b"b"), optneg()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(["negotiate", "connect", "eom"]),
       chunks=st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(_REAL),
                                 st.builds(lambda n, c: struct.pack("!I", n) + c,
                                           st.integers(0, 2**32 - 1),
                                           st.binary(min_size=1, max_size=3))),
                       max_size=12),
       eof=st.booleans())
def test_garbage_never_raises_anything_but_protocol_error_nor_grows_the_buffer(state, chunks,
                                                                               eof):
    conn = _fresh(state)
    try:
        for chunk in chunks + ([b""] if eof else []):
            conn.receive_data(chunk)
            while conn.awaiting_reply:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                assert isinstance(ev, (M.Negotiated, M.Verdict, M.Progress))
            # what is left after taking every complete packet is at most one partial one
            assert conn.buffered < 4 + M.MAX_PACKET
    except ProtocolError:
        with pytest.raises(ProtocolError):             # and it stays broken
            conn.receive_data(b"x")


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(1, 17))
def test_a_valid_end_of_message_answer_survives_any_chunking(noise_free, step):
    body = replbody(noise_free)
    conn = _fresh("eom")
    [v] = feed(conn, PROGRESS + addheader("X-N", "1") + body + ACCEPT, step=step)[-1:]
    assert v.modifications == (M.AddHeader("X-N", " 1"), M.ReplaceBody(noise_free))


# --- bounds on a milter's changes (SPEC §4.7) ------------------------------------------------

@pytest.mark.parametrize("wire,why", [
    (b"".join(addheader("X-N", str(i)) for i in range(1001)), "more than 1000 header changes"),
    (b"".join(chgheader(1, "X-N", "") for i in range(1001)), "more than 1000 header changes"),
    (addheader("X-Long", "x" * 65530), "a header of 65537 octets"),
    (b"".join(addrcpt(f"<r{i}@x.test>") for i in range(1001)), "more than 1000 added recipients"),
    (b"".join(addrcpt_par(f"<r{i}@x.test>") for i in range(1001)),
     "more than 1000 added recipients"),
    (addrcpt("<" + "a" * 5000 + "@x.test>"), "ADDRCPT: 5010 octets"),
])
def test_changes_beyond_the_bounds_break_the_conversation(wire, why):
    conn = in_message()
    conn.eom()
    conn.receive_data(wire + CONTINUE)
    with pytest.raises(ProtocolError, match=why):
        while conn.next_event() is not NEED_DATA:
            pass
    with pytest.raises(ProtocolError):
        conn.abort()                               # broken for good


def test_changes_up_to_the_bounds_are_taken():
    conn = in_message()
    conn.eom()
    wire = (b"".join(addheader("X-N", str(i)) for i in range(999))
            + addheader("X-Long", "x" * (65536 - 7))
            + b"".join(addrcpt(f"<r{i}@x.test>") for i in range(1000)) + CONTINUE)
    [v] = feed(conn, wire)
    assert len(v.modifications) == 2000
    # the counts start again with the next message
    conn.mail(["<a@x>"]); feed(conn, CONTINUE)
    conn.eom()
    [v] = feed(conn, addheader("X-Again", "1") + CONTINUE)
    assert v.modifications == (M.AddHeader("X-Again", " 1"),)


def test_max_size_bounds_header_changes_and_new_body_together():
    conn = in_message()
    conn.eom(max_size=1000)
    conn.receive_data(addheader("X-A", "a" * 500) + replbody(b"b" * 400) + replbody(b"c" * 200)
                      + CONTINUE)
    with pytest.raises(ProtocolError, match="changes of more than 1000 octets"):
        while conn.next_event() is not NEED_DATA:
            pass


def test_a_streamed_body_comes_out_piece_by_piece_before_the_verdict():
    conn = in_message()
    conn.eom(stream_body=True)
    events = []
    conn.receive_data(replbody(b"one\r\n") + addheader("X-A", "1") + replbody(b"two")
                      + replbody(b"") + CONTINUE)
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, M.Verdict):
            break
    assert events[:3] == [M.ReplaceBody(b"one\r\n"), M.ReplaceBody(b"two"), M.ReplaceBody(b"")]
    assert events[3].modifications == (M.AddHeader("X-A", " 1"),)    # no body on the verdict

