/* Per-address connection counts (SPEC section 2). The semantics are those of
 * gateway/native/perip_py.py, its pure-Python twin; tests/test_perip.py compares the two and a
 * naive model. gateway/native/perip.py checks the arguments before they get here.
 *
 * One open-addressing table per row of the shared memory, written by the row's worker only:
 * linear probing, and backward-shift deletion when a count drops to 0 (no tombstones, so a
 * table never fills up with dead entries). Readers in other processes take no lock: during a
 * write they may miss or see twice one entry for a moment, which a flood guard tolerates. */
#include <stdint.h>
#include <string.h>
#include "gateway_native.h"

#define KEY 16
#define OFF_LISTENER 16
#define OFF_COUNT 20

static uint64_t fmix(uint64_t h)           /* MurmurHash3's 64-bit finaliser */
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t pip_hash(const unsigned char *key, int32_t listener, uint64_t seed)
{
    uint64_t h = fmix(seed ^ be64(key));
    h = fmix(h ^ be64(key + 8));
    return fmix(h ^ (uint64_t)(uint32_t)listener);
}

static int32_t ld32(const unsigned char *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void st32(unsigned char *p, int32_t v)
{
    memcpy(p, &v, sizeof v);
}

static int same(const unsigned char *e, const unsigned char *key, int32_t listener)
{
    return ld32(e + OFF_LISTENER) == listener && memcmp(e, key, KEY) == 0;
}

/* The index of (key, listener) in one table, or of the empty entry where a probe for it ends
 * (*found 0); -1 when neither (a full table without it). */
static long long probe(const unsigned char *t, size_t mask, size_t start,
                       const unsigned char *key, int32_t listener, int *found)
{
    size_t i = start;
    for (size_t n = 0; n <= mask; n++, i = (i + 1) & mask) {
        const unsigned char *e = t + i * GW_PIP_SLOT;
        if (ld32(e + OFF_COUNT) == 0) {
            *found = 0;
            return (long long)i;
        }
        if (same(e, key, listener)) {
            *found = 1;
            return (long long)i;
        }
    }
    *found = 0;
    return -1;
}

/* Empty entry i, moving back the entries after it whose home is not between i and them. */
static void delete_at(unsigned char *t, size_t mask, size_t i, uint64_t seed)
{
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (j == i)                       /* around a full table: back at the hole */
            break;
        unsigned char *e = t + j * GW_PIP_SLOT;
        if (ld32(e + OFF_COUNT) == 0)
            break;
        size_t k = (size_t)pip_hash(e, ld32(e + OFF_LISTENER), seed) & mask;
        /* entry j stays when its home k lies cyclically in (i, j] */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        memcpy(t + i * GW_PIP_SLOT, e, GW_PIP_SLOT);
        i = j;
    }
    st32(t + i * GW_PIP_SLOT + OFF_COUNT, 0);
}

long long gw_pip_update(unsigned char *tables, size_t rows, size_t slots, size_t row,
                        const unsigned char *key, int listener, int delta,
                        unsigned long long seed)
{
    size_t mask = slots - 1, size = slots * GW_PIP_SLOT;
    size_t start = (size_t)pip_hash(key, listener, seed) & mask;
    int found;
    if (delta != 0) {
        unsigned char *t = tables + row * size;
        long long i = probe(t, mask, start, key, listener, &found);
        if (delta > 0) {
            if (i < 0)
                return GW_PIP_FULL;
            unsigned char *e = t + (size_t)i * GW_PIP_SLOT;
            if (found) {
                st32(e + OFF_COUNT, ld32(e + OFF_COUNT) + 1);
            } else {
                memcpy(e, key, KEY);
                st32(e + OFF_LISTENER, listener);
                st32(e + OFF_COUNT, 1);               /* written last: now it is an entry */
            }
        } else {
            if (!found)
                return GW_PIP_MISSING;
            unsigned char *e = t + (size_t)i * GW_PIP_SLOT;
            int32_t c = ld32(e + OFF_COUNT);
            if (c > 1)
                st32(e + OFF_COUNT, c - 1);
            else
                delete_at(t, mask, (size_t)i, seed);
        }
    }
    long long sum = 0;
    for (size_t r = 0; r < rows; r++) {
        const unsigned char *t = tables + r * size;
        long long i = probe(t, mask, start, key, listener, &found);
        if (found)
            sum += ld32(t + (size_t)i * GW_PIP_SLOT + OFF_COUNT);
    }
    return sum;
}
