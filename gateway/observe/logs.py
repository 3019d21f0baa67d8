"""Structured event log (SPEC §7): one line per event, logfmt (default) or JSON lines.

    log = EventLog("logfmt")
    conn = log.bind(listener="inbound").bind(conn=new_conn_id(), client="192.0.2.7:40001")
    conn.event("tls", side="client", version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")

gives ``ts=2025-01-01T12:00:00.123Z level=info event=tls conn=… listener=inbound client=…
side=client version=TLSv1.3 cipher=TLS_AES_128_GCM_SHA256``.

Where lines go (``log_file``, SPEC §9): stderr (journald) by default, an append-only file
(``LogFile``), or syslog with facility mail (``SyslogSocket``), as Postfix logs; the last two
reopen on SIGUSR1 (``EventLog.reopen``).

Key order: ``ts``, ``level``, ``event``, then the bound fields (``conn``, ``listener``,
``client`` first when bound, then the others in the order they were bound), then the call's
fields. A call field with the name of a bound field replaces its value in place; ``None``
values are left out. Logging never raises: odd values are rendered as safe text and a failing
stream is ignored.
"""
from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import secrets
import socket
import sys
import time
from typing import Any, TextIO

from .clock import per_second

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("logfmt", "json")
_LEADING = ("conn", "listener", "client")      # bound fields that always come first
_RESERVED = ("ts", "level", "event")
_MAX_DEPTH = 4


def new_conn_id() -> str:
    """A short random connection id: 10 lower-case base32 characters (50 bits)."""
    return base64.b32encode(secrets.token_bytes(7)).decode("ascii")[:10].lower()


_PLAIN_OK = re.compile(r'[ ="\\]')     # a printable ASCII value with one of these is quoted


# strftime once per second, not once per event
_second_text = per_second(lambda seconds: time.strftime("%Y-%m-%dT%H:%M:%S",
                                                        time.gmtime(seconds)))


def timestamp(now: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds: ``2025-01-01T12:00:00.123Z``."""
    if now is None:
        now = time.time()
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    return f"{_second_text(seconds)}.{millis:03d}Z"


# ---------------------------------------------------------------------------------------------
# Value rendering


def _text(value: Any) -> str:
    """Any value as text, without raising."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe version of *value* (str, int, finite float, bool, None, list, dict)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_plain(v, depth + 1) for v in value]
        if isinstance(value, dict):
            return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
    return _text(value)


def _logfmt_value(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is str and value and value.isascii() and value.isprintable() \
            and _PLAIN_OK.search(value) is None:
        return value                     # the common case: nothing to quote or escape
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        text = ",".join(_text(v) if not isinstance(v, bool) else _logfmt_value(v)
                        for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = _text(value)
    if text == "":
        return '""'
    if text.isascii() and text.isprintable() and _PLAIN_OK.search(text) is None:
        return text                      # the common case: nothing to quote or escape
    needs_quotes = False
    out = []
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
            needs_quotes = True
        elif ch == " " or ch == "=":
            out.append(ch)
            needs_quotes = True
        elif ch == "\n":
            out.append("\\n")
            needs_quotes = True
        elif ch == "\r":
            out.append("\\r")
            needs_quotes = True
        elif ch == "\t":
            out.append("\\t")
            needs_quotes = True
        elif not ch.isprintable():
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
            needs_quotes = True
        else:
            out.append(ch)
    text = "".join(out)
    return f'"{text}"' if needs_quotes else text


@functools.lru_cache(maxsize=1024)
def _logfmt_key(key: str) -> str:
    cleaned = "".join(ch if (ch.isascii() and (ch.isalnum() or ch in "_.-:/")) else "_"
                      for ch in key)
    return cleaned or "_"


def format_logfmt(record: dict[str, Any]) -> str:
    return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in record.items())


def format_json(record: dict[str, Any]) -> str:
    plain = {k: _plain(v) for k, v in record.items()}
    try:
        return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))
    except Exception:   # pragma: no cover - _plain leaves nothing json cannot encode
        return json.dumps({k: _text(v) for k, v in record.items()})


# ---------------------------------------------------------------------------------------------
# Loggers


