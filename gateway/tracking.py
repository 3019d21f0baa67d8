"""Message tracking (SPEC §7): one JSON line per relayed or refused message.

Every worker appends to the same file opened with O_APPEND and writes each record with a
single write() call, so records from several processes never interleave. `gateway track`
(gateway/track.py) reads it back.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass


@dataclass
class TrackingRecord:
    """One tracked message.

    upstream_leg: "tls" or "plain" when the transaction reached the upstream (its envelope was
    sent on a leg, with or without TLS); None when it never did (refused before a leg was used,
    the leg could not be opened, or the TLS its level requires was not obtained). Readers infer
    it for records written before the field existed (gateway/track.py `upstream_leg`).
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
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: TrackingRecord) -> None:
        try:
            os.write(self.fd, encode_record(record))
        except OSError as exc:                 # a full disk must not stop mail flowing
            print(f"tracking log write failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        os.close(self.fd)
