"""Prometheus metrics (SPEC §11) in prometheus-client's multiprocess mode.

The supervisor calls `prepare_multiprocess_dir()` before anything imports prometheus_client
(the value class is chosen at import), forks workers that each build `Metrics()`, serves one
endpoint with a fresh registry per scrape (`MetricsServer`), and marks reaped workers dead
(`mark_process_dead`). A scrape reads the value files as MultiProcessCollector does; a file being
created, removed or left unreadable by a killed worker is skipped, never a failed scrape
(`_TolerantCollector`). Without metrics, `NullMetrics` offers the same
attributes as no-ops, so call sites never check. `/status` (`status()`) answers JSON from the
same files and the workers' last-minute counts (gateway.recent).

prometheus_client is imported lazily (inside functions) so that importing this module never
fixes the value class too early.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

ENV = "PROMETHEUS_MULTIPROC_DIR"

HANDSHAKE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 1800.0, 3600.0)


class Spec(NamedTuple):
    """One metric: the Metrics/NullMetrics attribute, its kind, its name as exposed, help text,
    labels, and the kind's option (a gauge's multiprocess mode, a histogram's buckets)."""

    attribute: str
    kind: str                  # "counter", "gauge" or "histogram"
    name: str                  # as in the exposition (a counter's with its "_total")
    doc: str
    labels: tuple[str, ...] = ()
    option: Any = None


# The metrics (SPEC §11): the one table METRIC_NAMES, ATTRIBUTES, Metrics and NullMetrics
# are made from. A gauge mode "livemax" falls back to "max" on prometheus-client versions
# without it.
METRICS = (
    Spec("connections_total", "counter", "gateway_connections_total",
         "Accepted connections", ("listener", "protocol")),
    Spec("connections_active", "gauge", "gateway_connections_active",
         "Open connections", ("listener",), "livesum"),
    Spec("connections_rejected_total", "counter", "gateway_connections_rejected_total",
         "Connections refused before a session", ("listener", "reason")),
    Spec("tls_handshakes_total", "counter", "gateway_tls_handshakes_total",
         "TLS handshakes", ("listener", "side", "version", "result")),
    Spec("tls_handshake_seconds", "histogram", "gateway_tls_handshake_seconds",
         "TLS handshake duration", ("listener", "side"), HANDSHAKE_BUCKETS),
    Spec("policy_rejections_total", "counter", "gateway_policy_rejections_total",
         "Policy refusals", ("listener", "reason")),
    Spec("messages_total", "counter", "gateway_messages_total",
         "Messages by result", ("listener", "result")),
    Spec("message_bytes_total", "counter", "gateway_message_bytes_total",
         "Message octets accepted", ("listener",)),
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
        from . import native

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
                               "yes" if native.BACKEND == "native" else "no").set(1)


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


# A value file starts with a 4-byte "used" count and 4 bytes of padding (mmap_dict.py).
_HEADER = 8


def _read_file(path: str) -> list | None:
    """All (key, value, timestamp) of one value file, or None when it cannot be read whole.

    A file is created empty and only then sized and given its header (MmapedDict.__init__):
    a scrape in that window reads 0 bytes and prometheus_client raises
    struct.error('unpack_from requires a buffer of at least 4 bytes ...'); a process killed
    in that window leaves such a file for good. A file can also vanish (mark_process_dead)
    or, in principle, be read torn or be corrupt ('Read beyond file size detected'). Each of
    these costs the scrape that one file (which holds nothing yet in the usual case), never
    the whole exposition."""
    from prometheus_client.mmap_dict import MmapedDict
    try:
        if os.path.getsize(path) < _HEADER:
            return None
        return [(k, v, ts) for k, v, ts, _ in MmapedDict.read_all_values_from_file(path)]
    except Exception:                       # FileNotFoundError, struct.error, RuntimeError, ...
        return None


def _usable(path: str) -> bool:
    """Can this value file be read whole, keys included? (see _read_file)"""
    import json
    values = _read_file(path)
    if values is None:
        return False
    try:
        for key, _value, _ts in values:
            json.loads(key)
    except Exception:                       # a torn or corrupt key: the file is unusable
        return False
    return True


class _TolerantCollector:
    """MultiProcessCollector that survives an unreadable value file: the usual scrape merges
    every file once; if that fails, each file is checked on its own and the ones that cannot
    be read are left out of this scrape. Files only grow, so a file that checks out stays
    readable; the live-gauge files mark_process_dead removes are ignored by merge() when
    missing."""

    def __init__(self, path: str):
        self.path = path

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector
        files = sorted(glob.glob(os.path.join(glob.escape(self.path), "*.db")))
        try:
            return MultiProcessCollector.merge(files, accumulate=True)
        except Exception:                   # a file being made, or left damaged (see above)
            return MultiProcessCollector.merge([f for f in files if _usable(f)],
                                               accumulate=True)


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


class _Handler(BaseHTTPRequestHandler):
    server_version = "gateway-metrics"
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, ctype = render()
                code = 200
            except Exception as exc:                    # a scrape must not kill the thread
                body, ctype, code = (f"error: {exc!r}\n".encode(), "text/plain", 500)
        elif path == "/status":
            import json
            try:
                body = (json.dumps(status(self.server.workers), indent=2) + "\n").encode()
                ctype, code = "application/json", 200
            except Exception as exc:                    # a request must not kill the thread
                body, ctype, code = (f"error: {exc!r}\n".encode(), "text/plain", 500)
        elif path == "/healthz":
            healthy = self.server.healthy
            try:
                ok = healthy is None or bool(healthy())
            except Exception:
                ok = False
            body, ctype, code = ((b"ok\n", "text/plain; charset=utf-8", 200) if ok else
                                 (b"unhealthy\n", "text/plain; charset=utf-8", 503))
        else:
            body, ctype, code = b"not found\n", "text/plain; charset=utf-8", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):       # no request logging to stderr
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    healthy = None
    workers = None

    def handle_error(self, request, client_address):    # no tracebacks on stderr
        pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """`/metrics`, `/healthz` and `/status` for the supervisor, served from a daemon thread.

    *healthy*: a callable, true while every worker slot is served. *workers*: a callable
    returning `/status`'s worker rows (dicts: pid, generation, heartbeat_age_seconds) — the
    supervisor's to give; without it the list is empty. *sock*: a socket bound and listening
    already (the supervisor's, served by its metrics process), else one is bound to
    host:port."""

    def __init__(self, host: str, port: int, healthy=None, workers=None,
                 sock: socket.socket | None = None):
        self.host = host or "127.0.0.1"
        self.port = port
        self.healthy = healthy
        self.workers = workers
        self.sock = sock
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        cls = _Server6 if ":" in self.host else _Server
        if self.sock is None:
            httpd = cls((self.host, self.port), _Handler)
        else:
            httpd = cls((self.host, self.port), _Handler, bind_and_activate=False)
            httpd.socket.close()
            httpd.socket = self.sock
            httpd.server_address = self.sock.getsockname()
        httpd.healthy = self.healthy
        httpd.workers = self.workers
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gateway-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
