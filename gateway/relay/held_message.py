"""The message held while milters read it (SPEC §4.7): header fields in memory, the body in a
`Spool` (memory up to `milter_memory`, then an unlinked file), the milters' changes applied
between one milter and the next, and the result read back for the next milter (`chunks()`:
the message text) or for the upstream (`upstream_chunks()`: dot-stuffed)."""
from __future__ import annotations

from ..proto.message import HeaderSplitter, Stuffer, apply_header_edits, clean_body
from ..proto.milter import ReplaceBody
from .spool import READ_SIZE, Spool

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

    def chunks(self, size: int = READ_SIZE):
        """The message text: the header block, then the body."""
        yield self.header_block()
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
