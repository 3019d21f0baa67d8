"""The sans-IO SMTP server core, fed bytes directly (no sockets)."""
from __future__ import annotations

import pytest

from gateway.proto import smtp_server as S


def make(**kw) -> S.SMTPServer:
    kw.setdefault("hostname", "mx.test")
    core = S.SMTPServer(**kw)
    core.greeting()
    core.data_to_send()
    return core


class Driver:
    """Plays the session: answers events the way a permissive upstream would."""

    def __init__(self, core: S.SMTPServer):
        self.core = core
        self.events: list = []
        self.chunks: list[bytes] = []

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
            if ev is S.NEED_DATA or isinstance(ev, (S.ConnectionClosed, S.Quit)):
                if ev is not S.NEED_DATA:
                    self.events.append(ev)
                return core.data_to_send()
            self.events.append(ev)
            if isinstance(ev, S.Mail):
                core.respond(250, "2.1.0 Ok")
            elif isinstance(ev, S.Rcpt):
                core.respond(250, "2.1.5 Ok")
            elif isinstance(ev, S.Data):
                core.respond(354, "End data with <CR><LF>.<CR><LF>")
            elif isinstance(ev, S.DataChunk):
                self.chunks.append(ev.data)
            elif isinstance(ev, S.DataEnd):
                core.respond(250, "2.0.0 Ok: queued")
            elif isinstance(ev, S.StartTLS):
                core.respond(220, "2.0.0 Ready to start TLS")
                return core.data_to_send()
            if core.closed:
                return core.data_to_send()

    def kinds(self):
        return [type(e).__name__ for e in self.events]


def test_greeting():
    core = S.SMTPServer(hostname="mx.test")
    core.greeting()
    assert core.data_to_send() == b"220 mx.test ESMTP\r\n"


@pytest.mark.parametrize("offer,tls_active,expect", [
    (True, False, True), (False, False, False), (True, True, False)])
def test_ehlo_advertises_starttls_only_when_offered(offer, tls_active, expect):
    d = Driver(make(offer_starttls=offer, tls_active=tls_active, max_message_size=1000))
    out = d.feed(b"EHLO client.test\r\n")
    assert out.startswith(b"250-mx.test\r\n")
    assert b"250-PIPELINING\r\n" in out and b"SIZE 1000" in out
    assert b"8BITMIME" in out and b"ENHANCEDSTATUSCODES" in out and b"SMTPUTF8" in out
    assert (b"STARTTLS" in out) is expect
    assert b"CHUNKING" not in out and b"DSN" not in out
    assert d.kinds() == ["Hello"]


def test_esmtp_off_answers_ehlo_502_and_helo_works():
    d = Driver(make(esmtp=False))
    assert d.feed(b"EHLO x\r\n").startswith(b"502 5.5.1")
    assert d.feed(b"HELO x\r\n") == b"250 mx.test\r\n"


