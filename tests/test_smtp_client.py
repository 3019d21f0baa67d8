"""The sans-IO SMTP client core (upstream replies), fed bytes directly: no sockets, no trio."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ProtocolError
from gateway.proto.smtp_client import MAX_LINE, MAX_LINES, Reply, SMTPClient, UnsolicitedData

STREAM = (b"220 up.test ESMTP\r\n250-up.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
          b"250 STARTTLS\r\n550 5.1.1 No such user\r\n")
EXPECT = [Reply(220, ("up.test ESMTP",)),
          Reply(250, ("up.test", "PIPELINING", "SIZE 1000", "STARTTLS")),
          Reply(550, ("5.1.1 No such user",))]


def solicited(n: int = 10) -> SMTPClient:
    """A client with the greeting and *n* commands outstanding: the replies a framing test
    feeds all answer something (bytes that answer nothing are unsolicited, SPEC §6)."""
    c = SMTPClient()
    for _ in range(n):
        c.send("NOOP")
    return c


def drain(c: SMTPClient) -> list[Reply]:
    out = []
    while (r := c.next_reply()) is not None:
        out.append(r)
    return out


def feed_chunks(chunks) -> list[Reply]:
    c = solicited()
    got = []
    for part in chunks:
        if part:
            c.receive_data(part)
            got += drain(c)
    assert not c.has_leftover()
    return got


# --- framing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, expect", [
    (b"250 2.0.0 Ok\r\n", [Reply(250, ("2.0.0 Ok",))]),
    (STREAM, EXPECT),
])
def test_every_split_point(stream, expect):
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == expect
    for a in range(len(stream) + 1):            # every pair of split points
        for b in range(a, len(stream) + 1, 7):
            assert feed_chunks([stream[:a], stream[a:b], stream[b:]]) == expect


def test_byte_by_byte():
    c = solicited()
    got = []
    for i in range(len(STREAM)):
        c.receive_data(STREAM[i:i + 1])
        r = c.next_reply()
        # a reply completes exactly at the LF that ends its last ("250 ...") line
        line_start = STREAM.rfind(b"\n", 0, i) + 1
        ends_reply = STREAM[i:i + 1] == b"\n" and STREAM[line_start + 3:line_start + 4] == b" "
        assert (r is not None) == ends_reply
        if r is not None:
            got.append(r)
    assert got == EXPECT


def test_bare_lf_tolerated_and_bare_code():
    assert feed_chunks([b"220 hi\n250-a\r\n250\n354\r\n"]) == [
        Reply(220, ("hi",)), Reply(250, ("a", "")), Reply(354, ("",))]


_line_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
_reply = st.builds(Reply, st.integers(200, 599),
                   st.lists(_line_text, min_size=1, max_size=5).map(tuple))


def _wire(reply: Reply, lf_only: bool) -> bytes:
    end = b"\n" if lf_only else b"\r\n"
    out = b""
    for i, text in enumerate(reply.lines):
        sep = b" " if i == len(reply.lines) - 1 else b"-"
        out += b"%d" % reply.code + sep + text.encode() + end
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_reply, st.booleans()), min_size=1, max_size=6), st.data())
def test_any_chunking_yields_the_same_replies(replies, data):
    stream = b"".join(_wire(r, lf) for r, lf in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks, prev = [], 0
    for cut in cuts + [len(stream)]:
        chunks.append(stream[prev:cut])
        prev = cut
    assert feed_chunks(chunks) == [r for r, _ in replies]


# --- Reply: enhanced codes and rendering ------------------------------------------------------

@pytest.mark.parametrize("text, enhanced", [
    ("2.1.0 Ok", "2.1.0"), ("5.7.1", "5.7.1"), ("4.4.2\tlost", "4.4.2"),
    ("5.100.999 big", "5.100.999"), ("Ok", None), ("2.1.0Ok", None), ("3.0.0 go", None),
    ("2.1 Ok", None), ("5.1234.1 x", None), ("", None), (" 2.1.0 Ok", None),
])
def test_enhanced_detection(text, enhanced):
    assert Reply(250, (text,)).enhanced == enhanced


def test_reply_classes():
    assert [Reply(c, ("x",)).kind for c in (250, 354, 421, 550)] == [2, 3, 4, 5]
    assert Reply(250, ()).text == ""


@pytest.mark.parametrize("reply, wire", [
    (Reply(250, ("Ok",)), b"250 2.0.0 Ok\r\n"),
    (Reply(550, ("No such user",)), b"550 5.0.0 No such user\r\n"),
    (Reply(451, ("",)), b"451 4.0.0\r\n"),
    (Reply(250, ("2.1.5 Ok",)), b"250 2.1.5 Ok\r\n"),
    (Reply(250, ("up.test", "PIPELINING", "SIZE 10")),
     b"250-2.0.0 up.test\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 SIZE 10\r\n"),
    # first line has a code, a continuation lacks one: it gets the same code
    (Reply(550, ("5.7.1 refused", "see docs")), b"550-5.7.1 refused\r\n550 5.7.1 see docs\r\n"),
    (Reply(354, ("End data with <CR><LF>.<CR><LF>",)),
     b"354 End data with <CR><LF>.<CR><LF>\r\n"),         # 3xx: no enhanced codes exist
    (Reply(250, ("a\rb\x00c\td",)), b"250 2.0.0 a b c\td\r\n"),   # no bare CR/NUL relayed
])
def test_to_bytes_adds_x00(reply, wire):
    assert reply.to_bytes() == wire


def test_to_bytes_without_adding_round_trips():
    c = solicited()
    c.receive_data(STREAM)
    assert b"".join(r.to_bytes(add_enhanced=False) for r in drain(c)) == STREAM


# --- bounds -----------------------------------------------------------------------------------

def test_long_line_truncated_without_unbounded_buffering():
    c = solicited()
    c.receive_data(b"250 ")
    for _ in range(1024):                       # 1 MiB in 1 KiB chunks
        c.receive_data(b"x" * 1024)
        assert len(c._buf) <= MAX_LINE + 2
        assert c.next_reply() is None
    c.receive_data(b"tail\r\n250 next\r\n")
    r = c.next_reply()
    assert r.code == 250 and r.text == "x" * (MAX_LINE - 4)
    assert c.next_reply() == Reply(250, ("next",))
    assert not c.has_leftover()


def test_long_line_in_one_chunk_is_cut_at_once():
    c = SMTPClient()
    c.receive_data(b"250-" + b"y" * (1 << 20))
    assert len(c._buf) <= MAX_LINE + 2
    c.receive_data(b"\r\n250 end\r\n")
    assert c.next_reply() == Reply(250, ("y" * (MAX_LINE - 4), "end"))


def test_line_of_exactly_max_is_kept():
    text = "z" * (MAX_LINE - 4)
    for extra, expect in ((0, text), (1, text), (3, text)):
        c = SMTPClient()
        c.receive_data(b"250 " + text.encode() + b"!" * extra + b"\r\n")
        assert c.next_reply().text == expect


def test_long_line_then_eof_is_connection_closed():
    c = SMTPClient()
    c.receive_data(b"250 " + b"x" * 5000)
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match="connection closed"):
        c.next_reply()


def test_hundred_lines_ok_hundred_and_one_too_long():
    c = SMTPClient()
    c.receive_data(b"250-x\r\n" * (MAX_LINES - 1) + b"250 end\r\n")
    assert len(c.next_reply().lines) == MAX_LINES
    c = SMTPClient()
    c.receive_data(b"250-x\r\n" * MAX_LINES + b"250 end\r\n")
    with pytest.raises(ProtocolError, match="reply too long"):
        drain(c)
    with pytest.raises(ProtocolError, match="reply too long"):   # the error sticks
        c.next_reply()


def test_too_long_detected_before_the_reply_ends():
    c = SMTPClient()
    for _ in range(MAX_LINES + 1):
        c.receive_data(b"250-x\r\n")
    with pytest.raises(ProtocolError, match="reply too long"):
        c.next_reply()


@pytest.mark.parametrize("raw", [
    b"hello\r\n", b"25\r\n", b"250xok\r\n", b"250-a\r\n251 b\r\n", b"150 x\r\n", b"650 x\r\n",
    b"\r\n", b"2a0 x\r\n", b" 250 x\r\n",
])
def test_malformed(raw):
    c = SMTPClient()
    c.receive_data(raw)
    with pytest.raises(ProtocolError):
        drain(c)


@pytest.mark.parametrize("data", [b"250-a\r\n", b"250 par", b"", b"250-a\r\n250 b"])
def test_eof_mid_reply(data):
    c = SMTPClient()
    if data:
        c.receive_data(data)
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match="connection closed"):
        drain(c)


def test_eof_after_complete_reply_returns_it_first():
    c = SMTPClient()
    c.receive_data(b"221 2.0.0 Bye\r\n")
    c.receive_data(b"")
    assert c.next_reply() == Reply(221, ("2.0.0 Bye",))
    with pytest.raises(ProtocolError, match="connection closed"):
        c.next_reply()
    with pytest.raises(RuntimeError):
        c.receive_data(b"more")


# --- STARTTLS leftover (SPEC §6) --------------------------------------------------------------

def test_leftover_after_starttls_reply_is_detected():
    c = SMTPClient()
    c.send("STARTTLS")
    c.receive_data(b"220 go\r\n250-injected\r\n")
    assert c.next_reply() == Reply(220, ("go",))
    assert c.has_leftover()
    assert c.pending_bytes() == b"250-injected\r\n"
    with pytest.raises(ProtocolError, match="injection"):
        c.reset()                                # the check cannot be skipped
    assert c.take_leftover() == b"250-injected\r\n"
    assert not c.has_leftover() and c.pending_bytes() == b""

    c2 = SMTPClient()
    c2.receive_data(b"220 go\r\n")
    c2.next_reply()
    assert not c2.has_leftover()
    c2.reset()


@pytest.mark.parametrize("after", [b"2", b"\r\n", b"x" * 5000])
def test_any_extra_byte_is_leftover(after):
    c = SMTPClient()
    c.receive_data(b"220 go\r\n" + after)
    assert c.next_reply() == Reply(220, ("go",))
    assert c.has_leftover()


def test_reset_gives_a_fresh_parser():
    c = SMTPClient()
    c.receive_data(b"220 hi\r\n")
    c.next_reply()
    c.send("STARTTLS")
    c.receive_data(b"220 go\r\n")
    c.next_reply()
    c.reset()
    assert c.pending == 0
    c.send("EHLO gw")
    c.receive_data(b"250-up\r\n250 SIZE 5\r\n")
    assert c.next_reply() == Reply(250, ("up", "SIZE 5"))
    assert c.last_command == "EHLO"          # no greeting is expected after STARTTLS


# --- commands, pipelining, EHLO -------------------------------------------------------------

def test_send_and_pending_with_pipelining():
    c = SMTPClient()
    assert c.send("MAIL FROM:<a@b> SIZE=10") == b"MAIL FROM:<a@b> SIZE=10\r\n"
    c.send("RCPT TO:<c@d>")
    c.send("data")
    assert c.pending == 3 and c.pending_commands == ("MAIL", "RCPT", "DATA")
    c.receive_data(b"220 greeting\r\n250 2.1.0 Ok\r\n550 5.1.1 No\r\n")
    assert c.next_reply().code == 220 and c.last_command is None and c.pending == 3
    assert c.next_reply().code == 250 and c.last_command == "MAIL"
    assert c.next_reply().code == 550 and c.last_command == "RCPT"
    assert c.pending == 1
    c.receive_data(b"554 5.5.1 No valid recipients\r\n")
    assert c.next_reply().code == 554 and c.last_command == "DATA" and c.pending == 0


@pytest.mark.parametrize("bad", ["RCPT TO:<a@b>\r\nDATA", "NOOP\n", "NOOP\r", "MAIL\x00"])
def test_send_rejects_line_breaks(bad):
    c = SMTPClient()
    with pytest.raises(ValueError):
        c.send(bad)
    assert c.pending == 0


def test_send_utf8():
    assert SMTPClient().send("RCPT TO:<jörg@例え.jp>") == "RCPT TO:<jörg@例え.jp>\r\n".encode()


def test_ehlo_and_enhanced():
    c = solicited()
    c.receive_data(STREAM)
    _, ehlo, rej = drain(c)
    assert SMTPClient.parse_ehlo(ehlo) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}
    assert rej.enhanced == "5.1.1" and ehlo.enhanced is None


def test_parse_ehlo_details():
    r = Reply(250, ("up.test Hello", "pipelining", "AUTH PLAIN  LOGIN", "size",
                    "XCLIENT ADDR PORT NAME HELO", "  8BITMIME  ", ""))
    assert SMTPClient.parse_ehlo(r) == {"PIPELINING": "", "AUTH": "PLAIN  LOGIN", "SIZE": "",
                                        "XCLIENT": "ADDR PORT NAME HELO", "8BITMIME": ""}
    assert SMTPClient.parse_ehlo(Reply(250, ("only.name",))) == {}
    assert SMTPClient.parse_ehlo(Reply(502, ("5.5.1 no", "STARTTLS"))) == {}


def _answer(client: SMTPClient, wire: bytes) -> Reply:
    client.receive_data(wire)
    return client.next_reply()


def test_client_role_state_is_moved_by_replies():
    """The client role's table: EHLO sets extensions, MAIL opens, 354 enters the message,
    the reply to the final dot ends the transaction; the leg sets none of these itself."""
    c = SMTPClient()
    _answer(c, b"220 up ESMTP\r\n")
    c.command("EHLO gw")
    assert c.data_to_send() == b"EHLO gw\r\n"
    _answer(c, b"250-up\r\n250-PIPELINING\r\n250 DSN\r\n")
    assert set(c.extensions) == {"PIPELINING", "DSN"}
    assert c.mail("a@x", {"SIZE": "10", "RET": "HDRS"}) == ["SIZE"]
    assert c.rcpt("b@y", {"NOTIFY": "NEVER"}) == []
    assert c.data_to_send() == b"MAIL FROM:<a@x> RET=HDRS\r\nRCPT TO:<b@y> NOTIFY=NEVER\r\n"
    assert not c.in_transaction
    _answer(c, b"250 ok\r\n")
    assert c.in_transaction
    _answer(c, b"250 ok\r\n")
    c.command("DATA")
    c.data_to_send()
    with pytest.raises(ProtocolError):
        c.message_data(b"too early\r\n")
    _answer(c, b"354 go\r\n")
    assert c.in_data
    c.message_data(b"Subject: x\r\n")
    c.message_data(b"\r\nbody\r\n")
    assert c.buffered == len(b"Subject: x\r\n\r\nbody\r\n")
    c.end_message()
    assert not c.in_data and c.in_transaction
    assert c.data_to_send() == b"Subject: x\r\n\r\nbody\r\n.\r\n" and c.buffered == 0
    _answer(c, b"250 queued\r\n")
    assert not c.in_transaction and c.last_command == "."


def test_client_role_refusals_leave_state():
    c = SMTPClient(greeting=False)
    c.mail("a@x", {})
    _answer(c, b"550 no\r\n")
    assert not c.in_transaction
    c.mail("a@x", {})
    _answer(c, b"250 ok\r\n")
    c.command("DATA")
    _answer(c, b"451 later\r\n")
    assert c.in_transaction and not c.in_data
    c.command("RSET")
    _answer(c, b"250 ok\r\n")
    assert not c.in_transaction
    c.command("HELO gw")
    _answer(c, b"250 up\r\n")
    assert c.extensions == {}


def test_client_xclient_and_reset_forget_extensions():
    c = SMTPClient(greeting=False)
    c.xclient("2001:db8::1", 25, "h+o=st")
    assert c.data_to_send() == (b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=25 NAME=[UNAVAILABLE] "
                                b"HELO=h+2Bo+3Dst\r\n")
    c.extensions = {"STARTTLS": ""}
    _answer(c, b"220 go\r\n")
    c.reset()
    assert c.extensions == {}


# --- a SASL exchange marks the connection for good (SPEC §4.6) --------------------------------

def _ready() -> SMTPClient:
    c = SMTPClient()
    c.receive_data(b"220 up ESMTP\r\n")
    assert c.next_reply().code == 220
    c.command("EHLO gw")
    c.data_to_send()
    c.receive_data(b"250-up\r\n250 AUTH PLAIN LOGIN\r\n")
    assert c.next_reply().code == 250
    return c


def test_a_fresh_idle_client_is_reusable():
    c = _ready()
    assert c.reusable and not c.sasl_used and not c.in_sasl


@pytest.mark.parametrize("final", [b"235 2.7.0 Authentication successful\r\n",
                                   b"535 5.7.8 Error: authentication failed\r\n",
                                   b"501 5.7.0 Authentication aborted\r\n"])
def test_any_sasl_exchange_makes_the_client_unfit_for_reuse(final):
    c = _ready()
    c.auth("LOGIN")
    assert c.data_to_send() == b"AUTH LOGIN\r\n"
    assert c.in_sasl and c.sasl_used and not c.reusable      # awaiting the first reply
    c.receive_data(b"334 VXNlcm5hbWU6\r\n")
    assert c.next_reply().code == 334
    assert c.in_sasl and not c.reusable
    with pytest.raises(ProtocolError):
        c.command("MAIL FROM:<a@b>")           # never a command inside an exchange
    with pytest.raises(ProtocolError):
        c.command("QUIT")
    c.auth_response("YWxpY2U=")
    assert c.data_to_send() == b"YWxpY2U=\r\n"
    c.receive_data(final)
    reply = c.next_reply()
    assert not c.in_sasl                        # over, whatever the outcome ...
    assert c.sasl_used and not c.reusable       # ... and the connection stays marked
    assert c.authenticated == (reply.code == 235)
    c.command("QUIT")                           # commands again once it is over


def test_an_auth_command_sent_as_a_plain_command_counts_too():
    c = _ready()
    c.command("AUTH PLAIN AGFAYgBj")
    assert c.in_sasl and c.sasl_used and not c.reusable


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b"])
def test_a_sasl_response_never_carries_cr_lf_or_nul(bad):
    c = _ready()
    c.auth("PLAIN")
    c.data_to_send()
    c.receive_data(b"334 \r\n")
    c.next_reply()
    with pytest.raises(ValueError):
        c.auth_response(bad)
    assert c.data_to_send() == b""


def test_a_response_outside_an_exchange_or_before_the_334_is_refused():
    c = _ready()
    with pytest.raises(ProtocolError):
        c.auth_response("YWxpY2U=")
    c.auth("LOGIN")
    with pytest.raises(ProtocolError):
        c.auth_response("YWxpY2U=")             # the 334 has not been read yet


def test_reusable_needs_the_idle_command_state():
    c = _ready()
    c.mail("a@b", {})
    assert not c.reusable                       # queued, unsent
    c.data_to_send()
    assert not c.reusable                       # awaiting the reply
    c.receive_data(b"250 2.1.0 Ok\r\n")
    c.next_reply()
    assert c.in_transaction and not c.reusable
    c.command("RSET")
    c.data_to_send()
    c.receive_data(b"250 2.0.0 Ok\r\n")
    c.next_reply()
    assert c.reusable


# --- unsolicited data: bytes with no command outstanding are never a reply (SPEC §6) --------

def _after_greeting() -> SMTPClient:
    c = SMTPClient()
    c.receive_data(b"220 up.test ESMTP\r\n")
    assert c.next_reply().code == 220
    return c


def test_a_line_after_the_last_reply_is_unsolicited_and_never_answers_the_next_command():
    """The hostile upstream's extra `250` after RCPT's reply: the client's DATA must not
    take it for its answer."""
    c = _after_greeting()
    c.send("RCPT TO:<b@x.test>")
    assert not c.unsolicited
    c.receive_data(b"250 2.1.5 Ok\r\n250 2.0.0 stale\r\n")
    assert c.next_reply() == Reply(250, ("2.1.5 Ok",))
    assert c.pending == 0 and c.unsolicited            # known before anything is sent
    c.send("DATA")
    with pytest.raises(UnsolicitedData):
        c.next_reply()
    with pytest.raises(UnsolicitedData):                # broken for good
        c.next_reply()
    assert c.unsolicited and not c.in_data


def test_a_reply_when_nothing_is_outstanding_is_an_error_not_a_reply():
    c = _after_greeting()
    c.receive_data(b"421 4.4.2 up.test Error: timeout exceeded\r\n")
    assert c.unsolicited
    with pytest.raises(UnsolicitedData, match="421 4.4.2"):
        c.next_reply()


def test_bytes_before_the_final_dot_are_unsolicited():
    c = _after_greeting()
    c.send("DATA")
    c.receive_data(b"354 go\r\n")
    assert c.next_reply().code == 354 and c.in_data and not c.unsolicited
    c.receive_data(b"554 5.0.0 early\r\n")             # while the message streams
    assert c.unsolicited
    c.end_message()
    with pytest.raises(UnsolicitedData):
        c.next_reply()


def test_pipelined_replies_are_solicited():
    """MAIL and RCPT sent in one write: both replies, read in one chunk, are answers."""
    c = _after_greeting()
    c.send("MAIL FROM:<a@x.test>")
    c.send("RCPT TO:<b@x.test>")
    c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert not c.unsolicited
    assert c.next_reply().code == 250 and not c.unsolicited     # RCPT's still awaited
    assert c.next_reply().code == 250 and c.pending == 0 and not c.unsolicited
    c.send("DATA")
    c.receive_data(b"354 go\r\n")
    assert c.next_reply().code == 354


def test_the_greeting_and_a_partial_reply_in_progress_are_solicited():
    c = SMTPClient()
    c.receive_data(b"220-up.test\r\n")                   # the greeting, not yet complete
    assert not c.unsolicited
    c.receive_data(b"220 ESMTP\r\n")
    assert c.next_reply().code == 220 and not c.unsolicited
    c.send("EHLO gw.test")
    c.receive_data(b"250-up.test\r\n")                   # EHLO's reply, half there
    assert c.next_reply() is None and not c.unsolicited
    c.receive_data(b"250 PIPELINING\r\n")
    assert c.next_reply().code == 250 and not c.unsolicited
    c.receive_data(b"25")                                # a byte of something unasked
    assert c.unsolicited


def test_the_auth_mode_takes_long_challenges_and_ends_with_the_exchange():
    """SPEC §4.5/§4.6: inside a SASL exchange a 334 challenge may be 12,288 octets; the
    client core raises its line bound itself when AUTH goes out and drops it back to 512
    when the exchange ends (nobody sets `max_line` from outside)."""
    c = _ready()
    long_line = b"A" * 12000
    c.auth("XOAUTH2")
    c.data_to_send()
    c.receive_data(b"334 " + long_line + b"\r\n")
    assert c.next_reply().text == long_line.decode()          # whole, not cut at 512
    c.auth_response("")
    c.data_to_send()
    c.receive_data(b"535 5.7.8 failed\r\n")
    assert c.next_reply().code == 535 and c.max_line == 512   # the exchange is over
    c.command("NOOP")
    c.data_to_send()
    c.receive_data(b"250 " + long_line + b"\r\n")
    assert len(c.next_reply().text) == 512 - 4
