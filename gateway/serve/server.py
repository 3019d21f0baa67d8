"""Serving the listeners of one process: `serve()` accepts on every listener and hands each
connection to its SMTP or IMAP session; `Gateway.stop_accepting()` drains (a shutdown) or
retires (after a reload, SPEC §9); `serve_until_signal()`, which a worker and
`gateway run --single-process` run, ties both to signals.

What a worker serves with is built elsewhere, once: TLS contexts in listener_tls (by the
supervisor, before it forks), the listeners' runtimes in runtime.
"""
from __future__ import annotations

import math
import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from ..config import GatewayConfig
from .conncount import ConnectionCounts
from .signals import REOPEN_SIGNAL, RETIRE_SIGNAL
from ..observe.logs import new_conn_id
from ..net.accept import accept_loop
from ..net.bind import bind_socket
from ..net.proxy_protocol import is_trusted
from ..net.proxy_stream import read_proxy_header
from ..net.sockstream import LeanSocketStream
from ..native.perip import address_key
from ..relay.watchdog import tick_for
from .protocols import serving
from .runtime import ListenerRuntime, WorkerState, build_runtimes


RETIRE_IDLE = 2.0       # seconds: on a retired worker, an SMTP session silent that long
                        # outside a transaction is idle and answered 421 4.3.2 (SPEC §9)


@dataclass
class Gateway:
    """What `serve()` reports once every listener is bound."""
    config: GatewayConfig
    runtimes: list[ListenerRuntime]
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    demo_certificate: bool = False
    accept_scope: trio.CancelScope | None = None
    retiring: bool = False
    drain: "Drain | None" = None         # once accepting has stopped
    _cut: str | None = None              # an IMAP cut asked for before the drain began

    def stop_accepting(self, *, retire: bool = False) -> None:
        """Begin the drain: no new connections; serve() returns when sessions are done.

        A shutdown answers idle sessions 421 4.3.2 at once, relayed IMAP sessions get BYE,
        and whatever is left after shutdown_grace is cut. A retirement (a reload replaced this
        worker, SPEC §9) answers idle SMTP sessions 421 4.3.2, lets SMTP transactions in
        flight finish (up to upstream_data_done) and keeps IMAP sessions until they end or
        reload_grace passes. A shutdown after a retirement drains at once as a shutdown."""
        if self.drain is not None:
            if not retire:
                self.drain.shutdown()
            return
        if self.accept_scope is not None and self.accept_scope.cancel_called:
            self.retiring = self.retiring and retire      # a shutdown overrides a retirement
            return
        self.retiring = retire
        if self.accept_scope is not None:
            self.accept_scope.cancel()

    def cut_imap(self, reason: str) -> None:
        """A retired worker's IMAP sessions end now, with BYE (the supervisor's cap on the
        generations that keep them); nothing while this process is not retired."""
        if self.drain is not None:
            self.drain.cut_imap(reason)
        else:
            self._cut = reason

    def begin_drain(self, drain: "Drain") -> None:
        """Accepting has stopped: *drain* retires or shuts down the sessions, as asked, and
        carries out an IMAP cut asked for before it began."""
        self.drain = drain
        if self.retiring:
            drain.retire()
            if self._cut is not None:
                drain.cut_imap(self._cut)
        else:
            drain.shutdown()


async def _handle(rt: ListenerRuntime, sock) -> None:
    """One accepted connection (a trio socket), closed when this returns."""
    stream = LeanSocketStream(sock)         # the connection is the stream's from here
    try:
        await _session(rt, stream)
    finally:
        stream.socket.close()


