"""A worker process: serves the supervisor's sockets with trio until SIGTERM (SPEC §9).

It inherits the TLS contexts the supervisor built before forking (so every worker has the same
certificates and session-ticket keys, and no key is read here). It resets the signals it
inherited, builds its listeners' runtimes around those contexts (upstream settings, the stage
policy, alert mail) and opens the tracking log, then drops privileges, asks to die with the
supervisor (after the drop: a credential change
clears PR_SET_PDEATHSIG), then serves; SIGTERM stops accepting and drains, the retire signal
(SIGUSR2: a reload replaced it) stops accepting and retires (server.Drain), and a later one
cuts its IMAP sessions when the supervisor's order says so. A start that fails exits with
BOOT_ERROR, and the supervisor stops instead of respawning it. From inside its event loop it beats a heartbeat in
the shared memory of the connection counts, which the supervisor watches (worker_timeout).

SIGTERM and SIGUSR2 stay blocked from the fork (the supervisor blocks them) until trio
listens for them, so one sent while the worker starts waits instead of being lost.
"""
from __future__ import annotations

import grp
import os
import pwd
import signal
from functools import partial

import trio

from ..serve.signals import BOOT_ERROR, REOPEN_SIGNAL, RETIRE_SIGNAL
from .parent_death import die_with_parent

HELD_SIGNALS = {signal.SIGTERM, RETIRE_SIGNAL, REOPEN_SIGNAL}


def beat_interval(worker_timeout: float) -> float:
    """Seconds between heartbeats: 1, or less for a worker_timeout under 4 s."""
    return min(1.0, worker_timeout / 4)


def resolve_ids(user: str | None, group: str | None) -> tuple[int, int]:
    """(uid, gid) to run as; -1 leaves one unchanged (os.chown's convention)."""
    uid = pwd.getpwnam(user).pw_uid if user else -1
    gid = grp.getgrnam(group).gr_gid if group else (pwd.getpwnam(user).pw_gid if user else -1)
    return uid, gid


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become *user*/*group* (when root and they are set), and keep no capability once not
    root (a setuid from root clears them; a service started unprivileged with ambient ones,
    CAP_NET_BIND_SERVICE, loses them here: the supervisor binds). SPEC §9."""
    if os.getuid() == 0 and (user or group):
        uid, gid = resolve_ids(user, group)
        os.setgroups([])
        os.setgid(gid)
        if uid != -1:
            os.setuid(uid)
    if os.geteuid() != 0:
        clear_capabilities()


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def _capabilities() -> int:
    """This process's inheritable, permitted, effective and ambient sets, or-ed (Linux)."""
    found = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapAmb:")):
                    found |= int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return 0
    return found


def clear_capabilities() -> None:
    """Empty this process's ambient, inheritable, permitted and effective capability sets
    (Linux; dropping is always allowed). Nothing is called when none is held."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux") or not _capabilities():
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), zero, zero,
               zero)                                            # EINVAL before Linux 4.3
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)),
                   (Data * 2)()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def run_worker(config, sockets, log, counts, row: int, slot: int, tls=None,
               parent_pid: int | None = None) -> int:
    signal.pthread_sigmask(signal.SIG_SETMASK, HELD_SIGNALS)
    for sig in (signal.SIGHUP, signal.SIGCHLD, *HELD_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)             # (an ignored signal is not kept)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # ^C reaches the supervisor, which drains
    from ..serve.runtime import WorkerState, build_runtimes
    log = log.bind(worker=os.getpid())
    metrics = None
    if config.metrics:
        from ..observe.metrics import Metrics
        metrics = Metrics()
    state = WorkerState(counts=counts, row=row, metrics=metrics)
    try:
        # *tls*: the supervisor's contexts (shared ticket keys); else keys are read here,
        # still privileged
        runtimes = build_runtimes(config, log, state, tls)
        if config.tracking_log:
            from ..observe.tracking_log import TrackingLog
            state.tracking = TrackingLog(config.tracking_log, log=log, metrics=state.metrics)
        if config.metrics and os.getuid() == 0 and (config.user or config.group):
            from ..observe.metric_files import hand_over       # made as root: the user's to read
            hand_over(*resolve_ids(config.user, config.group))
        drop_privileges(config.user, config.group)
        if parent_pid is not None and not die_with_parent(parent_pid, signal.SIGTERM):
            return 0                                   # the supervisor is gone already
    except Exception as exc:
        log.event("fatal", level="error", message=f"worker start: {exc}")
        return BOOT_ERROR
    trio.run(partial(serve_worker, config, log, sockets=sockets, state=state,
                     runtimes=runtimes, interval=beat_interval(config.worker_timeout)))
    return 0


async def heartbeat(counts, row: int, interval: float) -> None:
    while True:
        counts.beat(row)
        await trio.sleep(interval)


async def serve_worker(config, log, *, sockets, state, runtimes, interval: float) -> None:
    """server.serve() with the heartbeat, until drained: SIGTERM/SIGINT drain, SIGUSR2
    retires (and, once retired, cuts the IMAP sessions when the supervisor's order in the
    shared counts says so); SIGUSR1 reopens the tracking log (server.until_stopped).

    (server.serve_until_signal, plus: the signals held since the fork are let in once trio
    listens, and the inherited listening sockets are closed once serve() has its own
    duplicates, so that when accepting stops nothing of this process keeps them listening:
    new clients are refused, not left queued on a socket nobody accepts from.)"""
    from ..serve.conncount import ORDER_CUT
    from ..serve.server import SERVE_SIGNALS, serve_then_cancel, until_stopped
    with trio.open_signal_receiver(*SERVE_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:
                gateway = await nursery.start(serve_then_cancel, nursery.cancel_scope, config,
                                              log, sockets, state, runtimes)
                # the first beat says "serving" (the supervisor's READY=1 waits for it)
                outer.start_soon(heartbeat, state.counts, state.row, interval)
                for sock in sockets:
                    sock.close()
                await until_stopped(
                    signals, gateway, state, log,
                    cut_ordered=lambda: state.counts.order(state.row) == ORDER_CUT)
            outer.cancel_scope.cancel()               # drained: the last beat is done
