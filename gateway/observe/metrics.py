"""Prometheus metrics (SPEC §11) in prometheus-client's multiprocess mode.

The supervisor makes its directory (`metric_files.create_run_dir()`, which also removes those
of instances killed with kill -9) before anything imports prometheus_client (the value class
is chosen at import), forks workers that each build `Metrics()`, and marks reaped workers
dead (`mark_process_dead`). Its metrics process serves one endpoint (`MetricsServer`): a
single thread, a few seconds for a request to arrive, a cap on connections, so no client of
that port can starve `/healthz`; before a scrape it merges the files of dead workers into one
archive (`metric_files.compact`), so a scrape reads as many files after a thousand reloads as
after one. A scrape reads the value files as MultiProcessCollector does, with exact sums; a
file being created, removed or left unreadable by a killed worker is skipped, never a failed
scrape (`metric_files.collect`). Without metrics, `NullMetrics` offers the same attributes
as no-ops, so call sites never check. `/status` (`status()`) answers JSON from the same files
and the workers' last-minute counts (gateway.observe.recent).

prometheus_client is imported lazily (inside functions) so that importing this module never
fixes the value class too early.
"""
from __future__ import annotations

import glob
import os
import selectors
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

from . import metric_files
from .metric_files import ENV, HEADER as _HEADER

HANDSHAKE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 1800.0, 3600.0)
MILTER_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Spec(NamedTuple):
    """One metric: the Metrics/NullMetrics attribute, its kind, its name as exposed, help text,
    labels, and the kind's option (a gauge's multiprocess mode, a histogram's buckets)."""

    attribute: str
    kind: str                  # "counter", "gauge" or "histogram"
    name: str                  # as in the exposition (a counter's with its "_total")
    doc: str
    labels: tuple[str, ...] = ()
    option: Any = None


# Label values from fixed sets (SPEC §11): a connection refused before its session, by reason;
# a transaction's end, by result. Each worker creates every listener's series at 0 from its
# start (runtime.start_metrics), so that `increase()` sees the first one.
REJECT_REASONS = ("max_connections", "per_ip", "pregreet", "proxy_untrusted", "proxy_malformed")
MESSAGE_RESULTS = ("accepted", "rejected", "tempfail", "discarded")

