"""Sans-IO MTA side of the Sendmail milter protocol, version 6 (SPEC §4.7).

No sockets, no trio here: the caller writes the bytes a stage method returns, feeds what the
milter sends with `receive_data()` (``b""`` is EOF) and takes events from `next_event()`
until it gets the stage's `Verdict` (``NEED_DATA``: read more first). The wire format and
the semantics follow Postfix's ``src/milter/milter8.c`` and Sendmail's ``libmilter/mfdef.h``.

Packets are ``uint32 length`` (network order, counting the command byte) + command byte +
data. `PacketDecoder` bounds a packet at `MAX_PACKET` (a body chunk of 65,535 octets plus
headroom for replies such as a long header); a zero or larger length is a `ProtocolError`, so
the buffer holds at most one incomplete packet (< 4 + MAX_PACKET octets) once the complete
ones have been taken.

One conversation::

    conn = MilterConnection()
    send(conn.negotiate())
    ev = conn.next_event()        # loop: NEED_DATA -> receive_data(read()); ends at Negotiated
    send(conn.connect("[192.0.2.1]", "192.0.2.1", 4711, macros={...}))
    verdict = conn.next_event()   # loop as above; Progress events may come first
    ... helo / mail / rcpt / data / header / eoh / body / eom, each followed by its verdict,
    abort (between messages; no reply), quit (no reply).

Every stage method returns the bytes to send (the MACRO packet for the stage, then the
command, as the milter negotiated them: a step it asked to skip sends only the macros, like
Postfix) and leaves exactly one `Verdict` to collect. When the milter negotiated "no reply"
for the step, skipped it, sent SKIP for that kind of event, or already accepted or refused
the message or connection, the verdict is produced without reading (``replied`` is False):
the caller never waits for a reply the milter was told not to send.

Verdicts: ``continue``, ``accept``, ``reject`` (``550 5.7.1 Command rejected``), ``tempfail``
(``451 4.7.1 Service unavailable - try again later``), ``replycode`` (the milter's own 4xx/5xx
reply, validated line by line, ``%%`` unescaped as Postfix does), ``discard`` and, at end of
message, ``quarantine`` (a QUARANTINE request followed by accept/continue). At end of message
the `Modification`s the milter sent before its verdict ride on the verdict.

What a verdict means for the state, as in Postfix: accept/refusal at CONNECT or HELO ends the
connection's events (later stages repeat the verdict, unreplied); accept at MAIL, RCPT, DATA,
a header, EOH or a body chunk ends the message's events; a refusal at RCPT refuses that
recipient only; a refusal at MAIL, DATA, a header, EOH or the body ends the message's events.
`abort()` (or the next `mail()`, which sends ABORT first when a transaction is open) starts over.

A milter's changes are bounded (`ChangeLimits`, SPEC §4.7): at most 1,000 header changes
(add, insert, change or delete) and 1,000 added recipients per message, one header of at most
64 KiB (name, colon, value), an address of at most 4 KiB, and, given ``eom(max_size=N)``, N
octets of header changes and replacement body together. Beyond them the milter broke its
contract: `ChangeLimitError` (a `ProtocolError`), read no further. With
``eom(stream_body=True)`` the replacement body is not kept: each REPLBODY comes out of
`next_event()` as a `ReplaceBody` event before the verdict, for the caller to spool, so the
core holds at most one packet of it.

Text goes over the wire as UTF-8 with ``surrogateescape`` (bytes round-trip). After a
`ProtocolError` the connection is broken: every later call raises it again.
"""
from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .. import errors as _errors

__all__ = [
    "ProtocolError", "ChangeLimitError", "ChangeLimits", "NEED_DATA", "MAX_PACKET",
    "MAX_CHUNK", "VERSION",
    "PacketDecoder", "encode_packet",
    "Action", "Verdict", "Negotiated", "Progress",
    "Modification", "AddHeader", "InsertHeader", "ChangeHeader", "ChangeFrom",
    "AddRecipient", "DeleteRecipient", "ReplaceBody",
    "MilterConnection", "parse_address",
]


class ProtocolError(_errors.ProtocolError):
    """The milter broke the protocol: garbage, an unexpected or malformed packet, EOF."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class ChangeLimitError(ProtocolError):
    """The milter's end-of-message changes went beyond `ChangeLimits`."""


@dataclass(frozen=True)
class ChangeLimits:
    """Bounds on one end of message's changes (SPEC §4.7)."""
    headers: int = 1000              # header changes: add, insert, change, delete
    header_size: int = 65536         # octets of one header: name, colon, value
    recipients: int = 1000           # added recipients
    address_size: int = 4096         # octets of an address and its ESMTP parameters
    size: int | None = None          # octets of header changes and new body (eom max_size)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

