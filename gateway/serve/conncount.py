"""Connection counts and heartbeats shared by all workers (SPEC §2, §9).

A shared-memory array with one row per worker and one column per listener: each worker writes
only its own row, the check sums a column, and the supervisor zeroes the row of a dead worker
so a crash leaks nothing. Reads are not locked: the limit may be off by a connection or two
for a moment, which is fine for a flood guard.

Next to the counts, one heartbeat per row: the CLOCK_MONOTONIC time (system-wide, so the
supervisor can compare it with its own clock) of the worker's last beat, 0 before its first.
And per worker slot the row of the worker serving it (written by the supervisor), so that the
metrics process answers /healthz from the beats themselves, without the supervisor's delay.

Per row too, a hash table of connections per client address (perip.py), for
`max_connections_per_ip` across workers: written by the row's worker, read by all, cleared
with the row. Each has room for every connection the listeners allow together (`capacity`,
the sum of their max_connections: one worker may get them all), so filling it from many
addresses cannot switch the limit off (SPEC §2).

Per row also the supervisor's order to its worker (`ORDER_RETIRE`, `ORDER_CUT`), which the
retire signal only announces: two signals sent before the worker reads them arrive as one,
the order in memory is never lost.

The rows are a fixed number, allocated before the first fork (every worker must see the same
memory): the supervisor takes `ROWS_PER_SLOT` rows per worker slot, so that several
generations of workers retired by reloads may drain at once (at most 4 of them keeping IMAP
sessions, SPEC §9), and defers a reload rather than run out (supervisor.py).
"""
from __future__ import annotations

import time
from multiprocessing.sharedctypes import RawArray

from ..native.perip import DEFAULT_SLOTS, PerIPTable, slots_for

ROWS_PER_SLOT = 8      # a serving generation and up to 7 draining ones
ORDER_SERVE, ORDER_RETIRE, ORDER_CUT = 0, 1, 2   # ORDER_CUT: retired, and its IMAP sessions end


class ConnectionCounts:
    """*rows* rows of *listeners* counts; *slots* worker slots; *capacity*: the connections
    one row may hold (the sum of the listeners' max_connections), which sizes its per-address
    table (a default size without it)."""

    def __init__(self, rows: int, listeners: int, slots: int = 1,
                 capacity: int | None = None):
        self.rows = rows
        self.listeners = listeners
        self.slots = slots
        self._a = RawArray("q", rows * listeners)
        self._beats = RawArray("d", rows)
        self._slot_rows = RawArray("q", slots)       # row + 1 of the slot's worker, 0: none
        self._health = RawArray("d", 2)              # [beat age still healthy, stopping]
        self._pids = RawArray("q", rows)             # the worker of each row, 0: none
        self._generations = RawArray("q", rows)      # the configuration generation it serves
        self._orders = RawArray("q", rows)           # the supervisor's ORDER_* to the worker
        self.per_ip = PerIPTable(                    # connections per client address (§2)
            rows, DEFAULT_SLOTS if capacity is None else slots_for(capacity))

    @classmethod
    def for_config(cls, config, rows: int = 1, slots: int = 1) -> ConnectionCounts:
        """The counts of *config*'s listeners, each row's per-address table sized for the
        sum of their max_connections."""
        return cls(rows, len(config.listeners), slots,
                   capacity=sum(listener.max_connections for listener in config.listeners))

    def add(self, row: int, listener: int, delta: int) -> None:
        self._a[row * self.listeners + listener] += delta

    def total(self, listener: int) -> int:
        return sum(self._a[listener::self.listeners])      # one column, summed in C

    def clear_row(self, row: int) -> None:
        for i in range(self.listeners):
            self._a[row * self.listeners + i] = 0
        self._beats[row] = 0.0
        self._pids[row] = 0
        self._generations[row] = 0
        self._orders[row] = ORDER_SERVE
        self.per_ip.clear_row(row)

    def set_worker(self, row: int, pid: int, generation: int) -> None:
        """*pid* serves configuration *generation* (0: the start, +1 per reload) in *row*."""
        self._pids[row] = pid
        self._generations[row] = generation

    def row_sessions(self, row: int, listeners) -> int:
        """Connections open in *row* on the *listeners* (indices)."""
        return sum(self._a[row * self.listeners + i] for i in listeners)

    def set_order(self, row: int, order: int) -> None:
        self._orders[row] = order

    def order(self, row: int) -> int:
        return self._orders[row]

    def workers(self, now: float | None = None) -> list[dict]:
        """`/status`'s worker rows: pid, generation, heartbeat age (None before the first
        beat), whether it serves a slot (else it drains after a reload)."""
        now = time.monotonic() if now is None else now
        serving = {row - 1 for row in self._slot_rows if row}
        out = []
        for row in range(self.rows):
            pid = self._pids[row]
            if pid:
                beat = self._beats[row]
                out.append({"pid": pid, "generation": self._generations[row],
                            "heartbeat_age_seconds": round(now - beat, 3) if beat else None,
                            "serving": row in serving})
        return out

    def beat(self, row: int) -> None:
        """The worker of *row* is alive and its event loop runs."""
        self._beats[row] = time.monotonic()

    def last_beat(self, row: int) -> float:
        """time.monotonic() of the last beat of *row*, 0.0 if none since clear_row()."""
        return self._beats[row]

    # --- liveness (SPEC §9): written by the supervisor, read by it and the metrics process

    def set_slot(self, slot: int, row: int | None) -> None:
        """*row* now serves *slot* (None: no worker does)."""
        self._slot_rows[slot] = 0 if row is None else row + 1

    def slot_row(self, slot: int) -> int | None:
        row = self._slot_rows[slot]
        return row - 1 if row else None

    def set_health_rules(self, stale: float, stopping: bool = False) -> None:
        """A worker is beating while its last beat is at most *stale* seconds old; while
        *stopping* the gateway is not healthy at all."""
        self._health[0] = stale
        self._health[1] = 1.0 if stopping else 0.0

    def healthy_slots(self, now: float | None = None) -> int:
        """How many slots have a worker whose last beat is recent enough."""
        now = time.monotonic() if now is None else now
        stale = self._health[0]
        beats = self._beats
        count = 0
        for row in self._slot_rows:
            if row and (beat := beats[row - 1]) and now - beat <= stale:
                count += 1
        return count

    def healthy(self) -> bool:
        """Every slot has a beating worker, and the gateway is not stopping."""
        return not self._health[1] and self.healthy_slots() == self.slots