# The metrics (SPEC §11): the one table METRIC_NAMES, ATTRIBUTES, Metrics and NullMetrics
# are made from. The connection and message counters carry the listener's `type` (public /
# private, §2) after its name. A gauge mode "livemax" falls back to "max" on
# prometheus-client versions without it.
METRICS = (
    Spec("connections_total", "counter", "gateway_connections_total",
         "Accepted connections", ("listener", "type", "protocol")),
    Spec("connections_active", "gauge", "gateway_connections_active",
         "Open connections", ("listener", "type"), "livesum"),
    Spec("connections_rejected_total", "counter", "gateway_connections_rejected_total",
         "Connections refused before a session", ("listener", "type", "reason")),
    Spec("tls_handshakes_total", "counter", "gateway_tls_handshakes_total",
         "TLS handshakes", ("listener", "side", "version", "result")),
    Spec("tls_handshake_seconds", "histogram", "gateway_tls_handshake_seconds",
         "TLS handshake duration", ("listener", "side"), HANDSHAKE_BUCKETS),
    Spec("policy_rejections_total", "counter", "gateway_policy_rejections_total",
         "Policy refusals", ("listener", "reason")),
    Spec("messages_total", "counter", "gateway_messages_total",
         "Transactions ended, by result", ("listener", "type", "result")),
    Spec("message_bytes_total", "counter", "gateway_message_bytes_total",
         "Message octets accepted", ("listener", "type")),
    Spec("upstream_errors_total", "counter", "gateway_upstream_errors_total",
         "Upstream failures", ("listener", "reason")),
    Spec("tls_alerts_total", "counter", "gateway_tls_alerts_total",
         "Required TLS not obtained", ("listener", "reason")),
    Spec("session_seconds", "histogram", "gateway_session_seconds",
         "Session duration", ("listener", "protocol"), SESSION_BUCKETS),
    Spec("worker_restarts_total", "counter", "gateway_worker_restarts_total",
         "Workers replaced after dying"),
    Spec("demo_certificate", "gauge", "gateway_demo_certificate",
         "1 when a generated demo certificate is in use", (), "livemax"),
    Spec("build_info", "gauge", "gateway_build_info",
         "Version and native core", ("version", "native"), "max"),
    Spec("auth_total", "counter", "gateway_auth_total",
         "AUTH exchanges relayed, by result", ("listener", "mechanism", "result")),
    Spec("tracking_errors_total", "counter", "gateway_tracking_errors_total",
         "Tracking records not written (disk full)"),
    Spec("workers_healthy", "gauge", "gateway_workers_healthy",
         "Worker slots with a live, beating worker", (), "livemax"),
    Spec("workers_configured", "gauge", "gateway_workers_configured",
         "Worker slots (gateway.workers)", (), "livemax"),
    Spec("config_last_reload_successful", "gauge", "gateway_config_last_reload_successful",
         "1 when the last reload (or the start) applied the configuration", (), "livemax"),
    Spec("config_last_reload_success_timestamp_seconds", "gauge",
         "gateway_config_last_reload_success_timestamp_seconds",
         "When the configuration was last applied (start or reload)", (), "livemax"),
    Spec("reload_sessions_cut_total", "counter", "gateway_reload_sessions_cut_total",
         "IMAP sessions a retired generation ended with BYE (reason: reload_grace passed, "
         "generation_cap: more than 4 retired generations kept sessions)",
         ("listener", "reason")),
    Spec("reloads_deferred_total", "counter", "gateway_reloads_deferred_total",
         "Reloads that waited for a draining generation to free a worker row"),
    Spec("milter_results_total", "counter", "gateway_milter_results_total",
         "Milter verdicts and failures, by result", ("listener", "milter", "result")),
    # observed at a milter's end of message: its answers from MAIL FROM on, summed
    Spec("milter_seconds", "histogram", "gateway_milter_seconds",
         "One milter's time for one message", ("listener", "milter"), MILTER_BUCKETS),
    # set by each worker at start: a worker's values go with it, so after a reload only the
    # certificates the new generation loaded remain
    Spec("certificate_expiry", "gauge", "gateway_certificate_expiry_timestamp_seconds",
         "notAfter of each loaded certificate", ("certificate", "key_type"), "livemax"),
    # the newest across workers, dead ones included (`/status`: the upstream's last result)
    Spec("upstream_last_result", "gauge", "gateway_upstream_last_result_timestamp_seconds",
         "When a connection to the upstream was last opened (ok) or failed, by result",
         ("listener", "result"), "max"),
)

# Exposed metric names, as they appear in the exposition.
METRIC_NAMES = tuple(spec.name for spec in METRICS)
# Attribute names shared by Metrics and NullMetrics.
ATTRIBUTES = tuple(spec.attribute for spec in METRICS)


def prepare_multiprocess_dir(path: str | None = None) -> str:
    """Create (or wipe) a private directory for the per-process value files and point
    PROMETHEUS_MULTIPROC_DIR at it. Call before the first import of prometheus_client."""
    if "prometheus_client" in sys.modules and not os.environ.get(ENV):
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                           "was set: its values would not be shared between processes")
    if path is None:
        path = tempfile.mkdtemp(prefix="gateway-metrics-")      # mode 0700, fresh
    else:
        path = os.path.abspath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise RuntimeError(f"metrics directory {path!r} exists and is not a directory")
            shutil.rmtree(path)
        os.makedirs(path, mode=0o700)
    os.chmod(path, 0o700)                                        # whatever the umask was
    os.environ[ENV] = path
    return path


def _gauge_mode_max() -> str:
    from prometheus_client import Gauge
    modes = getattr(Gauge, "_MULTIPROC_MODES", ())
    return "livemax" if "livemax" in modes else "max"


