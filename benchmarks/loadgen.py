"""Closed-loop SMTP load generator: complete sessions from several processes (not a test).

    .venv/bin/python benchmarks/loadgen.py --port 2525 [--starttls] [--size 10240]
        [--concurrency 16] [--processes 2] [--duration 5 | --sessions 1000]
        [--auth-user U --auth-password P]

One session: connect, 220, EHLO, [STARTTLS, TLS 1.3 handshake, EHLO,] [AUTH PLAIN with the
initial response, 235,] MAIL, RCPT, DATA, the message, QUIT, close. Every session is a new TCP connection and a full handshake (no TLS
session resumption). `concurrency` sessions are in flight at any time (closed loop: each
client thread starts its next session when the previous one ends), spread over `processes`
processes so that the client side is not limited by one interpreter. The run stops at the
deadline (`duration`) or after `sessions` sessions, whichever comes first; sessions still in
flight at the deadline are completed and counted.

Only 127.0.0.1 is ever contacted. Every wait has a timeout.
"""
from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import socket
import ssl
import threading
import time

SESSION_TIMEOUT = 60.0         # socket timeout of one blocking step


class SessionError(Exception):
    pass


def make_message(size: int) -> bytes:
    """A message of about `size` octets (headers + 76-column text), CRLF, dot-safe, plus the
    terminating '.' line."""
    head = (b"From: Bench <bench@client.bench>\r\nTo: <rcpt@sink.bench>\r\n"
            b"Subject: benchmark\r\nMessage-ID: <bench@client.bench>\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n")
    line = (b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrs" +
            b"\r\n")
    body_len = max(0, size - len(head))
    return head + line * (body_len // len(line)) + b".\r\n"


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def reply(self) -> bytes:
        """One (possibly multi-line) SMTP reply; returns its last line."""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SessionError("connection closed by server")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            if len(line) < 4 or line[3:4] != b"-":
                return line


def expect(reader: Reader, code: bytes, what: str) -> None:
    line = reader.reply()
    if not line.startswith(code):
        raise SessionError(f"{what}: {line[:120].decode('latin-1').strip()}")


def auth_plain_line(user: str, password: str) -> bytes:
    """`AUTH PLAIN` with its initial response (RFC 4616: no authzid)."""
    return b"AUTH PLAIN " + base64.b64encode(
        b"\0" + user.encode() + b"\0" + password.encode()) + b"\r\n"


def smtp_session(port: int, message: bytes, ctx: ssl.SSLContext | None,
                 host: str = "127.0.0.1", session: ssl.SSLSession | None = None,
                 auth_line: bytes | None = None):
    """One whole session; with *session* the TLS handshake offers to resume it; with
    *auth_line* (`auth_plain_line()`) it authenticates before MAIL. Returns (the TLS session to
    resume next time, whether this one was resumed); (None, False) without TLS."""
    new_session, reused = None, False
    sock = socket.create_connection((host, port), timeout=SESSION_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r = Reader(sock)
        expect(r, b"220", "greeting")
        sock.sendall(b"EHLO client.bench\r\n")
        expect(r, b"250", "EHLO")
        if ctx is not None:
            sock.sendall(b"STARTTLS\r\n")
            expect(r, b"220", "STARTTLS")
            sock = ctx.wrap_socket(sock, server_hostname="localhost", session=session)
            r = Reader(sock)
            sock.sendall(b"EHLO client.bench\r\n")
            expect(r, b"250", "EHLO after TLS")
            new_session = sock.session         # TLS 1.3 tickets have arrived by now
            reused = sock.session_reused
        if auth_line is not None:
            sock.sendall(auth_line)
            expect(r, b"235", "AUTH PLAIN")
        sock.sendall(b"MAIL FROM:<bench@client.bench>\r\n")
        expect(r, b"250", "MAIL")
        sock.sendall(b"RCPT TO:<rcpt@sink.bench>\r\n")
        expect(r, b"250", "RCPT")
        sock.sendall(b"DATA\r\n")
        expect(r, b"354", "DATA")
        sock.sendall(message)
        expect(r, b"250", "end of data")
        sock.sendall(b"QUIT\r\n")
        expect(r, b"221", "QUIT")
    finally:
        try:
            sock.close()
        except OSError:
            pass
    return new_session, reused


def _process_main(args: dict, threads: int, start_at: float, out) -> None:
    """One load-generator process: `threads` closed-loop clients."""
    message = make_message(args["size"])
    ctx = client_context() if args["starttls"] else None
    auth_line = auth_plain_line(*args["auth"]) if args["auth"] else None
    deadline = start_at + args["duration"]
    budget = [args["sessions_per_process"]]
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[str] = []
    ends: list[float] = []
    resumed = [0]

    def take() -> bool:
        with lock:
            if budget[0] is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            return True

    def client() -> None:
        session = None                        # --resume: the previous session's TLS session
        while time.time() < deadline and take():
            t0 = time.perf_counter()
            try:
                got, reused = smtp_session(args["port"], message, ctx, session=session,
                                           auth_line=auth_line)
                if args["resume"]:
                    session = got
                if reused:
                    with lock:
                        resumed[0] += 1
            except (OSError, SessionError, ssl.SSLError) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
        with lock:
            ends.append(time.time())

    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    ts = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(args["duration"] + 4 * SESSION_TIMEOUT)
    out.put({"lat": lat, "errors": errors[:20], "n_errors": len(errors),
             "resumed": resumed[0],
             "end": max(ends) if ends else time.time()})


def run_load(port: int, *, starttls: bool, size: int = 10240, concurrency: int = 16,
             processes: int = 2, duration: float = 5.0, sessions: int | None = None,
             resume: bool = False, auth: tuple[str, str] | None = None) -> dict:
    """Run the closed loop; returns sessions, errors, wall seconds, sessions/s, latencies.
    *auth* = (user, password): AUTH PLAIN in every session."""
    processes = max(1, min(processes, concurrency))
    per = [concurrency // processes + (1 if i < concurrency % processes else 0)
           for i in range(processes)]
    per_proc_sessions = None
    if sessions is not None:
        per_proc_sessions = [sessions // processes + (1 if i < sessions % processes else 0)
                             for i in range(processes)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3            # all processes start together
    procs = []
    for i in range(processes):
        args = {"port": port, "starttls": starttls, "size": size, "duration": duration,
                "resume": resume, "auth": auth,
                "sessions_per_process": per_proc_sessions[i] if per_proc_sessions else None}
        p = ctx.Process(target=_process_main, args=(args, per[i], start_at, out), daemon=True)
        p.start()
        procs.append(p)
    results = []
    limit = time.time() + duration + 5 * SESSION_TIMEOUT
    for _ in procs:
        results.append(out.get(timeout=max(1.0, limit - time.time())))
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    lat = sorted(x for r in results for x in r["lat"])
    end = max(r["end"] for r in results)
    wall = max(1e-9, end - start_at)
    return {
        "sessions": len(lat),
        "errors": sum(r["n_errors"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:5],
        "wall": wall,
        "rate": len(lat) / wall,
        "resumed": sum(r["resumed"] for r in results),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "concurrency": concurrency,
    }


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True, help="SMTP port on 127.0.0.1")
    ap.add_argument("--starttls", action="store_true")
    ap.add_argument("--size", type=int, default=10240, help="message size in octets")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds")
    ap.add_argument("--sessions", type=int, help="stop after this many sessions")
    ap.add_argument("--resume", action="store_true",
                    help="each client offers its previous TLS session (as MTAs do)")
    ap.add_argument("--auth-user", help="AUTH PLAIN as this user (with --auth-password)")
    ap.add_argument("--auth-password")
    a = ap.parse_args()
    if (a.auth_user is None) != (a.auth_password is None):
        ap.error("--auth-user and --auth-password go together")
    auth = (a.auth_user, a.auth_password) if a.auth_user is not None else None
    print(json.dumps(run_load(a.port, starttls=a.starttls, size=a.size,
                              concurrency=a.concurrency, processes=a.processes,
                              duration=a.duration, sessions=a.sessions, resume=a.resume,
                              auth=auth),
                     indent=1))


if __name__ == "__main__":
    main()
