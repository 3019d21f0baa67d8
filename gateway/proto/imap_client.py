"""Sans-IO IMAP client core: the gateway's side of the upstream leg before login (SPEC §5, §6).

Bytes from the server go in with `receive_data()` (``b""`` is EOF); complete responses come
out of `next_response()` (None: need more data); `command()` renders a command with a fresh
tag as pieces to send (a synchronising literal — when the server did not offer LITERAL+ —
splits it: each later piece goes after a "+ " continuation). No sockets, no trio, no TLS.

Responses are read by `imap_wire.LineReader` (literals in responses read exactly), bounded:
one response, lines and literals, at most `max_response` (64 KiB) octets, and at most
`max_untagged` (100) untagged responses per command; over either, or on malformed input or
EOF, `ProtocolError`, and the core stays broken.

STARTTLS (response injection, CVE-2021-38371 class): after the tagged answer to STARTTLS,
`has_leftover()` must be False — any byte already received beyond it aborts the leg — and
`reset()` (a fresh parser for the encrypted session) refuses to run while bytes are pending.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ProtocolError
from . import imap_wire as W

_CODE = re.compile(rb"^\[([^\]]*)\]")


@dataclass(frozen=True)
class Response:
    """One server response. `tag`: None for untagged (``*``), ``"+"`` for a continuation,
    else the command's tag. `kind`: OK/NO/BAD/BYE/PREAUTH/CAPABILITY... (upper case; "" for a
    continuation). `code`: the response code inside [...] of a status response, if any."""
    tag: str | None
    kind: str
    text: bytes
    code: str | None
    raw: bytes

    @property
    def untagged(self) -> bool:
        return self.tag is None

    @property
    def continuation(self) -> bool:
        return self.tag == "+"


class IMAPClient:
    def __init__(self, *, max_response: int = W.MAX_COMMAND, max_untagged: int = 100):
        self.max_untagged = max_untagged
        self.capabilities: set[str] = set()
        self._reader = W.LineReader(max_response, server=False)
        self._error: ProtocolError | None = None
        self._untagged = 0
        self._n = 0

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._reader.receive_data(data)

    def next_response(self) -> Response | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Response | None:
        item = self._reader.next()
        if item is W.NEED_DATA:
            return None
        if isinstance(item, W.Closed):
            raise ProtocolError("connection closed")
        if isinstance(item, W.TooBig):
            raise ProtocolError("response too long")
        if isinstance(item, W.Fatal):
            raise ProtocolError(item.reason)
        resp = _parse(item)
        if resp.tag is None:
            self._untagged += 1
            if self._untagged > self.max_untagged:
                raise ProtocolError("too many untagged responses")
            if resp.kind == "CAPABILITY":
                self._set_capabilities(resp.text)
        elif resp.tag != "+":
            self._untagged = 0
        if resp.code is not None and resp.code.upper().startswith("CAPABILITY "):
            self._set_capabilities(resp.code.encode("utf-8", "replace")[11:])
        return resp

    def _set_capabilities(self, text: bytes) -> None:
        self.capabilities = {c.upper() for c in text.decode("ascii", "replace").split()}

    # --- output -----------------------------------------------------------------------------

    def command(self, name: str, *args: bytes) -> tuple[str, list[bytes]]:
        """(tag, pieces) of one command; astring arguments rendered as atoms, quoted strings
        or literals ({N+} when the server offered LITERAL+)."""
        self._n += 1
        tag = f"gw{self._n}"
        pieces = W.render_command(tag.encode(), name.encode("ascii"), list(args),
                                  literal_plus="LITERAL+" in self.capabilities)
        return tag, pieces

    def raw_command(self, text: str) -> tuple[str, bytes]:
        """A command whose arguments we wrote ourselves (ID): no CR/LF/NUL allowed."""
        if any(c in text for c in "\r\n\0"):
            raise ValueError("CR, LF or NUL in an IMAP command")
        self._n += 1
        tag = f"gw{self._n}"
        return tag, f"{tag} {text}\r\n".encode("utf-8")

    # --- STARTTLS -----------------------------------------------------------------------------

    def has_leftover(self) -> bool:
        return self._reader.pending()

    def take_leftover(self) -> bytes:
        return self._reader.take_buffer()

    def reset(self) -> None:
        """A fresh parser (and no capabilities) after the TLS upgrade."""
        if self.has_leftover():
            raise ProtocolError("response injection: bytes received before the TLS handshake")
        self._reader = W.LineReader(self._reader.max_size, server=False)
        self._error = None
        self._untagged = 0
        self.capabilities = set()


def _parse(line: W.Line) -> Response:
    first = line.first
    tag_b, _, rest = first.partition(b" ")
    if tag_b == b"+":
        return Response("+", "", rest, None, line.raw)
    if tag_b == b"*":
        tag = None
    elif W.valid_tag(tag_b):
        tag = tag_b.decode("ascii")
    else:
        raise ProtocolError(f"malformed response: {first[:40]!r}")
    kind_b, _, text = rest.partition(b" ")
    if not kind_b:
        raise ProtocolError(f"malformed response: {first[:40]!r}")
    if tag is None and kind_b.isdigit():        # "* 3 EXISTS"
        kind_b, _, text = text.partition(b" ")
        kind_b = b"#" + kind_b
    kind = kind_b.upper().decode("ascii", "replace")
    if tag is not None and kind not in ("OK", "NO", "BAD"):
        raise ProtocolError(f"malformed tagged response: {first[:40]!r}")
    code = None
    if kind in ("OK", "NO", "BAD", "BYE", "PREAUTH"):
        m = _CODE.match(text)
        if m:
            code = m.group(1).decode("utf-8", "replace")
    return Response(tag, kind, text, code, line.raw)
