"""cffi build script for the native core (API mode). setup.py names it in cffi_modules;
it is exec'd by cffi's setuptools integration and never imports the gateway package."""

from cffi import FFI


ffibuilder = FFI()
ffibuilder.cdef("""
typedef struct {
    int state;
    int out_ls;
    int done;
    unsigned int flags;
    unsigned long long size;
} gw_data_t;
long gw_scan_line(const unsigned char *buf, size_t len, size_t start, unsigned int *flags);
size_t gw_data_feed(gw_data_t *st, const unsigned char *in, size_t inlen,
                    unsigned char *out, size_t *outlen);
int gw_find_literal(const unsigned char *line, size_t len, long long *n, int *plus);
""")
ffibuilder.set_source(
    "gateway._native",
    '#include "gateway_native.h"',
    sources=["_native/scan.c"],     # relative to the project root (setup.py)
    include_dirs=["_native"],
    extra_compile_args=["-O2", "-std=c99", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
