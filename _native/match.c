/* Rule matcher (SPEC sections 4.3 and 10). The semantics are those of
 * gateway/native/matcher_py.py, its pure-Python twin; tests/test_rulematch.py compares the two
 * and a naive reference.
 * gateway/native/matcher.py checks and packs the arguments before they get here.
 *
 * Domain rules: each side's patterns become keys in two open-addressing hash tables (exact
 * domains, and the parent X of `*.X`) plus one `*` key; a pair table maps (sender key,
 * recipient key) to the first enabled rule using that pair. A lookup hashes the domain once
 * from the right (the hash of every suffix that starts after a '.' falls out of that walk),
 * collects the recipient's matching keys, then probes the pair table for each matching sender
 * key with each of them, skipping pairs that cannot beat the best rule found so far (each key
 * knows its first rule). The cost depends on the number of labels, not of rules.
 *
 * Networks: one binary trie over the address bits per family (IPv4 32, IPv6 128); a node keeps
 * the lowest index of a network ending there and the lowest index in its subtree, so a walk
 * stops as soon as nothing below can beat what it has. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "gateway_native.h"

#define NONE INT32_MAX
#define FNV_OFF 1469598103934665603ULL
#define FNV_PRIME 1099511628211ULL
#define STACK_KEYS 256

/* --- domain rules -------------------------------------------------------------------------- */

typedef struct {
    uint64_t h;
    size_t off, len;              /* the key's bytes in the matcher's pool */
    int32_t id;                   /* -1: empty slot */
} kent_t;

typedef struct {
    kent_t *e;
    size_t mask, n;
} ktab_t;

typedef struct {
    int32_t any_id;               /* the `*` key, -1 if no rule uses it */
    ktab_t exact, sub;
    int32_t *first;               /* key id -> first enabled rule using it */
    size_t nkeys;
} side_t;

typedef struct {
    uint64_t k;                   /* ((sender key << 32) | recipient key) + 1; 0: empty */
    int32_t rule;
} pent_t;

struct gw_rm {
    side_t s, r;
    unsigned char *pool;
    pent_t *pairs;
    int pbits;
};

static uint64_t rhash(const unsigned char *p, size_t n)
{
    uint64_t h = FNV_OFF;
    while (n)
        h = (h ^ p[--n]) * FNV_PRIME;
    return h;
}

static size_t kslot(uint64_t h, size_t mask)
{
    return (size_t)(h ^ (h >> 29) ^ (h >> 47)) & mask;
}

static int32_t ktab_find(const ktab_t *t, const unsigned char *pool, uint64_t h,
                         const unsigned char *p, size_t n)
{
    size_t i = kslot(h, t->mask);
    for (;;) {
        const kent_t *e = &t->e[i];
        if (e->id < 0)
            return -1;
        if (e->h == h && e->len == n && memcmp(pool + e->off, p, n) == 0)
            return e->id;
        i = (i + 1) & t->mask;
    }
}

static int ktab_init(ktab_t *t, size_t cap)
{
    size_t i;
    t->e = malloc(cap * sizeof *t->e);
    if (t->e == NULL)
        return 0;
    for (i = 0; i < cap; i++)
        t->e[i].id = -1;
    t->mask = cap - 1;
    t->n = 0;
    return 1;
}

/* The key id of pattern pool[off:off+len] on this side, added with first rule `rule` if new. */
static int32_t side_add(side_t *sd, const unsigned char *pool, size_t off, size_t len,
                        int32_t rule)
{
    ktab_t *t;
    uint64_t h;
    int32_t id;
    size_t i;

    if (len == 1 && pool[off] == '*') {
        if (sd->any_id < 0) {
            sd->any_id = (int32_t)sd->nkeys++;
            sd->first[sd->any_id] = rule;
        }
        return sd->any_id;
    }
    if (len >= 2 && pool[off] == '*' && pool[off + 1] == '.') {
        t = &sd->sub;
        off += 2;
        len -= 2;
    } else {
        t = &sd->exact;
    }
    h = rhash(pool + off, len);
    id = ktab_find(t, pool, h, pool + off, len);
    if (id >= 0)
        return id;
    id = (int32_t)sd->nkeys++;
    sd->first[id] = rule;
    i = kslot(h, t->mask);
    while (t->e[i].id >= 0)
        i = (i + 1) & t->mask;
    t->e[i].h = h;
    t->e[i].off = off;
    t->e[i].len = len;
    t->e[i].id = id;
    t->n++;
    return id;
}

