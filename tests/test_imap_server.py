"""The sans-IO IMAP server core and the literal-aware reader, fed bytes directly."""
from __future__ import annotations

import base64

import pytest

from gateway.native import scanner, scanner_py
from gateway.proto import imap_server as S
from gateway.proto import imap_wire as W

BACKENDS = ["python"] + (["native"] if scanner.native_backend is not None else [])


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Every test runs with the Python twin and with the compiled scanner."""
    impl = scanner_py if request.param == "python" else scanner.native_backend
    monkeypatch.setattr(W, "scanner", impl)
    return request.param


def make(**kw) -> S.IMAPServer:
    kw.setdefault("hostname", "mx.test")
    core = S.IMAPServer(**kw)
    core.greeting()
    core.data_to_send()
    return core


class Driver:
    """Plays the session: STARTTLS is accepted, every login succeeds (or as told)."""

    def __init__(self, core: S.IMAPServer, login_ok: bool = True):
        self.core = core
        self.login_ok = login_ok
        self.events: list = []

    def feed(self, data: bytes, *, byte_at_a_time: bool = False) -> bytes:
        pieces = [data[i:i + 1] for i in range(len(data))] if byte_at_a_time else [data]
        out = []
        for piece in pieces:
            self.core.receive_data(piece)
            out.append(self.pump())
        return b"".join(out)

    def pump(self) -> bytes:
        core = self.core
        while True:
            ev = core.next_event()
            if ev is S.NEED_DATA:
                return core.data_to_send()
            self.events.append(ev)
            if isinstance(ev, (S.ConnectionClosed, S.Logout)):
                return core.data_to_send()
            if isinstance(ev, S.StartTLS):
                core.starttls_ok()
                out = core.data_to_send()
                self.discarded = core.start_tls()
                core.tls_established(verified=True)
                return out
            if isinstance(ev, S.Login):
                word = b"OK" if self.login_ok else b"NO"
                core.login_result(self.login_ok, ev.tag.encode() + b" " + word + b" done\r\n")
                if self.login_ok:
                    return core.data_to_send()


def test_greeting_capabilities_by_level():
    core = S.IMAPServer(hostname="mx.test", require_tls=True)
    core.greeting()
    assert core.data_to_send() == (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE "
                                   b"STARTTLS LOGINDISABLED] mx.test ready\r\n")
    assert "AUTH=" not in make(require_tls=True).capabilities()
    assert make(offer_starttls=False).capabilities().endswith("IDLE AUTH=PLAIN")
    core = make(require_tls=True)
    core.tls_established()
    assert core.capabilities() == "IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_basic_commands(byte_at_a_time):
    d = Driver(make())
    out = d.feed(b"a CAPABILITY\r\nb NOOP\r\nc ID (\"name\" \"x\")\r\nd FOO\r\ne LOGOUT\r\n"
                 b"f NOOP\r\n", byte_at_a_time=byte_at_a_time)
    assert out == (b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE STARTTLS AUTH=PLAIN\r\n"
                   b"a OK Capability completed\r\nb OK NOOP completed\r\n"
                   b"* ID NIL\r\nc OK ID completed\r\n"
                   b"d BAD Command not permitted before login\r\n"
                   b"* BYE Logging out\r\ne OK Logout completed\r\n")
    assert any(isinstance(e, S.Logout) for e in d.events)


def test_login_refused_in_the_clear_when_tls_required():
    d = Driver(make(require_tls=True))
    out = d.feed(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"
                 b"c AUTHENTICATE PLAIN\r\n")
    assert out == (b"a NO [PRIVACYREQUIRED] TLS is required\r\n"
                   b"b NO [PRIVACYREQUIRED] TLS is required\r\n"
                   b"c NO [PRIVACYREQUIRED] TLS is required\r\n")
    assert not any(isinstance(e, S.Login) for e in d.events)


def test_verify_needs_verified_certificate():
    core = make(require_tls=True, require_client_cert=True, tls_active=True)
    out = Driver(core).feed(b"a LOGIN alice secret\r\n")
    assert out == b"a NO [PRIVACYREQUIRED] Client certificate required\r\n"
    core.tls_established(verified=True)
    d = Driver(core)
    assert d.feed(b"b LOGIN alice secret\r\n") == b"b OK done\r\n"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_starttls_discards_pipelined_commands(byte_at_a_time):
    core = make(require_tls=True)
    d = Driver(core)
    if byte_at_a_time:
        out = d.feed(b"a STARTTLS\r\n", byte_at_a_time=True)
        core.receive_data(b"b CAPABILITY\r\n")        # arrived before the handshake
        assert core.start_tls() == 14
    else:
        out = d.feed(b"a STARTTLS\r\nb CAPABILITY\r\n")
        assert d.discarded == 14
    assert out == b"a OK Begin TLS negotiation now\r\n"
    assert d.feed(b"c STARTTLS\r\n") == b"c BAD TLS is already active\r\n"
    assert d.feed(b"d CAPABILITY\r\n").startswith(b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ "
                                                  b"ID IDLE AUTH=PLAIN\r\n")


def test_starttls_unavailable_and_with_arguments():
    assert Driver(make(offer_starttls=False)).feed(b"a STARTTLS\r\n") == \
        b"a BAD STARTTLS not available\r\n"
    assert Driver(make()).feed(b"a STARTTLS now\r\n") == b"a BAD Unexpected arguments\r\n"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_login_literal_is_never_a_command(byte_at_a_time):
    password = b"x\r\nb LOGOUT\r\n"
    d = Driver(make())
    out = d.feed(b"a LOGIN {5}\r\nalice {%d}\r\n%s\r\n" % (len(password), password),
                 byte_at_a_time=byte_at_a_time)
    assert out == b"+ Ready for literal data\r\n+ Ready for literal data\r\na OK done\r\n"
    login = [e for e in d.events if isinstance(e, S.Login)]
    assert len(login) == 1 and login[0].user == b"alice" and login[0].password == password
    assert not any(isinstance(e, S.Logout) for e in d.events)
    assert "x" not in repr(login[0]).replace("alice", "")    # no password in repr


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_non_synchronising_literal(byte_at_a_time):
    d = Driver(make(), login_ok=False)
    out = d.feed(b"a LOGIN alice {6+}\r\nse\"c t\r\nb NOOP\r\n", byte_at_a_time=byte_at_a_time)
    assert out == b"a NO done\r\nb OK NOOP completed\r\n"
    assert [e.password for e in d.events if isinstance(e, S.Login)] == [b'se"c t']


def test_quoted_strings():
    d = Driver(make())
    d.feed(b'a LOGIN "al ice" "p\\"w\\\\"\r\n')
    login = d.events[-1]
    assert (login.user, login.password) == (b"al ice", b'p"w\\')


def test_login_syntax_errors():
    d = Driver(make())
    assert d.feed(b"a LOGIN alice\r\n") == b"a BAD Invalid arguments\r\n"
    assert d.feed(b'b LOGIN "alice secret\r\n') == b"b BAD Invalid arguments\r\n"
    assert d.feed(b"* LOGIN a b\r\n") == b"* BAD Invalid tag\r\n"
    assert d.feed(b"\r\n") == b"* BAD Invalid tag\r\n"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_too_big_synchronising_literal_gets_bad_and_no_continuation(byte_at_a_time):
    d = Driver(make())
    out = d.feed(b"a LOGIN alice {65536}\r\nb NOOP\r\n", byte_at_a_time=byte_at_a_time)
    assert out == b"a BAD [TOOBIG] Command too long\r\nb OK NOOP completed\r\n"


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_too_big_non_synchronising_literal_is_skipped(byte_at_a_time):
    d = Driver(make())
    data = b"a LOGIN alice {70000+}\r\n" + b"c NOOP\r\n" * 8750 + b"\r\nb NOOP\r\n"
    out = d.feed(data, byte_at_a_time=byte_at_a_time)
    assert out == b"a BAD [TOOBIG] Command too long\r\nb OK NOOP completed\r\n"
    assert d.core._reader.buffered == 0


def test_too_big_chain_of_literals_and_long_line():
    d = Driver(make())
    # a command whose literals add up past 64 KiB: the rest of the command is skipped too
    lit = b"z" * 40000
    out = d.feed(b"a LOGIN {40000+}\r\n" + lit + b" {40000+}\r\n" + lit + b"\r\nb NOOP\r\n")
    assert out == b"a BAD [TOOBIG] Command too long\r\nb OK NOOP completed\r\n"
    # a line longer than the cap, ending with a {N+}: the literal is skipped as well
    out = d.feed(b"c NOOP " + b"x" * 70000 + b" {12+}\r\nd NOOP\r\nxx\r\n\r\ne NOOP\r\n")
    assert out == b"c BAD [TOOBIG] Command too long\r\ne OK NOOP completed\r\n"


def test_huge_literal_length_closes():
    d = Driver(make())
    out = d.feed(b"a LOGIN alice {9999999999999999999+}\r\n")
    assert out.startswith(b"a BAD") is False and out.startswith(b"* BYE")
    assert d.core.closed


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_authenticate_plain_continuation_and_sasl_ir(byte_at_a_time):
    ir = base64.b64encode(b"admin\0alice\0secret")
    d = Driver(make())
    out = d.feed(b"a AUTHENTICATE PLAIN\r\n" + ir + b"\r\n", byte_at_a_time=byte_at_a_time)
    assert out == b"+ \r\na OK done\r\n"
    login = d.events[-1]
    assert (login.authzid, login.user, login.password, login.mechanism) == \
        (b"admin", b"alice", b"secret", "PLAIN")
    d = Driver(make())
    assert d.feed(b"b AUTHENTICATE plain " + ir + b"\r\n") == b"b OK done\r\n"


def test_authenticate_errors():
    d = Driver(make())
    assert d.feed(b"a AUTHENTICATE PLAIN\r\n*\r\n") == \
        b"+ \r\na BAD Authentication cancelled\r\n"
    assert d.feed(b"b AUTHENTICATE PLAIN !!!\r\n") == b"b BAD Invalid base64\r\n"
    assert d.feed(b"c AUTHENTICATE PLAIN " + base64.b64encode(b"alice") + b"\r\n") == \
        b"c NO [AUTHENTICATIONFAILED] Invalid PLAIN message\r\n"
    assert d.feed(b"d AUTHENTICATE CRAM-MD5\r\n") == \
        b"d NO Unsupported authentication mechanism\r\n"
    # a continuation line ending like a literal is base64 text, not a literal announcement
    assert d.feed(b"e AUTHENTICATE PLAIN\r\nabc{5}\r\nf NOOP\r\n") == \
        b"+ \r\ne BAD Invalid base64\r\nf OK NOOP completed\r\n"


def test_pipelined_after_login_is_handed_over():
    d = Driver(make())
    d.feed(b"a LOGIN alice secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
    assert d.core.logged_in
    assert d.core.next_event() is S.NEED_DATA
    assert d.core.take_trailing() == b"b SELECT INBOX\r\nc IDLE\r\n"


def test_failed_login_keeps_the_dialogue():
    d = Driver(make(), login_ok=False)
    out = d.feed(b"a LOGIN alice bad\r\nb SELECT INBOX\r\n")
    assert out == b"a NO done\r\nb BAD Command not permitted before login\r\n"
    assert not d.core.logged_in


def test_too_many_errors_closes():
    d = Driver(make(max_errors=3))
    out = d.feed(b"a X\r\nb X\r\nc X\r\nd NOOP\r\n")
    assert out.endswith(b"* BYE Too many invalid commands\r\n")
    assert b"d OK" not in out and d.core.closed


def test_eof_closes():
    d = Driver(make())
    d.core.receive_data(b"a NOO")
    d.core.receive_data(b"")
    assert isinstance(d.core.next_event(), S.ConnectionClosed)


def test_reader_bounded_buffer():
    r = W.LineReader(1000)
    for _ in range(100):
        r.receive_data(b"y" * 500)
        assert r.next() is W.NEED_DATA
        assert r.buffered <= 1000
    r.receive_data(b"\r\nz OK\r\n")
    assert isinstance(r.next(), W.TooBig)
    assert r.next().raw == b"z OK\r\n"


def test_render_command_pieces():
    assert W.render_command(b"t1", b"LOGIN", [b"alice", b"pa ss"], literal_plus=False) == \
        [b't1 LOGIN alice "pa ss"\r\n']
    assert W.render_command(b"t1", b"LOGIN", [b"alice", b"a\r\nb"], literal_plus=False) == \
        [b"t1 LOGIN alice {4}\r\n", b"a\r\nb\r\n"]
    assert W.render_command(b"t1", b"LOGIN", [b"\xc3\xa9", b"a\r\nb"], literal_plus=True) == \
        [b"t1 LOGIN {2+}\r\n\xc3\xa9 {4+}\r\na\r\nb\r\n"]


def test_overlong_sasl_response():
    d = Driver(make())
    out = d.feed(b"a AUTHENTICATE PLAIN\r\n" + b"QUFB" * 20000 + b"\r\nb NOOP\r\n")
    assert out == b"+ \r\na BAD [TOOBIG] Command too long\r\nb OK NOOP completed\r\n"


ALPHABET = [b"a", b" ", b"{", b"}", b"+", b"1", b"7", b"\r\n", b"\n", b"LOGIN ", b"NOOP",
            b"x" * 300, b"{3}", b"{4+}", b"{70000+}", b"\"", b"AUTHENTICATE PLAIN"]


def _transcript(data: bytes, cuts: list[int]):
    core = make(max_command=2048)
    d = Driver(core, login_ok=False)
    out, last = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut > last:
            out.append(d.feed(data[last:cut]))
            last = cut
    return b"".join(out), [repr(e) for e in d.events]


def test_chunking_never_changes_the_outcome():
    """Property: however the input is split, the core answers the same (both backends)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(st.lists(st.sampled_from(ALPHABET), max_size=40),
                      st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
    def check(pieces, cuts):
        data = b"".join(pieces)
        whole = _transcript(data, [])
        assert _transcript(data, [c % (len(data) + 1) for c in cuts]) == whole
    check()


def test_empty_literal():
    d = Driver(make())
    assert d.feed(b"a LOGIN alice {0+}\r\n\r\n") == b"a OK done\r\n"
    assert d.events[-1].password == b""
