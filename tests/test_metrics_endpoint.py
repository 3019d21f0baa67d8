"""The metrics process of a supervised gateway (SPEC §9, §11): clients of its port that send
half a request cannot starve `/healthz` (one thread, a cap on connections), and the files of
dead workers are merged, so the metrics directory stays flat across reloads while no counter
goes backwards."""
from __future__ import annotations

import glob
import os
import re
import signal
import smtplib
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway.observe import metrics as M
from peers import free_port
from supervised import GatewayProcess, children, fetch, healthz, poll, write_config

COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _metrics_pid(gw: GatewayProcess) -> int:
    workers = set(gw.worker_pids())
    helpers = [p for p in children(gw.proc.pid) if p not in workers]
    assert len(helpers) == 1, helpers
    return helpers[0]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def _closed(sock: socket.socket) -> bool:
    """The server closed this client's connection (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:                                 # reset: closed with our bytes unread
        return True


def test_half_requests_do_not_starve_healthz(tmp_path, server_cert):
    """The trial: 3,000 clients each sending half a request line pinned 3,002 threads and
    /healthz stopped answering. Here 300 such clients: the metrics process keeps one thread,
    holds at most MAX_CONNECTIONS of them (the oldest waiting ones are closed), and /healthz
    and /metrics answer at once."""
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=sink_port, metrics_port=metrics_port,
                 server_cert=server_cert, workers=1)
    gw = GatewayProcess(cfg)
    idle: list[socket.socket] = []
    try:
        gw.wait_for(r"event=listening")
        poll(lambda: healthz(metrics_port) == 200, 10, what="/healthz")
        pid = _metrics_pid(gw)
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
            idle.append(sock)
            sock.sendall(b"GET /metr")
        started = time.monotonic()
        health = healthz(metrics_port)
        took = time.monotonic() - started
        scraped = fetch(metrics_port, "/metrics")[0]
        threads = _threads(pid)
        poll(lambda: sum(map(_closed, idle)) >= len(idle) - M.MAX_CONNECTIONS, 10,
             what="the connections beyond the cap closed")
    finally:
        for sock in idle:
            sock.close()
        assert gw.stop() == 0
    assert health == 200 and took < 2, (health, took)
    assert scraped == 200
    assert threads == 1


def _counters(body: str) -> dict:
    """{(sample, labels): value} of every counter and histogram sample of an exposition."""
    out = {}
    for family in text_string_to_metric_families(body):
        if family.type in ("counter", "histogram"):
            for s in family.samples:
                if s.name.endswith(COUNTER_SUFFIXES):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _files(gw: GatewayProcess) -> int:
    """Files in the gateway's metrics directory (value files, archives, recent counts)."""
    (top,) = glob.glob(os.path.join(gw.tmpdir, "gateway-metrics-*"))
    return sum(len(files) for _, _, files in os.walk(top))


def _scrape(metrics_port: int) -> dict:
    status, _, body = fetch(metrics_port, "/metrics")
    assert status == 200, body
    return _counters(body)


def test_files_stay_flat_and_no_counter_goes_backwards_across_reloads(tmp_path, server_cert):
    """The trial: 60 SIGHUPs took the directory from 31 to 389 files and a scrape from 11 to
    35 ms. Here 12 reloads, a session before each: every retired worker's files are merged
    into one archive, the count of files is what it was after the second, and between any
    two scrapes no counter or histogram sample decreases; nothing counted is lost."""
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=sink_port, metrics_port=metrics_port,
                 server_cert=server_cert, workers=1)
    gw = GatewayProcess(cfg)
    reloads = 12
    files = []
    try:
        gw.wait_for(r"event=listening")
        previous = _scrape(metrics_port)
        for n in range(1, reloads + 1):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.ehlo("client.test")
            poll(lambda: sum(v for (name, _), v in _scrape(metrics_port).items()
                             if name == "gateway_session_seconds_count") == n, 10,
                 what="the session counted")
            before = _scrape(metrics_port)
            gw.proc.send_signal(signal.SIGHUP)
            gw.wait_for(r"event=reloaded", count=n)
            gw.wait_for(r"event=worker_exit", count=n)          # the retired worker
            gw.wait_for(r"event=listening", count=n + 1)
            after = _scrape(metrics_port)
            for scrape_a, scrape_b in ((previous, before), (before, after)):
                went_back = {k: (v, scrape_b.get(k)) for k, v in scrape_a.items()
                             if scrape_b.get(k, -1) < v}
                assert not went_back, (n, went_back)
            previous = after
            files.append(_files(gw))
        connections = sum(v for (name, _), v in previous.items()
                          if name == "gateway_connections_total")
    finally:
        assert gw.stop() == 0
    assert connections == reloads
    assert max(files[2:]) <= files[1], files


# --- the endpoint's bounds, in this process --------------------------------------------------

def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def _end(sock: socket.socket) -> bytes:
    """What the server sends before it closes: b"" for nothing (a reset, when it closed with
    our bytes unread, is nothing too)."""
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def test_a_request_must_arrive_in_time_the_oldest_waiting_goes_and_bad_ones_are_answered():
    server = M.MetricsServer("127.0.0.1", 0, healthy=lambda: True, max_connections=4,
                             request_timeout=0.5)
    server.start()
    idle: list[socket.socket] = []
    try:
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        idle.append(slow)
        slow.sendall(b"GET /hea")
        started = time.monotonic()
        assert _end(slow) == b""                         # closed, no answer
        waited = time.monotonic() - started
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            idle[-1].sendall(b"GET /")
        assert _raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")
        oldest = idle[1]
        oldest.settimeout(5)
        evicted = _end(oldest)                           # made room for the health check
        answers = {name: _raw(server.port, request) for name, request in (
            ("head", b"HEAD /healthz HTTP/1.0\r\n\r\n"),
            ("post", b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n"),
            ("garbage", b"\x16\x03\x01 hello\r\n\r\n"),
            ("missing", b"GET /nope?x=1 HTTP/1.1\nHost: x\n\n"),
            ("huge", b"GET /healthz HTTP/1.0\r\nX: " + b"a" * (M.MAX_REQUEST + 10)))}
    finally:
        for sock in idle:
            sock.close()
        server.stop()
    assert 0.4 <= waited < 3, waited
    assert evicted == b""
    assert answers["head"].startswith(b"HTTP/1.0 200 OK\r\n")
    assert answers["head"].endswith(b"\r\n\r\n")          # no body
    assert b"Content-Length: 3\r\n" in answers["head"]
    assert answers["post"].startswith(b"HTTP/1.0 405 ")
    assert answers["garbage"].startswith(b"HTTP/1.0 400 ")
    assert answers["missing"].startswith(b"HTTP/1.0 404 ")
    assert answers["huge"].startswith(b"HTTP/1.0 431 ")
