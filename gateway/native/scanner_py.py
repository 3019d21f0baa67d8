"""Pure-Python twin of the native line scanner (_native/scan.c): same API, same results.

`gateway.native.scanner` picks the backend; the tests run both and compare them on generated input.
Buffers may be bytes, bytearray or any C-contiguous buffer (memoryview...), read as bytes.

- scan_line(buf, start=0) -> (end, flags): the line starting at buf[start:] ends just before
  `end` (past its LF), or end == -1 (flags 0) if it has no LF yet. flags: BARE_LF if the LF is
  not preceded by a CR of the line, BARE_CR for any other CR in it, NUL for a 0 byte in it.
- DataScanner(normalize=True).feed(data) -> (output, consumed): SMTP DATA content in, clean
  upstream framing out (see the class).
- find_literal(line) -> (N, plus) for an IMAP line (no CRLF) ending in {N} or {N+};
  (-2, plus) if N has more than 18 digits; (-1, False) if there is none.
- server_name(buf, cap=255) -> (n, name): the SNI host name of the TLS ClientHello at the
  start of *buf* (n = len(name) >= 1), or (SNI_MORE, b"") when *buf* ends before it could be
  read, or (SNI_NONE, b"") when there is none (see the function).
"""
from __future__ import annotations

import operator
import re

BARE_CR = 1
BARE_LF = 2
NUL = 4

SNI_MORE = -1
SNI_NONE = -2
SNI_MAX_HELLO = 65536
SNI_NAME_CAP = 255

__all__ = ["BARE_CR", "BARE_LF", "NUL", "SNI_MORE", "SNI_NONE", "scan_line", "find_literal",
           "server_name", "DataScanner"]

# DataScanner input states (the same numbers as in scan.c)
_LS, _DOT, _DOTCR, _MID, _CR = 0, 1, 2, 3, 4
_SPECIAL = re.compile(rb"[\r\n\x00]")
_CRLF = b"\r\n"


def _as_bytes(obj) -> bytes | bytearray:
    """bytes/bytearray as they are; any other buffer copied. Same errors as ffi.from_buffer:
    TypeError for a non-buffer (str, int...), BufferError for a non-contiguous one."""
    if type(obj) is bytes or type(obj) is bytearray:
        return obj
    view = memoryview(obj)
    if not view.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    return view.tobytes()


def _check_start(start) -> int:
    start = operator.index(start)
    if start < 0:
        raise ValueError("start must be >= 0")
    return start


def scan_line(buf, start: int = 0) -> tuple[int, int]:
    """End of the line starting at buf[start:] (index past its LF) and its flags; (-1, 0)."""
    buf = _as_bytes(buf)
    start = _check_start(start)
    end = buf.find(b"\n", start)
    if end < 0:
        return -1, 0
    flags = 0
    body_end = end
    if end > start and buf[end - 1] == 13:
        body_end = end - 1
    else:
        flags |= BARE_LF
    if buf.find(b"\r", start, body_end) >= 0:
        flags |= BARE_CR
    if buf.find(b"\0", start, end) >= 0:
        flags |= NUL
    return end + 1, flags


def find_literal(line) -> tuple[int, bool]:
    """IMAP literal announced at the end of *line* (without CRLF): (N, plus); (-2, plus) if N
    has more than 18 digits; (-1, False) if the line does not end with {N} or {N+}."""
    line = _as_bytes(line)
    if not line.endswith(b"}"):
        return -1, False
    brace = line.rfind(b"{")                # digits and '+' hold no '{': the last one it is
    if brace < 0:
        return -1, False
    inner = line[brace + 1:-1]
    plus = inner.endswith(b"+")
    digits = inner[:-1] if plus else inner
    if not digits or not digits.isdigit():  # bytes.isdigit(): ASCII 0-9 only
        return -1, False
    if len(digits) > 18:
        return -2, plus
    return int(digits), plus


