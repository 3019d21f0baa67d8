/* Line scanner for the gateway's hot path. Semantics are defined by gateway/pyscan.py,
 * its pure-Python twin; tests compare the two on generated input. */
#include <string.h>
#include "gateway_native.h"

enum { LS = 0, DOT = 1, DOTCR = 2, MID = 3, CR = 4 };

long gw_scan_line(const unsigned char *buf, size_t len, size_t start, unsigned int *flags)
{
    unsigned int f = 0;
    const unsigned char *lf;
    size_t end, body_end, i;

    *flags = 0;
    if (start >= len)
        return -1;
    lf = memchr(buf + start, '\n', len - start);
    if (lf == NULL)
        return -1;
    end = (size_t)(lf - buf);
    body_end = end;
    if (end > start && buf[end - 1] == '\r')
        body_end = end - 1;
    else
        f |= GW_BARE_LF;
    if (body_end > start && memchr(buf + start, '\r', body_end - start) != NULL)
        f |= GW_BARE_CR;
    for (i = start; i < end; i++) {
        if (buf[i] == 0) {
            f |= GW_NUL;
            break;
        }
    }
    *flags = f;
    return (long)(end + 1);
}

/* Output bound: a byte in MID emits at most 2 ('.' stuffed at line start, or LF -> CRLF);
 * a CR emits nothing when consumed and its CRLF (2) is emitted while the next byte is
 * processed, which may then emit 2 itself; a pending CR from an earlier feed adds 2 once.
 * Hence at most 2*inlen + 2 <= 2*inlen + 4. */
size_t gw_data_feed(gw_data_t *s, const unsigned char *in, size_t n,
                    unsigned char *out, size_t *outlen)
{
    size_t i = 0, o = 0;
    int st = s->state, ols = s->out_ls, done = 0;
    unsigned int flags = s->flags;

    if (s->done) {
        *outlen = 0;
        return 0;
    }
    while (i < n) {
        unsigned char b = in[i];
        switch (st) {
        case MID: {
            size_t j = i;
            while (j < n && in[j] != '\r' && in[j] != '\n' && in[j] != 0)
                j++;
            if (j > i) {
                if (ols && in[i] == '.')
                    out[o++] = '.';
                memcpy(out + o, in + i, j - i);
                o += j - i;
                ols = 0;
                i = j;
                continue;
            }
            i++;
            if (b == '\r') {
                st = CR;
            } else if (b == '\n') {
                flags |= GW_BARE_LF;
                out[o++] = '\r';
                out[o++] = '\n';
                ols = 1;
            } else {
                flags |= GW_NUL;
            }
            continue;
        }
        case LS:
            if (b == '.') {
                st = DOT;
                i++;
            } else {
                st = MID;
            }
            continue;
        case DOT:
            if (b == '\r') {
                st = DOTCR;
                i++;
            } else {
                st = MID;
            }
            continue;
        case DOTCR:
            if (b == '\n') {
                i++;
                done = 1;
                goto finished;
            }
            flags |= GW_BARE_CR;
            out[o++] = '\r';
            out[o++] = '\n';
            ols = 1;
            st = MID;
            continue;
        default: /* CR */
            out[o++] = '\r';
            out[o++] = '\n';
            ols = 1;
            if (b == '\n') {
                i++;
                st = LS;
            } else {
                flags |= GW_BARE_CR;
                st = MID;
            }
            continue;
        }
    }
finished:
    s->state = st;
    s->out_ls = ols;
    s->flags = flags;
    s->size += i;
    if (done) {
        s->done = 1;
        s->size -= 3;
    }
    *outlen = o;
    return i;
}

int gw_find_literal(const unsigned char *line, size_t len, long long *n, int *plus)
{
    size_t end, d;
    long long v = 0;

    *n = -1;
    *plus = 0;
    if (len < 3 || line[len - 1] != '}')
        return 0;
    end = len - 1;                      /* index of '}' */
    if (line[end - 1] == '+') {
        *plus = 1;
        end--;
    }
    d = end;
    while (d > 0 && line[d - 1] >= '0' && line[d - 1] <= '9')
        d--;
    if (d == end || d == 0 || line[d - 1] != '{') {
        *plus = 0;
        return 0;
    }
    if (end - d > 18) {
        *n = -2;
        return -2;
    }
    for (; d < end; d++)
        v = v * 10 + (line[d] - '0');
    *n = v;
    return 1;
}
