"""IMAP wire pieces shared by the sans-IO IMAP cores (SPEC §5): a literal-aware reader, a
tokenizer for the few pre-login commands, and argument rendering.

The reader assembles one whole IMAP "line" — a command (server side) or a response (client
side) — including the literals it announces (``{N}``, and ``{N+}`` of LITERAL+, RFC 7888), so
a literal's bytes are never taken for a command. The literal announcement at the end of each
line part is found by the native scanner (`gateway.native.scanner.find_literal`, or its
Python twin).

Everything is bounded by `max_size` (a whole command, lines and literals: 64 KiB before login):

- a line or literal that would take a command past the cap is never held: its bytes are
  dropped as they arrive (`SKIP`/`DISCARD`), and `TooBig` is reported once the rest of that
  command has gone by. A synchronising ``{N}`` that is too big is reported at once (the peer
  waits for a "+ " that never comes), so those N bytes are never even sent;
- on the server side, a synchronising literal within the cap makes the reader return
  `Continue` first: the core sends "+ " and the reader goes on with the literal;
- a literal length of more than 18 digits cannot be skipped exactly: `Fatal` (close).
The receive buffer holds at most `max_size` plus the last chunk received, and a line search
resumes where the previous one stopped, so reading stays linear.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..native import scanner


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

MAX_COMMAND = 65536     # SPEC §5: a whole command before login, line and literals
_TAIL = 40              # bytes kept of a discarded line: enough to see a {N+} at its end


@dataclass(frozen=True)
class Line:
    """A complete line. `parts`: the text of each line part (no CRLF), with the bytes of each
    literal between them: [text0, literal0, text1, ...]; `raw`: every byte as received."""
    parts: tuple[bytes, ...]
    raw: bytes

    @property
    def first(self) -> bytes:
        return self.parts[0]


@dataclass(frozen=True)
class Continue:
    """Server side: a synchronising literal of `size` octets may be sent: answer "+ "."""
    size: int


@dataclass(frozen=True)
class TooBig:
    """A line exceeded the cap and was dropped. `head`: its first bytes (for the tag)."""
    head: bytes


@dataclass(frozen=True)
class Fatal:
    """The input cannot be followed any more (a literal length beyond 18 digits)."""
    reason: str


@dataclass(frozen=True)
class Closed:
    """EOF (a partial line, if any, is dropped)."""


_LINE, _LITERAL, _SKIP, _DISCARD = range(4)


class LineReader:
    """Literal-aware IMAP line reader. `server`: this side reads commands (a synchronising
    literal needs our "+ "); otherwise it reads responses (literals follow at once)."""

    def __init__(self, max_size: int = MAX_COMMAND, *, server: bool = True):
        self.max_size = max_size
        self.server = server
        self._buf = bytearray()
        self._scan = 0             # where the LF search resumes
        self._eof = False
        self._mode = _LINE
        self._parts: list[bytes] = []
        self._raw: list[bytes] = []
        self._size = 0             # octets of the current line so far
        self._left = 0             # literal octets still to read / skip
        self._lit = bytearray()
        self._tail = b""           # end of the line being discarded
        self._head = b""           # start of the line being dropped (TooBig.head)
        self.literals = True       # False: a line's {N} is text (an AUTHENTICATE response)

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """Nothing of a line has been read yet (a line boundary)."""
        return self._mode == _LINE and not self._parts and not self._buf

    def take_buffer(self) -> bytes:
        """Remove and return the unparsed bytes (a protocol switch hands them over)."""
        out = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return out

    def pending(self) -> bool:
        """Anything received that is not part of a line returned yet."""
        return bool(self._buf) or bool(self._parts) or self._mode != _LINE

    # --- output -----------------------------------------------------------------------------

    def next(self):
        while True:
            mode = self._mode
            if mode == _LINE:
                event = self._read_line()
            elif mode == _LITERAL:
                event = self._read_literal()
            elif mode == _SKIP:
                event = self._skip()
            else:
                event = self._discard()
            if event is not None:
                return event

    def _need(self):
        return Closed() if self._eof else NEED_DATA

    def _read_line(self):
        buf = self._buf
        nl = buf.find(b"\n", self._scan)
        if nl < 0:
            if self._size + len(buf) > self.max_size:
                self._head = self._head_of((self._parts[0] if self._parts else bytes(buf))[:64])
                self._tail = bytes(buf[-_TAIL:])
                self._drop_line()
                buf.clear()
                self._scan = 0
                self._mode = _DISCARD
                return None
            self._scan = len(buf)
            return self._need()
        seg = bytes(buf[:nl + 1])
        del buf[:nl + 1]
        self._scan = 0
        text = seg[:-2] if seg.endswith(b"\r\n") else seg[:-1]
        self._size += len(seg)
        n, plus = scanner.find_literal(text) if self.literals else (-1, False)
        if self._size > self.max_size:          # the line itself is over the cap
            self._head = self._head_of((self._parts[0] if self._parts else text)[:64])
            self._drop_line()
            return self._literal_after_drop(n, plus)
        self._parts.append(text)
        self._raw.append(seg)
        if n == -1:
            line = Line(tuple(self._parts), b"".join(self._raw))
            self._drop_line()
            return line
        if n == -2 or self._size + n > self.max_size:
            self._head = self._head_of(self._parts[0][:64])
            self._drop_line()
            return self._literal_after_drop(n, plus)
        self._left = n
        self._lit = bytearray()
        self._mode = _LITERAL
        if self.server and not plus:
            return Continue(n)
        return None

    def _literal_after_drop(self, n: int, plus: bool):
        """A dropped line ended with literal announcement *n*: skip it if the peer sends it."""
        follows = plus or not self.server
        if n == -2 and follows:
            self._mode = _LINE
            return Fatal("literal length out of range")
        if n >= 0 and follows:
            self._left = n
            self._mode = _SKIP
            return None
        self._mode = _LINE                      # no literal, or a {N} we never invite
        return TooBig(self._head)

    def _read_literal(self):
        buf = self._buf
        if self._left and not buf:
            return self._need()
        take = min(self._left, len(buf))
        self._lit += buf[:take]
        del buf[:take]
        self._left -= take
        if self._left:
            return self._need()
        lit = bytes(self._lit)
        self._lit = bytearray()
        self._parts.append(lit)
        self._raw.append(lit)
        self._size += len(lit)
        self._mode = _LINE
        return None

    def _skip(self):
        buf = self._buf
        if self._left and not buf:
            return self._need()
        take = min(self._left, len(buf))
        del buf[:take]
        self._left -= take
        if self._left:
            return self._need()
        self._tail = b""
        self._mode = _DISCARD                  # the rest of the command line follows
        return None

    def _discard(self):
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            self._tail = (self._tail + bytes(buf[-_TAIL:]))[-_TAIL:]
            buf.clear()
            return self._need()
        tail = (self._tail + bytes(buf[max(0, nl - _TAIL):nl]))[-_TAIL:]
        del buf[:nl + 1]
        self._tail = b""
        if tail.endswith(b"\r"):
            tail = tail[:-1]
        n, plus = scanner.find_literal(tail) if self.literals else (-1, False)
        return self._literal_after_drop(n, plus)

    def _drop_line(self) -> None:
        self._parts = []
        self._raw = []
        self._size = 0

    @staticmethod
    def _head_of(data: bytes) -> bytes:
        return data.split(b"\n", 1)[0].split(b"\r", 1)[0]


# --- tokens -----------------------------------------------------------------------------------

_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0, 32)) | {127}
_TAG_SPECIALS = _ATOM_SPECIALS | {ord("+")}


def valid_tag(tag: bytes) -> bool:
    return 0 < len(tag) <= 64 and not any(b in _TAG_SPECIALS or b > 127 for b in tag)


def split_tag(first: bytes) -> tuple[bytes, bytes, bytes]:
    """``b"a1 LOGIN x y"`` -> (b"a1", b"LOGIN", b"x y")."""
    tag, _, rest = first.partition(b" ")
    name, _, args = rest.partition(b" ")
    return tag, name, args


def tokens(parts: tuple[bytes, ...], *, skip: int = 0) -> list[bytes]:
    """The astring arguments of a command: atoms, quoted strings and literals, in order.

    `skip` leading tokens of the first part are dropped (tag, command name). ValueError on bad
    syntax (an unterminated quoted string, a parenthesis)."""
    out: list[bytes] = []
    for i in range(0, len(parts), 2):
        text = parts[i]
        if i + 1 < len(parts):                  # ends with the literal's {N} / {N+}
            brace = text.rfind(b"{")
            text = text[:brace]
            if text and not text.endswith(b" "):
                raise ValueError("literal must follow a space")
        out.extend(_split(text))
        if i + 1 < len(parts):
            out.append(parts[i + 1])
    return out[skip:]


def _split(text: bytes) -> list[bytes]:
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
            continue
        if c == 0x22:                           # quoted string
            value = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted string")
                c = text[i]
                if c == 0x5C:
                    if i + 1 >= n or text[i + 1] not in b'"\\':
                        raise ValueError("bad escape in quoted string")
                    value.append(text[i + 1])
                    i += 2
                elif c == 0x22:
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
            if i < n and text[i] != 0x20:
                raise ValueError("junk after quoted string")
            out.append(bytes(value))
            continue
        j = text.find(b" ", i)
        j = n if j < 0 else j
        atom = text[i:j]
        if any(b in b'(){"\\' or b < 32 or b == 127 for b in atom):
            raise ValueError("bad character in atom")
        out.append(atom)
        i = j
    return out


# --- rendering --------------------------------------------------------------------------------

_ATOM_OK = frozenset(range(33, 127)) - set(b'(){ %*"\\]')


def render_astring(value: bytes, *, literal_plus: bool) -> list[bytes]:
    """*value* as an IMAP astring: [text] for an atom or quoted string; for a literal, the
    announcement ``{N+}`` / ``{N}`` ends the text and the value is a separate piece
    (``[b"{5}", b"value"]``): with ``{N}`` the caller waits for "+ " before sending it."""
    if value and all(b in _ATOM_OK for b in value):
        return [value]
    if len(value) <= 1024 and all(0 < b < 128 and b not in (10, 13) for b in value):
        return [b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"']
    return [b"{%d%s}" % (len(value), b"+" if literal_plus else b""), value]


def render_command(tag: bytes, name: bytes, args: list[bytes], *,
                   literal_plus: bool) -> list[bytes]:
    """A command as pieces to send: the first at once, each later one after a "+ " (only
    synchronising literals split a command). Each piece ends where a literal starts."""
    pieces: list[bytes] = []
    cur = bytearray(tag + b" " + name)
    for arg in args:
        rendered = render_astring(arg, literal_plus=literal_plus)
        cur += b" " + rendered[0]
        if len(rendered) == 2:
            cur += b"\r\n"
            if literal_plus:
                cur += rendered[1]
            else:
                pieces.append(bytes(cur))
                cur = bytearray(rendered[1])
    cur += b"\r\n"
    pieces.append(bytes(cur))
    return pieces


def quote(value: str) -> str:
    """A quoted string for a text we generate ourselves (ID values)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
