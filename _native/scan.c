/* Line scanner for the gateway's hot path (SPEC section 10). The semantics are those of
 * gateway/native/scanner_py.py, its pure-Python twin; the tests compare the two on generated input.
 * Arguments are checked by gateway/native/scanner.py before they get here. */
#include <string.h>
#include "gateway_native.h"

enum { LS = 0, DOT = 1, DOTCR = 2, MID = 3, CR = 4 };

/* Bytes that stop the copy loop inside a line. */
static const unsigned char special[256] = { [0] = 1, ['\n'] = 1, ['\r'] = 1 };

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* The index of the first special byte in in[i..n), or n. With SSE2 (every x86-64) 16 bytes
 * are compared at a time: most of a message is plain text between CRLFs. */
static size_t skip_plain(const unsigned char *in, size_t i, size_t n)
{
#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n'), nul = _mm_setzero_si128();
    while (i + 16 <= n) {
        __m128i v = _mm_loadu_si128((const __m128i *)(in + i));
        __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)),
                                   _mm_cmpeq_epi8(v, nul));
        int mask = _mm_movemask_epi8(hit);
        if (mask != 0)
            return i + (size_t)__builtin_ctz((unsigned int)mask);
        i += 16;
    }
#endif
    while (i < n && !special[in[i]])
        i++;
    return i;
}

long long gw_scan_line(const unsigned char *buf, size_t len, size_t start)
{
    const unsigned char *p, *lf;
    size_t end, body_end;
    unsigned int f = 0;

    if (start >= len)
        return -1;
    p = buf + start;
    lf = memchr(p, '\n', len - start);
    if (lf == NULL)
        return -1;
    end = (size_t)(lf - buf);                   /* index of the LF */
    body_end = end;
    if (end > start && buf[end - 1] == '\r')
        body_end = end - 1;                     /* the line's own CRLF */
    else
        f |= GW_BARE_LF;
    /* body_end stops before the first LF, so every CR before it is not followed by LF */
    if (memchr(p, '\r', body_end - start) != NULL)
        f |= GW_BARE_CR;
    if (memchr(p, 0, end - start) != NULL)
        f |= GW_NUL;
    return ((long long)(end + 1) << GW_FLAG_BITS) | f;
}

/* Output bound: o <= 2*inlen + 2 <= outcap. Charge every output byte to an input byte:
 *  - a run of k >= 1 ordinary bytes inside a line emits k, plus one re-stuffing '.' at most:
 *    <= 2k, so <= 2 per byte;
 *  - a bare LF inside a line emits CRLF: 2 for 1 byte;
 *  - a CR (inside a line, or the CR of a leading ".\r") emits nothing when consumed; exactly
 *    one CRLF (2 bytes) is emitted for it later, when the next byte is looked at (that byte
 *    is then either consumed as its LF, emitting nothing more, or handled again as an
 *    ordinary byte and charged for itself); charge those 2 bytes to the CR;
 *  - a leading '.', a NUL, the LF after a CR and the final LF of the marker emit nothing.
 * So each byte consumed by this call is charged at most 2, except that the CRLF of a CR
 * consumed by the PREVIOUS call (state CR or DOTCR on entry: one CR at most) lands in this
 * call's output: 2 more. Total <= 2*inlen + 2, within the 2*inlen + 4 the caller provides
 * (and that gw_data_feed checks before writing anything). */
