"""Sans-IO SMTP server core: the client-facing side of the gateway (SPEC §4.1–§4.5).

Bytes go in with `receive_data()`, events come out of `next_event()`, replies go out through
`data_to_send()`. There are no sockets, no trio and no TLS here: the relay session moves bytes,
performs the TLS handshake when told to, and decides policy and upstream answers.

The core answers everything that is pure protocol by itself (syntax, sequencing, EHLO, NOOP,
RSET, QUIT, unsupported commands, limits, the pre-TLS gate). Events that need the session's
answer (`Mail`, `Rcpt`, `Data`, `DataEnd`, `StartTLS`) stop the core until `respond()` is called,
so pipelined commands are answered strictly in order; the reply code drives the state change
(2xx to MAIL opens the transaction, 354 to DATA enters data mode, and so on).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..native import scanner
from . import replies as R


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# --- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    """EHLO/HELO was answered by the core; the transaction state was reset."""
    name: str
    esmtp: bool


@dataclass(frozen=True)
class StartTLS:
    """Needs a reply. After a 220, call `start_tls()` before reading on, then `tls_established()`."""


@dataclass(frozen=True)
class Auth:
    """AUTH on a TLS leg, before any transaction. Needs a reply: a 334 challenge enters the
    SASL line mode (the next line is an `AuthResponse`), any other reply ends the exchange
    (235: the session is authenticated). `initial` is the initial response (None: none;
    "=" is an empty one, RFC 4954). `malformed`: the initial response had a bare CR, LF or
    NUL (SPEC §4.6); it is not given, nothing may go upstream, and the session answers
    `501 5.5.2 Syntax error in SASL response`."""
    mechanism: str
    initial: str | None
    malformed: bool = False


@dataclass(frozen=True)
class AuthResponse:
    """One client line of the SASL exchange (`*` cancels). `too_long`: the line passed
    MAX_SASL_LINE and was dropped; the session cancels the exchange upstream and answers
    500 5.5.6. `malformed`: the line had a bare CR, LF or NUL (SPEC §4.6) and is not given;
    the session cancels the exchange upstream with `*` and answers 501 5.5.2. Needs a reply,
    as `Auth`."""
    line: str
    too_long: bool = False
    malformed: bool = False


@dataclass(frozen=True)
class Mail:
    address: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rcpt:
    address: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    """DATA with at least one accepted recipient. Needs a reply; 354 enters data mode."""


@dataclass(frozen=True)
class DataChunk:
    """Message bytes, already in clean upstream framing (CRLF, dot-stuffed, no NUL)."""
    data: bytes


@dataclass(frozen=True)
class DataAbort:
    """The message will be refused (reason `size` or `bare_newline`): drop the upstream leg."""
    reason: str


@dataclass(frozen=True)
class DataEnd:
    """The client's <CRLF>.<CRLF>. Needs a reply. `aborted` repeats a DataAbort reason."""
    size: int
    flags: int
    aborted: str | None


@dataclass(frozen=True)
class Reset:
    """RSET was answered by the core; the transaction is gone."""


@dataclass(frozen=True)
class Quit:
    """QUIT was answered (221); flush and close."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The client closed its side."""


_NEEDS_REPLY = (StartTLS, Auth, AuthResponse, Mail, Rcpt, Data, DataEnd)
MAX_SASL_LINE = 12288          # octets of a SASL response line (SPEC §4.5, RFC 4954)

_PATH_RE = re.compile(r"^(?P<path><[^<>\s]*>|[^<>\s]+)(?:\s+(?P<params>.*))?$")
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_NEEDS_EHLO = "\0needs-ehlo"   # a params key no check accepts
_NOT_IMPLEMENTED = {"BDAT", "ETRN", "VRFY", "EXPN", "XCLIENT", "TURN", "ATRN", "HELP",
                    "XFORWARD", "SEND", "SOML", "SAML"}
