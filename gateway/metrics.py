"""Prometheus metrics (SPEC §11) in prometheus-client's multiprocess mode.

The supervisor calls `prepare_multiprocess_dir()` before anything imports prometheus_client
(the value class is chosen at import), forks workers that each build `Metrics()`, serves one
endpoint with a fresh registry per scrape (`MetricsServer`), and marks reaped workers dead
(`mark_process_dead`). A scrape reads the value files as MultiProcessCollector does; a file being
created, removed or left unreadable by a killed worker is skipped, never a failed scrape
(`_TolerantCollector`). Without metrics, `NullMetrics` offers the same
attributes as no-ops, so call sites never check.

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

ENV = "PROMETHEUS_MULTIPROC_DIR"

# Exposed metric names (SPEC §11), as they appear in the exposition.
METRIC_NAMES = (
    "gateway_connections_total",
    "gateway_connections_active",
    "gateway_connections_rejected_total",
    "gateway_tls_handshakes_total",
    "gateway_tls_handshake_seconds",
    "gateway_policy_rejections_total",
    "gateway_messages_total",
    "gateway_message_bytes_total",
    "gateway_upstream_errors_total",
    "gateway_tls_alerts_total",
    "gateway_session_seconds",
    "gateway_worker_restarts_total",
    "gateway_demo_certificate",
    "gateway_build_info",
    "gateway_workers_healthy",
    "gateway_workers_configured",
)

# Attribute names shared by Metrics and NullMetrics.
ATTRIBUTES = (
    "connections_total", "connections_active", "connections_rejected_total",
    "tls_handshakes_total", "tls_handshake_seconds", "policy_rejections_total",
    "messages_total", "message_bytes_total", "upstream_errors_total", "tls_alerts_total",
    "session_seconds", "worker_restarts_total", "demo_certificate", "build_info",
    "workers_healthy", "workers_configured",
)

HANDSHAKE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
SESSION_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 1800.0, 3600.0)


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
    """The gateway's metrics. Built once per process; safe to build again after a fork
    (nothing is registered in the default registry: in multiprocess mode the collector
    reads the value files, so registration would only risk duplicate-name errors)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        import gateway
        from . import native

        def counter(name, doc, labels=()):
            # prometheus-client appends "_total" to counter names in the exposition.
            return Counter(name, doc, labels, registry=None)

        self.connections_total = counter(
            "gateway_connections", "Accepted connections", ("listener", "protocol"))
        self.connections_active = Gauge(
            "gateway_connections_active", "Open connections", ("listener",),
            multiprocess_mode="livesum", registry=None)
        self.connections_rejected_total = counter(
            "gateway_connections_rejected", "Connections refused before a session",
            ("listener", "reason"))
        self.tls_handshakes_total = counter(
            "gateway_tls_handshakes", "TLS handshakes", ("listener", "side", "version", "result"))
        self.tls_handshake_seconds = Histogram(
            "gateway_tls_handshake_seconds", "TLS handshake duration", ("listener", "side"),
            buckets=HANDSHAKE_BUCKETS, registry=None)
        self.policy_rejections_total = counter(
            "gateway_policy_rejections", "Policy refusals", ("listener", "reason"))
        self.messages_total = counter(
            "gateway_messages", "Messages by result", ("listener", "result"))
        self.message_bytes_total = counter(
            "gateway_message_bytes", "Message octets accepted", ("listener",))
        self.upstream_errors_total = counter(
            "gateway_upstream_errors", "Upstream failures", ("listener", "reason"))
        self.tls_alerts_total = counter(
            "gateway_tls_alerts", "Required TLS not obtained", ("listener", "reason"))
        self.session_seconds = Histogram(
            "gateway_session_seconds", "Session duration", ("listener", "protocol"),
            buckets=SESSION_BUCKETS, registry=None)
        self.worker_restarts_total = counter(
            "gateway_worker_restarts", "Workers replaced after dying")
        self.demo_certificate = Gauge(
            "gateway_demo_certificate", "1 when a generated demo certificate is in use",
            multiprocess_mode=_gauge_mode_max(), registry=None)
        self.build_info = Gauge(
            "gateway_build_info", "Version and native core", ("version", "native"),
            multiprocess_mode="max", registry=None)
        # set by the supervisor only (the workers' 0 never wins the max)
        self.workers_healthy = Gauge(
            "gateway_workers_healthy", "Worker slots with a live, beating worker",
            multiprocess_mode=_gauge_mode_max(), registry=None)
        self.workers_configured = Gauge(
            "gateway_workers_configured", "Worker slots (gateway.workers)",
            multiprocess_mode=_gauge_mode_max(), registry=None)
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

    def handle_error(self, request, client_address):    # no tracebacks on stderr
        pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """`/metrics` and `/healthz` for the supervisor, served from a daemon thread.

    *sock*: a socket bound and listening already (the supervisor's, served by its metrics
    process), else one is bound to host:port."""

    def __init__(self, host: str, port: int, healthy=None, sock: socket.socket | None = None):
        self.host = host or "127.0.0.1"
        self.port = port
        self.healthy = healthy
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
