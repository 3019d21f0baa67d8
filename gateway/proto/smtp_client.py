"""Sans-IO SMTP client core: the gateway's side of the upstream leg (SPEC §4.5, §6).

Bytes from the server go in with `receive_data()`; complete replies come out of
`next_reply()`. Reply lines are cut at 512 octets (the rest of the line is dropped as it
arrives, so a hostile server cannot grow the buffer) and a reply of more than 100 lines is a
protocol error. After the one reply to STARTTLS, `has_leftover()` tells whether the server sent
anything more before the handshake: that is response injection and the leg must be aborted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ProtocolError

MAX_LINE = 512
MAX_LINES = 100
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]          # text of each line, without code and separator

    @property
    def text(self) -> str:
        return self.lines[0] if self.lines else ""

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.text)
        return m.group(1) if m else None

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400


class SMTPClient:
    def __init__(self):
        self._buf = bytearray()
        self._lines: list[tuple[int, bool, str]] = []   # (code, last, text) of the open reply
        self._skipping = False                           # dropping the tail of a long line
        self._eof = False
        self.pending = 0

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1:]
            self._skipping = False
            self._buf += b"\n"                          # the truncated line ends here
        self._buf += data
        self._trim()

    def _trim(self) -> None:
        """Bound the partial last line to MAX_LINE octets."""
        last = self._buf.rfind(b"\n") + 1
        if len(self._buf) - last > MAX_LINE + 2:
            del self._buf[last + MAX_LINE:]
            self._skipping = True

    def next_reply(self) -> Reply | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if self._skipping and self._buf:
                    return None
                if self._eof:
                    raise ProtocolError("connection closed")
                return None
            raw = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            raw = raw[:MAX_LINE]
            code, last, text = self._parse_line(raw)
            if self._lines and self._lines[0][0] != code:
                raise ProtocolError(f"reply code changed within a reply: {raw[:40]!r}")
            self._lines.append((code, last, text))
            if len(self._lines) > MAX_LINES:
                raise ProtocolError("reply too long")
            if last:
                lines, self._lines = self._lines, []
                self.pending = max(0, self.pending - 1)
                return Reply(code, tuple(t for _, _, t in lines))

    @staticmethod
    def _parse_line(raw: bytes) -> tuple[int, bool, str]:
        if len(raw) < 3 or not raw[:3].isdigit() or raw[0:1] not in b"2345":
            raise ProtocolError(f"malformed reply line: {raw[:40]!r}")
        sep = raw[3:4]
        if sep not in (b"", b" ", b"-"):
            raise ProtocolError(f"malformed reply line: {raw[:40]!r}")
        return int(raw[:3]), sep != b"-", raw[4:].decode("utf-8", "replace")

    def send(self, command: str) -> bytes:
        if "\r" in command or "\n" in command:
            raise ValueError("CR or LF inside an SMTP command")
        self.pending += 1
        return command.encode("utf-8", "surrogateescape") + b"\r\n"

    def has_leftover(self) -> bool:
        return bool(self._buf) or bool(self._lines)

    def take_leftover(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def reset(self) -> None:
        """A fresh parser after the TLS upgrade (the leftover must have been checked)."""
        self._buf.clear()
        self._lines = []
        self._skipping = False
        self.pending = 0

    @staticmethod
    def parse_ehlo(reply: Reply) -> dict[str, str]:
        ext: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                ext[keyword.upper()] = params
        return ext