_ALLOWED_BEFORE_TLS = {"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"}
# the commands a session refused at connect or HELO still serves (§4.7)
_SERVED_AFTER_REFUSAL = frozenset(("QUIT", "NOOP", "RSET"))
# a line with any of these is never relayed as a SASL response nor kept as a HELO name (§4.4,
# §4.6): a CR not before the line's LF, a LF without its CR (the line is not a CRLF line), NUL
_BARE = scanner.BARE_CR | scanner.BARE_LF | scanner.NUL
# verbs whose line with a NUL gets its own reply (501) rather than 500 NUL_IN_COMMAND
_NUL_CHECKED = (b"EHLO", b"HELO", b"AUTH")
# control characters never allowed in an EHLO/HELO argument: it goes into the Received header
_HELLO_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SMTPServer:
    """One client connection's SMTP state, server side."""

    def __init__(
        self,
        *,
        hostname: str,
        esmtp: bool = True,
        max_message_size: int = 52428800,
        smtputf8: bool = True,
        dsn: bool = False,
        max_recipients: int = 1000,
        bare_newline: str = "reject",
        offer_starttls: bool = True,
        require_tls: bool = False,
        tls_active: bool = False,
        max_line: int = 2048,
        max_errors: int = 20,
        auth_mechanisms: tuple[str, ...] = (),
    ):
        self.hostname = hostname
        self.esmtp = esmtp
        self.max_message_size = max_message_size
        self.smtputf8 = smtputf8
        self.dsn = dsn
        self.max_recipients = max_recipients
        self.normalize = bare_newline == "normalize"
        self.offer_starttls = offer_starttls
        self.require_tls = require_tls
        self.tls_active = tls_active
        self.max_line = max_line
        self.max_errors = max_errors
        # AUTH (§4.6): offered once TLS is active when mechanisms are configured
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.authenticated = False

        self.helo: str | None = None
        self.esmtp_session = False
        self.mail_from: str | None = None
        self.rcpt_count = 0
        self.closed = False            # no more input will be processed; flush and close
        self.errors = 0

        self._buf = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._discarding = False       # inside an over-long command line
        self._awaiting = None          # event waiting for respond()
        self._scanner = None           # DataScanner while in data mode
        self._aborted: str | None = None
        self._rejections: list[tuple[int, str]] = []
        self._sasl = False             # inside an AUTH exchange: lines are AuthResponses
        self._flags = 0                # scan flags of the command line being handled
        self._refusal: tuple[int, str] | None = None   # refuse_session()'s reply

    @classmethod
    def for_listener(cls, listener, hostname: str, level) -> "SMTPServer":
        """The core a session of *listener* (its configuration) starts with, at the client
        *level* its connect stage set (a `ClientLevel`: `offers_tls`, `requires_tls`). The
        sessions and `gateway policy` both start here."""
        return cls(
            hostname=hostname,
            esmtp=listener.esmtp,
            max_message_size=listener.max_message_size,
            smtputf8=listener.smtputf8,
            dsn=listener.dsn,
            max_recipients=listener.max_recipients,
            bare_newline=listener.bare_newline,
            auth_mechanisms=listener.auth_mechanisms if listener.auth != "off" else (),
            offer_starttls=listener.tls == "starttls" and level.offers_tls,
            require_tls=level.requires_tls,
        )

    # --- I/O side ---------------------------------------------------------------------------

    def greeting(self) -> None:
        self._send(220, f"{self.hostname} ESMTP")

    def pregreeting(self) -> None:
        """The first line of a greeting held back (`pregreet_wait`, §4.1): `220-host ESMTP`;
        `greeting()` sends the final line."""
        self._out.append(f"220-{self.hostname} ESMTP\r\n".encode("utf-8", "surrogateescape"))

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_data(self) -> bool:
        return self._scanner is not None

    @property
    def in_transaction(self) -> bool:
        return self.mail_from is not None

    # --- session side -----------------------------------------------------------------------

    def respond(self, code: int, text, *, close: bool = False) -> None:
        """Answer the pending event (or send an unsolicited reply such as 421)."""
        self._send(code, text)
        event, self._awaiting = self._awaiting, None
        ok = 200 <= code < 300
        if isinstance(event, Mail) and ok:
            self.mail_from = event.address
            self.rcpt_count = 0
        elif isinstance(event, Rcpt) and ok:
            self.rcpt_count += 1
        elif isinstance(event, Data) and code == 354:
            self._scanner = scanner.DataScanner(self.normalize)
            self._aborted = None
        elif isinstance(event, DataEnd):
            self._reset_transaction()
        elif isinstance(event, (Auth, AuthResponse)):
            self._sasl = code == 334
            if code == 235:
                self.authenticated = True
        if close or code == 421:
            self.closed = True

    def start_tls(self) -> int:
        """After answering STARTTLS with 220: discard plaintext already received (§4.2).

        Returns the number of bytes discarded (non-zero means a command-injection attempt)."""
        n = len(self._buf)
        self._buf.clear()
        return n

    def close(self) -> None:
        """The session ends here (a failed TLS handshake, say): no more input is processed."""
        self.closed = True

    def refuse_session(self, code: int, text) -> None:
        """A refusal at connect or HELO (a hook's, §4.7): from now on every command but
        QUIT, NOOP and RSET gets this reply, as Postfix does, and no event that could reach
        the upstream comes out. The commands take another path (`_refused_command`), so a
        session never refused does no extra work per command."""
        self._refusal = (code, text)
        self._command = self._refused_command

    def tls_established(self) -> None:
        self.tls_active = True
        self.helo = None
        self.esmtp_session = False
        self._reset_transaction()

    def next_event(self):
        if self._awaiting is not None:
            raise RuntimeError(f"respond() to {self._awaiting!r} first")
        if self.closed:
            return ConnectionClosed()
        while True:
            if self._scanner is not None:
                event = self._data_event()
            elif self._sasl:
                event = self._sasl_event()
            else:
                event = self._command_event()
            if event is None:
                if self.closed:
                    return ConnectionClosed()
                continue
            if isinstance(event, _NEEDS_REPLY):
                self._awaiting = event
            return event

    # --- internals --------------------------------------------------------------------------

    def _send(self, code: int, text) -> None:
        self._out.append(R.render(code, text))

    def take_rejections(self) -> list[tuple[int, str]]:
        """Refusals the core sent by itself since the last call (for the session's logs)."""
        out, self._rejections = self._rejections, []
        return out

    def _reply(self, reply: tuple[int, str]) -> None:
        code, text = reply
        self._send(code, text)
        self._rejections.append(reply)
        if code >= 500:
            self.errors += 1
            if self.errors >= self.max_errors:
                self._send(*R.TOO_MANY_ERRORS)
                self.closed = True

    def _reset_transaction(self) -> None:
        self.mail_from = None
        self.rcpt_count = 0
        self._scanner = None
        self._aborted = None

    def _data_event(self):
        scanner = self._scanner
        if scanner.done:
            self._scanner = None
            return DataEnd(scanner.size, scanner.flags, self._aborted)
        if not self._buf:
            return ConnectionClosed() if self._eof else NEED_DATA
        out, used = scanner.feed(self._buf)
        del self._buf[:used]
        if self._aborted is None:
            if scanner.size > self.max_message_size:
                self._aborted = "size"
                return DataAbort("size")
            if not self.normalize and scanner.flags:
                self._aborted = "bare_newline"
                return DataAbort("bare_newline")
            if out:
                return DataChunk(out)
        return None

    _TOO_LONG = object()       # _next_line(): a line over the limit was dropped whole

    def _next_line(self, limit: int):
        """The next line without its ending, with its scan flags: (line, flags); or
        (_TOO_LONG, 0) once a line over *limit* octets has been dropped whole (however it
        arrived); or (event, 0) with NEED_DATA / ConnectionClosed; or (None, 0) to go on."""
        buf = self._buf
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return (ConnectionClosed() if self._eof else NEED_DATA), 0
            del buf[: nl + 1]
            self._discarding = False
            return self._TOO_LONG, 0
        end, flags = scanner.scan_line(buf)
        if end < 0:
            if len(buf) > limit + 1:
                self._discarding = True
                buf.clear()
                return None, 0
            return (ConnectionClosed() if self._eof else NEED_DATA), 0
        line = bytes(buf[:end])
        del buf[:end]
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if len(line) > limit:
            return self._TOO_LONG, 0
        return line, flags

    def _sasl_event(self):
        """One SASL response line (up to MAX_SASL_LINE octets; a longer one is dropped
        whole and reported, so the session can cancel the exchange upstream)."""
        line, flags = self._next_line(MAX_SASL_LINE)
        if line is self._TOO_LONG:
            return AuthResponse("", too_long=True)
        if line.__class__ is not bytes:
            return line                                 # NEED_DATA, closed, or go on
        if flags & _BARE:
            return AuthResponse("", malformed=True)     # not relayed: 501 (§4.6)
        return AuthResponse(line.decode("ascii", "replace").strip(" "))

    def _command_event(self):
        line, flags = self._next_line(self.max_line)
        if line is self._TOO_LONG:
            self._reply(R.LINE_TOO_LONG)
            return None
        if line.__class__ is not bytes:
            return line                                 # NEED_DATA, closed, or go on
        if flags & scanner.NUL and line.split(b" ", 1)[0].upper() not in _NUL_CHECKED:
            self._reply(R.NUL_IN_COMMAND)
            return None
        self._flags = flags
        return self._command(line.decode("utf-8", "surrogateescape"))

    def _dispatch(self, text: str):
        """One command line, to its `_cmd_<VERB>` handler (or the reply for an unknown one)."""
        verb, _, arg = text.strip(" ").partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        if verb == "AUTH":
            return self._cmd_AUTH(arg)
        if self.require_tls and not self.tls_active and verb not in _ALLOWED_BEFORE_TLS:
            self._reply(R.MUST_STARTTLS)
            return None
        handler = getattr(self, "_cmd_" + verb, None) if verb.isalpha() else None
        if handler is not None:
            return handler(arg)
        self._reply(R.NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED else R.UNRECOGNIZED)
        return None

    _command = _dispatch        # what a command line goes to; refuse_session() replaces it

    def _refused_command(self, text: str):
        verb = text.strip(" ").partition(" ")[0].upper()
        if verb in _SERVED_AFTER_REFUSAL:
            return self._dispatch(text)
        code, reply = self._refusal
        self._send(code, reply)                 # the session logged and counted it once
        if code >= 500:
            self.errors += 1
            if self.errors >= self.max_errors:
                self._send(*R.TOO_MANY_ERRORS)
                self.closed = True
        return None

    def _sync_error(self) -> bool:
        """Bytes after EHLO/HELO before its reply: the client did not wait (§4.1)."""
        if self._buf:
            self._reply(R.SYNC_ERROR)
            self.closed = True
            return True
        return False

    def _cmd_EHLO(self, arg: str):
        if not self.esmtp:
            self._reply(R.HELO_ONLY)
            return None
        if not arg:
            self._reply(R.SYNTAX)
            return None
        if self._bad_hello(arg):
            return None
        if self._sync_error():
            return None
        self._reset_transaction()
        self.helo, self.esmtp_session = arg.split(" ")[0], True
        lines = [self.hostname, "PIPELINING", f"SIZE {self.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if self.offer_starttls and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_mechanisms and self.tls_active:
            lines.append("AUTH " + " ".join(self.auth_mechanisms))
        if self.smtputf8:
            lines.append("SMTPUTF8")
        if self.dsn:
            lines.append("DSN")
        self._send(250, lines)
        return Hello(self.helo, True)

    def _cmd_HELO(self, arg: str):
        if not arg:
            self._reply(R.SYNTAX)
            return None
        if self._bad_hello(arg):
            return None
        if self._sync_error():
            return None
        self._reset_transaction()
        self.helo, self.esmtp_session = arg.split(" ")[0], False
        self._send(250, self.hostname)
        return Hello(self.helo, False)

    def _bad_hello(self, arg: str) -> bool:
        """An EHLO/HELO argument with a CR, LF, NUL or other control character (or a line
        not ended by CRLF): `501 5.5.2 Invalid EHLO argument`, the session's HELO name
        unchanged (it goes into the Received header, §4.4)."""
        if self._flags & _BARE or _HELLO_CONTROL.search(arg) is not None:
            self._reply(R.INVALID_EHLO)
            return True
        return False

    def _cmd_STARTTLS(self, arg: str):
        if arg:
            self._reply(R.SYNTAX)
        elif self.tls_active:
            self._reply(R.TLS_ACTIVE)
        elif not self.offer_starttls:
            self._reply(R.STARTTLS_UNAVAILABLE)
        else:
            return StartTLS()
        return None

    def _cmd_AUTH(self, arg: str):
        """AUTH (§4.6): 502 without AUTH on the listener, 538 before TLS (nothing goes
        upstream), 503 during a transaction or after a success, 504 for a mechanism the
        listener does not list; else an `Auth` event for the session to relay."""
        if not self.auth_mechanisms:
            self._reply(R.NOT_IMPLEMENTED)
            return None
        if not self.tls_active:
            self._reply(R.AUTH_NEEDS_TLS)
            return None
        if self.helo is None or not self.esmtp_session:
            self._reply(R.NEED_HELO)
            return None
        if self.authenticated:
            self._reply(R.AUTH_ALREADY)
            return None
        if self.mail_from is not None:
            self._reply(R.AUTH_IN_TRANSACTION)
            return None
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip(" ")
        if not mechanism or " " in initial:
            self._reply(R.SYNTAX)
            return None
        if mechanism not in self.auth_mechanisms:
            self._reply(R.AUTH_UNKNOWN_MECHANISM)
            return None
        if initial and self._flags & _BARE:
            return Auth(mechanism, None, malformed=True)     # nothing of it upstream (§4.6)
        return Auth(mechanism, initial or None)

    def _cmd_NOOP(self, arg: str):
        self._send(*R.OK)
        return None

    def _cmd_RSET(self, arg: str):
        if arg:
            self._reply(R.SYNTAX)
            return None
        self._reset_transaction()
        self._send(*R.OK)
        return Reset()

    def _cmd_QUIT(self, arg: str):
        self._send(*R.BYE)
        self.closed = True
        return Quit()

    def _cmd_MAIL(self, arg: str):
        if self.helo is None:
            self._reply(R.NEED_HELO)
            return None
        if self.mail_from is not None:
            self._reply(R.NESTED_MAIL)
            return None
        parsed = self._parse_path(arg, "FROM:")
        if parsed is None:
            self._reply(R.BAD_SENDER)
            return None
        address, params = parsed
        if address and "@" not in address:
            self._reply(R.BAD_SENDER)
            return None
        problem = self._check_params(params, _MAIL_PARAMS)
        if problem is not None:
            self._reply(problem)
            return None
        if not address.isascii() and "SMTPUTF8" not in params:
            self._reply((553, "5.6.7 Must declare SMTPUTF8 to send unicode address"))
            return None
        return Mail(address, params)

    def _cmd_RCPT(self, arg: str):
        if self.mail_from is None:
            self._reply(R.NEED_MAIL)
            return None
        parsed = self._parse_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            self._reply(R.BAD_RECIPIENT)
            return None
        address, params = parsed
        if "@" not in address and address.lower() != "postmaster":
            self._reply(R.BAD_RECIPIENT)
            return None
        problem = self._check_params(params, _RCPT_PARAMS)
        if problem is not None:
            self._reply(problem)
            return None
        if self.rcpt_count >= self.max_recipients:
            self._reply(R.TOO_MANY_RECIPIENTS)
            return None
        return Rcpt(address, params)

    def _cmd_DATA(self, arg: str):
        if arg:
            self._reply(R.SYNTAX)
        elif self.mail_from is None:
            self._reply(R.NEED_MAIL)
        elif self.rcpt_count == 0:
            self._reply(R.NO_VALID_RECIPIENTS)
        else:
            return Data()
        return None

    def _parse_path(self, arg: str, prefix: str):
        if arg[: len(prefix)].upper() != prefix:
            return None
        m = _PATH_RE.match(arg[len(prefix):].lstrip(" "))
        if m is None:
            return None
        path = m.group("path")
        if path.startswith("<"):
            path = path[1:-1]
        if ":" in path and path.startswith("@"):       # source route: ignore it (RFC 5321 §4.1.2)
            path = path.split(":", 1)[1]
        if len(path) > 256:
            return None
        params: dict[str, str | None] = {}
        raw = m.group("params")
        if raw:
            for item in raw.split():
                key, eq, value = item.partition("=")
                if not _ESMTP_KEYWORD.match(key):
                    return None
                params[key.upper()] = value if eq else None
        if params and not self.esmtp_session:
            params[_NEEDS_EHLO] = None                   # parameters need EHLO: refused below
        return path, params

    def _check_params(self, params: dict, allowed: dict):
        for key, value in params.items():
            check = allowed.get(key)
            if check is None or not check(self, value):
                if key == "SIZE" and value is not None and value.isdigit():
                    return R.TOO_BIG
                return R.UNSUPPORTED_PARAMETER
        return None


def _size_ok(core: SMTPServer, v) -> bool:
    return v is not None and v.isdigit() and len(v) < 20 and int(v) <= core.max_message_size


_MAIL_PARAMS = {
    "SIZE": _size_ok,
    "BODY": lambda core, v: v is not None and v.upper() in ("7BIT", "8BITMIME"),
    "SMTPUTF8": lambda core, v: core.smtputf8 and v is None,
    "RET": lambda core, v: core.dsn and v is not None and v.upper() in ("FULL", "HDRS"),
    "ENVID": lambda core, v: core.dsn and bool(v) and len(v) <= 100,
    "AUTH": lambda core, v: bool(core.auth_mechanisms) and bool(v) and len(v) <= 500,
}
_RCPT_PARAMS = {
    "NOTIFY": lambda core, v: core.dsn and bool(v),
    "ORCPT": lambda core, v: core.dsn and bool(v) and len(v) <= 500,
}
