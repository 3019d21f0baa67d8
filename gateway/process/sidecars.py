"""The supervisor's helper processes: the metrics endpoint and the demo sink (SPEC §9, §11).

The supervisor forks workers on respawns and reloads; a lock some thread of it held at that
moment (logging, the prometheus value lock, the import lock, malloc's) would stay held
forever in the child. So the supervisor runs no thread at all: what used to be threads of it
(the metrics HTTP server, the `--demo` sink) are processes forked from it, each a child like
the workers, dying with it (PR_SET_PDEATHSIG) and restarted by it when they die.

The metrics process serves a socket the supervisor bound (so a bind error ends the start, and
a restarted metrics process serves the same socket) and answers /healthz from the workers'
heartbeats in shared memory (conncount.py); it merges the files of dead workers
(metric_files.py). Like the workers, every helper drops to `user`/`group` with no capability
left (worker.drop_privileges) before it serves (SPEC §9): only the supervisor keeps root. A
helper's body is given `settle()`, which drops and then asks to die with the supervisor (a
credential change clears that request); it calls it once it has what it needs as root (the
sink its bound socket, both the modules they import: the interpreter may lie where the user
cannot read), and stops if it returns False (the supervisor is gone).
"""
from __future__ import annotations

import os
import signal
import socket

from .parent_death import die_with_parent


def fork_child(name: str, body, *, parent_pid: int, close=(), log=None, user=None,
               group=None) -> int:
    """Fork a helper that runs body(settle) and exits; returns its pid. settle() drops to
    *user*/*group* and sets the death signal; False: the supervisor is gone, stop. *close*:
    inherited sockets the child must not keep open (the listening sockets)."""
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
        from .worker import drop_privileges

        def settle() -> bool:
            drop_privileges(user, group)
            return die_with_parent(parent_pid, signal.SIGTERM)
        body(settle)
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


def serve_metrics(sock: socket.socket, counts, settle) -> None:
    """The metrics process: /metrics, /status and /healthz (200 while counts.healthy()),
    merging dead workers' files, until killed (SIGTERM's default action)."""
    from ..observe import metrics
    for warm_up in (metrics.render, metrics.status):    # read only: the merge writes as user
        try:                                # import all they use while it can read anything
            warm_up()
        except Exception:
            pass
    if not settle():
        return
    host, port = sock.getsockname()[:2]
    metrics.MetricsServer(host, port, healthy=counts.healthy, workers=counts.workers,
                          sock=sock, compact=True).serve_forever()


def serve_demo_sink(config, log, ready_fd: int, settle) -> None:
    """The demo sink process (`gateway run --demo`): binds, settles, then writes a byte to
    *ready_fd*."""
    import trio

    from ..sink import run_demo_sink

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(run_demo_sink, config, log)
            if not settle():
                nursery.cancel_scope.cancel()
                return
            os.write(ready_fd, b"1")
            os.close(ready_fd)
    trio.run(main)
