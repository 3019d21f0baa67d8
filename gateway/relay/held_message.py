"""The message held while milters read it (SPEC §4.7): header fields in memory, the body in a
`Spool` (memory up to `milter_memory`, then an unlinked file), the milters' changes applied
between one milter and the next, and the result read back for the next milter (`chunks()`:
the message text) or for the upstream (`upstream_chunks()`: dot-stuffed).

A milter's replacement body goes into a `ReplacementBody` as it arrives (a `Spool` of its
own, CRLF lines without NUL, as `clean_body` makes them, at most `limit` octets); the hook
hands it over as one of the milter's edits and `apply()` makes it the body."""
from __future__ import annotations

import re

from ..proto.message import HeaderSplitter, Stuffer, apply_header_edits, clean_body
from ..proto.milter import ChangeLimitError, ReplaceBody
from .spool import READ_SIZE, Spool

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


class ReplacementBody:
    """A milter's new body as its REPLBODY pieces arrive: spooled (memory up to *memory*,
    then an unlinked file in *spool_dir*), line ends made CRLF and NULs dropped across piece
    boundaries, ending with CRLF unless empty (`clean_body`, streamed). More than *limit*
    octets is a `ChangeLimitError` (the milter fails). `close()` unless handed to
    `HeldMessage.apply()`, which takes the spool."""

    def __init__(self, spool_dir: str, memory: int, limit: int):
        self.spool_dir = spool_dir
        self.memory = memory
        self.limit = limit
        self.started = False            # a REPLBODY came (an empty one too)
        self._spool: Spool | None = None
        self._cr = False                # the last piece ended in CR
        self._last = b""                # the last two octets written

    @property
    def size(self) -> int:
        return self._spool.size + (2 if self._cr else 0) if self._spool is not None else 0

    def write(self, data: bytes) -> None:
        self.started = True
        if self._spool is None:
            self._spool = Spool(self.spool_dir, self.memory)
        data = data.replace(b"\0", b"")
        if not data:
            return
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        data = _LINE_ENDS.sub(b"\r\n", data)
        self._put(data)

    def _put(self, data: bytes) -> None:
        if not data:
            return
        if self._spool.size + len(data) > self.limit:
            raise ChangeLimitError(f"a replacement body of more than {self.limit} octets "
                                   "(max_message_size)")
        self._spool.write(data)
        self._last = (self._last + data)[-2:]

    def finish(self) -> None:
        """The end of the pieces: a final CR becomes CRLF, an unended last line is ended."""
        if self._spool is None:
            return
        if self._cr:
            self._cr = False
            self._put(b"\r\n")
        if self._spool.size and self._last != b"\r\n":
            self._put(b"\r\n")

    def take(self) -> Spool:
        spool, self._spool = self._spool, None
        return spool if spool is not None else Spool(self.spool_dir, self.memory)

    def close(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

QUARANTINE_HEADER = "X-Gateway-Quarantine"


class HeldMessage:
    def __init__(self, spool_dir: str, memory: int):
        self.spool_dir = spool_dir
        self.memory = memory
        self.fields: list[bytes] = []       # header fields, folding kept, no final CRLF
        self.separator = b""                # the empty line after them (b"" when none)
        self.body = Spool(spool_dir, memory)
        self._splitter: HeaderSplitter | None = HeaderSplitter()

    def feed(self, text: bytes) -> None:
        """Message text as it arrives (CRLF lines, not dot-stuffed). SpoolError when the
        spool cannot take it."""
        splitter = self._splitter
        if splitter is not None:
            fields, text = splitter.feed(text)
            self.fields.extend(fields)
            if splitter.eoh:
                self.separator = splitter.separator
                self._splitter = None
        self.body.write(text)

    def finish(self) -> None:
        """The end of the message: a header block that never ended ends here."""
        splitter, self._splitter = self._splitter, None
        if splitter is not None:
            fields, rest = splitter.finish()
            self.fields.extend(fields)
            self.separator = splitter.separator
            self.body.write(rest)

    def header_block(self) -> bytes:
        return b"".join(f + b"\r\n" for f in self.fields) + self.separator

    def header_size(self) -> int:
        return sum(len(f) + 2 for f in self.fields) + len(self.separator)

    def chunks(self, size: int = READ_SIZE):
        """The message text: the header block (in pieces of about *size* octets: milters
        may have made it large), then the body."""
        piece: list[bytes] = []
        held = 0
        for f in self.fields:
            piece.append(f + b"\r\n")
            held += len(f) + 2
            if held >= size:
                yield b"".join(piece)
                piece, held = [], 0
        piece.append(self.separator)
        yield b"".join(piece)
        yield from self.body.chunks(size)

    def upstream_chunks(self, size: int = READ_SIZE):
        """The message as it goes upstream after DATA: dot-stuffed, without the final dot."""
        stuff = Stuffer()
        for chunk in self.chunks(size):
            if chunk:
                yield stuff.feed(chunk)

    def apply(self, edits) -> None:
        """One milter's header and body changes (envelope changes are the session's)."""
        self.fields = apply_header_edits(self.fields, edits)
        for edit in edits:
            if isinstance(edit, ReplacementBody):
                self.body.close()
                self.body = edit.take()
                if self.body.size and not self.separator:
                    self.separator = b"\r\n"
        pieces = [e.data for e in edits if isinstance(e, ReplaceBody)]
        if pieces:
            body = Spool(self.spool_dir, self.memory)
            try:
                body.write(clean_body(b"".join(pieces)))
            except BaseException:
                body.close()
                raise
            self.body.close()
            self.body = body
            if body.size and not self.separator:
                self.separator = b"\r\n"

    def quarantine(self, notes) -> None:
        """`X-Gateway-Quarantine: <milter>: <reason>` at the top, one per note."""
        self.fields[:0] = [f"{QUARANTINE_HEADER}: {note}".encode("utf-8", "surrogateescape")
                           for note in notes]

    @property
    def on_disk(self) -> bool:
        return self.body.on_disk

    def close(self) -> None:
        self.body.close()
