"""The sans-IO IMAP client core (the upstream leg before login), fed bytes directly."""
from __future__ import annotations

import pytest

from gateway.native import scanner, scanner_py
from gateway.errors import ProtocolError
from gateway.proto import imap_wire as W
from gateway.proto.imap_client import IMAPClient

BACKENDS = ["python"] + (["native"] if scanner.native_backend is not None else [])


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    impl = scanner_py if request.param == "python" else scanner.native_backend
    monkeypatch.setattr(W, "scanner", impl)


def responses(client: IMAPClient, data: bytes, *, byte_at_a_time=False) -> list:
    out = []
    pieces = [data[i:i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    for piece in pieces:
        client.receive_data(piece)
        while (r := client.next_response()) is not None:
            out.append(r)
    return out


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_greeting_capabilities_and_tagged(byte_at_a_time):
    c = IMAPClient()
    rs = responses(c, b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN LITERAL+] hi\r\n"
                      b"* 3 EXISTS\r\n+ go on\r\ngw1 NO [AUTHENTICATIONFAILED] bad\r\n",
                   byte_at_a_time=byte_at_a_time)
    assert [(r.tag, r.kind) for r in rs] == [(None, "OK"), (None, "#EXISTS"), ("+", ""),
                                             ("gw1", "NO")]
    assert rs[0].code.startswith("CAPABILITY ") and rs[3].code == "AUTHENTICATIONFAILED"
    assert c.capabilities == {"IMAP4REV1", "STARTTLS", "AUTH=PLAIN", "LITERAL+"}
    assert rs[3].raw == b"gw1 NO [AUTHENTICATIONFAILED] bad\r\n"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_literal_in_a_response_is_read_exactly(byte_at_a_time):
    c = IMAPClient()
    data = b'* ID ("name" {12}\r\nx\r\ngw1 OK hi)\r\ngw1 OK done\r\n'
    rs = responses(c, data, byte_at_a_time=byte_at_a_time)
    assert [r.kind for r in rs] == ["ID", "OK"]
    assert rs[0].raw == b'* ID ("name" {12}\r\nx\r\ngw1 OK hi)\r\n'


def test_capability_response_replaces_the_set():
    c = IMAPClient()
    responses(c, b"* CAPABILITY IMAP4rev1 STARTTLS\r\ngw1 OK done\r\n")
    assert c.capabilities == {"IMAP4REV1", "STARTTLS"}


def test_commands_render_literals_by_capability():
    c = IMAPClient()
    tag, pieces = c.command("LOGIN", b"alice", b"pw\r\nb LOGOUT\r\n")
    assert tag == "gw1" and pieces == [b"gw1 LOGIN alice {14}\r\n", b"pw\r\nb LOGOUT\r\n\r\n"]
    c.capabilities = {"LITERAL+"}
    tag, pieces = c.command("LOGIN", b"alice", b"pw\r\n")
    assert tag == "gw2" and pieces == [b"gw2 LOGIN alice {4+}\r\npw\r\n\r\n"]
    with pytest.raises(ValueError):
        c.raw_command("ID NIL\r\nx LOGOUT")


def test_starttls_leftover_is_injection():
    c = IMAPClient()
    responses(c, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    rs = responses(c, b"gw1 OK\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    # the core returns everything; the leg stops after the first and checks the rest
    assert rs[0].tag == "gw1"
    c = IMAPClient()
    c.receive_data(b"gw1 OK begin\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    assert c.next_response().tag == "gw1"
    assert c.has_leftover()
    with pytest.raises(ProtocolError):
        c.reset()
    assert c.take_leftover() == b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"
    c.reset()
    assert c.capabilities == set() and not c.has_leftover()


def test_partial_line_counts_as_leftover():
    c = IMAPClient()
    c.receive_data(b"gw1 OK begin\r\n*")
    assert c.next_response().tag == "gw1"
    assert c.has_leftover()


@pytest.mark.parametrize("data", [
    b"garbage\r\n",
    b"gw1 FOO bar\r\n",
    b"*\r\n",
])
def test_malformed_responses(data):
    c = IMAPClient()
    c.receive_data(data)
    with pytest.raises(ProtocolError):
        c.next_response()
    with pytest.raises(ProtocolError):           # stays broken
        c.next_response()


def test_bounds():
    c = IMAPClient(max_response=1000)
    c.receive_data(b"* OK " + b"x" * 2000 + b"\r\n")
    with pytest.raises(ProtocolError):
        c.next_response()
    c = IMAPClient(max_untagged=5)
    with pytest.raises(ProtocolError):
        responses(c, b"* OK x\r\n" * 6)
    c = IMAPClient()
    responses(c, b"* OK x\r\n" * 100 + b"gw1 OK\r\n" + b"* OK x\r\n" * 100)   # per command
    c = IMAPClient()
    c.receive_data(b"* OK x")
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        c.next_response()


def test_oversized_literal_in_a_response_is_an_error():
    c = IMAPClient(max_response=1000)
    c.receive_data(b"* ID {5000}\r\n" + b"y" * 5000 + b"\r\n")
    with pytest.raises(ProtocolError):
        c.next_response()


def test_client_renders_what_the_server_core_parses():
    """A fake wire: the client's rendering, read back by the server core's reader."""
    from gateway.proto import imap_server as S
    values = [b"alice", b"", b"a b", b'q"\\', b"\xc3\xa9", b"x\r\ny", b"{3}", b"*", b"%"]
    for plus in (False, True):
        for user in values[:1] + values[2:]:
            for password in values:
                c = IMAPClient()
                if plus:
                    c.capabilities = {"LITERAL+"}
                tag, pieces = c.command("LOGIN", user, password)
                core = S.IMAPServer(hostname="mx.test")
                events = []
                for piece in pieces:
                    for i in range(len(piece)):
                        core.receive_data(piece[i:i + 1])
                        ev = core.next_event()
                        if ev is not S.NEED_DATA:
                            events.append(ev)
                assert len(events) == 1, (user, password, events)
                assert (events[0].user, events[0].password) == (user, password)
