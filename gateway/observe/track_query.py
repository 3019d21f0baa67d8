"""`gateway track` (SPEC §7): read tracking files back, filter them, print a table or JSON.

Files may be rotated and gzip-compressed (`tracking.jsonl`, `.1`, `.2.gz`; gzip is recognised
by its magic number, not its name). Lines that are not tracking records (the fragment a torn
write left, a foreign line) are skipped and counted, never fatal. Times: ISO 8601 (without an
offset: UTC, as the records and the table are), `now`, relative (`30m`, `24h`, `7d`: that long
before now) or `today` / `yesterday` (local midnight). `since` is inclusive, `until`
exclusive, so `since=yesterday until=today` is yesterday.
"""
from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

RESULTS = ("accepted", "rejected", "tempfail", "discarded")
TIME_HELP = "ISO 8601 (2026-11-24T10:00Z; UTC without an offset), 30m, 24h, 7d, today, yesterday"

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_ROTATED = re.compile(r"\.(\d+)(\.gz)?")            # logrotate: FILE.1, FILE.2.gz
_DATED = re.compile(r"-(\d{8,10})(\.gz)?")          # logrotate dateext: FILE-20261124[.gz]


class TrackError(Exception):
    """A problem `gateway track` reports in one line (bad argument, unreadable file)."""


