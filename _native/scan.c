/* Line scanner for the gateway's hot path (SPEC section 10). The semantics are those of
 * gateway/pyscan.py, its pure-Python twin; the tests compare the two on generated input.
 * Arguments are checked by gateway/native.py before they get here. */
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