def test_pipelining_before_ehlo_reply_is_a_sync_error():
    d = Driver(make())
    out = d.feed(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\n")
    assert out == b"554 5.5.0 SMTP protocol synchronization error\r\n"
    assert d.core.closed


def test_required_level_gates_commands_before_tls():
    d = Driver(make(require_tls=True))
    assert b"STARTTLS" in d.feed(b"EHLO x\r\n")
    assert d.feed(b"MAIL FROM:<a@b.test>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    assert d.feed(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert d.feed(b"VRFY x\r\n").startswith(b"530 5.7.0")
    assert d.feed(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"


def test_starttls_discards_pipelined_plaintext():
    d = Driver(make())
    d.feed(b"EHLO x\r\n")
    out = d.feed(b"STARTTLS\r\nRSET\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert d.core.start_tls() == len(b"RSET\r\n")
    d.core.tls_established()
    assert "Reset" not in d.kinds()
    assert d.core.helo is None
    assert d.feed(b"MAIL FROM:<a@b.test>\r\n").startswith(b"503 5.5.1")   # EHLO again first
    out = d.feed(b"EHLO x\r\n")
    assert b"STARTTLS" not in out
    assert d.feed(b"STARTTLS\r\n") == b"554 5.5.1 Error: TLS already active\r\n"


@pytest.mark.parametrize("line,reply", [
    (b"STARTTLS now\r\n", b"501 5.5.4 Syntax error\r\n"),
])
def test_starttls_syntax(line, reply):
    d = Driver(make())
    d.feed(b"EHLO x\r\n")
    assert d.feed(line) == reply


def test_starttls_at_level_none():
    d = Driver(make(offer_starttls=False))
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"STARTTLS\r\n") == b"502 5.5.1 STARTTLS not available\r\n"


def test_long_line_is_refused_and_session_goes_on():
    d = Driver(make())
    d.feed(b"EHLO x\r\n")
    out = b""
    chunk = b"A" * 4096
    for _ in range(25):                          # 100 KB line, arriving in pieces
        out += d.feed(chunk)
        assert d.core.buffered <= 2048 + 4096
    out += d.feed(b"\r\nNOOP\r\n")
    assert out == b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"


def test_line_exactly_at_limit_is_accepted():
    d = Driver(make(max_line=20))
    assert d.feed(b"NOOP " + b"x" * 15 + b"\r\n") == b"250 2.0.0 Ok\r\n"
    assert d.feed(b"NOOP " + b"x" * 16 + b"\r\n") == b"500 5.5.2 Line too long\r\n"


@pytest.mark.parametrize("cmd,reply", [
    (b"MAIL FROM:<a@b.test> SIZE=999999999\r\n", b"552 5.3.4 Message size exceeds fixed limit\r\n"),
    (b"MAIL FROM:<a@b.test> FOO=bar\r\n", b"555 5.5.4 Unsupported parameter\r\n"),
    (b"MAIL FROM:<a@b.test> RET=FULL\r\n", b"555 5.5.4 Unsupported parameter\r\n"),
    (b"MAIL FROM:a@b <x>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL TO:<a@b.test>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"RCPT TO:<a@b.test>\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
    (b"DATA\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
    (b"BDAT 10 LAST\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"VRFY root\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"EXPN list\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"ETRN x\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"XCLIENT ADDR=1.2.3.4\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"FOO\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
    (b"NOOP\0\r\n", b"500 5.5.2 Error: NUL character not allowed\r\n"),
])
def test_command_errors(cmd, reply):
    d = Driver(make(max_message_size=1000))
    d.feed(b"EHLO x\r\n")
    assert d.feed(cmd) == reply


def test_mail_params_accepted():
    d = Driver(make())
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.events[-1] == S.Mail("a@b.test", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None})
    assert d.feed(b"MAIL FROM:<c@d.test>\r\n").startswith(b"503 5.5.1 Error: nested")


def test_null_sender_and_data_without_recipients():
    d = Driver(make())
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"MAIL FROM:<>\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.feed(b"DATA\r\n") == b"554 5.5.1 No valid recipients\r\n"


def test_too_many_recipients():
    d = Driver(make(max_recipients=2))
    d.feed(b"EHLO x\r\n")
    d.feed(b"MAIL FROM:<a@b.test>\r\n")
    out = d.feed(b"RCPT TO:<1@x.test>\r\nRCPT TO:<2@x.test>\r\nRCPT TO:<3@x.test>\r\n")
    assert out.endswith(b"452 4.5.3 Too many recipients\r\n")
    assert d.core.rcpt_count == 2


SESSION = (b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
           b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_full_transaction(byte_at_a_time):
    d = Driver(make())
    out = b"".join(d.feed(part, byte_at_a_time=byte_at_a_time) for part in SESSION)
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued\r\n"
                        b"221 2.0.0 Bye\r\n")
    assert b"".join(d.chunks) == b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n"
    assert [k for k in d.kinds() if k != "DataChunk"] == [
        "Hello", "Mail", "Rcpt", "Data", "DataEnd", "Quit"]
    end = [e for e in d.events if isinstance(e, S.DataEnd)][0]
    assert end.aborted is None and end.flags == 0


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_sequences_never_end_data(seq, mode):
    d = Driver(make(bare_newline=mode))
    d.feed(b"EHLO x\r\n")
    d.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    smuggled = (b"Subject: one\r\n\r\nbody" + seq +
                b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@d.test>\r\nDATA\r\nevil\r\n.\r\n")
    out = d.feed(smuggled)
    ends = [e for e in d.events if isinstance(e, S.DataEnd)]
    assert len(ends) == 1
    assert [e.address for e in d.events if isinstance(e, S.Mail)] == ["a@b.test"]
    if mode == "reject":
        assert ends[0].aborted == "bare_newline"
        assert "DataAbort" in d.kinds()
        assert out.endswith(b"250 2.0.0 Ok: queued\r\n")   # the driver answers; session sends 550
    else:
        body = b"".join(d.chunks)
        assert b"\r\n.\r\n" not in body
        assert ends[0].aborted is None


def test_message_over_size_is_aborted():
    d = Driver(make(max_message_size=100))
    d.feed(b"EHLO x\r\n")
    d.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    d.feed(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
    assert "DataAbort" in d.kinds()
    end = [e for e in d.events if isinstance(e, S.DataEnd)][0]
    assert end.aborted == "size"


def test_eof_is_connection_closed():
    d = Driver(make())
    d.feed(b"EHLO x\r\nNO")
    d.core.receive_data(b"")
    assert isinstance(d.core.next_event(), S.ConnectionClosed)


def test_too_many_errors_closes():
    d = Driver(make(max_errors=3))
    out = d.feed(b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n")
    assert out.endswith(b"421 4.7.0 Too many errors\r\n")
    assert d.core.closed


def test_respond_before_next_event_is_enforced():
    core = make()
    core.receive_data(b"EHLO x\r\n")
    core.next_event()
    core.receive_data(b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(core.next_event(), S.Mail)
    with pytest.raises(RuntimeError):
        core.next_event()


# --- AUTH (SPEC §4.6): the offer, the refusals, the SASL line mode ---------------------------

def _auth_core(**kw):
    kw.setdefault("auth_mechanisms", ("PLAIN", "LOGIN"))
    return make(**kw)


def _ehlo(core) -> bytes:
    core.receive_data(b"EHLO c\r\n")
    assert isinstance(core.next_event(), S.Hello)
    return core.data_to_send()


def _answer(core, code, text):
    core.respond(code, text)
    return core.data_to_send()


def test_auth_is_offered_only_on_tls_and_refused_before_it():
    core = _auth_core(require_tls=True)
    assert b"AUTH" not in _ehlo(core)
    core.receive_data(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    assert core.next_event() is S.NEED_DATA          # nothing for the session: no upstream
    assert core.data_to_send() == (b"538 5.7.11 Encryption required for requested "
                                   b"authentication mechanism\r\n")
    core.tls_established()
    assert b"250-AUTH PLAIN LOGIN\r\n" in _ehlo(core)


def test_auth_off_is_not_implemented_whatever_the_tls():
    core = make(tls_active=True)
    _ehlo(core)
    core.receive_data(b"AUTH PLAIN\r\n")
    assert core.next_event() is S.NEED_DATA
    assert core.data_to_send() == b"502 5.5.1 Command not implemented\r\n"


def test_auth_exchange_in_line_mode_then_authenticated():
    core = _auth_core(tls_active=True)
    _ehlo(core)
    core.receive_data(b"AUTH login\r\n")
    assert core.next_event() == S.Auth("LOGIN", None)
    assert _answer(core, 334, "VXNlcm5hbWU6") == b"334 VXNlcm5hbWU6\r\n"
    # the next line is a response, not a command, even when it looks like one
    core.receive_data(b"QUIT\r\n")
    assert core.next_event() == S.AuthResponse("QUIT")
    _answer(core, 334, "UGFzc3dvcmQ6")
    core.receive_data(b"cHc=\r\n")
    assert core.next_event() == S.AuthResponse("cHc=")
    _answer(core, 235, "2.7.0 Authentication successful")
    assert core.authenticated
    core.receive_data(b"AUTH PLAIN\r\nMAIL FROM:<a@b> AUTH=a@b\r\n")
    assert core.next_event() == S.Mail("a@b", {"AUTH": "a@b"})
    assert core.data_to_send() == b"503 5.5.1 Error: already authenticated\r\n"


def test_auth_refusals_during_a_transaction_and_for_an_unlisted_mechanism():
    core = _auth_core(tls_active=True)
    d = Driver(core)
    d.feed(b"EHLO c\r\n")
    out = d.feed(b"AUTH GSSAPI\r\nMAIL FROM:<a@b>\r\nAUTH PLAIN\r\n")
    assert out == (b"504 5.5.4 Unrecognized authentication type\r\n250 2.1.0 Ok\r\n"
                   b"503 5.5.1 Error: MAIL transaction in progress\r\n")


def test_sasl_response_over_12288_octets_is_reported_not_executed():
    core = _auth_core(tls_active=True)
    _ehlo(core)
    core.receive_data(b"AUTH PLAIN\r\n")
    assert core.next_event() == S.Auth("PLAIN", None)
    _answer(core, 334, "")
    long = b"A" * 20000
    for i in range(0, len(long), 1000):          # however it arrives
        core.receive_data(long[i:i + 1000])
        assert core.next_event() is S.NEED_DATA
    core.receive_data(b"\r\nRSET\r\n")
    assert core.next_event() == S.AuthResponse("", too_long=True)
    _answer(core, 500, "5.5.6 Authentication Exchange line is too long")
    assert isinstance(core.next_event(), S.Reset)       # back in command mode


# --- client text that must never reach a header or the upstream (SPEC §4.4, §4.6) ----------

@pytest.fixture(params=["native", "python"])
def scanner(request, monkeypatch):
    """The core's line scanner: the compiled one or the pure-Python twin (which reports a
    bare CR, a bare LF and a NUL alike)."""
    from gateway.native import scanner as facade, scanner_py
    if request.param == "native":
        if facade.native_backend is None:
            pytest.skip("no compiled core")
        monkeypatch.setattr(facade, "scan_line", facade.native_backend.scan_line)
    else:
        monkeypatch.setattr(facade, "scan_line", scanner_py.scan_line)
    return request.param


@pytest.mark.parametrize("line", [
    b"EHLO evil\rX-Injected: yes\r\n", b"HELO evil\rX-Injected: yes\r\n",
    b"EHLO evil\0\r\n", b"HELO \0evil\r\n", b"EHLO evil\x01\r\n", b"EHLO evil\tname\r\n",
    b"HELO evil\x7f\r\n", b"EHLO evil\x1b[0m\r\n", b"EHLO name other\x0bword\r\n",
    b"EHLO evil\n",                         # ended by a bare LF: not a CRLF line
])
def test_control_characters_in_the_hello_argument_get_501(scanner, line):
    core = make()
    core.receive_data(line + b"EHLO good.example\r\n")
    assert core.next_event() == S.Hello("good.example", True)
    assert core.data_to_send().startswith(b"501 5.5.2 Invalid EHLO argument\r\n250-mx.test")
    assert core.helo == "good.example"
    assert core.take_rejections() == [(501, "5.5.2 Invalid EHLO argument")]


def test_a_refused_hello_leaves_the_session_without_one(scanner):
    core = make()
    core.receive_data(b"EHLO evil\rX: y\r\nMAIL FROM:<a@b>\r\n")
    assert core.next_event() is S.NEED_DATA
    assert core.data_to_send() == (b"501 5.5.2 Invalid EHLO argument\r\n"
                                   b"503 5.5.1 Error: send HELO/EHLO first\r\n")
    assert core.helo is None


def test_utf8_and_punctuation_in_the_hello_argument_are_fine(scanner):
    core = make()
    core.receive_data("EHLO [192.0.2.1] bücher.example (x)\r\n".encode())
    assert core.next_event() == S.Hello("[192.0.2.1]", True)


@pytest.mark.parametrize("bad", [b"YWxp\rY2U=\r\n", b"YWxp\0Y2U=\r\n", b"YWxpY2U=\n"])
def test_bare_cr_nul_or_lf_in_a_sasl_response_is_reported_not_relayed(scanner, bad):
    core = _auth_core(tls_active=True)
    _ehlo(core)
    core.receive_data(b"AUTH LOGIN\r\n")
    assert core.next_event() == S.Auth("LOGIN", None)
    _answer(core, 334, "VXNlcm5hbWU6")
    core.receive_data(bad + b"RSET\r\n")
    assert core.next_event() == S.AuthResponse("", malformed=True)
    assert _answer(core, 501, "5.5.2 Syntax error in SASL response") == (
        b"501 5.5.2 Syntax error in SASL response\r\n")
    assert isinstance(core.next_event(), S.Reset)       # back in command mode


@pytest.mark.parametrize("bad", [b"AUTH PLAIN AGFs\raWNlAHB3\r\n",
                                 b"AUTH PLAIN AGFs\0aWNlAHB3\r\n",
                                 b"AUTH PLAIN AGFsaWNlAHB3\n"])
def test_bare_cr_nul_or_lf_in_an_initial_response_is_reported(scanner, bad):
    core = _auth_core(tls_active=True)
    _ehlo(core)
    core.receive_data(bad)
    assert core.next_event() == S.Auth("PLAIN", None, malformed=True)
    _answer(core, 501, "5.5.2 Syntax error in SASL response")
    core.receive_data(b"AUTH PLAIN AGFsaWNlAHB3\r\n")          # the session goes on
    assert core.next_event() == S.Auth("PLAIN", "AGFsaWNlAHB3")


def test_nul_outside_hello_and_auth_is_still_500(scanner):
    core = make()
    core.receive_data(b"NOOP\0\r\n")
    assert core.next_event() is S.NEED_DATA
    assert core.data_to_send() == b"500 5.5.2 Error: NUL character not allowed\r\n"
