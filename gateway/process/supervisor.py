"""The supervisor: owns the listening sockets, forks and replaces workers (SPEC §9).

One SO_REUSEPORT socket per worker slot per listener is bound here and kept while serving, so
connections queued on a crashed worker's socket wait for its replacement instead of being
reset, and a reload's new worker accepts on the very socket its predecessor drains from.
Before binding a group it makes sure no other process serves the address (addrcheck.py).
Signals are blocked and collected with sigtimedwait in the main loop: handlers never run code.

The supervisor runs no thread, so a fork never copies a lock some other thread holds: the
metrics endpoint and the demo sink are processes of their own (sidecars.py). Workers beat a
heartbeat in shared memory (conncount.py); one silent for `worker_timeout` is killed and
replaced, and /healthz is 200 only while every slot has a beating worker.

Exit codes (SPEC §9): 0 clean stop; 2 the configuration or environment cannot be used,
found before serving (one line naming the key or the listener and address); 1 a failure
after serving began (a worker that cannot start, an unexpected error).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial

from ..config import ConfigError, GatewayConfig, check_files, load_config
from ..serve.conncount import ORDER_CUT, ORDER_RETIRE, ROWS_PER_SLOT, ConnectionCounts
from ..serve.signals import BOOT_ERROR, REOPEN_SIGNAL, RETIRE_SIGNAL
from .notify import Notifier

EXIT_START = 2                 # unusable configuration or environment, found before serving
EXIT_FAILURE = 1
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, REOPEN_SIGNAL}
HELD = {RETIRE_SIGNAL}        # held in the supervisor so a new worker inherits it held
RELOAD_FIXED = ("user", "group", "metrics", "log_file", "pid_file")   # and `workers`, `bind`
HELPER_RESTART = 1.0           # seconds before a dead helper process is started again
STOP_HELPERS = 5.0             # seconds a helper gets to exit on SIGTERM at the end
RETAINED_GENERATIONS = 4       # retired generations that may keep IMAP sessions (§9)


@dataclass
class WorkerInfo:
    pid: int
    slot: int
    row: int
    started: float
    generation: int = 0
    imap: tuple[int, ...] = ()     # its listeners whose sessions outlive a reload (IMAP)
    retiring: bool = False
    cut: bool = False              # retired, and told to end its IMAP sessions (the cap)
    killed: bool = False           # SIGKILLed for a stale heartbeat, not reaped yet


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StartError(Exception):
    """The start cannot go on: one line naming the key or listener and address (exit 2)."""


class Supervisor:
    def __init__(self, config: GatewayConfig, log, *, demo: bool = False):
        self.config = config
        self.log = log.bind(process="supervisor")
        self.base_log = log
        self.demo = demo
        self.pid = os.getpid()
        self.n = config.workers or os.cpu_count() or 1
        self.rows = ROWS_PER_SLOT * self.n     # reload generations may drain side by side
        self.workers: dict[int, WorkerInfo] = {}
        self.backoff = [0.0] * self.n
        self.respawn_at: dict[int, float] = {}
        self.helpers: dict[int, str] = {}      # pid -> "metrics" | "demo-sink"
        self.helper_due: dict[str, float] = {}
        self.stopping = False
        self.reload_pending = False
        self.generation = 0             # +1 per applied reload (/status)
        self.exit_code = 0               # 1 once a worker could not start
        self.file_workers = config.workers
        self.sockets: list[list] = []
        self.metrics = None
        self.metrics_sock = None
        self.metrics_dir = None
        self.counts = None
        self.healthy_count = -1
        self.notifier = Notifier()           # systemd Type=notify (no-op without it)
        os.environ.pop("NOTIFY_SOCKET", None)    # the supervisor speaks for its children
        self.ready_due = True                # READY=1 once every slot's worker beats
        self.reload_announced = False        # RELOADING=1 sent, READY=1 not yet
        self.pid_written = None              # the pid_file this process wrote

    # --- start ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            try:
                self._start()
            except StartError as exc:
                self.log.event("fatal", level="error", message=str(exc))
                return EXIT_START
            return self._loop()
        except Exception as exc:             # a bug: stop the workers, say so, exit 1
            self.log.event("fatal", level="error", message=f"supervisor: {exc!r}")
            self._stop()
            self._wait_workers(time.monotonic() + self.config.shutdown_grace + 5)
            return EXIT_FAILURE
        finally:
            self._cleanup()

    def _start(self) -> None:
        config = self.config
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS | HELD)   # before anything to undo
        problems = check_files(config)       # unknown user, unreadable or mismatched keys
        if problems:
            raise StartError("; ".join(problems))
        if config.source is not None:        # the file's own `workers` (--workers may differ)
            try:
                self.file_workers = load_config(config.source).workers
            except ConfigError:
                pass
        if config.metrics:
            self._metrics_dir()
        self._bind_listeners()
        if config.metrics:
            from .sidecars import bind_metrics
            try:
                self.metrics_sock = bind_metrics(config.metrics)
            except OSError as exc:
                raise StartError(f"gateway.metrics {config.metrics}: "
                                 f"{exc.strerror or exc}") from None
        if config.pid_file:
            self._write_pid_file(config.pid_file)
        from ..serve.listener_tls import build_tls
        try:
            self.tls = build_tls(config, self.base_log)
        except Exception as exc:             # a certificate or key OpenSSL refuses
            raise StartError(f"TLS: {exc}") from None
        self.counts = ConnectionCounts.for_config(config, self.rows, self.n)
        self._health_rules()
        if config.metrics:
            from ..observe import metrics as M
            from ..observe.metric_files import hand_over
            self.metrics = M.Metrics()
            self.metrics.workers_configured.set(self.n)
            self.metrics.workers_healthy.set(0)
            self._reload_metrics(True)          # the configuration it started with
            hand_over(*self._owner())           # the metrics process reads them as the user
            self._start_helper("metrics")
            self.log.event("metrics_listening",
                           bind=_fmt(*self.metrics_sock.getsockname()[:2]))
        if self.demo:
            self._start_helper("demo-sink")
        self.log.event("supervisor_start", workers=self.n, pid=self.pid)
        for slot in range(self.n):
            self._spawn(slot)

    def _write_pid_file(self, path: str) -> None:
        """pid_file, written whole (a temporary file renamed over it) after binding, so that
        `kill -USR1 $(cat …)` and systemd's PIDFile= find this process."""
        tmp = f"{path}.{self.pid}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{self.pid}\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StartError(f"gateway.pid_file {path}: {exc.strerror or exc}") from None
        self.pid_written = path

    def _remove_pid_file(self) -> None:
        path, self.pid_written = self.pid_written, None
        try:
            with open(path, encoding="ascii") as f:
                mine = f.read().strip() == str(self.pid)
            if mine:                         # never another instance's file
                os.unlink(path)
        except (OSError, TypeError):
            pass

    def _notify_ready(self, healthy: int) -> None:
        """READY=1 (with a STATUS= line) once every slot has a beating worker: at the start
        and after a reload whose new generation serves."""
        if self.ready_due and healthy >= self.n and not self.stopping:
            self.ready_due = False
            draining = sum(1 for w in self.workers.values() if w.retiring)
            self.notifier.send(READY=1, STATUS=f"serving: {self.n} workers, generation "
                                               f"{self.generation}, {draining} draining")

    def _owner(self) -> tuple[int, int]:
        """(uid, gid) the workers and helpers run as; -1: unchanged."""
        if os.getuid() != 0 or not (self.config.user or self.config.group):
            return -1, -1
        from .worker import resolve_ids
        return resolve_ids(self.config.user, self.config.group)

    def _metrics_dir(self) -> None:
        """The prometheus multiprocess directory (metric_files.create_run_dir), after
        removing those of instances killed with kill -9; the workers and the metrics
        process, which run as `user`, write there."""
        from ..observe import metric_files
        if "prometheus_client" in sys.modules and not os.environ.get(metric_files.ENV):
            raise RuntimeError("prometheus_client was imported before "
                               "PROMETHEUS_MULTIPROC_DIR was set")
        try:
            self.metrics_dir = metric_files.create_run_dir(*self._owner())
        except OSError as exc:                # root without CAP_CHOWN (a systemd unit)
            key = "gateway.user" if self.config.user else "gateway.group"
            raise StartError(
                f"{key}: cannot hand the workers' files to "
                f"{self.config.user or self.config.group}: {exc.strerror or exc} (running "
                f"as root needs CAP_CHOWN, CAP_SETUID and CAP_SETGID; see "
                f"deploy/systemd/run-as-root.conf)") from None
        os.environ[metric_files.ENV] = self.metrics_dir.values

    def _bind_listeners(self) -> None:
        """The SO_REUSEPORT group of every listener, one socket per slot; StartError when an
        address cannot be bound or another process serves it."""
        from .addrcheck import ALREADY_SERVED, foreign_listener, probe
        from ..net.bind import bind_socket
        groups = []
        try:
            for listener in self.config.listeners:
                where = f"{listener.name} {_fmt(listener.host, listener.port)}"
                try:
                    probe(listener.host, listener.port)
                    group = []
                    groups.append(group)
                    for _ in range(self.n):
                        group.append(bind_socket(listener, reuse_port=True))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise StartError(f"{where}: {ALREADY_SERVED}") from None
                    raise StartError(f"{where}: {exc.strerror or exc}") from None
                if foreign_listener(group):
                    raise StartError(f"{where}: {ALREADY_SERVED}")
        except BaseException:
            for group in groups:
                for sock in group:
                    sock.close()
            raise
        self.sockets = [list(row) for row in zip(*groups)] if groups else [
            [] for _ in range(self.n)]

    def _build_tls(self, config: GatewayConfig):
        """A reload's TLS contexts (listener_tls.build_tls), or None (logged)."""
        from ..serve.listener_tls import build_tls
        try:
            return build_tls(config, self.base_log)
        except Exception as exc:       # a certificate or key OpenSSL refuses
            self.log.event("reload_failed", level="error", message=f"TLS: {exc}")
            return None

    # --- helper processes (sidecars.py) -----------------------------------------------------

    def _listening(self) -> list:
        return [sock for row in self.sockets for sock in row]

    def _start_helper(self, name: str) -> None:
        from . import sidecars
        close = self._listening()
        if name == "metrics":
            pid = sidecars.fork_child(
                name, partial(sidecars.serve_metrics, self.metrics_sock, self.counts),
                parent_pid=self.pid, close=close, log=self.base_log,
                user=self.config.user, group=self.config.group)
        else:
            if self.metrics_sock is not None:
                close.append(self.metrics_sock)
            r, w = os.pipe()
            pid = sidecars.fork_child(
                name, partial(sidecars.serve_demo_sink, self.config, self.base_log, w),
                parent_pid=self.pid, close=close, log=self.base_log,
                user=self.config.user, group=self.config.group)
            os.close(w)
            try:
                select.select([r], [], [], 10)      # bound: the sink is up (or gave up)
            finally:
                os.close(r)
        self.helpers[pid] = name

    def _stop_helpers(self) -> None:
        for pid in self.helpers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_HELPERS
        while self.helpers and time.monotonic() < deadline:
            for pid in list(self.helpers):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    del self.helpers[pid]
            if self.helpers:
                time.sleep(0.02)
        for pid in self.helpers:
            _kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.helpers.clear()

    def _cleanup(self) -> None:
        """On every exit: helpers stopped, sockets closed, the metrics directory removed."""
        try:
            self._stop_helpers()
        finally:
            for sock in self._listening():
                sock.close()
            if self.metrics_sock is not None:
                self.metrics_sock.close()
            if self.metrics_dir is not None:
                self.metrics_dir.remove()
                self.metrics_dir = None
            if self.pid_written is not None:
                self._remove_pid_file()

    # --- workers ----------------------------------------------------------------------------

    def _free_row(self) -> int | None:
        used = {w.row for w in self.workers.values()}
        return next((r for r in range(self.rows) if r not in used), None)

    def _spawn(self, slot: int) -> None:
        row = self._free_row()
        if row is None:                # cannot happen (reloads wait for rows); never fail
            self.log.event("worker_deferred", level="error", slot=slot,
                           message="no free worker row; trying again in a second")
            self.respawn_at[slot] = time.monotonic() + 1.0
            return
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
                if self.metrics_sock is not None:
                    self.metrics_sock.close()
                code = run_worker(self.config, self.sockets[slot], self.base_log,
                                  self.counts, row, slot, self.tls, parent_pid=self.pid)
            except BaseException as exc:               # never return into the supervisor
                try:
                    self.base_log.event("worker_crash", level="error", message=repr(exc))
                except BaseException:
                    pass
            finally:
                os._exit(code)
        imap = tuple(i for i, lst in enumerate(self.config.listeners)
                     if lst.protocol.outlives_reload)
        self.workers[pid] = WorkerInfo(pid, slot, row, time.monotonic(), self.generation, imap)
        self.counts.set_worker(row, pid, self.generation)
        self.counts.set_slot(slot, row)                # the slot's worker from now on
        self.log.event("worker_start", worker_pid=pid, slot=slot)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            name = self.helpers.pop(pid, None)
            if name is not None:
                self.log.event("helper_exit", level="warning", helper=name, pid=pid, code=code)
                if not self.stopping:
                    self.helper_due[name] = time.monotonic() + HELPER_RESTART
                continue
            info = self.workers.pop(pid, None)
            if info is None:
                continue
            self._vacate(info)
            self.counts.clear_row(info.row)
            if self.metrics_dir is not None:
                from ..observe import metrics as M
                M.mark_process_dead(pid)
            self.log.event("worker_exit", level="info" if code == 0 else "warning",
                           worker_pid=pid, slot=info.slot, code=code)
            if self.stopping or info.retiring:
                continue
            if code == BOOT_ERROR:
                self.log.event("fatal", level="error",
                               message="a worker could not start; stopping")
                self.exit_code = EXIT_FAILURE
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
        for name, when in list(self.helper_due.items()):
            if when <= now and not self.stopping:
                del self.helper_due[name]
                self._start_helper(name)

    def _watch(self) -> None:
        """Kill workers whose heartbeat is older than worker_timeout; the healthy gauge."""
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for info in self.workers.values():
            if info.killed:
                continue
            last = self.counts.last_beat(info.row)
            age = now - (last or info.started)
            if age > timeout:
                self.log.event("worker_timeout", level="error", worker_pid=info.pid,
                               slot=info.slot, age=round(age, 1),
                               message="no heartbeat within worker_timeout; killed")
                _kill(info.pid, signal.SIGKILL)
                info.killed = True
                self._vacate(info)
        healthy = self.counts.healthy_slots(now)
        if self.metrics is not None and healthy != self.healthy_count:
            self.metrics.workers_healthy.set(healthy)
        self.healthy_count = healthy
        self._notify_ready(healthy)

    def _vacate(self, info: WorkerInfo) -> None:
        """*info*'s worker is dead or dying: its slot has no worker until the next spawn."""
        if self.counts.slot_row(info.slot) == info.row:
            self.counts.set_slot(info.slot, None)

    def _health_rules(self) -> None:
        from .worker import beat_interval
        self.counts.set_health_rules(3 * beat_interval(self.config.worker_timeout),
                                     stopping=self.stopping)

    def _wait_workers(self, deadline: float) -> None:
        """After an unexpected error: reap workers until *deadline*, then SIGKILL them."""
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                signal.sigtimedwait({signal.SIGCHLD}, 0.2)
        for pid in list(self.workers):
            _kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.workers.clear()

    # --- signals ----------------------------------------------------------------------------

    def _loop(self) -> int:
        from .worker import beat_interval
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
            if self.reload_pending and not self.stopping and self._rows_for_reload():
                self.reload_pending = False
                self._reload()
            self._watch()
            if not self.stopping:
                self._cap_retained()
            timeout = min(0.5, beat_interval(self.config.worker_timeout) / 2)
            if self.respawn_at or self.helper_due or self.stopping:
                timeout = min(timeout, 0.2)
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None:
                sig = info.si_signo
                if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.log.event("shutdown", signal=signal.Signals(sig).name)
                    self._stop()
                elif sig == signal.SIGHUP and not self.stopping:
                    self._reload()
                elif sig == REOPEN_SIGNAL:
                    # logrotate moved the log files away: the supervisor reopens the event
                    # log (log_file), every worker it and the tracking log (§9)
                    reopen = getattr(self.base_log, "reopen", None)
                    if reopen is not None:
                        reopen()
                    self.log.event("reopen_logs", workers=len(self.workers))
                    for pid in list(self.workers):
                        _kill(pid, REOPEN_SIGNAL)
            self._reap()
            self._respawn_due()

    def _stop(self) -> None:
        """Drain: workers get SIGTERM, and the listening sockets are closed here (the workers
        close theirs as they stop accepting), so new clients are refused and try the next
        server instead of waiting in a queue nobody accepts from."""
        self.stopping = True
        self.notifier.send(STOPPING=1, STATUS="stopping: draining sessions")
        if self.counts is not None:
            self._health_rules()
        self.reload_pending = False
        self.respawn_at.clear()
        self.helper_due.clear()
        for pid in list(self.workers):
            _kill(pid, signal.SIGTERM)
        for sock in self._listening():
            sock.close()

    def _rows_for_reload(self) -> bool:
        """Enough free rows to start a new generation beside the draining ones?"""
        serving = sum(1 for w in self.workers.values() if not w.retiring)
        return self.rows - len(self.workers) >= serving + len(self.respawn_at)

    def _reload(self) -> None:
        """SIGHUP: re-read, check and apply the configuration (or refuse it, logged); the
        outcome is exported as gateway_config_last_reload_successful (and its timestamp)."""
        if not self.reload_announced:        # once, also for a deferred reload
            self.reload_announced = self.notifier.reloading("reloading the configuration")
        ok = self._try_reload()
        if ok is not None:
            self._reload_metrics(ok)
            self.reload_announced = False
            self.ready_due = True            # refused: at once; applied: once the new serve
            self._notify_ready(self.healthy_count if not ok else 0)

    def _reload_metrics(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.config_last_reload_successful.set(1 if ok else 0)
            if ok:
                self.metrics.config_last_reload_success_timestamp_seconds.set(time.time())

    def _try_reload(self) -> bool | None:
        """True: reloaded; False: refused or failed; None: deferred (rows) or nothing to do."""
        source = self.config.source
        if source is None:
            self.log.event("reload_failed", level="error",
                           message="no configuration file to re-read (--demo)")
            return False
        if not self._rows_for_reload():
            if not self.reload_pending:
                draining = sum(1 for w in self.workers.values() if w.retiring)
                self.log.event("reload_deferred", level="warning", draining=draining,
                               message="older generations still draining; the reload runs "
                                       "when one has finished")
                if self.metrics is not None:
                    self.metrics.reloads_deferred_total.inc()
            self.reload_pending = True
            return None
        try:
            new = load_config(source)
        except ConfigError as exc:
            self.log.event("reload_failed", level="error", message=str(exc))
            return False
        changed = ["workers"] if new.workers != self.file_workers else []
        changed += [k for k in RELOAD_FIXED if getattr(new, k) != getattr(self.config, k)]
        old_binds = [(l.host, l.port) for l in self.config.listeners]
        if [(l.host, l.port) for l in new.listeners] != old_binds:
            changed.append("bind")
        if changed:
            self.log.event("reload_refused", level="error", changed=",".join(changed),
                           message="a restart is needed for these settings; "
                                   "the running configuration stays")
            return False
        new = dataclasses.replace(new, workers=self.config.workers,
                                  single_process=self.config.single_process)
        problems = check_files(new)
        if problems:
            self.log.event("reload_failed", level="error", message="; ".join(problems))
            return False
        tls = self._build_tls(new)
        if tls is None:
            return False
        self.config, self.tls = new, tls
        self.generation += 1
        self._health_rules()
        old = [w for w in self.workers.values() if not w.retiring]
        for info in old:                   # new worker first, then retire the old one
            self._spawn(info.slot)
            info.retiring = True
            self.counts.set_order(info.row, ORDER_RETIRE)
            _kill(info.pid, RETIRE_SIGNAL)         # finish, then exit
        self.log.event("reloaded", workers=len(old))
        self._cap_retained()
        return True

    def _cap_retained(self) -> None:
        """At most RETAINED_GENERATIONS retired generations keep IMAP sessions (SPEC §9): a
        SIGHUP storm must not keep dozens of generations, and their rows, for reload_grace.
        Beyond that the oldest one's workers are told to end theirs (BYE), logged here and
        counted by the workers (gateway_reload_sessions_cut_total, reason generation_cap)."""
        keeping: dict[int, list[WorkerInfo]] = {}
        for info in self.workers.values():
            if info.retiring and not info.cut and not info.killed and info.imap \
                    and self.counts.row_sessions(info.row, info.imap) > 0:
                keeping.setdefault(info.generation, []).append(info)
        while len(keeping) > RETAINED_GENERATIONS:
            oldest = min(keeping)
            workers = keeping.pop(oldest)
            sessions = sum(self.counts.row_sessions(w.row, w.imap) for w in workers)
            self.log.event("generation_cut", level="warning", generation=oldest,
                           workers=len(workers), sessions=sessions, reason="generation_cap",
                           message=f"more than {RETAINED_GENERATIONS} retired generations "
                                   "keep IMAP sessions; the oldest one's are ended")
            for info in workers:
                info.cut = True
                self.counts.set_order(info.row, ORDER_CUT)
                _kill(info.pid, RETIRE_SIGNAL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