async def _session(rt: ListenerRuntime, stream: LeanSocketStream) -> None:
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = stream.socket.getpeername()
    except OSError:
        return
    own_address = peer[0]
    if rt.listener.proxy_protocol:
        m, name, ltype = rt.state.metrics, rt.listener.name, rt.listener.type
        got = await read_proxy_header(
            stream, peer, rt.log.bind(client=_fmt_addr(peer)),
            trusted_proxies=rt.listener.trusted_proxies,
            timeout=rt.listener.timeouts.tls_handshake,
            rejected=lambda reason: m.connections_rejected_total.labels(name, ltype,
                                                                        reason).inc())
        if got is None:
            await stream.aclose()
            return
        peer, stream = got
    client = _fmt_addr(peer)
    conn_id = new_conn_id()
    log = rt.log.bind(conn=conn_id, client=client)
    state = rt.state
    counts = state.counts
    counts.add(state.row, rt.index, 1)
    state.session_started()
    m, name, ltype = state.metrics, rt.listener.name, rt.listener.type
    m.connections_total.labels(name, ltype, rt.listener.protocol).inc()
    state.recent.session(rt.index)
    m.connections_active.labels(name, ltype).inc()
    ip_key = None                   # the per-address count this session holds (§2)
    try:
        verdict = rt.stages.admit(counts.total(rt.index))
        if not verdict.refused and rt.listener.max_connections_per_ip:
            key = _per_ip_key(rt, peer[0], own_address)
            if key is not None:
                held = counts.per_ip.add(state.row, rt.index, key)
                if held < 0:        # no room to count it: past every max_connections (§2)
                    _report_full(counts.per_ip, log)
                else:
                    ip_key = key
                verdict = rt.stages.admit_address(held)
        if verdict.refused:
            log.event("reject", code=verdict.reply[0], reason=verdict.reason)
            m.connections_rejected_total.labels(name, ltype, verdict.label).inc()
            await _refuse(rt, stream, verdict)
            return
        # the session's own scope: a retirement gives SMTP and IMAP sessions different ends
        with trio.CancelScope(deadline=session_deadline(rt)) as own:
            state.session_scopes[own] = rt
            try:
                session = serving(rt.listener).session
                await session(rt, stream, (peer[0], peer[1]), log, conn_id).run()
            except Exception as exc:           # a bug in one session must not end the worker
                log.event("session_error", level="error", message=repr(exc))
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await stream.aclose()
            finally:
                del state.session_scopes[own]
    finally:
        counts.add(state.row, rt.index, -1)
        if ip_key is not None:
            counts.per_ip.remove(state.row, rt.index, ip_key)
        state.session_ended()
        m.connections_active.labels(name, ltype).dec()


async def _refuse(rt: ListenerRuntime, stream, verdict) -> None:
    """Over a connection limit: the protocol's reply, none on an implicit listener; close."""
    with trio.move_on_after(5):
        if rt.listener.tls != "implicit":
            try:
                await stream.send_all(serving(rt.listener).refusal(verdict))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    await stream.aclose()


def _per_ip_key(rt: ListenerRuntime, address: str, own_address: str) -> bytes | None:
    """What the client *address* counts under for max_connections_per_ip, or None: not
    counted. A trusted proxy is exempt when it speaks for itself (no PROXY header replaced
    its address: a listener without proxy_protocol behind a balancer, a health check's
    PROXY LOCAL); behind PROXY the real client's address counts."""
    trusted = rt.listener.trusted_proxies
    if trusted and address == own_address and is_trusted(address, trusted):
        return None
    return address_key(address, rt.listener.per_ip_ipv6_prefix)


def _report_full(table, log) -> None:
    if not table.full_reported:
        table.full_reported = True
        log.event("per_ip_table_full", level="warning",
                  message="the per-address table of this worker is full: more connections "
                          "than the max_connections it was sized for at the start (a reload "
                          "raised them?); new addresses are refused until a restart")


def _fmt_addr(peer) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


