"""Where a relayed IMAP server→client stream may take a word of ours (SPEC §9).

After login the gateway relays bytes unparsed. To end such a session politely (a drain, a
reload) it may send `* BYE [UNAVAILABLE] Server shutting down` only between two responses:
never inside a line, never inside a literal (`{n}` announces n raw bytes that belong to the
line), never once COMPRESS may have begun (then the bytes are deflate, not lines).
`ResponseBoundary` follows the stream with that much parsing and nothing more:

    b = ResponseBoundary()
    b.feed(chunk)            # every chunk sent to the client, in order
    b.at_boundary            # True between responses

A line's end is CRLF (a bare LF is accepted as the server's own business); a line whose text
ends with `{n}` or `{n+}` continues after n literal bytes. A partial line is held back only
for its tail (to read a literal's size), so memory stays bounded whatever the server sends.
"""
from __future__ import annotations

from ..native import scanner

_TAIL = 32          # bytes of a partial line kept: enough for "{" 18 digits "+}" and CR


class ResponseBoundary:
    def __init__(self) -> None:
        self._literal = 0          # literal bytes still to come
        self._tail = b""           # the end of the current partial line
        self._mid_line = False     # inside a line (or a line continuing after a literal)
        self.compressed = False    # COMPRESS may be active: never at a boundary again

    @property
    def at_boundary(self) -> bool:
        return not self.compressed and not self._mid_line and self._literal == 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._literal:
                take = min(self._literal, end - pos)
                self._literal -= take
                pos += take
                self._mid_line = True          # the line goes on after its literal
                self._tail = b""
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._tail = (self._tail + bytes(view[pos:]))[-_TAIL:]
                self._mid_line = True
                return
            line_end = (self._tail + bytes(view[max(pos, nl - _TAIL):nl]))[-_TAIL:]
            self._tail = b""
            pos = nl + 1
            if line_end.endswith(b"\r"):
                line_end = line_end[:-1]
            n, _ = scanner.find_literal(line_end)
            if n > 0:
                self._literal = n
                self._mid_line = True
            elif n == 0:
                self._mid_line = True          # `{0}`: the line goes on at once
            elif n < -1:
                self.compressed = True         # a size past any bound: lost track for good
            else:
                self._mid_line = False         # a response (or its last line) ended

    def client_sent(self, data: bytes) -> None:
        """Bytes the client sent upstream: a COMPRESS command means the stream may turn to
        deflate at the server's OK, so the relay never speaks again."""
        if b"COMPRESS" in data.upper():
            self.compressed = True
