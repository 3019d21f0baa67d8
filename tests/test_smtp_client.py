"""The sans-IO SMTP client core (upstream replies), fed bytes directly."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ProtocolError
from gateway.proto.smtp_client import Reply, SMTPClient

STREAM = (b"220 up.test ESMTP\r\n250-up.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
          b"250 STARTTLS\r\n550 5.1.1 No such user\r\n")
EXPECT = [Reply(220, ("up.test ESMTP",)),
          Reply(250, ("up.test", "PIPELINING", "SIZE 1000", "STARTTLS")),
          Reply(550, ("5.1.1 No such user",))]


def drain(c: SMTPClient) -> list[Reply]:
    out = []
    while (r := c.next_reply()) is not None:
        out.append(r)
    return out


def test_every_split_point():
    for cut in range(len(STREAM) + 1):
        c = SMTPClient()
        got = []
        for part in (p for p in (STREAM[:cut], STREAM[cut:]) if p):
            c.receive_data(part)
            got += drain(c)
        assert got == EXPECT


@given(st.lists(st.integers(0, len(STREAM)), max_size=6))
def test_any_chunking(cuts):
    c = SMTPClient()
    got, prev = [], 0
    for cut in sorted(cuts) + [len(STREAM)]:
        c.receive_data(STREAM[prev:cut]) if cut > prev else None
        got += drain(c)
        prev = max(prev, cut)
    assert got == EXPECT


def test_ehlo_and_enhanced():
    c = SMTPClient()
    c.receive_data(STREAM)
    _, ehlo, rej = drain(c)
    assert SMTPClient.parse_ehlo(ehlo) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}
    assert rej.enhanced == "5.1.1" and ehlo.enhanced is None


def test_long_line_truncated_without_unbounded_buffering():
    c = SMTPClient()
    c.receive_data(b"250 ")
    for _ in range(1000):
        c.receive_data(b"x" * 1024)
        assert len(c._buf) <= 600
    c.receive_data(b"tail\r\n")
    r = c.next_reply()
    assert r.code == 250 and len(r.text) == 512 - 4


def test_too_many_lines():
    c = SMTPClient()
    c.receive_data(b"250-x\r\n" * 101 + b"250 end\r\n")
    with pytest.raises(ProtocolError, match="too long"):
        drain(c)


@pytest.mark.parametrize("raw", [b"hello\r\n", b"25\r\n", b"250xok\r\n", b"250-a\r\n251 b\r\n"])
def test_malformed(raw):
    c = SMTPClient()
    c.receive_data(raw)
    with pytest.raises(ProtocolError):
        drain(c)


def test_eof_mid_reply():
    c = SMTPClient()
    c.receive_data(b"250-a\r\n")
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        drain(c)


def test_leftover_after_starttls_reply_is_detected():
    c = SMTPClient()
    c.receive_data(b"220 go\r\n250-injected\r\n")
    assert c.next_reply() == Reply(220, ("go",))
    assert c.has_leftover()
    c2 = SMTPClient()
    c2.receive_data(b"220 go\r\n")
    c2.next_reply()
    assert not c2.has_leftover()


def test_send_rejects_newlines():
    c = SMTPClient()
    assert c.send("MAIL FROM:<a@b>") == b"MAIL FROM:<a@b>\r\n"
    with pytest.raises(ValueError):
        c.send("RCPT TO:<a@b>\r\nDATA")
