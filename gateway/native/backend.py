"""The compiled core `gateway._native`, loaded once for the line scanner, the rule matcher and
the per-address connection counts (SPEC §10, §2).

GATEWAY_PURE_PYTHON=1: the compiled module is not even imported; every part uses its
pure-Python twin (`gateway.native.scanner_py`, `gateway.native.matcher_py`,
`gateway.native.perip_py`). Otherwise `gateway._native` is imported here, once. A part it
cannot provide (the import fails, or an older build lacks the part's functions) uses its twin,
unless GATEWAY_REQUIRE_NATIVE=1 (CI): then importing that part's facade
(`gateway.native.scanner`, `gateway.native.matcher`, `gateway.native.perip`) raises
ImportError.

    SCANNER, MATCHER, PERIP
                        "native" or "python": what the line scanner / the rule matcher / the
                        per-address counts use
    core(part)          (ffi, lib) for "scanner", "matcher" or "perip", or (None, None) for
                        the twin;
                        ImportError as above (the facades call it once, at import)
"""
from __future__ import annotations

import os

__all__ = ["MATCHER", "PERIP", "PURE_PYTHON", "REQUIRE_NATIVE", "SCANNER", "core"]

PURE_PYTHON = os.environ.get("GATEWAY_PURE_PYTHON") == "1"
REQUIRE_NATIVE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"

# part -> (a C function the part needs, its name in messages, what GATEWAY_REQUIRE_NATIVE's
# error says cannot be imported)
_PARTS = {
    "scanner": ("gw_scan_line", "line scanner", "the native core gateway._native"),
    "matcher": ("gw_rm_new", "rule matcher", "the native rule matcher in gateway._native"),
    "perip": ("gw_pip_update", "per-address counts",
              "the native per-address counts in gateway._native"),
}

_ffi = _lib = None
_import_error: ImportError | None = None
if not PURE_PYTHON:
    try:
        from .._native import ffi as _ffi, lib as _lib
    except ImportError as exc:
        _ffi = _lib = None
        _import_error = exc


def _problem(part: str) -> ImportError | None:
    """Why *part* cannot use the compiled core (None: it can). Not for PURE_PYTHON."""
    if _lib is None:
        return _import_error
    symbol, name, _ = _PARTS[part]
    if not hasattr(_lib, symbol):
        return ImportError(f"gateway._native was built without the {name} (rebuild it)")
    return None


def core(part: str):
    """(ffi, lib) of the compiled core for *part* ("scanner", "matcher" or "perip"), or
    (None, None) when the pure-Python twin is to be used; ImportError when
    GATEWAY_REQUIRE_NATIVE=1 and the compiled part cannot be loaded."""
    if part not in _PARTS:
        raise ValueError(f"unknown part {part!r}: expected one of {', '.join(_PARTS)}")
    if PURE_PYTHON:
        return None, None
    problem = _problem(part)
    if problem is None:
        return _ffi, _lib
    if REQUIRE_NATIVE:
        raise ImportError(f"GATEWAY_REQUIRE_NATIVE=1 but {_PARTS[part][2]} cannot be imported: "
                          f"{problem}") from problem
    return None, None


def _which(part: str) -> str:
    return "python" if PURE_PYTHON or _problem(part) is not None else "native"


SCANNER = _which("scanner")
MATCHER = _which("matcher")
PERIP = _which("perip")
