"""The supervisor: owns the listening sockets, forks and replaces workers (SPEC §9).

One SO_REUSEPORT socket per worker slot per listener is bound here and kept for the life of the
process, so connections queued on a crashed worker's socket wait for its replacement instead of
being reset, and a reload's new worker accepts on the very socket its predecessor drains from.
Signals are blocked and collected with sigtimedwait in the main loop: handlers never run code.
The metrics endpoint runs in a thread of this process (prometheus multiprocess mode).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass

from .config import ConfigError, GatewayConfig, check_files, load_config
from .conncount import ConnectionCounts
from .lifecycle import BOOT_ERROR, RETIRE_SIGNAL

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
RELOAD_FIXED = ("workers", "user", "group")


@dataclass
class WorkerInfo:
    pid: int
    slot: int
    row: int
    started: float
    retiring: bool = False


class Supervisor:
    def __init__(self, config: GatewayConfig, log, *, demo: bool = False):
        self.config = config
        self.log = log.bind(process="supervisor")
        self.base_log = log
        self.demo = demo
        self.n = config.workers or os.cpu_count() or 1
        self.rows = 2 * self.n                # a reload runs two generations side by side
        self.workers: dict[int, WorkerInfo] = {}
        self.backoff = [0.0] * self.n
        self.respawn_at: dict[int, float] = {}
        self.stopping = False
        self.exit_code = 0               # 1 once a worker could not start
        self.metrics = None
        self.metrics_server = None
        self.metrics_dir = None

    # --- start ------------------------------------------------------------------------------

    def run(self) -> int:
        from .net.bind import bind_socket
        if self.config.metrics:
            from . import metrics as M
            self.metrics_dir = M.prepare_multiprocess_dir()
            if self.config.user or self.config.group:   # workers write there after dropping
                from .worker import resolve_ids
                uid, gid = resolve_ids(self.config.user, self.config.group)
                os.chown(self.metrics_dir, uid, gid)
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self.sockets = [[bind_socket(l, reuse_port=True) for l in self.config.listeners]
                            for _ in range(self.n)]
        except OSError as exc:
            self.log.event("fatal", level="error", message=f"bind: {exc}")
            return 1
        self.tls = self._build_tls(self.config)
        if self.tls is None:
            return 1
        self.counts = ConnectionCounts(self.rows, len(self.config.listeners))
        if self.config.metrics:
            self._start_metrics()
        if self.demo:
            self._start_demo_sink()
        self.log.event("supervisor_start", workers=self.n, pid=os.getpid())
        for slot in range(self.n):
            self._spawn(slot)
        try:
            return self._loop()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            for row in self.sockets:
                for sock in row:
                    sock.close()

    def _build_tls(self, config: GatewayConfig):
        """The TLS contexts every worker inherits (listener_tls.build_tls), or None (logged)."""
        from .listener_tls import build_tls
        try:
            return build_tls(config, self.base_log)
        except Exception as exc:       # a certificate or key OpenSSL refuses
            self.log.event("fatal" if config is self.config else "reload_failed",
                           level="error", message=f"TLS: {exc}")
            return None

    def _start_metrics(self) -> None:
        from . import metrics as M
        host, _, port = self.config.metrics.rpartition(":")
        self.metrics = M.Metrics()
        self.metrics_server = M.MetricsServer(host.strip("[]"), int(port),
                                              healthy=lambda: bool(self.workers))
        self.metrics_server.start()
        self.log.event("metrics_listening", bind=f"{host}:{self.metrics_server.port}")

    def _start_demo_sink(self) -> None:
        import trio

        from .sink import run_demo_sink
        ready = threading.Event()

        def thread():
            async def main():
                async with trio.open_nursery() as n:
                    await n.start(run_demo_sink, self.config, self.base_log)
                    ready.set()
            trio.run(main)
        threading.Thread(target=thread, name="demo-sink", daemon=True).start()
        ready.wait(10)

    # --- workers ----------------------------------------------------------------------------

    def _free_row(self) -> int:
        used = {w.row for w in self.workers.values()}
        return next(r for r in range(self.rows) if r not in used)

    def _spawn(self, slot: int) -> None:
        row = self._free_row()
        self.counts.clear_row(row)
        pid = os.fork()
        if pid == 0:                                   # the worker
            code = 70
            try:
                from .worker import run_worker
                for other, socks in enumerate(self.sockets):
                    if other != slot:
                        for sock in socks:
                            sock.close()
                code = run_worker(self.config, self.sockets[slot], self.base_log,
                                  self.counts, row, slot, self.tls)
            except BaseException as exc:               # never return into the supervisor
                try:
                    self.base_log.event("worker_crash", level="error", message=repr(exc))
                except BaseException:
                    pass
            finally:
                os._exit(code)
        self.workers[pid] = WorkerInfo(pid, slot, row, time.monotonic())
        self.log.event("worker_start", worker_pid=pid, slot=slot)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.workers.pop(pid, None)
            if info is None:
                continue
            self.counts.clear_row(info.row)
            if self.metrics_dir is not None:
                from . import metrics as M
                M.mark_process_dead(pid)
            code = os.waitstatus_to_exitcode(status)
            self.log.event("worker_exit", level="info" if code == 0 else "warning",
                           worker_pid=pid, slot=info.slot, code=code)
            if self.stopping or info.retiring:
                continue
            if code == BOOT_ERROR:
                self.log.event("fatal", level="error",
                               message="a worker could not start; stopping")
                self.exit_code = 1
                self._stop()
                continue
            lived = time.monotonic() - info.started
            delay = self.backoff[info.slot]
            self.backoff[info.slot] = 0.0 if lived > 10 else min(30.0, max(0.25, delay * 2))
            self.respawn_at[info.slot] = time.monotonic() + (0.0 if lived > 10 else delay)
            if self.metrics is not None:
                self.metrics.worker_restarts_total.inc()

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if when <= now and not self.stopping:
                del self.respawn_at[slot]
                self._spawn(slot)

    # --- signals ----------------------------------------------------------------------------

    def _loop(self) -> int:
        deadline = None
        while True:
            if self.stopping and not self.workers:
                self.log.event("supervisor_exit", code=self.exit_code)
                return self.exit_code
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.config.shutdown_grace + 5
            if deadline is not None and time.monotonic() > deadline:
                for pid in list(self.workers):
                    _kill(pid, signal.SIGKILL)
            timeout = 0.2 if (self.respawn_at or self.stopping) else 1.0
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None:
                sig = info.si_signo
                if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.log.event("shutdown", signal=signal.Signals(sig).name)
                    self._stop()
                elif sig == signal.SIGHUP and not self.stopping:
                    self._reload()
            self._reap()
            self._respawn_due()

    def _stop(self) -> None:
        self.stopping = True
        self.respawn_at.clear()
        for pid in list(self.workers):
            _kill(pid, signal.SIGTERM)

    def _reload(self) -> None:
        source = self.config.source
        if source is None:
            self.log.event("reload_failed", level="error",
                           message="no configuration file to re-read (--demo)")
            return
        try:
            new = load_config(source)
        except ConfigError as exc:
            self.log.event("reload_failed", level="error", message=str(exc))
            return
        new = dataclasses.replace(new, workers=self.config.workers,
                                  single_process=self.config.single_process)
        changed = [k for k in RELOAD_FIXED if getattr(new, k) != getattr(self.config, k)]
        old_binds = [(l.host, l.port) for l in self.config.listeners]
        if [(l.host, l.port) for l in new.listeners] != old_binds:
            changed.append("bind")
        if changed:
            self.log.event("reload_refused", level="error", changed=",".join(changed),
                           message="a restart is needed for these settings")
            return
        problems = check_files(new)
        if problems:
            self.log.event("reload_failed", level="error", message="; ".join(problems))
            return
        tls = self._build_tls(new)
        if tls is None:
            return
        self.config, self.tls = new, tls
        old = [w for w in self.workers.values() if not w.retiring]
        for info in old:                   # new worker first, then retire the old one
            self._spawn(info.slot)
            info.retiring = True
            _kill(info.pid, RETIRE_SIGNAL)         # finish, then exit
        self.log.event("reloaded", workers=len(old))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
