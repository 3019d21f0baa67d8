"""cffi build script for the native core (API mode): builds the extension `gateway._native`.

setup.py names it in cffi_modules (cffi exec's this file; it never imports the gateway
package). `python _native/build.py`, from the project root, compiles it alone. Paths are
relative to the project root, where setup.py runs.
"""
import sys

from cffi import FFI

# Exactly the declarations of _native/gateway_native.h (the #defines stay in the header).
CDEF = """
typedef struct {
    int state;
    int out_mid;
    int done;
    unsigned int flags;
    unsigned long long size;
} gw_data_t;
long long gw_scan_line(const unsigned char *buf, size_t len, size_t start);
long long gw_data_feed(gw_data_t *st, const unsigned char *in, size_t inlen,
                       unsigned char *out, size_t outcap, size_t *outlen);
long long gw_find_literal(const unsigned char *line, size_t len);
typedef struct gw_rm gw_rm_t;
typedef struct gw_nm gw_nm_t;
gw_rm_t *gw_rm_new(size_t nrules, const unsigned char *buf, size_t buflen, const size_t *offs,
                   const unsigned char *enabled);
void gw_rm_free(gw_rm_t *m);
int gw_rm_match(const gw_rm_t *m, const unsigned char *s, size_t slen,
                const unsigned char *r, size_t rlen);
int gw_rm_match_many(const gw_rm_t *m, size_t n, const unsigned char *buf, const size_t *offs,
                     int *out);
gw_nm_t *gw_nm_new(size_t n, const unsigned char *addrs, const int *plens,
                   const unsigned char *fams);
void gw_nm_free(gw_nm_t *m);
int gw_nm_match(const gw_nm_t *m, const unsigned char *ip, size_t n);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "gateway._native",
    '#include "gateway_native.h"',
    sources=["_native/scan.c", "_native/match.c"],
    include_dirs=["_native"],
    depends=["_native/gateway_native.h"],
    extra_compile_args=[] if sys.platform == "win32" else ["-O2", "-std=c99", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
