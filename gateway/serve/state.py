"""State the workers share and keep across reloads, in one SQLite database (SPEC §8, §13).

`state_dir/state.sqlite` (stdlib sqlite3) holds, for now, the alert limiter: when an alert
e-mail last went out for each (domain, reason), so that "at most one per domain and reason per
`alert_interval`" holds across every worker and every reload, not per process. (The MTA-STS
policy cache of §4.8 is meant to join it as another table.)

The directory is created 0700 for the workers' user while the worker is still privileged
(`prepare_state_dir`, as the milter spool is); the database is opened lazily, in the worker
after the privilege drop, never in the supervisor (a connection must not cross a fork). It
runs in WAL mode (readers do not block the writer, a crash leaves it consistent) with a busy
timeout, so workers writing at once wait for each other instead of failing.

A claim is one atomic statement, an upsert whose update only happens when the row's last
send is at least an interval old: of two workers racing for the same alert, exactly one sees a
changed row. The calls block, so callers run them in a thread (`AlertMailer` uses
`trio.to_thread.run_sync`); they are rare, at most one per (domain, reason) per interval per
worker, since each worker remembers what the database told it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

from ..relay.spool import prepare_spool_dir

FILENAME = "state.sqlite"
BUSY_TIMEOUT = 5.0             # seconds a statement waits for another process' write lock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    domain TEXT NOT NULL,
    reason TEXT NOT NULL,
    last REAL NOT NULL,          -- time.time() of the last alert e-mail sent for the pair
    PRIMARY KEY (domain, reason)
) WITHOUT ROWID
"""

# Claim (domain, reason) at `now` unless it was claimed less than `interval` ago. A row more
# than an interval in the future means the clock was stepped back: it is due again.
_CLAIM = """
INSERT INTO alerts (domain, reason, last) VALUES (?1, ?2, ?3)
ON CONFLICT (domain, reason) DO UPDATE SET last = excluded.last
WHERE excluded.last - alerts.last >= ?4 OR alerts.last - excluded.last > ?4
"""


class StateStore:
    """The shared state database; opened at first use, thread-safe (one connection, a lock)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, FILENAME)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def claim_alerts(self, domains, reason: str, interval: float,
                     now: float | None = None) -> tuple[list[str], dict[str, float]]:
        """Claim each (domain, reason) for an alert at *now* (time.time()): returns the
        domains claimed, and for the others when their last alert went out. Raises
        sqlite3.Error (or OSError) when the database cannot be used."""
        now = time.time() if now is None else now
        claimed: list[str] = []
        held: dict[str, float] = {}
        with self._lock:
            conn = self._connection()
            for domain in domains:
                if conn.execute(_CLAIM, (domain, reason, now, interval)).rowcount == 1:
                    claimed.append(domain)
                    continue
                row = conn.execute("SELECT last FROM alerts WHERE domain = ? AND reason = ?",
                                   (domain, reason)).fetchone()
                held[domain] = row[0] if row else now
            if claimed:             # pairs quiet for an interval are forgotten: bounded
                conn.execute("DELETE FROM alerts WHERE last < ?", (now - interval,))
        return claimed, held

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def prepare_state_dir(path: str, user: str | None = None, group: str | None = None) -> None:
    """Create *path* 0700 for the workers' user (still privileged), and hand them the
    database files an earlier run as another user may have left."""
    prepare_spool_dir(path, user, group)
    if os.geteuid() != 0 or not (user or group):
        return
    st = os.stat(path)
    for name in (FILENAME, FILENAME + "-wal", FILENAME + "-shm"):
        try:
            os.chown(os.path.join(path, name), st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass
