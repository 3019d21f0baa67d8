"""Message tracking (SPEC §7): one JSON line per relayed or refused message.

Every worker appends to the same file opened with O_APPEND and writes each record with a
single write() of the whole line, so records from several processes never interleave. A record
is written whole or counted as failed: a short or failed write (disk full) is logged as
`tracking_error` and counted in `gateway_tracking_errors_total`, and mail keeps flowing. The
fragment a short write leaves (a full disk, a worker killed mid-write) is never glued to the
next record: a record written after a file that does not end with a newline starts with one.
Looking at the last byte and appending are one step under an exclusive lock on the file
(flock, per open file, let go when the process dies): without it another worker's record,
in the middle of being appended (the file's size grows a page at a time), looked like a torn
one, and the newline put before the next record left an empty line.
`gateway track` (gateway/observe/track_query.py) reads the file back.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
from dataclasses import asdict, dataclass

_FLAGS = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_MODE = 0o640


def _open(path: str) -> tuple[int, bool]:
    """The file for appending, and whether it could be opened for reading too (to see the
    fragment a torn write left at its end); a write-only file is written all the same."""
    try:
        return os.open(path, os.O_RDWR | _FLAGS, _MODE), True
    except PermissionError:
        return os.open(path, os.O_WRONLY | _FLAGS, _MODE), False


def _lock(fd: int) -> bool:
    """Take the file's exclusive lock (waiting for another worker's write); False where the
    filesystem has no locks: written all the same."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


@dataclass
class TrackingRecord:
    """One tracked message.

    upstream_leg: "tls" or "plain" when the transaction reached the upstream (its envelope was
    sent on a leg, with or without TLS); None when it never did (refused before a leg was used,
    the leg could not be opened, or the TLS its level requires was not obtained). Readers infer
    it for records written before the field existed (gateway/observe/track_query.py `upstream_leg`).
    auth_user: the SMTP AUTH identity (SPEC §4.6), None when the client did not authenticate.
    milter: the milters' verdicts (SPEC §4.7), a list of {"milter", "stage", "result"}; None
    when no milter ran. Fields left None are written as null and not shown by `gateway track`'s
    table.
    """
    id: str
    time: str                  # RFC 3339, UTC
    listener: str
    client: str
    helo: str | None
    mail_from: str
    recipients: list[str]
    size: int
    client_tls: str | None     # "TLSv1.3 TLS_AES_256_GCM_SHA384", or None for plaintext
    upstream: str
    upstream_tls: str | None
    result: str                # accepted | rejected | tempfail | discarded
    reply: str
    upstream_leg: str | None = None     # "tls" | "plain" | None: no upstream leg
    auth_user: str | None = None
    milter: list[dict] | None = None


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def encode_record(record: TrackingRecord) -> bytes:
    """The record's line, newline included."""
    line = json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":")) + "\n"
    return line.encode("utf-8", "surrogateescape")


class TrackingLog:
    """The tracking file of one process.

    *log*: where `tracking_error` events go (an EventLog or BoundLog; default a logfmt
    EventLog on stderr). *metrics*: a Metrics whose `tracking_errors_total` counts the records
    not written (default: not counted). `reopen()` reopens the path after logrotate moved the
    file away (for the worker to call on SIGUSR1, SPEC §9)."""

    def __init__(self, path: str, *, log=None, metrics=None):
        self.path = path
        self.log = log
        self.metrics = metrics
        self.errors = 0                          # records not written whole, this process
        self.fd, self._readable = _open(path)

    def write(self, record: TrackingRecord) -> None:
        data = encode_record(record)
        fd = self.fd
        locked = False
        try:
            if self._readable:
                locked = _lock(fd)               # held for microseconds: check + one write
                if not self._ends_with_newline():
                    data = b"\n" + data          # a torn record before: start a line of our own
            written = os.write(fd, data)
        except OSError as exc:                   # a full disk must not stop mail flowing
            self._failed(record, exc.strerror or str(exc), 0, len(data))
            return
        finally:
            if locked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:                  # (closing the file lets it go in any case)
                    pass
        if written != len(data):                 # a short write (disk full): the record is torn
            self._failed(record, "short write", written, len(data))

    def _ends_with_newline(self) -> bool:
        """Does the file end with a whole line? (under the lock, see write()). An empty
        file does, and so does one cut shorter meanwhile (copytruncate: nothing to read)."""
        size = os.fstat(self.fd).st_size
        return size == 0 or os.pread(self.fd, 1, size - 1) in (b"\n", b"")

    def _failed(self, record: TrackingRecord, reason: str, written: int, size: int) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.tracking_errors_total.inc()
        self._log().event("tracking_error", level="error", path=self.path, id=record.id,
                          reason=reason, written=written, bytes=size)

    def _log(self):
        if self.log is None:
            from .logs import EventLog
            self.log = EventLog()
        return self.log

    def reopen(self) -> bool:
        """Open the path again (logrotate moved the file away) and write there from now on.
        On failure the old file stays in use and `tracking_error` is logged; returns success."""
        try:
            fd, readable = _open(self.path)
        except OSError as exc:
            self._log().event("tracking_error", level="error", path=self.path,
                              reason=f"reopen: {exc.strerror or exc}")
            return False
        old, self.fd, self._readable = self.fd, fd, readable
        os.close(old)
        self._log().event("tracking_reopened", path=self.path)
        return True

    def close(self) -> None:
        os.close(self.fd)
