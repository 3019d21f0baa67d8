"""Pure-Python twin of the native line scanner (_native/scan.c): same API, same results.

`gateway.native` picks the backend; the tests run both and compare them on generated input.
Buffers may be bytes, bytearray or any C-contiguous buffer (memoryview...), read as bytes.

- scan_line(buf, start=0) -> (end, flags): the line starting at buf[start:] ends just before
  `end` (past its LF), or end == -1 (flags 0) if it has no LF yet. flags: BARE_LF if the LF is
  not preceded by a CR of the line, BARE_CR for any other CR in it, NUL for a 0 byte in it.
- DataScanner(normalize=True).feed(data) -> (output, consumed): SMTP DATA content in, clean
  upstream framing out (see the class).
- find_literal(line) -> (N, plus) for an IMAP line (no CRLF) ending in {N} or {N+};
  (-2, plus) if N has more than 18 digits; (-1, False) if there is none.
"""
from __future__ import annotations

import operator
import re

BARE_CR = 1
BARE_LF = 2
NUL = 4

__all__ = ["BARE_CR", "BARE_LF", "NUL", "scan_line", "find_literal", "DataScanner"]

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
