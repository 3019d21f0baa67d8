"""cffi build script for the native core (API mode): builds the extension `gateway._native`.

setup.py names it in cffi_modules (cffi exec's this file; it never imports the gateway
package). `python _native/build.py`, from the project root, compiles it alone. Paths are
relative to the project root, where setup.py runs.
"""
import sys

from cffi import FFI

HEADER = "_native/gateway_native.h"


def _declarations(path: str) -> str:
    """The header's C declarations for cffi's cdef: the header without its preprocessor
    lines (cffi drops the comments itself), so the API is written down once."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


CDEF = _declarations(HEADER)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "gateway._native",
    '#include "gateway_native.h"',
    sources=["_native/scan.c", "_native/match.c", "_native/verify.c", "_native/perip.c"],
    include_dirs=["_native"],
    depends=[HEADER],
    extra_compile_args=[] if sys.platform == "win32" else ["-O2", "-std=c99", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
