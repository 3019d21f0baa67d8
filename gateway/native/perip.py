"""Connections per client address across all workers (SPEC §2 `max_connections_per_ip`): the
compiled core or its pure-Python twin over tables in shared memory.

Which backend is gateway/native/backend.py's choice, by the same rules as the line scanner's
(GATEWAY_PURE_PYTHON=1 forces the twin, `gateway.native.perip_py`; under GATEWAY_REQUIRE_NATIVE=1 a
compiled core that cannot be loaded is an ImportError here). The table layout and the
semantics of `update` are documented in gateway/native/perip_py.py.

    table = PerIPTable(rows, slots_for(connections))   # before the fork: every worker
                                             # must see the same memory
    key = address_key("2001:db8::1", 64)     # 16 bytes: IPv4 mapped, IPv6 masked
    n = table.add(row, listener, key)        # the count over all rows with this one, or
                                             # FULL (-1): not counted (refuse it)
    table.remove(row, listener, key)         # when that connection ends (not after FULL)
    table.total(listener, key); table.clear_row(row)

`native_backend` / `python_backend` hold the two implementations of
`update(mem, rows, slots, row, key, listener, delta, seed)` (`native_backend` is None when the
core is not loaded), so tests can hold them side by side.

A row is sized by `slots_for()` for every connection its worker may hold: the sum of the
listeners' `max_connections` (SO_REUSEPORT does not split evenly, so one worker may get them
all), twice over, so a table is at most half full and never full while max_connections holds.
The memory is one shared anonymous mapping: pages nobody touched cost nothing.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
from types import SimpleNamespace

from . import backend, perip_py
from .perip_py import FULL, MISSING, SLOT

__all__ = ["BACKEND", "DEFAULT_SLOTS", "FULL", "MAX_SLOTS", "MISSING", "PerIPTable",
           "address_key", "native_backend", "python_backend", "slots_for"]

DEFAULT_SLOTS = 2048    # per row, without a configuration: room for 1000 connections
HEADROOM = 2            # entries per connection a row may hold: at most half full
MIN_SLOTS = 64
MAX_SLOTS = 1 << 20     # 24 MiB a row; beyond max_connections of 512K in all, refusals

_ffi, _lib = backend.core("perip")
BACKEND = "python" if _lib is None else "native"
python_backend = perip_py

_V4_MAPPED = bytes(10) + b"\xff\xff"


def _native_update(mem, rows: int, slots: int, row: int, key: bytes, listener: int,
                   delta: int, seed: int) -> int:
    return _lib.gw_pip_update(_ffi.from_buffer(mem, require_writable=True), rows, slots, row,
                              key, listener, delta, seed)


native_backend = None if _lib is None else SimpleNamespace(
    update=_native_update, FULL=FULL, MISSING=MISSING, SLOT=SLOT)


def slots_for(connections: int) -> int:
    """Entries per row for a worker that may hold *connections* counted connections (the
    sum of the listeners' max_connections): a power of two, HEADROOM times as many, between
    MIN_SLOTS and MAX_SLOTS."""
    need = max(MIN_SLOTS, connections * HEADROOM)
    return min(MAX_SLOTS, 1 << (need - 1).bit_length())


def address_key(host: str, v6_prefix: int = 64) -> bytes | None:
    """The 16 bytes a client address counts under: an IPv4 address (or an IPv4-mapped IPv6
    one) as its IPv4-mapped IPv6 form, an IPv6 address masked to its first *v6_prefix* bits.
    None when *host* is not an IP address."""
    try:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    except (OSError, TypeError, ValueError):
        pass
    if host.__class__ is not str:
        return None
    host = host.split("%", 1)[0]                      # a zone id
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED or v6_prefix >= 128:
        return packed
    bits = max(v6_prefix, 0)
    mask = ((1 << bits) - 1) << (128 - bits)
    return (int.from_bytes(packed, "big") & mask).to_bytes(16, "big")


class PerIPTable:
    """*rows* tables of *slots* entries in shared memory, keyed by a *seed* all processes
    share (random unless given). Row r is written only by the worker of row r."""

    def __init__(self, rows: int, slots: int = DEFAULT_SLOTS, seed: int | None = None):
        if rows < 1:
            raise ValueError("rows must be at least 1")
        if slots < 1 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.rows = rows
        self.slots = slots
        self.seed = (int.from_bytes(os.urandom(8), "little") if seed is None
                     else seed & 0xFFFFFFFFFFFFFFFF)
        self._map = mmap.mmap(-1, rows * slots * SLOT)    # shared, zeroed: all empty
        self._raw = (ctypes.c_ubyte * (rows * slots * SLOT)).from_buffer(self._map)
        self.full_reported = False            # per process: "table full" is logged once
        seed = self.seed
        if _lib is not None:
            ptr = _ffi.from_buffer(self._raw, require_writable=True)
            fn = _lib.gw_pip_update
            self._update = lambda row, key, listener, delta: fn(
                ptr, rows, slots, row, key, listener, delta, seed)
        else:
            mem = memoryview(self._raw).cast("B")
            self._update = lambda row, key, listener, delta: perip_py.update(
                mem, rows, slots, row, key, listener, delta, seed)

    def _check(self, row: int, listener: int, key: bytes) -> None:
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} out of range (0..{self.rows - 1})")
        if not 0 <= listener < 1 << 31:
            raise ValueError(f"listener {listener} out of range")
        if len(key) != 16:
            raise ValueError("key must be 16 bytes (address_key)")

    def add(self, row: int, listener: int, key: bytes) -> int:
        """Count one more connection of *key* on *listener* in *row*: the count over all rows,
        this one included, or FULL (the row's table is full; nothing was counted: the
        caller refuses the connection)."""
        self._check(row, listener, key)
        return self._update(row, bytes(key), listener, 1)

    def remove(self, row: int, listener: int, key: bytes) -> int:
        """One connection fewer (one that add() counted): the count left over all rows, or
        MISSING when *row* held none (nothing changed)."""
        self._check(row, listener, key)
        return self._update(row, bytes(key), listener, -1)

    def total(self, listener: int, key: bytes) -> int:
        self._check(0, listener, key)
        return self._update(0, bytes(key), listener, 0)

    def clear_row(self, row: int) -> None:
        """Forget every count of *row* (its worker is gone)."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} out of range (0..{self.rows - 1})")
        size = self.slots * SLOT
        ctypes.memset(ctypes.addressof(self._raw) + row * size, 0, size)
