"""The supervisor's helper processes: the metrics endpoint and the demo sink (SPEC §9, §11).

The supervisor forks workers on respawns and reloads; a lock some thread of it held at that
moment (logging, the prometheus value lock, the import lock, malloc's) would stay held
forever in the child. So the supervisor runs no thread at all: what used to be threads of it
(the metrics HTTP server, the `--demo` sink) are processes forked from it, each a child like
the workers, dying with it (PR_SET_PDEATHSIG) and restarted by it when they die.

The metrics process serves a socket the supervisor bound (so a bind error ends the start, and
a restarted metrics process serves the same socket) and answers /healthz from the workers'
heartbeats in shared memory (conncount.py).
"""
from __future__ import annotations

import os
import signal
import socket

from .lifeline import die_with_parent


def fork_child(name: str, body, *, parent_pid: int, close=(), log=None) -> int:
    """Fork a helper that runs body() and exits; returns its pid. *close*: inherited
    sockets the child must not keep open (the listening sockets)."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # ^C reaches the supervisor
        for sock in close:
            sock.close()
        if not die_with_parent(parent_pid, signal.SIGTERM):
            code = 0
        else:
            body()
            code = 0
    except BaseException as exc:                         # never return into the supervisor
        try:
            if log is not None:
                log.event("helper_crash", level="error", helper=name, message=repr(exc))
        except BaseException:
            pass
    finally:
        os._exit(code)


def bind_metrics(address: str) -> socket.socket:
    """The listening socket of the metrics endpoint ("host:port", [v6]:port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, int(port)))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_metrics(sock: socket.socket, counts) -> None:
    """The metrics process: /metrics, and /healthz (200 while counts.healthy()) until
    killed."""
    from .metrics import MetricsServer
    host, port = sock.getsockname()[:2]
    server = MetricsServer(host, port, healthy=counts.healthy, workers=counts.workers,
                           sock=sock)
    server.start()
    while True:
        signal.pause()                      # SIGTERM (default action) ends the process


def serve_demo_sink(config, log, ready_fd: int) -> None:
    """The demo sink process (`gateway run --demo`): writes a byte to *ready_fd* once bound."""
    import trio

    from .sink import run_demo_sink

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(run_demo_sink, config, log)
            os.write(ready_fd, b"1")
            os.close(ready_fd)
    trio.run(main)