class Metrics:
    """The gateway's metrics, one attribute per row of METRICS. Built once per process; safe
    to build again after a fork (nothing is registered in the default registry: in
    multiprocess mode the collector reads the value files, so registration would only risk
    duplicate-name errors)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        import gateway
        from ..native import scanner

        for spec in METRICS:
            if spec.kind == "counter":
                # prometheus-client appends "_total" to counter names in the exposition.
                metric = Counter(spec.name.removesuffix("_total"), spec.doc, spec.labels,
                                 registry=None)
            elif spec.kind == "gauge":
                mode = _gauge_mode_max() if spec.option == "livemax" else spec.option
                metric = Gauge(spec.name, spec.doc, spec.labels, multiprocess_mode=mode,
                               registry=None)
            else:
                metric = Histogram(spec.name, spec.doc, spec.labels, buckets=spec.option,
                                   registry=None)
            setattr(self, spec.attribute, metric)
        self.build_info.labels(gateway.__version__,
                               "yes" if scanner.BACKEND == "native" else "no").set(1)


class _Null:
    """A metric that accepts every call and does nothing."""

    __slots__ = ()

    def labels(self, *args, **kwargs):
        return self

    def inc(self, amount=1, *args, **kwargs):
        pass

    def dec(self, amount=1, *args, **kwargs):
        pass

    def set(self, value=0, *args, **kwargs):
        pass

    def observe(self, amount=0, *args, **kwargs):
        pass


_NULL = _Null()


class NullMetrics:
    """Metrics switched off: same attributes as Metrics, all no-ops."""

    def __init__(self):
        for name in ATTRIBUTES:
            setattr(self, name, _NULL)


def mark_process_dead(pid: int) -> None:
    """Drop a reaped worker's live gauges (livesum/livemax) from the exposition, and any of
    its value files left shorter than a header (killed between creating and sizing one)."""
    path = os.environ.get(ENV)
    if not path:
        return
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid, path)
    for f in glob.glob(os.path.join(glob.escape(path), f"*_{int(pid)}.db")):
        try:
            if os.path.getsize(f) < _HEADER:
                os.remove(f)
        except OSError:
            pass


class _TolerantCollector:
    """The value files of every process and the archive of dead ones, merged
    (metric_files.collect: a file that cannot be read whole is left out of this scrape)."""

    def __init__(self, path: str):
        self.path = path

    def collect(self):
        return metric_files.collect(self.path)


def render() -> tuple[bytes, str]:
    """The exposition of all processes' metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    path = os.environ.get(ENV)
    if not path or not os.path.isdir(path):
        raise ValueError(f"{ENV} is not set or not a directory")
    registry = CollectorRegistry()
    registry.register(_TolerantCollector(path))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _samples(path: str) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of every process's value files, merged: {sample name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in _TolerantCollector(path).collect():
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _utc(ts: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def status(workers=None, now: float | None = None) -> dict:
    """`/status` (SPEC §11), summed across workers: per listener the open connections, the
    sessions and messages of the last minute and the upstream's last result; the certificates
    loaded, with their expiry; the workers (*workers*: the supervisor's callable returning
    rows of pid, generation and heartbeat age; empty when it gives none); the last reload,
    once the supervisor exports it."""
    import time

    from .recent import read_recent
    path = os.environ.get(ENV)
    if not path or not os.path.isdir(path):
        raise ValueError(f"{ENV} is not set or not a directory")
    now = time.time() if now is None else now
    samples = _samples(path)
    recent = read_recent(path, now)

    def by_listener(name: str) -> dict[str, list[tuple[dict, float]]]:
        rows: dict[str, list[tuple[dict, float]]] = {}
        for labels, value in samples.get(name, ()):
            rows.setdefault(labels.get("listener", ""), []).append((labels, value))
        return rows
    active = by_listener("gateway_connections_active")
    upstream = by_listener("gateway_upstream_last_result_timestamp_seconds")
    names = list(recent)
    for source in (by_listener("gateway_tls_alerts_total"), active, upstream):
        names += [n for n in source if n and n not in names]
    listeners = []
    for name in names:
        results = {labels["result"]: value for labels, value in upstream.get(name, ())}
        last = None
        if results:
            result, at = max(results.items(), key=lambda item: item[1])
            last = {"result": result, "at": at, "at_utc": _utc(at),
                    "age_seconds": round(now - at, 1)}
        counts = recent.get(name, {"sessions": 0, "messages": 0})
        listeners.append({
            "name": name,
            "active_connections": int(sum(v for _, v in active.get(name, ()))),
            "sessions_last_minute": counts["sessions"],
            "messages_last_minute": counts["messages"],
            "upstream_last_result": last})
    certificates = sorted(
        ({"name": labels["certificate"], "key_type": labels["key_type"], "not_after": value,
          "not_after_utc": _utc(value), "expires_in_days": round((value - now) / 86400, 1)}
         for labels, value in samples.get("gateway_certificate_expiry_timestamp_seconds", ())),
        key=lambda c: (c["not_after"], c["name"], c["key_type"]))
    out = {"time": _utc(now), "listeners": listeners, "certificates": certificates,
           "demo_certificate": any(v == 1 for _, v in samples.get("gateway_demo_certificate",
                                                                  ())),
           "workers": list(workers()) if workers is not None else []}
    # the supervisor's reload gauges (SPEC §11), when it exports them
    reload_ok = samples.get("gateway_config_last_reload_successful")
    if reload_ok:
        out["last_reload_successful"] = bool(max(v for _, v in reload_ok))
        at = samples.get("gateway_config_last_reload_success_timestamp_seconds")
        if at:
            out["last_reload_success_utc"] = _utc(max(v for _, v in at))
    return out


# The endpoint's bounds (SPEC §9): no client of the port can starve /healthz or /metrics.
MAX_CONNECTIONS = 64       # open at once; a new one closes the oldest still sending its request
REQUEST_TIMEOUT = 5.0      # seconds from the connection to the end of its request's headers
SEND_TIMEOUT = 10.0        # seconds for the client to take the answer
MAX_REQUEST = 8192         # bytes of request line and headers
COMPACT_EVERY = 5.0        # seconds between merges of dead workers' files when nobody scrapes

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


class _Conn:
    __slots__ = ("sock", "inbuf", "out", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.inbuf = b""
        self.out: bytes | None = None        # the answer, once the request is in
        self.deadline = deadline


class MetricsServer:
    """`/metrics`, `/healthz` and `/status` with bounded resources (SPEC §9): one thread and a
    selector; at most *max_connections* connections (a new one closes the oldest that has
    not sent its whole request yet); a request must arrive within *request_timeout* seconds
    and its answer be taken within SEND_TIMEOUT; one request per connection (HTTP/1.0).

    *healthy*: a callable, true while every worker slot is served. *workers*: a callable
    returning `/status`'s worker rows (dicts: pid, generation, heartbeat_age_seconds) — the
    supervisor's to give; without it the list is empty. *sock*: a socket bound and listening
    already (the supervisor's, served by its metrics process), else one is bound to
    host:port. *compact*: merge the files of dead processes before each scrape and every few
    seconds (metric_files.compact; only the metrics process, the one reader, may).

    `serve_forever()` serves in the calling thread (the metrics process); `start()` in a
    daemon thread until `stop()`."""

    def __init__(self, host: str, port: int, healthy=None, workers=None,
                 sock: socket.socket | None = None, *, compact: bool = False,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT):
        self.host = host or "127.0.0.1"
        self.port = port
        self.healthy = healthy
        self.workers = workers
        self.sock = sock
        self.compact = compact
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._conns: dict[socket.socket, _Conn] = {}      # oldest first
        self._stopping = False
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._compacted = 0.0

    # --- life ---

    def _bind(self) -> None:
        if self.sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self.sock = socket.create_server((self.host.strip("[]"), self.port),
                                             family=family, backlog=64)
        self.port = self.sock.getsockname()[1]

    def start(self) -> None:
        self._bind()
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self.serve_forever, name="gateway-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            try:
                self._wake[1].send(b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._wake is not None:
            for s in self._wake:
                s.close()
            self._wake = None
        if self.sock is not None:
            self.sock.close()

    def serve_forever(self) -> None:
        self._bind()
        listener = self.sock
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        if self._wake is not None:
            sel.register(self._wake[0], selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = 1.0
                if self._conns:
                    timeout = min(timeout, min(c.deadline for c in self._conns.values()) - now)
                ready = sel.select(max(0.0, timeout))
                # the connections first, then new ones: a client that sent its request
                # is answered before a flood of new connections could push it out
                for key, events in ready:
                    if key.data == "wake":
                        return
                    if key.data is not None:
                        conn = key.data
                        if (conn.sock in self._conns and events & selectors.EVENT_READ
                                and conn.out is None):
                            self._read(sel, conn)
                        if (conn.sock in self._conns and events & selectors.EVENT_WRITE
                                and conn.out is not None):
                            self._send(sel, conn)
                if any(key.data is None for key, _ in ready):
                    self._accept(sel, listener)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._close(sel, conn)               # too slow to ask, or to take
                if self.compact and now - self._compacted >= COMPACT_EVERY:
                    self._compact()
        finally:
            for conn in list(self._conns.values()):
                self._close(sel, conn)
            sel.close()

    # --- connections ---

    def _accept(self, sel, listener: socket.socket) -> None:
        for _ in range(self.max_connections):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                  # out of descriptors, or the client gave up
                if self._conns:
                    self._close(sel, next(iter(self._conns.values())))
                return
            if len(self._conns) >= self.max_connections:
                waiting = [c for c in self._conns.values() if c.out is None]
                self._close(sel, waiting[0] if waiting else next(iter(self._conns.values())))
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.request_timeout)
            self._conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _close(self, sel, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _read(self, sel, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conn)
            return
        if not data:
            self._close(sel, conn)
            return
        conn.inbuf += data
        head = conn.inbuf.replace(b"\r\n", b"\n")
        end = head.find(b"\n\n")
        if end < 0:
            if len(conn.inbuf) > MAX_REQUEST:
                self._answer(sel, conn, b"HEAD", *self._plain(431, b"request too large\n"))
            return
        line = head.split(b"\n", 1)[0].split()
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            self._answer(sel, conn, b"GET", *self._plain(400, b"bad request\n"))
            return
        method, target = line[0], line[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._answer(sel, conn, b"GET", *self._plain(405, b"method not allowed\n"))
            return
        self._answer(sel, conn, method, *self._respond(target.split("?", 1)[0]))

    def _answer(self, sel, conn: _Conn, method: bytes, code: int, ctype: str,
                body: bytes) -> None:
        head = (f"HTTP/1.0 {code} {_REASONS.get(code, 'Error')}\r\n"
                f"Server: gateway-metrics\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        conn.out = head if method == b"HEAD" else head + body
        conn.inbuf = b""
        conn.deadline = time.monotonic() + SEND_TIMEOUT
        sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._send(sel, conn)

    def _send(self, sel, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        try:                                 # all sent: end it, without resetting the answer
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.recv(65536)
        except OSError:
            pass
        self._close(sel, conn)

    # --- answers ---

    @staticmethod
    def _plain(code: int, body: bytes) -> tuple[int, str, bytes]:
        return code, _TEXT, body

    def _compact(self) -> None:
        self._compacted = time.monotonic()
        try:
            metric_files.compact()
        except Exception:                    # a merge must never cost a scrape
            pass

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            try:
                ok = self.healthy is None or bool(self.healthy())
            except Exception:
                ok = False
            return self._plain(200, b"ok\n") if ok else self._plain(503, b"unhealthy\n")
        if path not in ("/metrics", "/status"):
            return self._plain(404, b"not found\n")
        if self.compact:
            self._compact()
        try:
            if path == "/metrics":
                body, ctype = render()
                return 200, ctype, body
            import json
            return (200, "application/json",
                    (json.dumps(status(self.workers), indent=2) + "\n").encode())
        except Exception as exc:             # a request must not end the endpoint
            return 500, "text/plain", f"error: {exc!r}\n".encode()