/* Key ids of this side's patterns matching d[0:n] into out (room for n + 2); their count. */
static size_t side_walk(const side_t *sd, const unsigned char *pool, const unsigned char *d,
                        size_t n, int32_t *out)
{
    size_t c = 0, i = n;
    uint64_t h = FNV_OFF;
    int32_t id;
    int has_sub = sd->sub.n > 0;

    if (sd->any_id >= 0)
        out[c++] = sd->any_id;
    if (n == 0)                                  /* the null sender: only `*` */
        return c;
    while (i--) {
        unsigned char ch = d[i];
        if (ch == '.' && has_sub) {              /* h is the hash of d[i+1:] */
            id = ktab_find(&sd->sub, pool, h, d + i + 1, n - i - 1);
            if (id >= 0)
                out[c++] = id;
        }
        h = (h ^ ch) * FNV_PRIME;
    }
    if (sd->exact.n > 0) {
        id = ktab_find(&sd->exact, pool, h, d, n);
        if (id >= 0)
            out[c++] = id;
    }
    return c;
}

static size_t pslot(uint64_t k, int bits)
{
    return (size_t)((k * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
}

static int32_t pair_find(const gw_rm_t *m, uint64_t k)
{
    size_t mask = ((size_t)1 << m->pbits) - 1, i = pslot(k, m->pbits);
    for (;;) {
        const pent_t *e = &m->pairs[i];
        if (e->k == k)
            return e->rule;
        if (e->k == 0)
            return NONE;
        i = (i + 1) & mask;
    }
}

void gw_rm_free(gw_rm_t *m)
{
    if (m == NULL)
        return;
    free(m->s.exact.e);
    free(m->s.sub.e);
    free(m->s.first);
    free(m->r.exact.e);
    free(m->r.sub.e);
    free(m->r.first);
    free(m->pool);
    free(m->pairs);
    free(m);
}

static int side_init(side_t *sd, size_t cap, size_t nrules)
{
    sd->any_id = -1;
    sd->nkeys = 0;
    sd->first = malloc((nrules + 1) * sizeof *sd->first);
    return sd->first != NULL && ktab_init(&sd->exact, cap) && ktab_init(&sd->sub, cap);
}

gw_rm_t *gw_rm_new(size_t nrules, const unsigned char *buf, size_t buflen, const size_t *offs,
                   const unsigned char *enabled)
{
    gw_rm_t *m;
    size_t cap = 8, i, pmask;

    if (nrules >= (size_t)INT32_MAX)
        return NULL;
    m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    while (cap < 2 * nrules)
        cap <<= 1;
    m->pbits = 3;
    while (((size_t)1 << m->pbits) < cap)
        m->pbits++;
    m->pool = malloc(buflen ? buflen : 1);
    m->pairs = calloc(cap, sizeof *m->pairs);
    if (m->pool == NULL || m->pairs == NULL || !side_init(&m->s, cap, nrules)
        || !side_init(&m->r, cap, nrules)) {
        gw_rm_free(m);
        return NULL;
    }
    if (buflen)
        memcpy(m->pool, buf, buflen);
    pmask = cap - 1;
    for (i = 0; i < nrules; i++) {
        int32_t sid, rid;
        uint64_t k;
        size_t j;
        if (!enabled[i])
            continue;
        sid = side_add(&m->s, m->pool, offs[2 * i], offs[2 * i + 1] - offs[2 * i], (int32_t)i);
        rid = side_add(&m->r, m->pool, offs[2 * i + 1], offs[2 * i + 2] - offs[2 * i + 1],
                       (int32_t)i);
        k = (((uint64_t)sid << 32) | (uint64_t)rid) + 1;
        j = pslot(k, m->pbits);
        while (m->pairs[j].k != 0 && m->pairs[j].k != k)
            j = (j + 1) & pmask;
        if (m->pairs[j].k == 0) {                /* else an earlier rule has the pair */
            m->pairs[j].k = k;
            m->pairs[j].rule = (int32_t)i;
        }
    }
    return m;
}

int gw_rm_match(const gw_rm_t *m, const unsigned char *s, size_t slen,
                const unsigned char *r, size_t rlen)
{
    int32_t rstack[STACK_KEYS], sstack[STACK_KEYS], *rids = rstack, *sids = sstack;
    int32_t best = NONE;
    size_t nr, ns, a, b;

    if (m->r.nkeys == 0)
        return -1;
    if (rlen + 2 > STACK_KEYS || slen + 2 > STACK_KEYS) {    /* beyond any DNS name */
        if (rlen + 2 > STACK_KEYS)
            rids = malloc((rlen + 2) * sizeof *rids);
        if (slen + 2 > STACK_KEYS)
            sids = malloc((slen + 2) * sizeof *sids);
        if (rids == NULL || sids == NULL) {
            if (rids != rstack)
                free(rids);
            if (sids != sstack)
                free(sids);
            return -2;
        }
    }
    nr = side_walk(&m->r, m->pool, r, rlen, rids);
    ns = nr ? side_walk(&m->s, m->pool, s, slen, sids) : 0;
    for (a = 0; a < ns; a++) {
        int32_t sid = sids[a];
        if (m->s.first[sid] >= best)
            continue;
        for (b = 0; b < nr; b++) {
            int32_t rid = rids[b], rule;
            if (m->r.first[rid] >= best)
                continue;
            rule = pair_find(m, (((uint64_t)sid << 32) | (uint64_t)rid) + 1);
            if (rule < best)
                best = rule;
        }
    }
    if (rids != rstack)
        free(rids);
    if (sids != sstack)
        free(sids);
    return best == NONE ? -1 : (int)best;
}

int gw_rm_match_many(const gw_rm_t *m, size_t n, const unsigned char *buf, const size_t *offs,
                     int *out)
{
    size_t i;
    int ret = 0;
    for (i = 0; i < n; i++) {
        const size_t *o = offs + 2 * i;
        out[i] = gw_rm_match(m, buf + o[0], o[1] - o[0], buf + o[1], o[2] - o[1]);
        if (out[i] == -2)
            ret = -2;
    }
    return ret;
}

/* --- networks ------------------------------------------------------------------------------ */

typedef struct {
    int32_t child[2];             /* 0: none (node 0 is the root) */
    int32_t term;                 /* lowest index of a network ending here, NONE */
    int32_t submin;               /* lowest index in this subtree, NONE */
} node_t;

typedef struct {
    node_t *n;
    size_t len, cap;
} trie_t;

struct gw_nm {
    trie_t t4, t6;
};

static int trie_init(trie_t *t)
{
    t->cap = 64;
    t->n = malloc(t->cap * sizeof *t->n);
    if (t->n == NULL)
        return 0;
    t->len = 1;
    t->n[0].child[0] = t->n[0].child[1] = 0;
    t->n[0].term = t->n[0].submin = NONE;
    return 1;
}

static int trie_insert(trie_t *t, const unsigned char *addr, int plen, int32_t idx)
{
    size_t node = 0;
    int bit;
    for (bit = 0;; bit++) {
        if (idx < t->n[node].submin)
            t->n[node].submin = idx;
        if (bit == plen)
            break;
        int b = (addr[bit >> 3] >> (7 - (bit & 7))) & 1;
        int32_t c = t->n[node].child[b];
        if (c == 0) {
            if (t->len == t->cap) {
                node_t *nn;
                if (t->cap > (size_t)INT32_MAX / 2)
                    return 0;
                nn = realloc(t->n, 2 * t->cap * sizeof *nn);
                if (nn == NULL)
                    return 0;
                t->n = nn;
                t->cap *= 2;
            }
            c = (int32_t)t->len++;
            t->n[c].child[0] = t->n[c].child[1] = 0;
            t->n[c].term = t->n[c].submin = NONE;
            t->n[node].child[b] = c;
        }
        node = (size_t)c;
    }
    if (idx < t->n[node].term)
        t->n[node].term = idx;
    return 1;
}

static int32_t trie_find(const trie_t *t, const unsigned char *addr, int bits)
{
    const node_t *nd = t->n;
    int32_t best = NONE;
    int bit;
    for (bit = 0;; bit++) {
        int32_t c;
        if (nd->term < best)
            best = nd->term;
        if (nd->submin >= best || bit == bits)
            break;
        c = nd->child[(addr[bit >> 3] >> (7 - (bit & 7))) & 1];
        if (c == 0)
            break;
        nd = t->n + c;
    }
    return best;
}

void gw_nm_free(gw_nm_t *m)
{
    if (m == NULL)
        return;
    free(m->t4.n);
    free(m->t6.n);
    free(m);
}

gw_nm_t *gw_nm_new(size_t n, const unsigned char *addrs, const int *plens,
                   const unsigned char *fams)
{
    gw_nm_t *m;
    size_t i;
    if (n >= (size_t)INT32_MAX)
        return NULL;
    m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    if (!trie_init(&m->t4) || !trie_init(&m->t6)) {
        gw_nm_free(m);
        return NULL;
    }
    for (i = 0; i < n; i++) {
        trie_t *t = fams[i] == 4 ? &m->t4 : &m->t6;
        if (!trie_insert(t, addrs + 16 * i, plens[i], (int32_t)i)) {
            gw_nm_free(m);
            return NULL;
        }
    }
    return m;
}

/* The rules of Python's ipaddress.IPv4Address: four 1-3 digit decimal octets, no leading
 * zero, at most 255. */
static int parse_v4(const unsigned char *p, size_t n, unsigned char out[4])
{
    size_t i = 0;
    int k;
    for (k = 0; k < 4; k++) {
        size_t start = i;
        unsigned v = 0;
        while (i < n && p[i] >= '0' && p[i] <= '9' && i - start < 4)
            v = v * 10 + (unsigned)(p[i++] - '0');
        if (i == start || i - start > 3 || v > 255 || (p[start] == '0' && i - start > 1))
            return 0;
        out[k] = (unsigned char)v;
        if (k < 3) {
            if (i >= n || p[i] != '.')
                return 0;
            i++;
        }
    }
    return i == n;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The rules of Python's ipaddress.IPv6Address (without the scope id). */
static int parse_v6(const unsigned char *p, size_t n, unsigned char out[16])
{
    size_t st[10], ln[10], i, start = 0;
    long val[10];                 /* -1: empty part, -2: not a hextet, else its value */
    int k = 0, K, j, skip = -1, hi, lo, skipped, h;
    unsigned char v4[4];

    for (i = 0; i <= n; i++) {
        if (i == n || p[i] == ':') {
            if (k == 10)
                return 0;          /* more than 9 parts */
            st[k] = start;
            ln[k] = i - start;
            k++;
            start = i + 1;
        }
    }
    if (k < 3)
        return 0;
    K = k;
    if (memchr(p + st[k - 1], '.', ln[k - 1]) != NULL) {
        if (!parse_v4(p + st[k - 1], ln[k - 1], v4))
            return 0;
        if (k == 10)
            return 0;
        K = k + 1;
    }
    if (K > 9)
        return 0;
    for (j = 0; j < k; j++) {
        if (ln[j] == 0) {
            val[j] = -1;
        } else if (ln[j] > 4) {
            val[j] = -2;
        } else {
            long v = 0;
            size_t q;
            for (q = 0; q < ln[j]; q++) {
                int d = hexval(p[st[j] + q]);
                if (d < 0) {
                    v = -2;
                    break;
                }
                v = v * 16 + d;
            }
            val[j] = v;
        }
    }
    if (K == k + 1) {
        val[k - 1] = (v4[0] << 8) | v4[1];
        val[k] = (v4[2] << 8) | v4[3];
    }
    for (j = 1; j < K - 1; j++) {
        if (val[j] == -1) {
            if (skip >= 0)
                return 0;
            skip = j;
        }
    }
    if (skip >= 0) {
        hi = skip;
        lo = K - skip - 1;
        if (val[0] == -1 && --hi)
            return 0;
        if (val[K - 1] == -1 && --lo)
            return 0;
        skipped = 8 - (hi + lo);
        if (skipped < 1)
            return 0;
    } else {
        if (K != 8 || val[0] == -1 || val[K - 1] == -1)
            return 0;
        hi = K;
        lo = 0;
        skipped = 0;
    }
    h = 0;
    for (j = 0; j < hi; j++, h++) {
        if (val[j] < 0)
            return 0;
        out[2 * h] = (unsigned char)(val[j] >> 8);
        out[2 * h + 1] = (unsigned char)val[j];
    }
    for (j = 0; j < skipped; j++, h++)
        out[2 * h] = out[2 * h + 1] = 0;
    for (j = K - lo; j < K; j++, h++) {
        if (val[j] < 0)
            return 0;
        out[2 * h] = (unsigned char)(val[j] >> 8);
        out[2 * h + 1] = (unsigned char)val[j];
    }
    return 1;
}

int gw_nm_match(const gw_nm_t *m, const unsigned char *ip, size_t n)
{
    unsigned char a[16];
    const unsigned char *pct;
    int32_t r;
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    if (parse_v4(ip, n, a)) {
        r = trie_find(&m->t4, a, 32);
    } else {
        if (memchr(ip, '/', n) != NULL)
            return -1;
        pct = memchr(ip, '%', n);
        if (pct != NULL) {                       /* scope id: non-empty, no second '%' */
            size_t rest = n - (size_t)(pct - ip) - 1;
            if (rest == 0 || memchr(pct + 1, '%', rest) != NULL)
                return -1;
            n = (size_t)(pct - ip);
        }
        if (!parse_v6(ip, n, a))
            return -1;
        if (memcmp(a, mapped, 12) == 0)
            r = trie_find(&m->t4, a + 12, 32);
        else
            r = trie_find(&m->t6, a, 128);
    }
    return r == NONE ? -1 : (int)r;
}
