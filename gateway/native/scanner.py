"""The line scanner facade: the compiled cffi core or its pure-Python twin (SPEC §10).

Which one is gateway/native/backend.py's choice (GATEWAY_PURE_PYTHON=1 forces the twin,
`gateway.native.scanner_py`; GATEWAY_REQUIRE_NATIVE=1 makes a compiled core that cannot be
loaded an ImportError here instead of a fallback).

Exports BACKEND ("native" or "python"), the flags BARE_CR/BARE_LF/NUL and scan_line,
find_literal, DataScanner, and server_name (the SNI of a ClientHello, with SNI_MORE/SNI_NONE)
with the semantics documented in gateway/native/scanner_py.py, and VERIFY_ACCEPT_ADDRESS: the
address of the C certificate verify callback `gw_verify_accept` (SPEC §3.3;
gateway/tls/context.py hands it to OpenSSL), or None without the compiled core (the twin has
none: a Python callback is used).
`native_backend` is the compiled implementation under those same names (None when it is not
loaded), so tests and benchmarks can hold the two side by side.

The C functions trust their arguments: the wrappers here check them (with the same errors as
the twin) and pass the caller's buffer with ffi.from_buffer, without copying it.
"""
from __future__ import annotations

import operator

from . import backend, scanner_py
from .scanner_py import BARE_CR, BARE_LF, NUL, SNI_MORE, SNI_NAME_CAP, SNI_NONE, _check_start

__all__ = ["BACKEND", "BARE_CR", "BARE_LF", "NUL", "SNI_MORE", "SNI_NONE", "scan_line",
           "find_literal", "server_name", "DataScanner", "native_backend",
           "VERIFY_ACCEPT_ADDRESS"]

_ffi, _lib = backend.core("scanner")

_FLAG_BITS = 3          # GW_FLAG_BITS: gw_scan_line returns (end << 3) | flags
_KEEP_OUT = 1 << 18     # a scanner keeps an output buffer up to this size between feeds


def _native_scan_line(buf, start: int = 0) -> tuple[int, int]:
    src = _from_buffer(buf)
    if start.__class__ is not int or start < 0:
        start = _check_start(start)
    try:
        r = _scan(src, len(src), start)          # C: -1 when start >= len
    except OverflowError:                        # start beyond size_t: past any buffer
        return -1, 0
    if r < 0:
        return -1, 0
    return r >> _FLAG_BITS, r & 7


def _native_find_literal(line) -> tuple[int, bool]:
    src = _from_buffer(line)
    r = _lib.gw_find_literal(src, len(src))
    if r >= 0:
        return r >> 1, bool(r & 1)
    if r == -1:
        return -1, False
    return -2, r == -3


def _native_server_name(buf, cap: int = SNI_NAME_CAP) -> tuple[int, bytes]:
    src = _from_buffer(buf)
    if cap.__class__ is not int or cap < 0:
        cap = operator.index(cap)
        if cap < 0:
            raise ValueError("cap must be >= 0")
    name = _ffi.new("unsigned char[]", cap or 1)
    r = _lib.gw_tls_server_name(src, len(src), name, cap)
    if r < 0:
        return r, b""
    return r, _ffi.buffer(name, r)[:]


class _NativeDataScanner:
    """scanner_py.DataScanner over the C transducer (same API and results)."""

    __slots__ = ("normalize", "_st", "_outlen", "_out", "_cap")

    def __init__(self, normalize: bool = True):
        self.normalize = normalize
        self._st = _ffi.new("gw_data_t *")          # zeroed: the start of a message
        self._outlen = _ffi.new("size_t *")
        self._out = None
        self._cap = 0

    @property
    def done(self) -> bool:
        return bool(self._st.done)

    @property
    def flags(self) -> int:
        return self._st.flags

    @property
    def size(self) -> int:
        return self._st.size

    def feed(self, data) -> tuple[bytes, int]:
        """Consume *data*: (output for the upstream, input octets consumed)."""
        src = _from_buffer(data)
        n = len(src)
        st = self._st
        if n == 0 or st.done:
            return b"", 0
        need = 2 * n + 4                               # the bound proved in scan.c
        out, cap = self._out, self._cap
        if need > cap:
            out, cap = _alloc("unsigned char[]", need), need
            if need <= _KEEP_OUT:
                self._out, self._cap = out, cap
        used = _lib.gw_data_feed(st, src, n, out, cap, self._outlen)
        if used < 0:                                   # cannot happen: cap >= 2n+4
            raise AssertionError("gw_data_feed: output buffer too small")
        return _ffi.buffer(out, self._outlen[0])[:], used


class _NativeBackend:
    """The compiled implementation under the twin's names (for tests and benchmarks)."""
    BARE_CR, BARE_LF, NUL = BARE_CR, BARE_LF, NUL
    scan_line = staticmethod(_native_scan_line)
    find_literal = staticmethod(_native_find_literal)
    server_name = staticmethod(_native_server_name)
    SNI_MORE, SNI_NONE = SNI_MORE, SNI_NONE
    DataScanner = _NativeDataScanner


if _lib is not None:
    _alloc = _ffi.new_allocator(should_clear_after_alloc=False)
    _from_buffer = _ffi.from_buffer
    _scan = _lib.gw_scan_line
    native_backend = _NativeBackend
    BACKEND = "native"
    scan_line = _native_scan_line
    find_literal = _native_find_literal
    # a build older than the SNI scanner lacks it: its twin then (rebuild to get it)
    server_name = _native_server_name if hasattr(_lib, "gw_tls_server_name") \
        else scanner_py.server_name
    DataScanner = _NativeDataScanner
    # an integer, so the pointer can be cast into pyOpenSSL's own ffi (gateway/tls/_ossl.py);
    # the function lives as long as the loaded module, i.e. the process
    VERIFY_ACCEPT_ADDRESS = (
        int(_ffi.cast("uintptr_t", _ffi.cast("int (*)(int, void *)", _lib.gw_verify_accept)))
        if hasattr(_lib, "gw_verify_accept") else None)
else:
    native_backend = None
    BACKEND = "python"
    scan_line = scanner_py.scan_line
    find_literal = scanner_py.find_literal
    server_name = scanner_py.server_name
    DataScanner = scanner_py.DataScanner
    VERIFY_ACCEPT_ADDRESS = None
