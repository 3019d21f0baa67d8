"""Pure-Python twin of the native line scanner (_native/scan.c). Same API, same results.

`gateway.native` chooses between the two; tests compare them on generated input.
"""
from __future__ import annotations

import re

BARE_CR = 1
BARE_LF = 2
NUL = 4

# DataScanner input states (the C core uses the same numbers)
_LS, _DOT, _DOTCR, _MID, _CR = 0, 1, 2, 3, 4
_SPECIAL = re.compile(rb"[\r\n\x00]")
_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
_CRLF = b"\r\n"


def scan_line(buf, start: int = 0) -> tuple[int, int]:
    """End of the line starting at buf[start:] (index past its LF) and its flags; (-1, 0)."""
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
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
    """IMAP literal announced at the end of *line* (no CRLF): (n, plus), (-2, plus) if n has
    more than 18 digits, (-1, False) if none."""
    m = _LITERAL.search(bytes(line))
    if m is None:
        return -1, False
    digits, plus = m.group(1), m.group(2) == b"+"
    if len(digits) > 18:
        return -2, plus
    return int(digits), plus


class DataScanner:
    """Streaming SMTP DATA transducer: finds the client's <CRLF>.<CRLF>, un-stuffs the
    client's dot-stuffing and emits clean upstream framing (CRLF only, NUL removed, every line
    starting with '.' stuffed again). `flags` collects BARE_CR/BARE_LF/NUL, `size` counts the
    raw input octets of the message (stuffing included, the final ".\\r\\n" excluded)."""

    def __init__(self, normalize: bool = True):
        self.normalize = normalize
        self.done = False
        self.flags = 0
        self.size = 0
        self._state = _LS
        self._out_ls = True          # the output is at the start of a line

    def feed(self, data) -> tuple[bytes, int]:
        if self.done:
            return b"", 0
        buf = bytes(data)
        n = len(buf)
        out = bytearray()
        st, ols, flags = self._state, self._out_ls, self.flags
        i = 0
        done = False
        while i < n:
            if st == _MID:
                m = _SPECIAL.search(buf, i)
                j = m.start() if m else n
                if j > i:
                    if ols and buf[i] == 0x2E:
                        out += b"."
                    out += buf[i:j]
                    ols = False
                    i = j
                    continue
                b = buf[i]
                i += 1
                if b == 13:
                    st = _CR
                elif b == 10:
                    flags |= BARE_LF
                    out += _CRLF
                    ols = True
                else:
                    flags |= NUL
                continue
            b = buf[i]
            if st == _LS:
                if b == 0x2E:
                    st = _DOT
                    i += 1
                else:
                    st = _MID
            elif st == _DOT:               # the leading dot is deleted (un-stuffed)
                if b == 13:
                    st = _DOTCR
                    i += 1
                else:
                    st = _MID
            elif st == _DOTCR:
                if b == 10:
                    i += 1
                    done = True
                    break
                flags |= BARE_CR
                out += _CRLF
                ols = True
                st = _MID
            else:                          # _CR
                out += _CRLF
                ols = True
                if b == 10:
                    i += 1
                    st = _LS
                else:
                    flags |= BARE_CR
                    st = _MID
        self._state, self._out_ls, self.flags = st, ols, flags
        self.size += i
        if done:
            self.done = True
            self.size -= 3
        return bytes(out), i