class DataScanner:
    """Streaming SMTP DATA transducer (the input may be split at any byte).

    It starts at a client line start (the CRLF of the DATA command counts). Only the client's
    <CRLF>.<CRLF> ends the data; feed() stops consuming right after it, so what follows (a
    pipelined command) stays with the caller. At real client line starts (after CRLF) a
    leading '.' not followed by CRLF is deleted (RFC 5321 4.5.2 un-stuffing). The output is
    always clean framing: CRLF line ends only (a bare CR or LF becomes CRLF), no NUL, and every
    output line that starts with '.' gets another '.', so no output line is a lone '.'. It
    holds the CRLF of the last content line, not the final ".\\r\\n" (the caller sends that).

    done: the end marker was seen. flags: BARE_CR | BARE_LF | NUL seen in the message.
    size: raw input octets consumed before the end marker (stuffing included, marker
    excluded). `normalize` is kept for API symmetry: the output is normalized either way and
    the caller rejects by `flags`.
    """

    def __init__(self, normalize: bool = True):
        self.normalize = normalize
        self.done = False
        self.flags = 0
        self.size = 0
        self._state = _LS
        self._mid = False            # the output is inside a line (not at a line start)

    def feed(self, data) -> tuple[bytes, int]:
        """Consume *data*: (output for the upstream, input octets consumed)."""
        buf = _as_bytes(data)
        if self.done:
            return b"", 0
        n = len(buf)
        out = bytearray()
        st, mid, flags = self._state, self._mid, self.flags
        i = 0
        done = False
        while i < n:
            if st == _MID:
                m = _SPECIAL.search(buf, i)
                j = m.start() if m else n
                if j > i:                      # ordinary bytes, copied
                    if not mid and buf[i] == 0x2E:
                        out += b"."            # re-stuff an output line start
                    out += buf[i:j]
                    mid = True
                    i = j
                    continue
                b = buf[i]
                i += 1
                if b == 13:
                    st = _CR                   # decided by the next byte
                elif b == 10:
                    flags |= BARE_LF
                    out += _CRLF
                    mid = False                # an output line start, not a client one
                else:
                    flags |= NUL               # removed
                continue
            b = buf[i]
            if st == _LS:                      # client line start
                if b == 0x2E:
                    st = _DOT
                    i += 1
                else:
                    st = _MID
            elif st == _DOT:                   # leading dot: deleted unless CRLF follows
                if b == 13:
                    st = _DOTCR
                    i += 1
                else:
                    st = _MID
            elif st == _DOTCR:
                if b == 10:                    # <CRLF>.<CRLF>: the end
                    i += 1
                    done = True
                    break
                flags |= BARE_CR               # dot deleted, the CR is bare; b handled again
                out += _CRLF
                mid = False
                st = _MID
            else:                              # _CR pending
                out += _CRLF
                mid = False
                if b == 10:
                    i += 1
                    st = _LS
                else:
                    flags |= BARE_CR           # b handled again
                    st = _MID
        self._state, self._mid, self.flags = st, mid, flags
        self.size += i
        if done:
            self.done = True
            self.size -= 3                     # ".\r\n"; the CRLF before it is content
        return bytes(out), i


class _NeedMore(Exception):
    pass


class _NoName(Exception):
    pass


class _HelloReader:
    """The handshake bytes of consecutive TLS handshake records, read only as far as needed:
    a record header is looked at when the first byte after the previous record is wanted
    (as in scan.c). `left` counts what remains of the ClientHello message."""

    __slots__ = ("buf", "pos", "end", "left")

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0
        self.end = 0
        self.left = 4                    # the handshake header

    def _ready(self) -> None:
        buf = self.buf
        if self.pos >= self.end:
            h = self.end
            if h + 5 > len(buf):
                raise _NeedMore
            if buf[h] != 22 or buf[h + 1] != 3:
                raise _NoName            # not a handshake record
            reclen = (buf[h + 3] << 8) | buf[h + 4]
            if reclen == 0 or reclen > 16384:
                raise _NoName
            self.pos = h + 5
            self.end = self.pos + reclen
        if self.pos >= len(buf):
            raise _NeedMore

    def take(self, n: int) -> bytes:
        if self.left < n:
            raise _NoName
        parts = []
        while n > 0:
            self._ready()
            stop = min(self.end, len(self.buf), self.pos + n)
            parts.append(self.buf[self.pos:stop])
            got = stop - self.pos
            self.pos = stop
            self.left -= got
            n -= got
        return b"".join(parts)

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _server_name(r: _HelloReader, cap: int) -> bytes:
    if r.num(1) != 1:                    # handshake type: ClientHello
        raise _NoName
    length = r.num(3)
    if length > SNI_MAX_HELLO:
        raise _NoName
    r.left = length
    r.take(2 + 32)                       # legacy_version, random
    n = r.num(1)                         # legacy_session_id
    if n > 32:
        raise _NoName
    r.take(n)
    r.take(r.num(2))                     # cipher_suites
    r.take(r.num(1))                     # legacy_compression_methods
    if r.left == 0:
        raise _NoName                    # no extensions at all
    ext_left = r.num(2)
    if ext_left > r.left:
        raise _NoName
    while ext_left >= 4:
        kind = r.num(2)
        elen = r.num(2)
        ext_left -= 4
        if elen > ext_left:
            raise _NoName
        ext_left -= elen
        if kind != 0:
            r.take(elen)
            continue
        if elen < 2:                     # server_name: a ServerNameList
            raise _NoName
        list_left = r.num(2)
        if list_left > elen - 2:
            raise _NoName
        while list_left >= 3:
            name_type = r.num(1)
            nlen = r.num(2)
            list_left -= 3
            if nlen > list_left:
                raise _NoName
            list_left -= nlen
            if name_type == 0:           # host_name
                if nlen == 0 or nlen > cap:
                    raise _NoName
                return r.take(nlen)
            r.take(nlen)
        raise _NoName
    raise _NoName


def server_name(buf, cap: int = SNI_NAME_CAP) -> tuple[int, bytes]:
    """The SNI host name of the TLS ClientHello at the start of *buf* (TLS records as a client
    sends them; the ClientHello may be spread over several).

    (len(name), name) once the name has been read; (SNI_MORE, b"") when *buf* ends before it
    could be; (SNI_NONE, b"") when there is none: no server_name extension or no host_name
    in it, a name longer than *cap*, a ClientHello longer than SNI_MAX_HELLO, or not a
    ClientHello at all (OpenSSL then says what is wrong). Nothing after the name is read."""
    buf = _as_bytes(buf)
    cap = operator.index(cap)
    if cap < 0:
        raise ValueError("cap must be >= 0")
    try:
        name = _server_name(_HelloReader(buf), cap)
    except _NeedMore:
        return SNI_MORE, b""
    except _NoName:
        return SNI_NONE, b""
    return len(name), bytes(name)