def local_now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def parse_time(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """An aware datetime for *text* (see the module docstring). Raises ValueError."""
    now = now if now is not None else local_now()
    word = text.strip().lower()
    if word == "now":
        return now
    if word in ("today", "yesterday"):
        day = now.astimezone().date()
        if word == "yesterday":
            day -= datetime.timedelta(days=1)
        return datetime.datetime.combine(day, datetime.time()).astimezone()   # local midnight
    m = _RELATIVE.fullmatch(word)
    if m:
        try:
            return now - datetime.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise ValueError(f"too far back: {text!r}") from None
    try:
        return _parse_iso(text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} ({TIME_HELP})") from None


def _parse_iso(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00")
                                            .replace("z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def rotated_files(path: str) -> list[str]:
    """*path* and its rotated siblings that exist, oldest first: dated ones (dateext) by date,
    then numbered ones from the highest number, then *path* itself."""
    directory, base = os.path.split(path)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        names = []
    dated, numbered = [], []
    for name in names:
        if not name.startswith(base) or name == base:
            continue
        rest = name[len(base):]
        m = _ROTATED.fullmatch(rest)
        if m:
            numbered.append((-int(m.group(1)), name))
            continue
        m = _DATED.fullmatch(rest)
        if m:
            dated.append((m.group(1), name))
    files = [os.path.join(directory, n) for _, n in sorted(dated) + sorted(numbered)]
    if os.path.exists(path) or not files:
        files.append(path)          # a missing path with no siblings: reported when read
    return files


def _open(path: str):
    """A text stream of the file, decompressed when it is gzip."""
    f = open(path, "rb")
    try:
        magic = f.peek(2)[:2]
    except OSError:
        f.close()
        raise
    if magic == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape")


def _record(line: str) -> dict | None:
    """The record of one line with its parsed time under "_when", or None if it is none."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("time"), str):
        return None
    recipients = rec.get("recipients", [])
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        return None
    try:
        when = _parse_iso(rec["time"])
    except ValueError:
        return None
    rec["_when"] = when
    return rec


def read_records(paths: Iterable[str], warn: Callable[[str], None]) -> Iterator[dict]:
    """Every record of *paths* in file order (with "_when"). A file that cannot be opened
    raises TrackError; skipped lines and a truncated gzip file are reported through *warn*."""
    for path in paths:
        try:
            stream = _open(path)
        except OSError as exc:
            raise TrackError(f"{path}: {exc.strerror or exc}") from None
        skipped = 0
        with stream:
            try:
                for line in stream:
                    rec = _record(line)
                    if rec is None:
                        skipped += line.strip() != ""
                        continue
                    yield rec
            except (OSError, EOFError, zlib.error) as exc:
                warn(f"{path}: read stopped early: {exc}")
        if skipped:
            warn(f"{path}: {skipped} line{'s' * (skipped != 1)} skipped "
                 "(not tracking records)")


# --- legs --------------------------------------------------------------------------------

def client_leg(rec: dict) -> str:
    """"tls" or "plain": the client leg always exists."""
    return "tls" if rec.get("client_tls") else "plain"


def upstream_leg(rec: dict) -> str | None:
    """"tls", "plain", or None when the message never reached the upstream. Records written
    before `upstream_leg` existed: TLS details mean "tls", an accepted message without them
    went over a plaintext leg, anything else is taken as no leg."""
    leg = rec.get("upstream_leg")
    if leg in ("tls", "plain"):
        return leg
    if rec.get("upstream_tls"):
        return "tls"
    if rec.get("result") == "accepted":
        return "plain"
    return None


# --- query -------------------------------------------------------------------------------

def _matches_address(address: str, pattern: str) -> bool:
    """*pattern*: an address (alice@x.example), a domain (x.example or @x.example), or <> for
    the null sender."""
    address = (address or "").lower()
    pattern = pattern.strip().lower()
    if pattern == "<>":
        return address in ("", "<>")
    if "@" in pattern.lstrip("@"):
        return address == pattern
    return "@" in address and address.rpartition("@")[2] == pattern.lstrip("@")


@dataclass
class Filters:
    mail_from: str | None = None
    rcpt: str | None = None
    addr: str | None = None             # the sender or any recipient
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    results: frozenset[str] = field(default_factory=frozenset)    # empty: any
    tls: bool | None = None             # True: every leg that existed used TLS
    client_tls: bool | None = None
    upstream_tls: bool | None = None    # True: a TLS upstream leg; False: a plaintext one

    def match(self, rec: dict) -> bool:
        when = rec["_when"]
        if self.since is not None and when < self.since:
            return False
        if self.until is not None and when >= self.until:
            return False
        if self.results and rec.get("result") not in self.results:
            return False
        if self.mail_from is not None and not _matches_address(rec.get("mail_from"),
                                                               self.mail_from):
            return False
        if self.rcpt is not None and not any(_matches_address(r, self.rcpt)
                                             for r in rec.get("recipients", ())):
            return False
        if self.addr is not None \
                and not _matches_address(rec.get("mail_from"), self.addr) \
                and not any(_matches_address(r, self.addr) for r in rec.get("recipients", ())):
            return False
        client, upstream = client_leg(rec), upstream_leg(rec)
        if self.client_tls is not None and (client == "tls") != self.client_tls:
            return False
        if self.upstream_tls is not None \
                and upstream != ("tls" if self.upstream_tls else "plain"):
            return False
        if self.tls is not None:
            all_tls = client == "tls" and upstream in ("tls", None)
            if all_tls != self.tls:
                return False
        return True


def query(paths: Iterable[str], filters: Filters,
          warn: Callable[[str], None] = lambda message: None) -> list[dict]:
    """The matching records of every file, in time order (stable: file order for equal
    times), each without its "_when"."""
    records = [rec for rec in read_records(paths, warn) if filters.match(rec)]
    records.sort(key=lambda rec: rec["_when"])
    for rec in records:
        del rec["_when"]
    return records


# --- output ------------------------------------------------------------------------------

def _one_line(text) -> str:
    return " ".join(str(text).split())


def _tls_cell(details: str | None, leg: str | None) -> str:
    if leg is None:
        return "-"
    if leg == "plain":
        return "plain"
    version = (details or "").split(" ")[0]
    return version if version.startswith("TLS") else f"TLS {version}".rstrip()


def _time_cell(text) -> str:
    try:
        return _parse_iso(text).astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return _one_line(text or "")


def _milter_cell(milters) -> str:
    if not milters:
        return "-"
    if not isinstance(milters, list):
        return _one_line(milters)
    return ",".join(f"{m.get('milter')}:{m.get('stage')}:{m.get('result')}"
                    if isinstance(m, dict)
                    else _one_line(m) for m in milters)


def format_table(records: list[dict]) -> str:
    """A table with one row per record: the record id first (what a log line or a user
    quotes back), each leg shows its TLS version, `plain`, or `-` when there was no upstream
    leg; AUTH and MILTER columns only when a record has them; the reply comes last and is
    never cut."""
    auth = any(r.get("auth_user") for r in records)
    milter = any(r.get("milter") for r in records)
    header = ["ID", "TIME (UTC)", "RESULT", "FROM", "TO", "SIZE", "CLIENT", "UPSTREAM"]
    header += ["AUTH"] * auth + ["MILTER"] * milter + ["REPLY"]
    rows = [header]
    for r in records:
        row = [_one_line(r.get("id") or "-"),
               _time_cell(r.get("time")), _one_line(r.get("result", "")),
               _one_line(r.get("mail_from") or "<>"), _one_line(",".join(r.get("recipients", ()))),
               str(r.get("size", "")), _tls_cell(r.get("client_tls"), client_leg(r)),
               _tls_cell(r.get("upstream_tls"), upstream_leg(r))]
        if auth:
            row.append(_one_line(r.get("auth_user") or "-"))
        if milter:
            row.append(_milter_cell(r.get("milter")))
        row.append(_one_line(r.get("reply", "")))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]])
                     .rstrip() for row in rows)


def format_json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)