long long gw_data_feed(gw_data_t *s, const unsigned char *in, size_t n,
                       unsigned char *out, size_t outcap, size_t *outlen)
{
    size_t i = 0, o = 0;
    int st, mid, done = 0;
    unsigned int flags;

    *outlen = 0;
    if (outcap < 4 || (outcap - 4) / 2 < n)
        return -1;
    if (s->done)
        return 0;
    st = s->state;
    mid = s->out_mid;
    flags = s->flags;
    while (i < n) {
        unsigned char b = in[i];
        switch (st) {
        case MID:
            if (!special[b]) {
                size_t j = skip_plain(in, i + 1, n);
                if (!mid && b == '.')
                    out[o++] = '.';             /* re-stuff an output line start */
                memcpy(out + o, in + i, j - i);
                o += j - i;
                mid = 1;
                i = j;
            } else if (b == '\r') {
                st = CR;                        /* decided by the next byte */
                i++;
            } else if (b == '\n') {
                flags |= GW_BARE_LF;
                out[o++] = '\r';
                out[o++] = '\n';
                mid = 0;                        /* an output line start, not a client one */
                i++;
            } else {
                flags |= GW_NUL;                /* removed */
                i++;
            }
            break;
        case LS:                                /* client line start: after CRLF, or first */
            if (b == '.') {
                st = DOT;
                i++;
            } else {
                st = MID;
            }
            break;
        case DOT:                               /* leading dot: deleted unless CRLF follows */
            if (b == '\r') {
                st = DOTCR;
                i++;
            } else {
                st = MID;
            }
            break;
        case DOTCR:
            if (b == '\n') {                    /* <CRLF>.<CRLF>: the end */
                i++;
                done = 1;
                goto finished;
            }
            flags |= GW_BARE_CR;                /* ".\r" + other: dot deleted, CR is bare */
            out[o++] = '\r';
            out[o++] = '\n';
            mid = 0;
            st = MID;                           /* b is handled again */
            break;
        default:                                /* CR pending */
            out[o++] = '\r';
            out[o++] = '\n';
            mid = 0;
            if (b == '\n') {
                i++;
                st = LS;
            } else {
                flags |= GW_BARE_CR;
                st = MID;                       /* b is handled again */
            }
            break;
        }
    }
finished:
    s->state = st;
    s->out_mid = mid;
    s->flags = flags;
    s->size += i;
    if (done) {
        s->done = 1;
        s->size -= 3;                           /* ".\r\n"; its CRLF before is content */
    }
    *outlen = o;
    return (long long)i;
}

long long gw_find_literal(const unsigned char *line, size_t len)
{
    size_t end, d;
    long long v = 0;
    int plus = 0;

    if (len < 3 || line[len - 1] != '}')
        return -1;
    end = len - 1;                              /* one past the last digit */
    if (line[end - 1] == '+') {
        plus = 1;
        end--;
    }
    d = end;
    while (d > 0 && line[d - 1] >= '0' && line[d - 1] <= '9')
        d--;
    if (d == end || d == 0 || line[d - 1] != '{')
        return -1;
    if (end - d > 18)
        return -2 - plus;
    for (; d < end; d++)
        v = v * 10 + (line[d] - '0');
    return 2 * v + plus;
}

/* --- the server name (SNI) of a TLS ClientHello -------------------------------------------
 * A reader over the handshake bytes of consecutive TLS handshake records, which it reads only
 * as far as it needs: a record header is looked at when the first byte after the previous
 * record is wanted. `left` counts what remains of the ClientHello message. */
typedef struct {
    const unsigned char *buf;
    size_t len;
    size_t pos;                    /* next byte to read */
    size_t end;                    /* end of the current record's payload */
    size_t left;                   /* bytes left in the ClientHello body */
} hello_reader;

/* Make r->pos point at a readable byte: 0, GW_SNI_MORE or GW_SNI_NONE. */
static int hr_ready(hello_reader *r)
{
    if (r->pos >= r->end) {                     /* the next record's header */
        size_t h = r->end;
        size_t reclen;
        if (r->len < 5 || h > r->len - 5)
            return GW_SNI_MORE;
        if (r->buf[h] != 22 || r->buf[h + 1] != 3)
            return GW_SNI_NONE;                 /* not a handshake record */
        reclen = ((size_t)r->buf[h + 3] << 8) | r->buf[h + 4];
        if (reclen == 0 || reclen > 16384)
            return GW_SNI_NONE;
        r->pos = h + 5;
        r->end = r->pos + reclen;
    }
    if (r->pos >= r->len)
        return GW_SNI_MORE;
    return 0;
}