def _merge(fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(fields)
    for k, v in extra.items():
        k = _text(k)
        if k in _RESERVED:
            k += "_"
        merged[k] = v
    return merged


def _order_bound(fields: dict[str, Any]) -> dict[str, Any]:
    ordered = {k: fields[k] for k in _LEADING if k in fields}
    ordered.update((k, v) for k, v in fields.items() if k not in ordered)
    return ordered


class EventLog:
    """Writes one line per event to *stream* (default: ``sys.stderr`` at write time)."""

    def __init__(self, fmt: str = "logfmt", stream: TextIO | None = None,
                 min_level: str = "debug"):
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.fmt = fmt
        self.stream = stream
        self.min_level = min_level
        self._min_rank = LEVELS.index(min_level) if min_level in LEVELS else 0
        self._format = format_json if fmt == "json" else format_logfmt

    def bind(self, **fields: Any) -> BoundLog:
        return BoundLog(self, _merge({}, fields))

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        self.emit_event(event, level, {}, fields)

    def format(self, event: str, level: str = "info", **fields: Any) -> str:
        """The line (without newline) that `event` would write."""
        return self._format(self._record(event, level, {}, fields))

    @staticmethod
    def _record(event: str, level: str, bound: dict[str, Any],
                fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": timestamp(), "level": _text(level),
                                  "event": _text(event)}
        merged = _order_bound(bound)
        merged.update(_merge({}, fields))
        record.update((k, v) for k, v in merged.items() if v is not None)
        return record

    def emit_event(self, event: str, level: str, bound: dict[str, Any],
                   fields: dict[str, Any], prefix: str | None = None) -> None:
        """Write one event with *bound* fields (a BoundLog's) under the call's *fields*;
        *prefix* is the bound fields already in logfmt, when the BoundLog has made it."""
        try:
            if level in LEVELS and LEVELS.index(level) < self._min_rank:
                return
            if prefix is not None and fields.keys().isdisjoint(bound) \
                    and fields.keys().isdisjoint(_RESERVED):
                line = _logfmt_line(event, level, prefix, fields)
            else:
                line = self._format(self._record(event, level, bound, fields))
        except Exception as exc:  # never let logging break a session
            try:
                line = self._format({"ts": timestamp(), "level": "error",
                                     "event": "log_error", "failed_event": _text(event),
                                     "reason": _text(exc)})
            except Exception:
                return
        stream = self.stream
        try:
            if stream is None:
                stream = sys.stderr
                stream.write(line + "\n")
                stream.flush()
            elif stream.__class__ in _TARGETS:
                stream.emit(level, line)
            else:
                stream.write(line + "\n")
                stream.flush()
        except Exception:
            pass

    def reopen(self) -> None:
        """SIGUSR1: a log file or syslog socket is opened again (logrotate moved the file);
        stderr stays as it is."""
        reopen = getattr(self.stream, "reopen", None)
        if reopen is not None:
            reopen()


def _logfmt_line(event: str, level: str, prefix: str, fields: dict[str, Any]) -> str:
    """The logfmt line of one event whose call fields neither repeat a bound one nor use a
    reserved name (those take the general path): the same
    text as format_logfmt(_record(...)), with the bound fields already formatted."""
    parts = [f"ts={timestamp()} level={_logfmt_value(_text(level))} "
             f"event={_logfmt_value(_text(event))}"]
    if prefix:
        parts.append(prefix)
    for k, v in fields.items():         # no key is reserved or bound (see emit_event)
        if v is None:
            continue
        parts.append(f"{_logfmt_key(k)}={_logfmt_value(v)}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Log targets (log_file)

SYSLOG_SOCKET = "/dev/log"
_FACILITY_MAIL = 2
_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class LogFile:
    """Lines appended to a file, one write(2) each (O_APPEND: the lines of the supervisor and
    of every worker interleave whole). *owner* (uid, gid) is given the file when this process
    creates it, so that workers that dropped to `user` can reopen it after logrotate."""

    def __init__(self, path: str, owner: tuple[int, int] | None = None):
        self.path = path
        self.owner = owner
        self.fd = -1
        self.fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self.owner is not None and os.geteuid() == 0:
            try:
                os.fchown(fd, *self.owner)
            except OSError:
                pass
        return fd

    def emit(self, level: str, line: str) -> None:
        os.write(self.fd, (line + "\n").encode("utf-8", errors="backslashreplace"))

    def reopen(self) -> None:
        try:
            fd = self._open()
        except OSError:
            return                  # keep writing to the old file rather than nowhere
        old, self.fd = self.fd, fd
        os.close(old)


class SyslogSocket:
    """Lines sent to the local syslog daemon (``/dev/log``, or the socket of
    ``syslog:/path``) with facility mail, tagged ``gateway[pid]``, as Postfix logs. A line the
    daemon does not take (it is restarting) is dropped, never blocks."""

    def __init__(self, path: str = SYSLOG_SOCKET, tag: str = "gateway"):
        self.path = path
        self.tag = tag
        self.sock: socket.socket | None = None
        self._connect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        old, self.sock = self.sock, sock
        if old is not None:
            old.close()

    def emit(self, level: str, line: str) -> None:
        priority = _FACILITY_MAIL * 8 + _SEVERITY.get(level, 6)
        data = f"<{priority}>{self.tag}[{os.getpid()}]: {line}".encode(
            "utf-8", errors="backslashreplace")
        try:
            self.sock.send(data)
        except OSError:
            try:                    # the daemon restarted: its socket is a new one
                self._connect()
                self.sock.send(data)
            except OSError:
                pass

    def reopen(self) -> None:
        try:
            self._connect()
        except OSError:
            pass


_TARGETS = (LogFile, SyslogSocket)


def open_target(spec: str, owner: tuple[int, int] | None = None):
    """The target of ``log_file``: None (stderr) for "", a SyslogSocket for "syslog" or
    "syslog:/path", else a LogFile. Raises OSError when it cannot be opened."""
    if not spec:
        return None
    if spec == "syslog":
        return SyslogSocket()
    if spec.startswith("syslog:"):
        return SyslogSocket(spec[len("syslog:"):])
    return LogFile(spec, owner)


class BoundLog:
    """An EventLog with fields bound (per listener, per connection)."""

    __slots__ = ("_log", "fields", "_prefix")

    def __init__(self, log: EventLog, fields: dict[str, Any]):
        self._log = log
        self.fields = fields
        self._prefix: str | None = None     # the bound fields in logfmt, made on first use

    def bind(self, **fields: Any) -> BoundLog:
        return BoundLog(self._log, _merge(self.fields, fields))

    def reopen(self) -> None:
        self._log.reopen()

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        log = self._log
        prefix = None
        if log.fmt == "logfmt":
            prefix = self._prefix
            if prefix is None:
                bound = {k: v for k, v in _order_bound(self.fields).items() if v is not None}
                prefix = self._prefix = format_logfmt(bound)
        log.emit_event(event, level, self.fields, fields, prefix)
