"""Sans-IO SMTP client core: the gateway's side of the upstream leg (SPEC §4.1, §4.5, §6).

No sockets, no trio, no TLS in here: bytes from the server go in with `receive_data()`
(``b""`` is EOF), complete replies come out of `next_reply()` (``None``: need more data), and
`send()` renders a command line for the caller to write.

Bounds (SPEC §4.5): a reply line is cut at `MAX_LINE` (512) octets, not counting its line end.
The rest of an over-long line is dropped as it arrives, so however a hostile server chunks a
huge line, the receive buffer holds at most ~512 octets of it plus the chunk just received. A
reply of more than `MAX_LINES` (100) lines is a `ProtocolError`, as is a malformed line, a
continuation line whose code differs, or EOF before a complete reply. After a `ProtocolError`
the core stays broken: every later `next_reply()` raises the same error.

Line ends: CRLF, and a bare LF ending a server line is tolerated (we are the client; being
lenient about what the server ends its lines with cannot smuggle anything into a message).

STARTTLS and response injection (SPEC §6, CVE-2021-38371 class)::

    wire.send_all(client.send("STARTTLS"))
    reply = await read_one_reply()          # loop: next_reply() / receive_some()
    if reply.code != 220: ...               # refused
    if client.has_leftover():               # the server sent more than that one reply
        junk = client.take_leftover()       # (for the log) -- and abort the leg
        raise ...
    ... TLS handshake on the raw stream ...
    client.reset()                          # fresh parser for the encrypted session

`reset()` refuses (ProtocolError) to run while leftover bytes are still buffered, so the check
cannot be skipped silently.

Unsolicited data (SPEC §6): bytes from the server while no command is outstanding (and the
greeting is read) answer nothing, and are never taken as the next command's reply.
`unsolicited` says so as soon as they are here (a hostile upstream's extra `250` after RCPT's
reply, a `421` on an idle connection); sending a command then, or asking `next_reply()`, turns
them into a sticky `UnsolicitedData` (a ProtocolError), so the stale line can never answer
that command. Pipelined commands are all outstanding until their replies are read: replies to
them, however they arrive, are solicited. The caller (the upstream leg) checks `unsolicited`,
and its socket, before a command and drops (or retires) the connection instead.

The client role's state lives here too, as h11 keeps each role's state machine beside its
parser: commands are queued (`command()`, `mail()`, `rcpt()`, `message_data()`,
`end_message()`) and leave through `data_to_send()`, so pipelined commands and the chunks of a
message go out in one write; each reply read moves the state by the table `_TRANSITIONS`
(EHLO's 250 sets `extensions`, MAIL's 2xx opens the transaction, DATA's 354 enters the
message, the reply to the final dot or RSET's 250 ends it). The trio leg only moves bytes and
never sets these flags itself.

SASL (SPEC §4.6): an AUTH command (`auth()`, or any command line whose verb is AUTH) begins an
exchange, the client's AUTH mode; while it lasts (`in_sasl`: until a reply other than 334) a
reply line may be `MAX_CHALLENGE_LINE` (12,288) octets, not 512, and only `auth_response()` may
send, and any other command is a ProtocolError, so a command of the gateway's can never be
read by the server as a user name or password. `sasl_used` stays True for the life of the
connection, whatever the exchange ended in, and makes the client unfit for reuse: `reusable`
is True only in the idle command state (nothing queued, no reply awaited, no transaction) of
a connection on which no exchange ever began. The pool hands on only such connections.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from ..errors import ProtocolError
from .replies import render

MAX_LINE = 512           # octets of a reply line kept, line end excluded (SPEC §4.5)
MAX_CHALLENGE_LINE = 12288   # ... inside a SASL exchange, where a 334 challenge may be that long
MAX_LINES = 100          # lines in one reply (SPEC §4.5)

# RFC 3463 status code at the start of a line's text: class 2/4/5, subject and detail 1-3 digits.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=[ \t]|$)")
# Characters never relayed to our client inside reply text (CR, NUL, other C0 controls, DEL).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class UnsolicitedData(ProtocolError):
    """The server sent something while no command was outstanding (SPEC §6)."""


@dataclass(frozen=True)
class Reply:
    """One complete SMTP reply. `lines` holds each line's text without code and separator."""
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The first line's text (``""`` for a bare ``250``)."""
        return self.lines[0] if self.lines else ""

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code that starts the first line (``"2.1.0"``), else None."""
        m = _ENHANCED.match(self.text)
        return m.group(0) if m else None

    @property
    def kind(self) -> int:
        """First digit of the code: 2 completion, 3 intermediate, 4 transient, 5 permanent."""
        return self.code // 100

    def relay_lines(self, add_enhanced: bool = True) -> list[str]:
        """The reply's lines as our own client gets them.

        With `add_enhanced`, a 2xx/4xx/5xx line without an enhanced status code gets one: the
        first line's code if it has one, else ``X.0.0`` with X the reply's first digit (SPEC
        §4.1), on every line of a multi-line reply. 3xx replies (``354``) have no enhanced codes
        (RFC 3463 defines classes 2, 4 and 5 only) and are left as they are. Control characters
        inside the text (a bare CR, NUL...) become spaces, so nothing but our own CRLF ends a
        line.
        """
        lines = list(self.lines) or [""]
        if add_enhanced and self.kind in (2, 4, 5):
            status = self.enhanced or f"{self.kind}.0.0"
            lines = [ln if _ENHANCED.match(ln) else f"{status} {ln}".rstrip() for ln in lines]
        return [_CONTROL.sub(" ", ln) for ln in lines]

    def to_bytes(self, add_enhanced: bool = True) -> bytes:
        """Render `relay_lines()`: ``250-a\\r\\n250 b\\r\\n``."""
        return render(self.code, self.relay_lines(add_enhanced))


class SMTPClient:
    """Parser of server replies plus renderer of commands, for one SMTP client session.

    `greeting`: the first reply received is the server's greeting and answers no command
    (True for a fresh connection; `reset()` clears it, as no greeting follows STARTTLS).
    """

    def __init__(self, *, greeting: bool = True):
        self._buf = bytearray()                 # bytes received, not yet consumed
        self._skipping = False                  # dropping the tail of an over-long line
        self._eof = False
        self._error: ProtocolError | None = None
        self._code: int | None = None           # code of the open (incomplete) reply
        self._texts: list[str] = []             # texts of the open reply's lines so far
        self._pending: deque[str] = deque()     # verbs of commands sent, awaiting replies
        self._greeting = greeting
        self.max_line = MAX_LINE                # MAX_CHALLENGE_LINE in a SASL exchange
        self.last_command: str | None = None    # verb the last reply answered (None: greeting)
        # the client role's state (moved by _TRANSITIONS as replies are read)
        self.extensions: dict[str, str] = {}    # of the last 250 EHLO (HELO: none)
        self.in_transaction = False             # MAIL accepted, not yet ended or RSET
        self.in_data = False                    # DATA answered 354, the final dot not queued
        self.sasl_used = False                  # an AUTH was ever sent: never reused (§4.6)
        self.in_sasl = False                    # a SASL exchange is in progress
        self.authenticated = False              # an AUTH was answered 235
        self._out: list[bytes] = []             # queued for data_to_send()
        self._out_size = 0

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the server; ``b""`` means the server closed."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return                          # still inside the over-long line: drop it
            self._skipping = False
            data = data[nl:]                    # keep the LF that ends the truncated line
        self._buf += data
        # Bound the partial last line. It was at most MAX_LINE + 2 octets before this chunk,
        # so this rfind scans at most the new chunk plus that.
        start = self._buf.rfind(b"\n") + 1
        limit = self.max_line
        if len(self._buf) - start > limit + 2:   # room for a CR and one more byte
            del self._buf[start + limit:]
            self._skipping = True

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more data is needed; `UnsolicitedData` when
        what is there answers no command."""
        if self._error is None and self.unsolicited:
            self._unsolicited()
        if self._error is not None:
            raise self._error
        try:
            return self._next_reply()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_reply(self) -> Reply | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if self._eof:
                    raise ProtocolError("connection closed")
                return None
            end = nl - 1 if nl > 0 and self._buf[nl - 1] == 0x0D else nl
            raw = bytes(self._buf[:min(end, self.max_line)])
            del self._buf[:nl + 1]
            code, last, text = _parse_line(raw)
            if self._code is None:
                self._code = code
            elif code != self._code:
                raise ProtocolError(f"reply code changed within a reply: {raw[:40]!r}")
            self._texts.append(text)
            if len(self._texts) > MAX_LINES:
                raise ProtocolError("reply too long")
            if last:
                reply = Reply(code, tuple(self._texts))
                self._code, self._texts = None, []
                if self._greeting:
                    self._greeting = False
                    self.last_command = None
                else:               # next_reply() checked: a command is outstanding
                    self.last_command = verb = self._pending.popleft()
                    step = _TRANSITIONS.get(verb)
                    if step is not None:
                        step(self, reply)
                return reply

    # --- output -----------------------------------------------------------------------------

    def send(self, command: str) -> bytes:
        """Render one command line (CRLF added) and count it as awaiting a reply.

        CR, LF or NUL inside the command is a ValueError: a command line never carries a
        second one. Text is UTF-8 (surrogate escapes pass raw bytes through). Inside a SASL
        exchange this is a ProtocolError (the server would read the line as a response); an
        AUTH command begins one."""
        if self.in_sasl:
            raise ProtocolError("a command inside a SASL exchange")
        if "\r" in command or "\n" in command or "\x00" in command:
            raise ValueError("CR, LF or NUL inside an SMTP command")
        data = command.encode("utf-8", "surrogateescape") + b"\r\n"
        verb = command.split(" ", 1)[0].upper()
        if verb == "AUTH":
            # the AUTH mode: until the exchange ends a 334 challenge may be a long line
            self.sasl_used = self.in_sasl = True
            self.max_line = MAX_CHALLENGE_LINE
        self._outstanding(verb)
        return data

    def _outstanding(self, verb: str) -> None:
        """A command goes out: what arrived before it and answers nothing ends the session's
        usefulness here (sticky), before the command can be answered by it."""
        if self._error is None and self.unsolicited:
            self._unsolicited()
        self._pending.append(verb)

    def _unsolicited(self) -> None:
        self._error = UnsolicitedData(
            f"unsolicited data from the server: {bytes(self._buf[:40])!r}")

    def command(self, command: str) -> None:
        """Queue one command line for `data_to_send()` (rendered as `send()` does)."""
        self._queue(self.send(command))

    def mail(self, address: str, params: dict) -> list[str]:
        """Queue MAIL FROM with the client's parameters the server's EHLO supports.

        Returns the names of parameters dropped because the server lacks their extension
        (DSN's RET/ENVID, say), for the caller to log."""
        ext = self.extensions
        keep = {"SIZE": "SIZE" in ext, "BODY": "8BITMIME" in ext, "SMTPUTF8": "SMTPUTF8" in ext,
                "RET": "DSN" in ext, "ENVID": "DSN" in ext, "AUTH": "AUTH" in ext}
        text, dropped = _params(params, keep)
        self.command(f"MAIL FROM:<{address}>" + text)
        return dropped

    def rcpt(self, address: str, params: dict) -> list[str]:
        """Queue RCPT TO with the parameters the server supports (NOTIFY/ORCPT need DSN).
        Returns the dropped parameter names, as `mail()`."""
        dsn = "DSN" in self.extensions
        text, dropped = _params(params, {"NOTIFY": dsn, "ORCPT": dsn})
        self.command(f"RCPT TO:<{address}>" + text)
        return dropped

    def auth(self, mechanism: str, initial: str | None = None) -> None:
        """Queue AUTH (with its initial response): a SASL exchange begins (see the module
        docstring); the connection is never reusable after it."""
        self.command(f"AUTH {mechanism}" + (f" {initial}" if initial is not None else ""))

    def auth_response(self, line: str) -> None:
        """Queue one response of the exchange in progress (``*`` cancels), after its 334.

        CR, LF or NUL in it is a ValueError (nothing is queued); a response outside an
        exchange, or before the 334 it answers was read, is a ProtocolError."""
        if not self.in_sasl or self._pending or self.last_command != "AUTH":
            raise ProtocolError("a SASL response outside an exchange awaiting one")
        if "\r" in line or "\n" in line or "\x00" in line:
            raise ValueError("CR, LF or NUL inside a SASL response")
        self._queue(line.encode("utf-8", "surrogateescape") + b"\r\n")
        self._outstanding("AUTH")             # its reply moves the exchange as AUTH's does

    @property
    def reusable(self) -> bool:
        """Fit to serve another client session: the idle command state (nothing queued, no
        reply awaited, no transaction, nothing unread) and no SASL exchange ever begun."""
        return (not self.sasl_used and not self._pending and not self._out
                and not self.in_transaction and not self.in_data and not self.has_leftover()
                and self._error is None and not self._eof)

    def xclient(self, ip: str, port: int, helo: str | None) -> None:
        """Queue XCLIENT with the client's address, port and HELO name (xtext-encoded)."""
        if ":" in ip:
            ip = "IPV6:" + ip
        attrs = [f"ADDR={ip}", f"PORT={port}", "NAME=[UNAVAILABLE]"]
        if helo:
            attrs.append(f"HELO={_xtext(helo)}")
        self.command("XCLIENT " + " ".join(attrs))

    def message_data(self, data: bytes) -> None:
        """Queue message bytes (already in upstream framing) after DATA's 354."""
        if not self.in_data:
            raise ProtocolError("message data outside DATA")
        self._queue(data)

    def end_message(self) -> None:
        """Queue the final dot; its reply ends the transaction."""
        if not self.in_data:
            raise ProtocolError("end of message outside DATA")
        self._queue(b".\r\n")
        self._outstanding(".")
        self.in_data = False

    def data_to_send(self) -> bytes:
        """Everything queued, in one piece (one write), and the queue emptied."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        self._out = []
        self._out_size = 0
        return data

    def discard_output(self) -> None:
        """Forget what is queued (the connection is being dropped)."""
        self._out = []
        self._out_size = 0

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet taken by `data_to_send()`."""
        return self._out_size

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    @property
    def pending(self) -> int:
        """Commands sent whose replies have not been read yet (pipelining)."""
        return len(self._pending)

    @property
    def unsolicited(self) -> bool:
        """Bytes arrived that answer no command (SPEC §6): received with no command
        outstanding and the greeting read, or found so before (sticky)."""
        if isinstance(self._error, UnsolicitedData):
            return True
        return not self._pending and not self._greeting and self.has_leftover()

    @property
    def pending_commands(self) -> tuple[str, ...]:
        """Verbs of the commands awaiting replies, oldest first."""
        return tuple(self._pending)

    # --- leftover (STARTTLS response injection, SPEC §6) ----------------------------------

    def pending_bytes(self) -> bytes:
        """Bytes received but not yet consumed by `next_reply()` (a copy)."""
        return bytes(self._buf)

    def has_leftover(self) -> bool:
        """True when anything was received beyond the replies read so far: after the one
        reply to STARTTLS this is response injection, and the leg must be aborted."""
        return bool(self._buf) or self._code is not None or self._skipping

    def take_leftover(self) -> bytes:
        """Remove and return the unconsumed bytes (for logging before aborting the leg).
        A partly parsed reply is dropped as well."""
        out = bytes(self._buf)
        self._buf.clear()
        self._code, self._texts = None, []
        self._skipping = False
        return out

    def reset(self) -> None:
        """A fresh parser after the TLS upgrade. The leftover must be empty (checked before
        the handshake); if it is not, this raises ProtocolError rather than lose it."""
        if self.has_leftover():
            raise ProtocolError("response injection: bytes received before the TLS handshake")
        self._eof = False
        self._error = None
        self._pending.clear()
        self._greeting = False
        self.last_command = None
        self.extensions = {}               # only what the encrypted EHLO offers counts (§6)
        self.discard_output()

    # --- EHLO -------------------------------------------------------------------------------

    @staticmethod
    def parse_ehlo(reply: Reply) -> dict[str, str]:
        """Extensions of a 250 EHLO reply: upper-case keyword -> parameter string.

        The first line (the server's name) is skipped; a non-250 reply offers nothing."""
        ext: dict[str, str] = {}
        if reply.code != 250:
            return ext
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                ext.setdefault(keyword.upper(), params.strip())
        return ext


