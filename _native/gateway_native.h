/* The native core's whole exported API (must match the cdef in build.py). */
#ifndef GATEWAY_NATIVE_H
#define GATEWAY_NATIVE_H
#include <stddef.h>

#define GW_BARE_CR 1
#define GW_BARE_LF 2
#define GW_NUL 4

typedef struct {
    int state;                 /* input state: 0 line start, 1 dot, 2 dot-CR, 3 mid, 4 CR */
    int out_ls;                /* output is at a line start (for re-stuffing) */
    int done;                  /* <CRLF>.<CRLF> seen */
    unsigned int flags;        /* GW_BARE_CR | GW_BARE_LF | GW_NUL seen so far */
    unsigned long long size;   /* raw input octets consumed */
} gw_data_t;

/* End of the line starting at buf[start] (index past its LF) or -1; *flags for that line. */
long gw_scan_line(const unsigned char *buf, size_t len, size_t start, unsigned int *flags);

/* Transform DATA input; out must hold 2*inlen+4 bytes. Returns octets consumed. */
size_t gw_data_feed(gw_data_t *st, const unsigned char *in, size_t inlen,
                    unsigned char *out, size_t *outlen);

/* IMAP literal {n} / {n+} at the end of line: 1 found, 0 none, -2 more than 18 digits. */
int gw_find_literal(const unsigned char *line, size_t len, long long *n, int *plus);

#endif
