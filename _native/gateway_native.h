/* The native core's whole exported API. _native/build.py hands this file, without its
 * preprocessor lines, to cffi's cdef; gateway/native/scanner.py wraps it and checks
 * every argument, so the C functions trust what they get. Semantics:
 * gateway/native/scanner_py.py (scanner), gateway/native/matcher_py.py (rule matcher),
 * gateway/native/perip_py.py (per-address counts); the verify callback has no twin
 * (gateway/tls/context.py uses a Python callback without the native core). */
#ifndef GATEWAY_NATIVE_H
#define GATEWAY_NATIVE_H
#include <stddef.h>

#define GW_BARE_CR 1
#define GW_BARE_LF 2
#define GW_NUL 4
#define GW_FLAG_BITS 3             /* gw_scan_line packs the flags into the low 3 bits */

/* DataScanner state; zero-initialised (cffi's ffi.new) is the start of a message. */
typedef struct {
    int state;                     /* input state: 0 client line start, 1 dot, 2 dot-CR,
                                      3 inside a line, 4 CR pending */
    int out_mid;                   /* the output is NOT at the start of a line */
    int done;                      /* the client's <CRLF>.<CRLF> was seen */
    unsigned int flags;            /* GW_BARE_CR | GW_BARE_LF | GW_NUL seen so far */
    unsigned long long size;       /* raw input octets consumed (the end marker excluded) */
} gw_data_t;

/* The line starting at buf[start] (start < len): -1 if it has no LF yet, else
 * (end << GW_FLAG_BITS) | flags with end the index just past its LF. */
long long gw_scan_line(const unsigned char *buf, size_t len, size_t start);

/* Feed DATA input. Writes the upstream framing to out (outcap must be at least 2*inlen+4)
 * and its length to *outlen; returns the input octets consumed (it stops right after the
 * end marker), or -1 (nothing done) if outcap is too small. */
long long gw_data_feed(gw_data_t *st, const unsigned char *in, size_t inlen,
                       unsigned char *out, size_t outcap, size_t *outlen);

/* IMAP literal {N} / {N+} at the end of line (no CRLF): -1 none; -2 (no '+') or -3 ('+')
 * when N has more than 18 digits; else 2*N + plus. */
long long gw_find_literal(const unsigned char *line, size_t len);

/* The server name (SNI host_name) of the TLS ClientHello at the start of buf (TLS records as
 * a client sends them, the ClientHello possibly spread over several). Returns its length
 * (1..cap, copied to name), GW_SNI_MORE when buf ends before the name could be read, or
 * GW_SNI_NONE: no host name (or one longer than cap), or not a ClientHello, or one longer
 * than GW_SNI_MAX_HELLO. It reads no further than the name. */
#define GW_SNI_MORE (-1)
#define GW_SNI_NONE (-2)
#define GW_SNI_MAX_HELLO 65536
int gw_tls_server_name(const unsigned char *buf, size_t len, unsigned char *name, size_t cap);

/* OpenSSL's certificate verify callback (_native/verify.c, SPEC §3.3): accepts every chain
 * (returns 1), so a handshake never fails on verification; the result is read afterwards with
 * SSL_get_verify_result. x509_store_ctx is OpenSSL's X509_STORE_CTX *, passed through unused.
 * gateway/native/scanner.py exports its address, gateway/tls/_ossl.py hands it to
 * SSL_CTX_set_verify. */
int gw_verify_accept(int preverify_ok, void *x509_store_ctx);

/* Rule matcher (_native/match.c; semantics: gateway/native/matcher_py.py). Opaque compiled tables,
 * freed by gw_rm_free / gw_nm_free. */
typedef struct gw_rm gw_rm_t;
typedef struct gw_nm gw_nm_t;

/* Domain rules. Rule i's sender pattern is buf[offs[2i]:offs[2i+1]], its recipient pattern
 * buf[offs[2i+1]:offs[2i+2]] (offs has 2*nrules+1 entries); enabled[i] != 0 if enabled. The
 * buffer is copied. NULL when out of memory. */
gw_rm_t *gw_rm_new(size_t nrules, const unsigned char *buf, size_t buflen, const size_t *offs,
                   const unsigned char *enabled);
void gw_rm_free(gw_rm_t *m);
/* The first enabled rule matching (sender, recipient), -1 none, -2 out of memory. */
int gw_rm_match(const gw_rm_t *m, const unsigned char *s, size_t slen,
                const unsigned char *r, size_t rlen);
/* out[i] = gw_rm_match of pair i: sender buf[offs[2i]:offs[2i+1]], recipient
 * buf[offs[2i+1]:offs[2i+2]]. Returns -2 if any lookup ran out of memory, else 0. */
int gw_rm_match_many(const gw_rm_t *m, size_t n, const unsigned char *buf, const size_t *offs,
                     int *out);

/* Networks: network i is fams[i] (4 or 6), its address in addrs[16i:16i+16] (IPv4 in the
 * first 4 bytes), prefix length plens[i] (0..32 or 0..128). NULL when out of memory. */
gw_nm_t *gw_nm_new(size_t n, const unsigned char *addrs, const int *plens,
                   const unsigned char *fams);
void gw_nm_free(gw_nm_t *m);
/* The lowest index of a network containing the address text ip[0:n], -1 none or invalid. */
int gw_nm_match(const gw_nm_t *m, const unsigned char *ip, size_t n);

/* Per-address connection counts (_native/perip.c; semantics: gateway/native/perip_py.py). The
 * tables lie in memory shared by all workers: `rows` tables of `slots` entries each (slots a
 * power of two), row r at tables[r * slots * GW_PIP_SLOT]. An entry is a 16-byte address key at
 * offset 0, the listener index (int32, native byte order) at 16 and the count (int32) at 20;
 * count 0 is an empty entry. Row `row` is written only by its worker (linear probing,
 * backward-shift deletion); every row is read.
 *
 * gw_pip_update adds delta (+1, -1 or 0) to the count of (key, listener) in row `row` and
 * returns the sum of that count over all rows afterwards; GW_PIP_FULL when delta is +1 and the
 * row has no free entry, GW_PIP_MISSING when delta is -1 and the row has no such entry (then
 * nothing changed). `seed` keys the hash; every process must use the same one. */
#define GW_PIP_SLOT 24
#define GW_PIP_FULL (-1)
#define GW_PIP_MISSING (-2)
long long gw_pip_update(unsigned char *tables, size_t rows, size_t slots, size_t row,
                        const unsigned char *key, int listener, int delta,
                        unsigned long long seed);

#endif
