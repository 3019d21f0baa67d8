"""The line scanner facade: the compiled cffi core or its pure-Python twin (SPEC §10).

GATEWAY_PURE_PYTHON=1 forces the twin. Otherwise the compiled `gateway._native` is used; if it
is missing, GATEWAY_REQUIRE_NATIVE=1 turns that into an ImportError (CI), else the twin is used.
`BACKEND` says which one is active.
"""
from __future__ import annotations

import os

from . import pyscan
from .pyscan import BARE_CR, BARE_LF, NUL  # noqa: F401  (same values in C)

_lib = _ffi = None
if os.environ.get("GATEWAY_PURE_PYTHON") != "1":
    try:
        from ._native import ffi as _ffi, lib as _lib
    except ImportError:
        if os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1":
            raise ImportError("GATEWAY_REQUIRE_NATIVE=1 but the native core gateway._native "
                              "is not built")


class _NativeDataScanner:
    """DataScanner over the C transducer; same API as pyscan.DataScanner."""

    __slots__ = ("normalize", "_st")

    def __init__(self, normalize: bool = True):
        self.normalize = normalize
        self._st = _ffi.new("gw_data_t *")
        self._st.out_ls = 1

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
        n = len(data)
        if n == 0 or self._st.done:
            return b"", 0
        out = _ffi.new("unsigned char[]", 2 * n + 4)
        outlen = _ffi.new("size_t *")
        used = _lib.gw_data_feed(self._st, _ffi.from_buffer(data), n, out, outlen)
        return _ffi.buffer(out, outlen[0])[:], used


def _native_scan_line(buf, start: int = 0) -> tuple[int, int]:
    if start < 0:
        raise ValueError("start must be >= 0")
    flags = _ffi.new("unsigned int *")
    end = _lib.gw_scan_line(_ffi.from_buffer(buf), len(buf), start, flags)
    return end, flags[0]


def _native_find_literal(line) -> tuple[int, bool]:
    n = _ffi.new("long long *")
    plus = _ffi.new("int *")
    found = _lib.gw_find_literal(_ffi.from_buffer(line), len(line), n, plus)
    if found == 0:
        return -1, False
    return n[0], bool(plus[0])


class native_backend:
    """The compiled implementation under the twin's names (for tests and benchmarks)."""
    scan_line = staticmethod(_native_scan_line)
    find_literal = staticmethod(_native_find_literal)
    DataScanner = _NativeDataScanner


if _lib is not None:
    BACKEND = "native"
    scan_line = _native_scan_line
    find_literal = _native_find_literal
    DataScanner = _NativeDataScanner
else:
    BACKEND = "python"
    native_backend = None  # noqa: F811
    scan_line = pyscan.scan_line
    find_literal = pyscan.find_literal
    DataScanner = pyscan.DataScanner
