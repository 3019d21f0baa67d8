"""Per-address connection counts in shared memory, pure Python (SPEC §2): the twin of the
native core's _native/perip.c, over the same bytes with the same results.

The memory holds `rows` tables of `slots` entries (a power of two), one table per row of the
connection counts (conncount.py), each written only by the worker of its row and read by all.
An entry is 24 bytes: a 16-byte address key, the listener index (int32, native byte order) and
the count (int32); count 0 is an empty entry. Linear probing from the hash of (key, listener)
under a seed every process shares; when a count drops to 0 the entry is removed by backward
shift, so no tombstones pile up.

    update(mem, rows, slots, row, key, listener, delta, seed) -> int

adds *delta* (+1, -1 or 0) to the count of (key, listener) in *row*'s table and returns the
sum of that count over all rows afterwards; FULL when delta is +1 and the table has no free
entry, MISSING when delta is -1 and the table has no such entry (then nothing changed).
*mem* is a writable buffer of rows * slots * SLOT bytes; the caller checks the arguments
(gateway/native/perip.py).
"""
from __future__ import annotations

import struct

__all__ = ["FULL", "MISSING", "SLOT", "update", "slot_hash"]

SLOT = 24
FULL = -1
MISSING = -2

_M64 = (1 << 64) - 1
_LC = struct.Struct("=ii")          # listener, count at offset 16
_I32 = struct.Struct("=i")


def _fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xff51afd7ed558ccd) & _M64
    h ^= h >> 33
    h = (h * 0xc4ceb9fe1a85ec53) & _M64
    h ^= h >> 33
    return h


def slot_hash(key: bytes, listener: int, seed: int) -> int:
    """The 64-bit hash of (key, listener); its low bits are the entry a probe starts at."""
    h = _fmix(seed ^ int.from_bytes(key[:8], "big"))
    h = _fmix(h ^ int.from_bytes(key[8:16], "big"))
    return _fmix(h ^ (listener & 0xFFFFFFFF))


def _probe(mem, base: int, mask: int, start: int, key: bytes, listener: int):
    """(index, found) of (key, listener) in the table at *base*, or of the empty entry where
    the probe ends; (-1, False) for a full table without it."""
    i = start
    for _ in range(mask + 1):
        off = base + i * SLOT
        lst, count = _LC.unpack_from(mem, off + 16)
        if count == 0:
            return i, False
        if lst == listener and mem[off:off + 16] == key:
            return i, True
        i = (i + 1) & mask
    return -1, False


def _delete_at(mem, base: int, mask: int, i: int, seed: int) -> None:
    j = i
    while True:
        j = (j + 1) & mask
        if j == i:                                # around a full table: back at the hole
            break
        off = base + j * SLOT
        lst, count = _LC.unpack_from(mem, off + 16)
        if count == 0:
            break
        k = slot_hash(bytes(mem[off:off + 16]), lst, seed) & mask
        if (i < k <= j) if i <= j else (i < k or k <= j):
            continue                              # its home lies in (i, j]: it stays
        dst = base + i * SLOT
        mem[dst:dst + SLOT] = mem[off:off + SLOT]
        i = j
    _I32.pack_into(mem, base + i * SLOT + 20, 0)


def update(mem, rows: int, slots: int, row: int, key: bytes, listener: int, delta: int,
           seed: int) -> int:
    mask = slots - 1
    size = slots * SLOT
    start = slot_hash(key, listener, seed) & mask
    if delta:
        base = row * size
        i, found = _probe(mem, base, mask, start, key, listener)
        if delta > 0:
            if i < 0:
                return FULL
            off = base + i * SLOT
            if found:
                _I32.pack_into(mem, off + 20, _I32.unpack_from(mem, off + 20)[0] + 1)
            else:
                mem[off:off + 16] = key
                _LC.pack_into(mem, off + 16, listener, 1)
        else:
            if not found:
                return MISSING
            off = base + i * SLOT
            count = _I32.unpack_from(mem, off + 20)[0]
            if count > 1:
                _I32.pack_into(mem, off + 20, count - 1)
            else:
                _delete_at(mem, base, mask, i, seed)
    total = 0
    for r in range(rows):
        base = r * size
        i, found = _probe(mem, base, mask, start, key, listener)
        if found:
            total += _I32.unpack_from(mem, base + i * SLOT + 20)[0]
    return total
