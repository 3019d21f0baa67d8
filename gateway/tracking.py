"""Message tracking (SPEC §7): one JSON line per relayed or refused message, and its query.

Every worker appends to the same file opened with O_APPEND and writes each record with a
single write() call, so records from several processes never interleave. `gateway track`
reads it back with filters and prints a table that marks each leg that used TLS.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass


@dataclass
class TrackingRecord:
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
    result: str                # accepted | rejected | tempfail
    reply: str


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class TrackingLog:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: TrackingRecord) -> None:
        line = json.dumps(asdict(record), ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            os.write(self.fd, line.encode("utf-8", "surrogateescape"))
        except OSError as exc:                 # a full disk must not stop mail flowing
            print(f"tracking log write failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        os.close(self.fd)


# --- gateway track ------------------------------------------------------------------------

def _parse_time(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def _matches_address(address: str, pattern: str) -> bool:
    pattern = pattern.lower()
    address = address.lower()
    if "@" in pattern:
        return address == pattern
    return address.rpartition("@")[2] == pattern.lstrip("@")     # a domain


def query(path, *, mail_from=None, rcpt=None, since=None, until=None, tls=None):
    """Records matching every given filter. tls=True: both legs used TLS; False: a leg did not."""
    since = _parse_time(since) if since else None
    until = _parse_time(until) if until else None
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            when = _parse_time(rec["time"])
            if since and when < since or until and when > until:
                continue
            if mail_from and not _matches_address(rec["mail_from"], mail_from):
                continue
            if rcpt and not any(_matches_address(r, rcpt) for r in rec["recipients"]):
                continue
            encrypted = bool(rec.get("client_tls")) and bool(rec.get("upstream_tls"))
            if tls is not None and encrypted != tls:
                continue
            yield rec


def format_table(records) -> str:
    rows = [("TIME", "RESULT", "FROM", "TO", "SIZE", "CLIENT LEG", "UPSTREAM LEG", "REPLY")]
    for r in records:
        rows.append((r["time"][:19].replace("T", " "), r["result"], r["mail_from"] or "<>",
                     ",".join(r["recipients"]), str(r["size"]),
                     ("TLS " + r["client_tls"].split(" ")[0]) if r.get("client_tls") else "plain",
                     ("TLS " + r["upstream_tls"].split(" ")[0]) if r.get("upstream_tls")
                     else "plain", r["reply"][:40]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)