/* Read n <= 3 bytes of the body as a big-endian number. */
static int hr_num(hello_reader *r, size_t n, size_t *out)
{
    size_t v = 0;
    int rc;
    if (r->left < n)
        return GW_SNI_NONE;
    while (n-- > 0) {
        if ((rc = hr_ready(r)) != 0)
            return rc;
        v = (v << 8) | r->buf[r->pos++];
        r->left--;
    }
    *out = v;
    return 0;
}

/* Skip n bytes of the body (copying them to out when out is not NULL). */
static int hr_skip(hello_reader *r, size_t n, unsigned char *out)
{
    int rc;
    if (r->left < n)
        return GW_SNI_NONE;
    while (n > 0) {
        size_t avail;
        if ((rc = hr_ready(r)) != 0)
            return rc;
        avail = (r->end < r->len ? r->end : r->len) - r->pos;
        if (avail > n)
            avail = n;
        if (out != NULL) {
            memcpy(out, r->buf + r->pos, avail);
            out += avail;
        }
        r->pos += avail;
        r->left -= avail;
        n -= avail;
    }
    return 0;
}

#define TRY(call) do { int rc_ = (call); if (rc_ != 0) return rc_; } while (0)

int gw_tls_server_name(const unsigned char *buf, size_t len, unsigned char *name, size_t cap)
{
    hello_reader r = { buf, len, 0, 0, 4 };
    size_t v, n, ext_left, list_left;

    TRY(hr_num(&r, 1, &v));                     /* handshake type: ClientHello */
    if (v != 1)
        return GW_SNI_NONE;
    TRY(hr_num(&r, 3, &v));
    if (v > GW_SNI_MAX_HELLO)
        return GW_SNI_NONE;
    r.left = v;
    TRY(hr_skip(&r, 2 + 32, NULL));             /* legacy_version, random */
    TRY(hr_num(&r, 1, &n));                     /* legacy_session_id */
    if (n > 32)
        return GW_SNI_NONE;
    TRY(hr_skip(&r, n, NULL));
    TRY(hr_num(&r, 2, &n));                     /* cipher_suites */
    TRY(hr_skip(&r, n, NULL));
    TRY(hr_num(&r, 1, &n));                     /* legacy_compression_methods */
    TRY(hr_skip(&r, n, NULL));
    if (r.left == 0)
        return GW_SNI_NONE;                     /* no extensions at all */
    TRY(hr_num(&r, 2, &ext_left));
    if (ext_left > r.left)
        return GW_SNI_NONE;
    while (ext_left >= 4) {
        size_t type, elen;
        TRY(hr_num(&r, 2, &type));
        TRY(hr_num(&r, 2, &elen));
        ext_left -= 4;
        if (elen > ext_left)
            return GW_SNI_NONE;
        ext_left -= elen;
        if (type != 0) {
            TRY(hr_skip(&r, elen, NULL));
            continue;
        }
        if (elen < 2)                           /* server_name: a ServerNameList */
            return GW_SNI_NONE;
        TRY(hr_num(&r, 2, &list_left));
        if (list_left > elen - 2)
            return GW_SNI_NONE;
        while (list_left >= 3) {
            size_t kind, nlen;
            TRY(hr_num(&r, 1, &kind));
            TRY(hr_num(&r, 2, &nlen));
            list_left -= 3;
            if (nlen > list_left)
                return GW_SNI_NONE;
            list_left -= nlen;
            if (kind == 0) {                    /* host_name */
                if (nlen == 0 || nlen > cap)
                    return GW_SNI_NONE;
                TRY(hr_skip(&r, nlen, name));
                return (int)nlen;
            }
            TRY(hr_skip(&r, nlen, NULL));
        }
        return GW_SNI_NONE;
    }
    return GW_SNI_NONE;
}

#undef TRY
