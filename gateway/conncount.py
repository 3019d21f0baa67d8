"""Connection counts shared by all workers (SPEC §2 max_connections is across workers).

A shared-memory array with one row per worker and one column per listener: each worker writes
only its own row, the check sums a column, and the supervisor zeroes the row of a dead worker
so a crash leaks nothing. Reads are not locked: the limit may be off by a connection or two
for a moment, which is fine for a flood guard.
"""
from __future__ import annotations

from multiprocessing.sharedctypes import RawArray


class ConnectionCounts:
    def __init__(self, rows: int, listeners: int):
        self.rows = rows
        self.listeners = listeners
        self._a = RawArray("q", rows * listeners)

    def add(self, row: int, listener: int, delta: int) -> None:
        self._a[row * self.listeners + listener] += delta

    def total(self, listener: int) -> int:
        a, n = self._a, self.listeners
        return sum(a[r * n + listener] for r in range(self.rows))

    def clear_row(self, row: int) -> None:
        for i in range(self.listeners):
            self._a[row * self.listeners + i] = 0