# --- the client role's transitions (verb of the command a reply answers → step) -------------

def _ehlo_reply(client: SMTPClient, reply: Reply) -> None:
    if reply.code == 250:
        client.extensions = SMTPClient.parse_ehlo(reply)


def _helo_reply(client: SMTPClient, reply: Reply) -> None:
    if reply.code == 250:
        client.extensions = {}


def _mail_reply(client: SMTPClient, reply: Reply) -> None:
    if reply.code // 100 == 2:
        client.in_transaction = True


def _data_reply(client: SMTPClient, reply: Reply) -> None:
    if reply.code == 354:
        client.in_data = True


def _end_reply(client: SMTPClient, reply: Reply) -> None:
    client.in_transaction = False          # the message is taken or refused: either way over


def _rset_reply(client: SMTPClient, reply: Reply) -> None:
    if reply.code == 250:
        client.in_transaction = False


def _auth_reply(client: SMTPClient, reply: Reply) -> None:
    # a 334 asks for a response; any other reply ends the exchange (235: authenticated)
    client.in_sasl = reply.code == 334
    if not client.in_sasl:
        client.max_line = MAX_LINE          # the exchange is over: the AUTH mode ends
    if reply.code == 235:
        client.authenticated = True


_TRANSITIONS = {"EHLO": _ehlo_reply, "HELO": _helo_reply, "MAIL": _mail_reply,
                "DATA": _data_reply, ".": _end_reply, "RSET": _rset_reply,
                "AUTH": _auth_reply}


def _params(params: dict, keep: dict) -> tuple[str, list[str]]:
    """(" K=V K2" for the parameters *keep* allows, names of the others)."""
    out, dropped = [], []
    for key, value in params.items():
        if keep.get(key):
            out.append(key if value is None else f"{key}={value}")
        else:
            dropped.append(key)
    return (" " + " ".join(out)) if out else "", dropped


def _xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII except + and =, the rest as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


def _parse_line(raw: bytes) -> tuple[int, bool, str]:
    """``250-text`` -> (250, False, "text"); ``250 text`` or ``250`` -> last line."""
    if len(raw) < 3 or not raw[:3].isdigit() or raw[0] not in b"2345":
        raise ProtocolError(f"malformed reply line: {raw[:40]!r}")
    sep = raw[3:4]
    if sep not in (b"", b" ", b"-"):
        raise ProtocolError(f"malformed reply line: {raw[:40]!r}")
    return int(raw[:3]), sep != b"-", raw[4:].decode("utf-8", "replace")