async def serve(config: GatewayConfig, log, *, sockets=None, state: WorkerState | None = None,
                runtimes=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve every listener; reports a `Gateway` once bound.

    *sockets*: listening stdlib sockets, one per listener, owned by a supervisor (else bound
    here). Runs until cancelled, or until `Gateway.stop_accepting()`: then idle sessions get
    421 4.3.2, transactions in flight get `shutdown_grace` seconds, and serve() returns."""
    state = state if state is not None else WorkerState(
        ConnectionCounts.for_config(config))
    if state.tracking is None and config.tracking_log:
        from ..observe.tracking_log import TrackingLog
        state.tracking = TrackingLog(config.tracking_log, log=log, metrics=state.metrics)
    if runtimes is None:
        runtimes, demo = build_runtimes(config, log, state)
    else:
        runtimes, demo = runtimes
    gateway = Gateway(config, runtimes, demo_certificate=demo)
    state.metrics.demo_certificate.set(1 if demo else 0)
    async with trio.open_nursery() as handlers:
        for rt in runtimes:
            if rt.alerts is not None:
                rt.alerts.nursery = handlers
        state.pool.closed = False
        state.pool.nursery = handlers
        reaper = trio.CancelScope()

        async def reap():
            with reaper:
                await state.pool.reap()
        handlers.start_soon(reap)
        watch_scope = trio.CancelScope()        # cancelled once drained sessions are gone
        state.watchdog.start(handlers, tick_for(
            [t for rt in runtimes if serving(rt.listener).watched
             for t in (rt.listener.timeouts.command, rt.listener.timeouts.data)]), watch_scope)
        async with trio.open_nursery() as acceptors:
            gateway.accept_scope = acceptors.cancel_scope
            for rt, sock in zip(runtimes, sockets or [None] * len(runtimes)):
                if sock is None:
                    sock = bind_socket(rt.listener)
                else:
                    sock = sock.dup()        # the owner keeps its own descriptor open
                listen_sock = trio.socket.from_stdlib_socket(sock)
                host, port = sock.getsockname()[:2]
                gateway.addresses[rt.listener.name] = (host, port)
                rt.log.event("listening", bind=f"{host}:{port}",
                             protocol=rt.listener.protocol, tls=rt.listener.tls,
                             client_tls=rt.listener.client_tls,
                             upstream=f"{rt.upstream.host}:{rt.upstream.port}",
                             upstream_tls=rt.listener.upstream.tls)

                acceptors.start_soon(accept_loop, listen_sock, partial(_handle, rt), handlers,
                                     rt.log)
            task_status.started(gateway)
        # accepting stopped: drain
        if gateway.retiring:
            log.event("draining", grace=config.shutdown_grace, retire=True,
                      reload_grace=config.reload_grace)
        else:
            log.event("draining", grace=config.shutdown_grace, retire=False)
        reaper.cancel()
        handlers.start_soon(state.pool.close_all)
        grace_scope = trio.CancelScope()        # the reload_grace timer of a retirement

        async def stop_watch_when_idle():
            while state.sessions:
                await state.no_sessions.wait()
            watch_scope.cancel()
            grace_scope.cancel()                # no session left: the worker may exit
        handlers.start_soon(stop_watch_when_idle)
        gateway.begin_drain(Drain(config, state, handlers, log, grace_scope))


def session_deadline(rt: ListenerRuntime) -> float:
    """When a session of *rt* that starts now must end: never while serving; on a retired
    worker, an SMTP session when upstream_data_done has passed since the retirement, an IMAP
    one when its cut (reload_grace, the supervisor's cap) is shutdown_grace old."""
    state = rt.state
    if not rt.listener.protocol.outlives_reload:
        if state.retired_at is None:
            return math.inf
        return state.retired_at + rt.listener.timeouts.upstream_data_done
    return state.imap_deadline


class Drain:
    """The end of a process' serving, once accepting has stopped (SPEC §9).

    `shutdown()`: every session drains at once (idle SMTP ones answer 421 4.3.2, IMAP ones
    say BYE) and what is left after shutdown_grace is cancelled. `retire()` (a reload
    replaced the worker): SMTP sessions drain (a session silent for RETIRE_IDLE outside a
    transaction answers 421 4.3.2, so a client in the middle of its exchange is not cut),
    a transaction in flight gets up to upstream_data_done; IMAP sessions stay until they
    end or reload_grace passes, then `cut_imap()`, which the supervisor may also ask for
    sooner (its cap of retired generations keeping sessions); a cut session is closed
    without a word shutdown_grace later if it never reached a response boundary. serve()
    returns when no session is left, so a retired worker with no IMAP sessions exits as
    soon as its SMTP work is done."""

    def __init__(self, config: GatewayConfig, state: WorkerState, handlers: trio.Nursery,
                 log, grace_scope: trio.CancelScope):
        self.config = config
        self.state = state
        self.handlers = handlers
        self.log = log
        self.grace_scope = grace_scope
        self.imap_cut = False
        self.down = False

    def retire(self) -> None:
        state = self.state
        state.retired_at = trio.current_time()
        state.drain_smtp(RETIRE_IDLE)
        for scope, rt in list(state.session_scopes.items()):
            if not rt.listener.protocol.outlives_reload:
                scope.deadline = min(scope.deadline, session_deadline(rt))
        self.handlers.start_soon(self._reload_grace)

    async def _reload_grace(self) -> None:
        with self.grace_scope:
            await trio.sleep(self.config.reload_grace)
            self.cut_imap("reload_grace")

    def cut_imap(self, reason: str) -> None:
        """The retired worker's IMAP sessions say BYE now (counted and logged with *reason*:
        "reload_grace" or "generation_cap")."""
        if self.imap_cut or self.down:
            return
        self.imap_cut = True
        self.grace_scope.cancel()
        state = self.state
        per_listener: dict[str, int] = {}
        for rt in state.session_scopes.values():
            if rt.listener.protocol.outlives_reload:
                per_listener[rt.listener.name] = per_listener.get(rt.listener.name, 0) + 1
        for name, n in per_listener.items():
            state.metrics.reload_sessions_cut_total.labels(name, reason).inc(n)
        if per_listener:
            self.log.event("reload_sessions_cut", level="warning", reason=reason,
                           sessions=sum(per_listener.values()))
        state.imap_deadline = trio.current_time() + self.config.shutdown_grace
        state.drain_imap()
        for scope, rt in list(state.session_scopes.items()):
            if rt.listener.protocol.outlives_reload:
                scope.deadline = min(scope.deadline, state.imap_deadline)

    def shutdown(self) -> None:
        if self.down:
            return
        self.down = True
        self.grace_scope.cancel()
        self.state.drain()
        scope = self.handlers.cancel_scope
        scope.deadline = min(scope.deadline, trio.current_time() + self.config.shutdown_grace)


async def serve_until_signal(config: GatewayConfig, log, *, sockets=None, state=None,
                             runtimes=None) -> None:
    """serve() until SIGTERM/SIGINT (drain, SPEC §9) or SIGUSR2 (retire after a reload);
    SIGUSR1 reopens the event and tracking logs (logrotate) and serving goes on."""
    if state is None:
        state = WorkerState(ConnectionCounts.for_config(config))
    with trio.open_signal_receiver(*SERVE_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(serve_then_cancel, nursery.cancel_scope, config, log,
                                          sockets, state, runtimes)
            await until_stopped(signals, gateway, state, log)


async def serve_then_cancel(scope: trio.CancelScope, config, log, sockets, state, runtimes,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """serve(), then cancel *scope* (the signal loop beside it): a retired process that has
    drained exits without waiting for another signal."""
    await serve(config, log, sockets=sockets, state=state, runtimes=runtimes,
                task_status=task_status)
    scope.cancel()


SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, RETIRE_SIGNAL, REOPEN_SIGNAL)


async def until_stopped(signals, gateway: Gateway, state: WorkerState, log,
                        cut_ordered=None) -> None:
    """Act on the signals of a serving process until it is drained (the caller cancels this
    then) or shut down: SIGUSR1 reopens the event log (log_file) and the
    tracking log and serving goes on; SIGTERM/SIGINT
    drain (§9); SIGUSR2 retires, and on a retired process cuts its IMAP sessions when
    *cut_ordered()* says the supervisor asked for it (a worker: the order in the shared
    counts, since two signals may arrive as one; else a second SIGUSR2 cuts)."""
    async for signum in signals:
        if signum == REOPEN_SIGNAL:          # logrotate moved the files: reopen, serve on
            reopen = getattr(log, "reopen", None)    # the event log (log_file), then tracking
            if reopen is not None:
                reopen()
            if state.tracking is not None:
                state.tracking.reopen()
            continue
        if signum == RETIRE_SIGNAL:
            retired = gateway.retiring
            if not retired:
                log.event("shutdown", signal=signal.Signals(signum).name)
                gateway.stop_accepting(retire=True)
            if cut_ordered() if cut_ordered is not None else retired:
                gateway.cut_imap("generation_cap")
            continue
        log.event("shutdown", signal=signal.Signals(signum).name)
        gateway.stop_accepting()
        break
