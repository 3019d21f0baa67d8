"""A worker process: serves the supervisor's sockets with trio until SIGTERM (SPEC §9).

It inherits the TLS contexts the supervisor built before forking (so every worker has the same
certificates and session-ticket keys, and no key is read here). It resets the signals it
inherited, builds its listeners' runtimes around those contexts (upstream settings, encryption
and client rules, alert mail) and opens the tracking log, then drops privileges, then serves.
SIGTERM stops accepting and drains; the retire signal (after a reload) lets sessions finish
first. A start that fails exits with BOOT_ERROR, and the supervisor stops instead of
respawning it.
"""
from __future__ import annotations

import grp
import os
import pwd
import signal
from functools import partial

import trio

from .lifecycle import BOOT_ERROR, RETIRE_SIGNAL


def resolve_ids(user: str | None, group: str | None) -> tuple[int, int]:
    """(uid, gid) to run as; -1 leaves one unchanged (os.chown's convention)."""
    uid = pwd.getpwnam(user).pw_uid if user else -1
    gid = grp.getgrnam(group).gr_gid if group else (pwd.getpwnam(user).pw_gid if user else -1)
    return uid, gid


def drop_privileges(user: str | None, group: str | None) -> None:
    if os.getuid() != 0 or not (user or group):
        return
    uid, gid = resolve_ids(user, group)
    os.setgroups([])
    os.setgid(gid)
    if uid != -1:
        os.setuid(uid)


def run_worker(config, sockets, log, counts, row: int, slot: int, tls=None) -> int:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # ^C reaches the supervisor, which drains
    signal.signal(RETIRE_SIGNAL, signal.SIG_IGN)       # until trio listens for it
    from .runtime import WorkerState, build_runtimes
    from .server import serve_until_signal
    log = log.bind(worker=os.getpid())
    metrics = None
    if config.metrics:
        from .metrics import Metrics
        metrics = Metrics()
    state = WorkerState(counts=counts, row=row, metrics=metrics)
    try:
        # *tls*: the supervisor's contexts (shared ticket keys); else keys are read here,
        # still privileged
        runtimes = build_runtimes(config, log, state, tls)
        if config.tracking_log:
            from .tracking import TrackingLog
            state.tracking = TrackingLog(config.tracking_log, log=log, metrics=state.metrics)
        drop_privileges(config.user, config.group)
    except Exception as exc:
        log.event("fatal", level="error", message=f"worker start: {exc}")
        return BOOT_ERROR
    trio.run(partial(serve_until_signal, config, log, sockets=sockets, state=state,
                     runtimes=runtimes))
    return 0
