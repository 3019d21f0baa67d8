"""A message as milters see it and change it (SPEC §4.7), sans-IO.

The session's message data arrives dot-stuffed (the server core's `DataChunk`s are already in
upstream framing); milters get it un-stuffed, and the message a milter changed goes back
upstream stuffed again. Both directions run chunk by chunk with one bit of state (whether the
next byte starts a line), since every line end in the gateway's framing is CRLF:

    unstuff = Unstuffer();  plain = unstuff.feed(chunk)       # client -> milters, spool
    stuff = Stuffer();      wire = stuff.feed(plain)          # spool -> upstream

`HeaderSplitter` splits the un-stuffed message into its header fields and body as the bytes
arrive (a field is complete when the next line does not continue it). The header block ends
at the empty line, at a line that is not a header field, or after `MAX_HEADER_BLOCK` octets
(the rest is body, as Postfix's header_size_limit keeps its memory bounded).

`apply_header_edits()` applies a milter's header changes to a list of fields the way Postfix's
cleanup does (indexes count every field, the gateway's own Received: included; a change or
delete counts fields of that name, case-insensitively); `clean_body()` turns a replacement body
into CRLF lines without NUL.
"""
from __future__ import annotations

import re

from .milter import AddHeader, ChangeHeader, InsertHeader

MAX_HEADER_BLOCK = 262144        # octets of header fields held before the rest counts as body

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_NEWLINES = re.compile(rb"\r\n|\r|\n")


class Unstuffer:
    """Dot-stuffed CRLF data -> the message text (a leading dot of each line removed)."""

    __slots__ = ("at_line_start",)

    def __init__(self):
        self.at_line_start = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        start = self.at_line_start
        self.at_line_start = data[-1:] == b"\n"
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n")
        if start and data[:1] == b".":
            data = data[1:]
        return data


class Stuffer:
    """The message text -> dot-stuffed data for the upstream (the final dot is the leg's)."""

    __slots__ = ("at_line_start",)

    def __init__(self):
        self.at_line_start = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        start = self.at_line_start
        self.at_line_start = data[-1:] == b"\n"
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        if start and data[:1] == b".":
            data = b"." + data
        return data


def split_field(field: bytes) -> tuple[str, str]:
    """A header field's name and its value as milters get it: what follows the colon,
    folded lines joined with CRLF."""
    name, _, value = field.partition(b":")
    return (name.rstrip(b" \t").decode("utf-8", "surrogateescape"),
            value.decode("utf-8", "surrogateescape"))


class HeaderSplitter:
    """Incremental split of the message text into header fields and body.

    `feed(data)` returns ``(fields, body)``: the fields completed by this data (raw bytes,
    folding CRLFs kept, without the final CRLF) and body bytes. `eoh` becomes True when the
    header block ended; `separator` is the empty line that ended it (``b"\\r\\n"``) or
    ``b""`` when a non-header line or the size bound ended it. `finish()` at the end of the
    message returns the last field, if the block never ended."""

    def __init__(self, limit: int = MAX_HEADER_BLOCK):
        self.limit = limit
        self.eoh = False
        self.separator = b""
        self._buf = bytearray()
        self._field: bytearray | None = None
        self._size = 0

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        if self.eoh:
            return [], data
        buf = self._buf
        buf += data
        fields: list[bytes] = []
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            if not line:
                self._end(fields, b"\r\n")
                pos = end + 2
                break
            if line[:1] in (b" ", b"\t") and self._field is not None:
                self._field += b"\r\n" + line
            elif _FIELD_NAME.match(line):
                if self._field is not None:
                    fields.append(bytes(self._field))
                self._field = bytearray(line)
            else:                        # not a header field: the body starts here
                self._end(fields, b"")
                break
            self._size += end + 2 - pos
            pos = end + 2
            if self._size > self.limit:
                self._end(fields, b"")
                break
        del buf[:pos]
        if not self.eoh and len(buf) + self._size > self.limit:
            self._end(fields, b"")       # one endless line: the rest is body
        if self.eoh:
            body = bytes(buf)
            buf.clear()
            return fields, body
        return fields, b""

    def _end(self, fields: list[bytes], separator: bytes) -> None:
        if self._field is not None:
            fields.append(bytes(self._field))
            self._field = None
        self.eoh = True
        self.separator = separator

    def finish(self) -> tuple[list[bytes], bytes]:
        """The end of the message: what is still held (the block never ended)."""
        if self.eoh:
            return [], b""
        fields: list[bytes] = []
        self._end(fields, b"")
        body = bytes(self._buf)
        self._buf.clear()
        return fields, body


def _field(name: str, value: str) -> bytes:
    return f"{name}:{value}".encode("utf-8", "surrogateescape")


def _named(fields: list[bytes], name: str) -> list[int]:
    wanted = name.lower().encode("utf-8", "surrogateescape")
    return [i for i, f in enumerate(fields)
            if f.partition(b":")[0].rstrip(b" \t").lower() == wanted]


def apply_header_edits(fields: list[bytes], edits) -> list[bytes]:
    """*fields* after the milter header changes among *edits* (proto.milter's AddHeader,
    InsertHeader, ChangeHeader; others are ignored), in order."""
    out = list(fields)
    for edit in edits:
        if isinstance(edit, AddHeader):
            out.append(_field(edit.name, edit.value))
        elif isinstance(edit, InsertHeader):
            out.insert(min(edit.index, len(out)), _field(edit.name, edit.value))
        elif isinstance(edit, ChangeHeader):
            positions = _named(out, edit.name)
            if edit.index <= len(positions):
                at = positions[edit.index - 1]
                if edit.delete:
                    del out[at]
                else:
                    out[at] = _field(edit.name, edit.value)
            elif not edit.delete:
                out.append(_field(edit.name, edit.value))
    return out


def clean_body(data: bytes) -> bytes:
    """A replacement body as the upstream may get it: CRLF line ends only, no NUL, ending
    with CRLF unless empty."""
    data = _NEWLINES.sub(b"\r\n", data.replace(b"\0", b""))
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data