VERSION = 6
MAX_CHUNK = 65535                    # body octets per BODY packet (MILTER_CHUNK_SIZE)
MAX_PACKET = 2 * 65536               # command byte + data of one packet we accept
_LEN = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")

# --- commands (MTA -> milter), SMFIC_* -----------------------------------------------------
C_ABORT = b"A"
C_BODY = b"B"
C_CONNECT = b"C"
C_MACRO = b"D"
C_BODYEOB = b"E"
C_HELO = b"H"
C_QUIT_NC = b"K"
C_HEADER = b"L"
C_MAIL = b"M"
C_EOH = b"N"
C_OPTNEG = b"O"
C_QUIT = b"Q"
C_RCPT = b"R"
C_DATA = b"T"

# --- replies (milter -> MTA), SMFIR_* ------------------------------------------------------
R_ADDRCPT = b"+"
R_DELRCPT = b"-"
R_ADDRCPT_PAR = b"2"
R_SHUTDOWN = b"4"
R_ACCEPT = b"a"
R_REPLBODY = b"b"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_CHGFROM = b"e"
R_CONN_FAIL = b"f"
R_ADDHEADER = b"h"
R_INSHEADER = b"i"
R_SETSYMLIST = b"l"
R_CHGHEADER = b"m"
R_PROGRESS = b"p"
R_QUARANTINE = b"q"
R_REJECT = b"r"
R_SKIP = b"s"
R_TEMPFAIL = b"t"
R_REPLYCODE = b"y"

# --- actions the milter may take at end of message, SMFIF_* ---------------------------------
F_ADDHDRS = 0x001
F_CHGBODY = 0x002
F_ADDRCPT = 0x004
F_DELRCPT = 0x008
F_CHGHDRS = 0x010
F_QUARANTINE = 0x020
F_CHGFROM = 0x040
F_ADDRCPT_PAR = 0x080
F_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF
#: actions that change the message or its envelope (quarantine and symbol lists do not)
CHANGE_ACTIONS = F_ADDHDRS | F_CHGBODY | F_ADDRCPT | F_DELRCPT | F_CHGHDRS | F_CHGFROM \
    | F_ADDRCPT_PAR

# --- protocol steps, SMFIP_* -----------------------------------------------------------------
P_NOCONNECT = 0x000001
P_NOHELO = 0x000002
P_NOMAIL = 0x000004
P_NORCPT = 0x000008
P_NOBODY = 0x000010
P_NOHDRS = 0x000020
P_NOEOH = 0x000040
P_NR_HDR = 0x000080
P_NOUNKNOWN = 0x000100
P_NODATA = 0x000200
P_SKIP = 0x000400
P_RCPT_REJ = 0x000800
P_NR_CONN = 0x001000
P_NR_HELO = 0x002000
P_NR_MAIL = 0x004000
P_NR_RCPT = 0x008000
P_NR_DATA = 0x010000
P_NR_UNKN = 0x020000
P_NR_EOH = 0x040000
P_NR_BODY = 0x080000
P_HDR_LEADSPC = 0x100000
P_NOSEND_MASK = (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH
                 | P_NOUNKNOWN | P_NODATA)
P_NOREPLY_MASK = (P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN
                  | P_NR_HDR | P_NR_EOH | P_NR_BODY)
#: What we offer: every step may be skipped or left unanswered, SKIP and leading spaces are
#: understood. Not SMFIP_RCPT_REJ (we do not show milters recipients policy refused) and not
#: the MDS_256K/1M flags (body chunks stay at 65,535 octets).
OFFERED_PROTOCOL = P_NOSEND_MASK | P_NOREPLY_MASK | P_SKIP | P_HDR_LEADSPC

# --- macro stages in SETSYMLIST, SMFIM_* ----------------------------------------------------
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)

# command -> (its "don't send" flag, its "no reply" flag, its macro stage)
_STEPS = {
    C_CONNECT: (P_NOCONNECT, P_NR_CONN, M_CONNECT),
    C_HELO: (P_NOHELO, P_NR_HELO, M_HELO),
    C_MAIL: (P_NOMAIL, P_NR_MAIL, M_ENVFROM),
    C_RCPT: (P_NORCPT, P_NR_RCPT, M_ENVRCPT),
    C_DATA: (P_NODATA, P_NR_DATA, M_DATA),
    C_HEADER: (P_NOHDRS, P_NR_HDR, M_EOH),      # Postfix sends the EOH macros with headers
    C_EOH: (P_NOEOH, P_NR_EOH, M_EOH),
    C_BODY: (P_NOBODY, P_NR_BODY, M_EOM),       # ... and the EOM macros with body chunks
    C_BODYEOB: (0, 0, M_EOM),                   # end of message is always sent and answered
}
_STAGE_NAMES = {C_CONNECT: "connect", C_HELO: "helo", C_MAIL: "mail", C_RCPT: "rcpt",
                C_DATA: "data", C_HEADER: "header", C_EOH: "eoh", C_BODY: "body",
                C_BODYEOB: "eom"}
