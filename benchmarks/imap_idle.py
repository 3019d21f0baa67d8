"""Idle IMAP sessions for scenario 5: a minimal IMAP upstream and a client that holds many
STARTTLS + LOGIN + IDLE sessions open (not a test).

    .venv/bin/python benchmarks/imap_idle.py upstream --port P [--cert F --key F]
    .venv/bin/python benchmarks/imap_idle.py client --port P --sessions N [--processes 2]

The upstream (asyncio, one process) greets `* OK`, answers CAPABILITY, NOOP, LOGIN, ID,
IDLE (`+ idling` ... `DONE`), LOGOUT, and STARTTLS when given a certificate. It holds
thousands of connections at a few KiB each. The client opens `sessions` connections from
`processes` processes: greeting, STARTTLS, TLS 1.3 handshake, LOGIN, IDLE; then it holds them
until told to stop (a line on stdin, or `hold` seconds), and closes them. Only 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import ssl
import sys
import time

CAPS = b"IMAP4rev1 IDLE LITERAL+ SASL-IR ID AUTH=PLAIN"


# ------------------------------------------------------------------------------- upstream


async def _serve_conn(reader, writer, ctx):
    async def send(data: bytes):
        writer.write(data)
        await writer.drain()

    try:
        caps = CAPS + (b" STARTTLS" if ctx is not None else b"")
        await send(b"* OK [CAPABILITY " + caps + b"] upstream.bench ready\r\n")
        tls = False
        while True:
            line = await asyncio.wait_for(reader.readline(), 3600)
            if not line:
                return
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            cmd, _, arg = rest.partition(b" ")
            cmd = cmd.upper()
            if cmd == b"CAPABILITY":
                c = CAPS + (b" STARTTLS" if ctx is not None and not tls else b"")
                await send(b"* CAPABILITY " + c + b"\r\n" + tag + b" OK CAPABILITY done\r\n")
            elif cmd in (b"NOOP", b"ID"):
                await send(b"* ID NIL\r\n" * (cmd == b"ID") + tag + b" OK done\r\n")
            elif cmd == b"LOGIN":
                await send(tag + b" OK [CAPABILITY " + CAPS + b"] Logged in\r\n")
            elif cmd == b"AUTHENTICATE":
                if b" " not in arg:                       # no SASL-IR: one continuation
                    await send(b"+ \r\n")
                    await asyncio.wait_for(reader.readline(), 60)
                await send(tag + b" OK Logged in\r\n")
            elif cmd == b"SELECT" or cmd == b"EXAMINE":
                await send(b"* 0 EXISTS\r\n* 0 RECENT\r\n" + tag + b" OK [READ-WRITE] done\r\n")
            elif cmd == b"IDLE":
                await send(b"+ idling\r\n")
                done = await asyncio.wait_for(reader.readline(), 3600)
                if not done:
                    return
                await send(tag + b" OK IDLE terminated\r\n")
            elif cmd == b"STARTTLS" and ctx is not None and not tls:
                await send(tag + b" OK Begin TLS negotiation now\r\n")
                await writer.start_tls(ctx)
                tls = True
            elif cmd == b"LOGOUT":
                await send(b"* BYE logging out\r\n" + tag + b" OK LOGOUT done\r\n")
                return
            else:
                await send(tag + b" BAD unknown command\r\n")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve_upstream(port: int, cert: str | None, key: str | None):
    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(lambda r, w: _serve_conn(r, w, ctx), "127.0.0.1",
                                        port, backlog=4096)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------- client


async def _open_session(port: int, ctx: ssl.SSLContext, timeout: float):
    async def step():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greet = await reader.readline()
        if not greet.startswith(b"* OK"):
            raise RuntimeError(f"greeting {greet[:80]!r}")
        writer.write(b"a1 STARTTLS\r\n")
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("closed at STARTTLS")
            if line.startswith(b"a1 "):
                if not line.startswith(b"a1 OK"):
                    raise RuntimeError(f"STARTTLS {line[:80]!r}")
                break
        await writer.start_tls(ctx, server_hostname="localhost")
        writer.write(b"a2 LOGIN bench secret\r\n")
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("closed at LOGIN")
            if line.startswith(b"a2 "):
                if not line.startswith(b"a2 OK"):
                    raise RuntimeError(f"LOGIN {line[:80]!r}")
                break
        writer.write(b"a3 IDLE\r\n")
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("closed at IDLE")
            if line.startswith(b"+"):
                break
        return reader, writer
    return await asyncio.wait_for(step(), timeout)


async def _client_proc(port: int, n: int, ready_q, stop_evt, hold: float, conc: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
    except (ValueError, OSError):
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sem = asyncio.Semaphore(conc)
    sessions, errors = [], []

    async def one():
        async with sem:
            try:
                sessions.append(await _open_session(port, ctx, 60))
            except Exception as exc:      # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(n)))
    ready_q.put({"open": len(sessions), "errors": len(errors), "samples": errors[:3]})
    deadline = time.monotonic() + hold
    while not stop_evt.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for _, w in sessions:
        w.transport.abort()


def _client_entry(port, n, ready_q, stop_evt, hold, conc):
    asyncio.run(_client_proc(port, n, ready_q, stop_evt, hold, conc))


class IdleClients:
    """Open `n` idle sessions from `processes` processes; `open()` returns when all are
    set up (or failed); `close()` ends them."""

    def __init__(self, port: int, n: int, processes: int = 2, hold: float = 600,
                 connect_concurrency: int = 64):
        self.port, self.n, self.processes = port, n, max(1, processes)
        self.hold, self.conc = hold, connect_concurrency
        self.ctx = mp.get_context("fork")
        self.procs = []
        self.stop_evt = self.ctx.Event()

    def open(self, timeout: float = 300) -> dict:
        q = self.ctx.Queue()
        per = [self.n // self.processes + (1 if i < self.n % self.processes else 0)
               for i in range(self.processes)]
        for k in per:
            p = self.ctx.Process(target=_client_entry, daemon=True,
                                 args=(self.port, k, q, self.stop_evt, self.hold, self.conc))
            p.start()
            self.procs.append(p)
        t0 = time.monotonic()
        res = [q.get(timeout=timeout) for _ in self.procs]
        return {"open": sum(r["open"] for r in res), "errors": sum(r["errors"] for r in res),
                "samples": [s for r in res for s in r["samples"]][:3],
                "setup_s": time.monotonic() - t0}

    def close(self) -> None:
        self.stop_evt.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--cert")
    u.add_argument("--key")
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--sessions", type=int, default=100)
    c.add_argument("--processes", type=int, default=2)
    c.add_argument("--hold", type=float, default=5)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    if a.cmd == "upstream":
        try:
            asyncio.run(serve_upstream(a.port, a.cert, a.key))
        except KeyboardInterrupt:
            pass
    else:
        ic = IdleClients(a.port, a.sessions, a.processes, a.hold)
        print(json.dumps(ic.open()))
        sys.stdout.flush()
        time.sleep(min(a.hold, 5))
        ic.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
