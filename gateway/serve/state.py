"""State the workers share and keep across reloads, in one SQLite database (SPEC §8, §13).

`state_dir/state.sqlite` (stdlib sqlite3) holds the alert limiter: when an alert e-mail last
went out for each (domain, reason), so that "at most one per domain and reason per
`alert_interval`" holds across every worker and every reload, not per process. It also holds
the MTA-STS policy cache of §4.8 (table `sts_policies`, one row per policy domain: read and
written by gateway.dest.mta_sts, which decides what to keep; groundwork, not used by the
sessions yet).

The directory is created 0700 for the workers' user while the worker is still privileged
(`prepare_state_dir`, as the milter spool is); the database is opened lazily, in the worker
after the privilege drop, never in the supervisor (a connection must not cross a fork). It
runs in WAL mode (readers do not block the writer, a crash leaves it consistent) with a busy
timeout, so workers writing at once wait for each other instead of failing.

A claim is one atomic statement, an upsert whose update only happens when the row's last
send is at least an interval old: of two workers racing for the same alert, exactly one sees a
changed row. A store opened with `read_only` (commands run as root, §4.8) never creates, changes or
migrates anything: the file is opened `mode=ro`, a missing file reads as empty, and a write
raises sqlite3.OperationalError. SQLite still creates the `-wal`/`-shm` files of a WAL
database when no one has it open; run as root, the reader hands them to the database's owner,
so the workers can open them afterwards.

The calls block, so callers run them in a thread (`AlertMailer` uses
`trio.to_thread.run_sync`); they are rare, at most one per (domain, reason) per interval per
worker, since each worker remembers what the database told it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import NamedTuple

from ..relay.spool import prepare_spool_dir

FILENAME = "state.sqlite"
BUSY_TIMEOUT = 5.0             # seconds a statement waits for another process' write lock

_SCHEMA = ("""
CREATE TABLE IF NOT EXISTS alerts (
    domain TEXT NOT NULL,
    reason TEXT NOT NULL,
    last REAL NOT NULL,          -- time.time() of the last alert e-mail sent for the pair
    PRIMARY KEY (domain, reason)
) WITHOUT ROWID
""", """
CREATE TABLE IF NOT EXISTS sts_policies (
    domain TEXT NOT NULL PRIMARY KEY,   -- the policy domain, lower case, no trailing dot
    policy_id TEXT NOT NULL,            -- the TXT record's id when the policy was fetched
    mode TEXT NOT NULL,                 -- enforce, testing, none
    mx TEXT NOT NULL,                   -- the mx patterns, one per line
    max_age INTEGER NOT NULL,           -- seconds, as clamped
    fetched_at REAL NOT NULL,           -- time.time() of the fetch
    expires_at REAL NOT NULL            -- fetched_at + max_age
) WITHOUT ROWID
""", """
CREATE INDEX IF NOT EXISTS sts_policies_expiry ON sts_policies (expires_at)
""")


class StsRow(NamedTuple):
    """One cached MTA-STS policy as the store holds it."""

    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    expires_at: float


_STS_COLUMNS = "domain, policy_id, mode, mx, max_age, fetched_at, expires_at"
_STS_PUT = f"""
INSERT INTO sts_policies ({_STS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id, mode = excluded.mode,
    mx = excluded.mx, max_age = excluded.max_age, fetched_at = excluded.fetched_at,
    expires_at = excluded.expires_at
"""


def _sts_row(row) -> StsRow:
    domain, policy_id, mode, mx, max_age, fetched_at, expires_at = row
    return StsRow(domain, policy_id, mode, tuple(p for p in mx.split("\n") if p),
                  int(max_age), float(fetched_at), float(expires_at))

# Claim (domain, reason) at `now` unless it was claimed less than `interval` ago. A row more
# than an interval in the future means the clock was stepped back: it is due again.
_CLAIM = """
INSERT INTO alerts (domain, reason, last) VALUES (?1, ?2, ?3)
ON CONFLICT (domain, reason) DO UPDATE SET last = excluded.last
WHERE excluded.last - alerts.last >= ?4 OR alerts.last - excluded.last > ?4
"""


class StateStore:
    """The shared state database; opened at first use, thread-safe (one connection, a lock)."""

    def __init__(self, directory: str, *, read_only: bool = False):
        self.path = os.path.join(directory, FILENAME)
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._handed_back = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.read_only:
                conn = sqlite3.connect(f"file:{_uri_path(self.path)}?mode=ro", uri=True,
                                       timeout=BUSY_TIMEOUT, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                       check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                if not self.read_only:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    for statement in _SCHEMA:
                        conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _read(self, sql: str, args: tuple) -> list:
        rows = self._connection().execute(sql, args).fetchall()
        if self.read_only and not self._handed_back:
            self._handed_back = True
            _give_to_owner(self.path)
        return rows

    def _absent(self) -> bool:
        """Read-only and there is no database (yet): everything reads as empty."""
        return self.read_only and self._conn is None and not os.path.exists(self.path)

    def get_sts_policy(self, domain: str) -> StsRow | None:
        """The cached MTA-STS policy of *domain* (expired or not), or None."""
        with self._lock:
            if self._absent():
                return None
            try:
                rows = self._read(f"SELECT {_STS_COLUMNS} FROM sts_policies WHERE domain = ?",
                                  (domain,))
            except sqlite3.OperationalError as exc:
                if self.read_only and "no such table" in str(exc):
                    return None         # an older database, not migrated by a reader
                raise
        return _sts_row(rows[0]) if rows else None

    def put_sts_policy(self, row: StsRow) -> None:
        """Store (replace) the policy of `row.domain`."""
        with self._lock:
            self._connection().execute(_STS_PUT, (
                row.domain, row.policy_id, row.mode, "\n".join(row.mx), int(row.max_age),
                float(row.fetched_at), float(row.expires_at)))

    def sts_due_for_refresh(self, now: float, ahead: float) -> list[StsRow]:
        """The cached policies that expire before *now* + *ahead* (those already expired
        too), soonest first."""
        with self._lock:
            if self._absent():
                return []
            try:
                rows = self._read(f"SELECT {_STS_COLUMNS} FROM sts_policies "
                                  f"WHERE expires_at <= ? ORDER BY expires_at, domain",
                                  (now + ahead,))
            except sqlite3.OperationalError as exc:
                if self.read_only and "no such table" in str(exc):
                    return []
                raise
        return [_sts_row(row) for row in rows]

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


def _give_to_owner(path: str) -> None:
    """Root only: give the `-wal`/`-shm` files of *path* to the owner of *path*."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(path)
        for suffix in ("-wal", "-shm"):
            side = path + suffix
            try:
                if os.stat(side).st_uid != st.st_uid or os.stat(side).st_gid != st.st_gid:
                    os.chown(side, st.st_uid, st.st_gid)
            except FileNotFoundError:
                pass
    except OSError:
        pass


def _uri_path(path: str) -> str:
    """*path* for a `file:` URI (the characters URIs reserve, escaped)."""
    from urllib.parse import quote
    return quote(os.path.abspath(path), safe="/")


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