_MESSAGE_STAGES = (C_DATA, C_HEADER, C_EOH, C_BODY, C_BODYEOB)

DEFAULT_REJECT = (550, "5.7.1 Command rejected")
DEFAULT_TEMPFAIL = (451, "4.7.1 Service unavailable - try again later")


# --- packets ---------------------------------------------------------------------------------

def encode_packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    if len(command) != 1:
        raise ValueError("a milter command is one byte")
    if 1 + len(data) > MAX_PACKET:
        raise ValueError(f"milter packet of {1 + len(data)} octets exceeds {MAX_PACKET}")
    return _LEN.pack(1 + len(data)) + command + data


class PacketDecoder:
    """Splits a byte stream into ``(command, data)`` packets, bounded by `MAX_PACKET`."""

    def __init__(self, max_packet: int = MAX_PACKET):
        self.max_packet = max_packet
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise ProtocolError("data after end of stream")
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def eof(self) -> bool:
        return self._eof

    def next_packet(self) -> tuple[bytes, bytes] | None:
        """The next complete packet, or None when more data is needed.

        EOF with nothing buffered returns None (check `eof`); EOF inside a packet, a zero
        length and a length over the bound are `ProtocolError`s."""
        buf = self._buf
        if len(buf) >= 4:
            (length,) = _LEN.unpack_from(buf)
            if length == 0:
                raise ProtocolError("milter sent a packet of length 0")
            if length > self.max_packet:
                raise ProtocolError(f"milter sent a packet of {length} octets "
                                    f"(limit {self.max_packet})")
            if len(buf) >= 4 + length:
                command = bytes(buf[4:5])
                data = bytes(buf[5:4 + length])
                del buf[:4 + length]
                return command, data
        if self._eof and buf:
            raise ProtocolError("milter closed the connection inside a packet")
        return None


# --- events ----------------------------------------------------------------------------------

class Action(str, enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    REPLYCODE = "replycode"
    DISCARD = "discard"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Modification:
    """Base of the end-of-message changes. Header values are what follows ``Name:`` on the
    wire (leading space included), folded lines joined with CRLF."""


@dataclass(frozen=True)
class AddHeader(Modification):
    """Append a header at the end of the header block."""
    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader(Modification):
    """Insert a header before the header at 0-based position `index` (0 = first; past the
    end = append)."""
    index: int
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader(Modification):
    """Replace the `index`-th (1-based) header called `name`; an empty value deletes it.
    An index past the last such header adds one when the value is not empty."""
    index: int
    name: str
    value: str

    @property
    def delete(self) -> bool:
        return self.value == ""


@dataclass(frozen=True)
class ChangeFrom(Modification):
    """Replace the envelope sender (``<addr>``) and its ESMTP parameters (None: none)."""
    address: str
    args: str | None = None


@dataclass(frozen=True)
class AddRecipient(Modification):
    """Add an envelope recipient; `args` are ESMTP parameters (ADDRCPT_PAR only)."""
    address: str
    args: str | None = None


@dataclass(frozen=True)
class DeleteRecipient(Modification):
    address: str


@dataclass(frozen=True)
class ReplaceBody(Modification):
    """One piece of the new body: all ReplaceBody pieces, in order, are the new body."""
    data: bytes


@dataclass(frozen=True)
class Verdict:
    """A stage's answer. `reply` is ``(code, text)`` for reject/tempfail/replycode, with
    text a tuple of lines for a multi-line reply (as `replies.render` takes them); `reason`
    is the quarantine reason; `modifications` come with the end-of-message verdict; `replied`
    is False when no reply was read (see the module docstring); `stage` names the step."""
    action: Action
    stage: str
    reply: tuple[int, str | tuple[str, ...]] | None = None
    reason: str | None = None
    modifications: tuple[Modification, ...] = ()
    replied: bool = True


@dataclass(frozen=True)
class Negotiated:
    """The milter's OPTNEG answer: its version, the actions it may take (SMFIF_*), the
    protocol flags it set (SMFIP_*: steps to skip, replies it won't send) and its macro
    lists per stage (SMFIM_* -> names), if it sent any."""
    version: int
    actions: int
    protocol: int
    symlists: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """The milter is still working (SMFIR_PROGRESS): restart the wait."""


# --- helpers ---------------------------------------------------------------------------------

def _enc(text: str) -> bytes:
    b = text.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError("NUL in a milter string")
    return b


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _cstrings(data: bytes, count: int | None, what: str) -> list[bytes]:
    """Split NUL-terminated strings; `count` None = any number (at least one)."""
    if not data or data[-1:] != b"\0":
        raise ProtocolError(f"{what}: missing string terminator")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise ProtocolError(f"{what}: {len(parts)} strings, expected {count}")
    return parts


def macro_name(name: str) -> str:
    """Canonical macro name: one character bare, longer ones in braces (``{client_addr}``)."""
    bare = name[1:-1] if len(name) > 2 and name[0] == "{" and name[-1] == "}" else name
    return bare if len(bare) == 1 else "{" + bare + "}"


_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
_REPLY_LINE = re.compile(r"([45][0-9][0-9])([ -]|\Z)(.*)\Z", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ADDR_BAD = re.compile(rb"[\r\n]")


def _header_name(b: bytes, what: str) -> str:
    if not _HEADER_NAME.match(b):
        raise ProtocolError(f"{what}: bad header name {b[:80]!r}")
    return _dec(b)


def _header_value(b: bytes, leading_space: bool, what: str) -> str:
    """The value as it goes after the colon: CRLF line breaks, each followed by white space."""
    lines = b.replace(b"\r\n", b"\n").split(b"\n")
    for line in lines[1:]:
        if line[:1] not in (b" ", b"\t"):
            raise ProtocolError(f"{what}: header continuation line without leading white space")
    for line in lines:
        if b"\r" in line:
            raise ProtocolError(f"{what}: bare CR in header value")
    value = b"\r\n".join(lines)
    if not leading_space and value:
        value = b" " + value
    return _dec(value)


def _address(b: bytes, what: str) -> str:
    if not b or _ADDR_BAD.search(b):
        raise ProtocolError(f"{what}: bad address {b[:80]!r}")
    return _dec(b)


def _parse_replycode(data: bytes) -> tuple[int, str | tuple[str, ...]]:
    if data[-1:] == b"\0":
        data = data[:-1]
    if b"\0" in data:
        raise ProtocolError("REPLYCODE: NUL inside the reply")
    text = _dec(data)
    # Sendmail uses the reply as a format string: '%%' is '%', a lone '%' is dropped.
    text = re.sub(r"%(.?)", lambda m: m.group(1), text, flags=re.S)
    lines = text.split("\r\n")
    code = None
    out = []
    for i, line in enumerate(lines):
        m = _REPLY_LINE.match(line)
        if not m:
            raise ProtocolError(f"REPLYCODE: not a 4xx/5xx reply line: {line[:80]!r}")
        last = i == len(lines) - 1
        if code is None:
            code = m.group(1)
        elif m.group(1) != code:
            raise ProtocolError("REPLYCODE: lines with different codes")
        if (m.group(2) == "-") == last:
            raise ProtocolError("REPLYCODE: bad continuation marker")
        if _CONTROL.search(m.group(3)):
            raise ProtocolError("REPLYCODE: control character in the reply text")
        out.append(m.group(3))
    assert code is not None
    return int(code), (out[0] if len(out) == 1 else tuple(out))


def parse_address(address: str) -> tuple[str, str, int] | tuple[str, str]:
    """``inet:HOST:PORT`` (``inet:[IPv6]:PORT``) -> ``("inet", host, port)``; ``unix:/path``
    -> ``("unix", path)``. ValueError with a message naming what is wrong."""
    kind, sep, rest = address.partition(":")
    if kind == "unix" and sep:
        if not rest.startswith("/"):
            raise ValueError(f"milter address {address!r}: unix: needs an absolute path")
        return ("unix", rest)
    if kind == "inet" and sep:
        host, sep, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) \
                or not 0 < int(port) < 65536:
            raise ValueError(f"milter address {address!r}: expected inet:HOST:PORT")
        return ("inet", host, int(port))
    raise ValueError(f"milter address {address!r}: expected inet:HOST:PORT or unix:/path")


# --- the MTA side ----------------------------------------------------------------------------

_S_NEW, _S_NEGOTIATING, _S_READY, _S_CONNECTED, _S_CLOSED = range(5)

_VERDICT_REPLIES = {R_ACCEPT, R_CONTINUE, R_REJECT, R_TEMPFAIL, R_REPLYCODE, R_DISCARD, R_SKIP}
_EOM_REPLIES = {R_ADDHEADER, R_INSHEADER, R_CHGHEADER, R_CHGFROM, R_ADDRCPT, R_ADDRCPT_PAR,
                R_DELRCPT, R_REPLBODY, R_QUARANTINE}
_NEEDS_ACTION = {R_ADDHEADER: F_ADDHDRS, R_INSHEADER: F_ADDHDRS, R_CHGHEADER: F_CHGHDRS,
                 R_CHGFROM: F_CHGFROM, R_ADDRCPT: F_ADDRCPT, R_ADDRCPT_PAR: F_ADDRCPT_PAR,
                 R_DELRCPT: F_DELRCPT, R_REPLBODY: F_CHGBODY, R_QUARANTINE: F_QUARANTINE}


class MilterConnection:
    """One MTA-to-milter connection's protocol state (see the module docstring)."""

    def __init__(self, *, actions: int = ALL_ACTIONS, protocol: int = OFFERED_PROTOCOL,
                 max_packet: int = MAX_PACKET, limits: ChangeLimits = ChangeLimits()):
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.limits = limits
        self._max_size: int | None = limits.size
        self._stream_body = False
        self._headers_changed = 0
        self._rcpts_added = 0
        self._change_bytes = 0
        self._decoder = PacketDecoder(max_packet)
        self._state = _S_NEW
        self._error: ProtocolError | None = None
        self.version = 0
        self.actions = 0                  # negotiated SMFIF_* mask
        self.protocol = 0                 # the milter's SMFIP_* mask
        self.symlists: dict[int, tuple[str, ...]] | None = None
        self._awaiting: bytes | None = None       # command whose reply we read
        self._pending: Verdict | None = None      # a verdict produced without reading
        self._conn_done: Verdict | None = None    # accept/refusal at connect/helo
        self._msg_done: Verdict | None = None     # accept/refusal inside the transaction
        self._in_transaction = False
        self._skip: bytes | None = None           # event type the milter said to SKIP
        self._mods: list[Modification] = []
        self._quarantine: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def negotiated(self) -> bool:
        return self._state >= _S_READY

    @property
    def awaiting_reply(self) -> bool:
        """A reply must be read before the pending verdict comes out."""
        return self._awaiting is not None

    @property
    def active(self) -> bool:
        """The milter still wants this connection's events (no accept/refusal at connect or
        HELO, not quit, no error)."""
        return self._error is None and self._state in (_S_READY, _S_CONNECTED) \
            and self._conn_done is None

    @property
    def may_change(self) -> bool:
        """The milter negotiated actions that change the message or its envelope."""
        return bool(self.actions & CHANGE_ACTIONS)

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def reply_expected(self, command: bytes) -> bool:
        """Whether `command` (C_*) is sent and answered under the negotiated flags."""
        no_send, no_reply, _ = _STEPS[command]
        return not (self.protocol & (no_send | no_reply))

    # ------------------------------------------------------------------ I/O

    def receive_data(self, data: bytes) -> None:
        self._check()
        try:
            self._decoder.receive_data(data)
        except ProtocolError as exc:
            raise self._fail(exc.reason) from None

    def next_event(self):
        """`NEED_DATA`, `Negotiated`, `Progress` or the pending `Verdict`."""
        self._check()
        if self._pending is not None:
            verdict, self._pending = self._pending, None
            return verdict
        if self._awaiting is None:
            raise RuntimeError("no reply is pending")
        try:
            while True:
                packet = self._decoder.next_packet()
                if packet is None:
                    if self._decoder.eof:
                        raise ProtocolError("milter closed the connection")
                    return NEED_DATA
                command, data = packet
                if self._awaiting == C_OPTNEG:
                    event = self._negotiated(command, data)
                else:
                    event = self._reply(command, data)
                    if event is None:            # a modification: read on
                        continue
                if not isinstance(event, (Progress, ReplaceBody)) and self._decoder.buffered:
                    raise ProtocolError("milter sent data after its answer")
                return event
        except ProtocolError as exc:
            raise self._fail(exc.reason) from None

    # ------------------------------------------------------------------ stages

    def negotiate(self) -> bytes:
        self._check()
        if self._state != _S_NEW:
            raise RuntimeError("negotiation already started")
        self._state = _S_NEGOTIATING
        self._awaiting = C_OPTNEG
        return encode_packet(C_OPTNEG, _OPTNEG.pack(VERSION, self.offered_actions,
                                                    self.offered_protocol))

    def connect(self, hostname: str, address: str | None = None, port: int = 0, *,
                family: str | None = None, macros: Mapping[str, str] | None = None) -> bytes:
        """CONNECT: `hostname` as Postfix sends it (``[addr]`` when unknown); `address` an IP
        address or a unix socket path (None: unknown family); `family` one of ``4 6 L U``,
        inferred from `address` when None."""
        if self._state != _S_READY:
            self._check()
            raise RuntimeError("connect() needs a negotiated, unconnected milter")
        if family is None:
            family = ("U" if address is None else "L" if address.startswith("/")
                      else "6" if ":" in address else "4")
        if family not in ("4", "6", "L", "U"):
            raise ValueError(f"bad address family {family!r}")
        data = _enc(hostname) + b"\0" + family.encode()
        if family != "U":
            if not 0 <= port <= 65535:
                raise ValueError(f"bad port {port}")
            data += struct.pack("!H", port if family != "L" else 0) + _enc(address or "") + b"\0"
        self._state = _S_CONNECTED
        return self._stage(C_CONNECT, data, macros)

    def helo(self, name: str, *, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(C_HELO, _enc(name) + b"\0", macros)

    def mail(self, args: Sequence[str], *, macros: Mapping[str, str] | None = None) -> bytes:
        """MAIL: ``args[0]`` the sender in angle brackets, then ESMTP parameters
        (``"SIZE=123"``). Sends ABORT first when the previous transaction is still open."""
        prefix = self.abort() if self._in_transaction else b""
        out = self._stage(C_MAIL, self._argv(args), macros)
        self._in_transaction = True
        return prefix + out

    def rcpt(self, args: Sequence[str], *, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(C_RCPT, self._argv(args), macros)

    def data(self, *, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(C_DATA, b"", macros)

    def header(self, name: str, value: str, *,
               macros: Mapping[str, str] | None = None) -> bytes:
        """One header: `value` is what follows the colon, folded lines joined with CRLF (or
        LF). Sent with LF line breaks and, unless the milter asked for leading spaces, with
        one leading space removed, as Postfix does."""
        v = _enc(value).replace(b"\r\n", b"\n")
        if not self.protocol & P_HDR_LEADSPC and v[:1] == b" ":
            v = v[1:]
        return self._stage(C_HEADER, _enc(name) + b"\0" + v + b"\0", macros)

    def eoh(self, *, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(C_EOH, b"", macros)

    def body(self, chunk: bytes, *, macros: Mapping[str, str] | None = None) -> bytes:
        """One body chunk of 1..65,535 octets (CRLF lines, not dot-stuffed)."""
        if not 0 < len(chunk) <= MAX_CHUNK:
            raise ValueError(f"a body chunk has 1..{MAX_CHUNK} octets, not {len(chunk)}")
        return self._stage(C_BODY, bytes(chunk), macros)

    def eom(self, *, macros: Mapping[str, str] | None = None, max_size: int | None = None,
            stream_body: bool = False) -> bytes:
        """End of message; its verdict carries the modifications. *max_size*: octets of
        header changes and replacement body allowed together (else `limits.size`);
        *stream_body*: REPLBODY pieces come out of `next_event()` as `ReplaceBody` events
        instead of riding on the verdict."""
        self._mods = []
        self._quarantine = None
        self._max_size = max_size if max_size is not None else self.limits.size
        self._stream_body = stream_body
        self._headers_changed = self._rcpts_added = self._change_bytes = 0
        return self._stage(C_BODYEOB, b"", macros)

    def abort(self) -> bytes:
        """Forget the current message (no reply). Harmless when none is open."""
        self._check_idle()
        self._in_transaction = False
        self._msg_done = None
        self._skip = None
        if self._state != _S_CONNECTED or self._conn_done is not None:
            return b""
        return encode_packet(C_ABORT)

    def quit(self, *, new_connection: bool = False) -> bytes:
        """QUIT (no reply); ``new_connection`` sends QUIT_NC: the milter stays connected and
        negotiated, and the next call is `connect()`."""
        self._check_idle()
        if self._state not in (_S_READY, _S_CONNECTED):
            return b""
        if new_connection:
            self._state = _S_READY
            self._conn_done = self._msg_done = None
            self._in_transaction = False
            self._skip = None
            return encode_packet(C_QUIT_NC)
        self._state = _S_CLOSED
        return encode_packet(C_QUIT)

    # ------------------------------------------------------------------ internals

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_idle(self) -> None:
        self._check()
        if self._awaiting is not None or self._pending is not None:
            raise RuntimeError("the previous stage's verdict was not collected")

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._awaiting = None
        self._pending = None
        return self._error

    @staticmethod
    def _argv(args: Sequence[str]) -> bytes:
        if not args:
            raise ValueError("MAIL/RCPT need at least the address")
        return b"".join(_enc(a) + b"\0" for a in args)

    def _macros(self, command: bytes, macros: Mapping[str, str] | None) -> bytes:
        stage = _STEPS[command][2]
        if self.symlists is not None:
            wanted = self.symlists.get(stage)
            if not wanted:
                return b""
            given = {macro_name(k): v for k, v in (macros or {}).items()}
            pairs = [(n, given[n]) for n in wanted if n in given]
        else:
            pairs = [(macro_name(k), v) for k, v in (macros or {}).items()]
        if not pairs:
            return b""
        data = command + b"".join(_enc(n) + b"\0" + _enc(v) + b"\0" for n, v in pairs)
        return encode_packet(C_MACRO, data)

    def _stage(self, command: bytes, data: bytes, macros) -> bytes:
        self._check_idle()
        if self._state != _S_CONNECTED:
            raise RuntimeError(f"{_STAGE_NAMES[command]}() before connect() or after quit()")
        stage = _STAGE_NAMES[command]
        no_send, no_reply, _ = _STEPS[command]
        done = self._conn_done or (self._msg_done if command != C_CONNECT else None)
        if done is not None:
            self._pending = Verdict(done.action, stage, done.reply, done.reason, (),
                                    replied=False)
            return b""
        if command == self._skip:
            self._pending = Verdict(Action.CONTINUE, stage, replied=False)
            return b""
        self._skip = None
        out = self._macros(command, macros)
        if self.protocol & no_send:
            self._pending = Verdict(Action.CONTINUE, stage, replied=False)
            return out
        out += encode_packet(command, data)
        if self.protocol & no_reply:
            self._pending = Verdict(Action.CONTINUE, stage, replied=False)
        else:
            self._awaiting = command
        return out

    def _negotiated(self, command: bytes, data: bytes) -> Negotiated:
        if command != C_OPTNEG:
            raise ProtocolError(f"milter answered negotiation with {command!r}")
        if len(data) < _OPTNEG.size:
            raise ProtocolError("negotiation reply too short")
        version, actions, protocol = _OPTNEG.unpack_from(data)
        if not 2 <= version <= VERSION:
            raise ProtocolError(f"milter protocol version {version} (we speak 2..{VERSION})")
        if actions & ~self.offered_actions:
            raise ProtocolError(f"milter wants actions 0x{actions:x} beyond the offered "
                             f"0x{self.offered_actions:x}")
        rest = data[_OPTNEG.size:]
        symlists: dict[int, tuple[str, ...]] | None = None
        while rest:
            if len(rest) < 5:
                raise ProtocolError("truncated macro list in negotiation reply")
            (stage,) = _LEN.unpack_from(rest)
            end = rest.find(b"\0", 4)
            if end < 0:
                raise ProtocolError("unterminated macro list in negotiation reply")
            names = _dec(rest[4:end]).split()
            rest = rest[end + 1:]
            if symlists is None:
                symlists = {}
            if stage <= M_EOH:           # unknown stages are ignored, as Postfix does
                symlists[stage] = tuple(macro_name(n) for n in names)
        if version < 4:
            protocol |= P_NODATA         # not in that protocol version: never sent
        self.version, self.actions, self.protocol = version, actions, protocol
        self.symlists = symlists
        self._awaiting = None
        self._state = _S_READY
        return Negotiated(version, actions, protocol, dict(symlists or {}))

    def _reply(self, command: bytes, data: bytes):
        event = self._awaiting
        assert event is not None
        stage = _STAGE_NAMES[event]
        if command == R_PROGRESS:
            if data:
                raise ProtocolError("PROGRESS with data")
            return Progress()
        if command in _EOM_REPLIES:
            if event != C_BODYEOB:
                raise ProtocolError(f"modification {command!r} in answer to {stage}")
            needed = _NEEDS_ACTION[command]
            if not self.actions & needed:
                raise ProtocolError(f"modification {command!r} without negotiating it")
            return self._modification(command, data)
        if command not in _VERDICT_REPLIES:
            raise ProtocolError(f"unexpected reply {command!r} to {stage}")
        if command != R_REPLYCODE and data:
            raise ProtocolError(f"reply {command!r} with {len(data)} data octets")
        in_connect = event in (C_CONNECT, C_HELO)
        reply = None
        if command == R_CONTINUE:
            action = Action.CONTINUE
        elif command == R_SKIP:
            if event == C_BODYEOB:
                raise ProtocolError("SKIP in answer to end of message")
            self._skip = event
            action = Action.CONTINUE
        elif command == R_ACCEPT:
            action = Action.ACCEPT
        elif command == R_DISCARD:
            if in_connect:
                raise ProtocolError(f"DISCARD in answer to {stage}")
            action = Action.DISCARD
        elif command == R_REJECT:
            action, reply = Action.REJECT, DEFAULT_REJECT
        elif command == R_TEMPFAIL:
            action, reply = Action.TEMPFAIL, DEFAULT_TEMPFAIL
        else:
            action, reply = Action.REPLYCODE, _parse_replycode(data)
        self._awaiting = None
        mods: tuple[Modification, ...] = ()
        reason = None
        if event == C_BODYEOB:
            self._in_transaction = False
            self._msg_done = None
            self._skip = None
            if action in (Action.ACCEPT, Action.CONTINUE):
                mods = tuple(self._mods)
                if self._quarantine is not None:
                    action, reason = Action.QUARANTINE, self._quarantine
            self._mods = []
            self._quarantine = None
        verdict = Verdict(action, stage, reply, reason, mods)
        if action is not Action.CONTINUE and event != C_BODYEOB:
            if in_connect:
                self._conn_done = (Verdict(Action.CONTINUE, stage) if action is Action.ACCEPT
                                   else verdict)
            elif action is Action.ACCEPT:
                self._msg_done = Verdict(Action.CONTINUE, stage)
            elif event != C_RCPT or action is Action.DISCARD:
                self._msg_done = verdict
        return verdict

    def _count(self, octets: int, *, header: bool = False, rcpt: bool = False) -> None:
        """Account one change against `limits`; ChangeLimitError beyond them."""
        limits = self.limits
        if header:
            self._headers_changed += 1
            if self._headers_changed > limits.headers:
                raise ChangeLimitError(f"more than {limits.headers} header changes")
        if rcpt:
            self._rcpts_added += 1
            if self._rcpts_added > limits.recipients:
                raise ChangeLimitError(f"more than {limits.recipients} added recipients")
        self._change_bytes += octets
        if self._max_size is not None and self._change_bytes > self._max_size:
            raise ChangeLimitError(f"changes of more than {self._max_size} octets "
                                   "(max_message_size)")

    def _header_change(self, name: bytes, value: bytes, what: str) -> None:
        octets = len(name) + 1 + len(value)
        if octets > self.limits.header_size:
            raise ChangeLimitError(f"{what}: a header of {octets} octets "
                                   f"(limit {self.limits.header_size})")
        self._count(octets, header=True)

    def _address_change(self, data: bytes, what: str, *, rcpt: bool = False) -> None:
        if len(data) > self.limits.address_size:
            raise ChangeLimitError(f"{what}: {len(data)} octets "
                                   f"(limit {self.limits.address_size})")
        self._count(len(data), rcpt=rcpt)

    def _modification(self, command: bytes, data: bytes):
        """Record one change (None), or, streaming the body, a `ReplaceBody` event."""
        leadspc = bool(self.protocol & P_HDR_LEADSPC)
        if command == R_ADDHEADER:
            name, value = _cstrings(data, 2, "ADDHEADER")
            self._header_change(name, value, "ADDHEADER")
            self._mods.append(AddHeader(_header_name(name, "ADDHEADER"),
                                        _header_value(value, leadspc, "ADDHEADER")))
        elif command in (R_INSHEADER, R_CHGHEADER):
            what = "INSHEADER" if command == R_INSHEADER else "CHGHEADER"
            if len(data) < 4:
                raise ProtocolError(f"{what}: too short")
            (index,) = _LEN.unpack_from(data)
            name, value = _cstrings(data[4:], 2, what)
            self._header_change(name, value, what)
            if index > 0x7FFFFFFF:
                raise ProtocolError(f"{what}: bad index {index}")
            hname = _header_name(name, what)
            if command == R_INSHEADER:
                self._mods.append(InsertHeader(index, hname,
                                               _header_value(value, leadspc, what)))
            else:
                hvalue = _header_value(value, leadspc, what) if value else ""
                self._mods.append(ChangeHeader(max(index, 1), hname, hvalue))
        elif command in (R_CHGFROM, R_ADDRCPT_PAR):
            what = "CHGFROM" if command == R_CHGFROM else "ADDRCPT_PAR"
            self._address_change(data, what, rcpt=command == R_ADDRCPT_PAR)
            parts = _cstrings(data, None, what)
            if len(parts) > 2:
                raise ProtocolError(f"{what}: {len(parts)} strings")
            addr = _address(parts[0], what)
            args = None
            if len(parts) == 2 and parts[1]:
                if _ADDR_BAD.search(parts[1]):
                    raise ProtocolError(f"{what}: line break in the parameters")
                args = _dec(parts[1])
            cls = ChangeFrom if command == R_CHGFROM else AddRecipient
            self._mods.append(cls(addr, args))
        elif command == R_ADDRCPT:
            self._address_change(data, "ADDRCPT", rcpt=True)
            (addr,) = _cstrings(data, 1, "ADDRCPT")
            self._mods.append(AddRecipient(_address(addr, "ADDRCPT")))
        elif command == R_DELRCPT:
            self._address_change(data, "DELRCPT")
            (addr,) = _cstrings(data, 1, "DELRCPT")
            self._mods.append(DeleteRecipient(_address(addr, "DELRCPT")))
        elif command == R_REPLBODY:
            self._count(len(data))
            if self._stream_body:
                return ReplaceBody(data)
            self._mods.append(ReplaceBody(data))
        elif command == R_QUARANTINE:
            reason = data[:-1] if data[-1:] == b"\0" else data
            if b"\0" in reason:
                raise ProtocolError("QUARANTINE: NUL inside the reason")
            text = _dec(reason)
            if _CONTROL.search(text):
                raise ProtocolError("QUARANTINE: control character in the reason")
            self._quarantine = text
