"""Serving the listeners of one process: `serve()` accepts on every listener and hands each
connection to its SMTP or IMAP session; `Gateway.stop_accepting()` drains (a shutdown) or
retires (after a reload, SPEC §9); `serve_until_signal()`, which a worker and
`gateway run --single-process` run, ties both to signals.

What a worker serves with is built elsewhere, once: TLS contexts in listener_tls (by the
supervisor, before it forks), the listeners' runtimes in runtime.
"""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from .config import GatewayConfig
from .conncount import ConnectionCounts
from .lifecycle import REOPEN_SIGNAL, RETIRE_SIGNAL
from .logs import new_conn_id
from .net.accept import accept_loop
from .net.bind import bind_socket
from .net.proxy_protocol import is_trusted
from .net.proxy_stream import read_proxy_header
from .net.sockstream import LeanSocketStream
from .perip import address_key
from .proto import replies as R
from .relay.imap_session import IMAPSession
from .relay.smtp_session import SMTPSession
from .relay.watchdog import tick_for
from .runtime import ListenerRuntime, WorkerState, build_runtimes


IMAP_TOO_MANY_CONNECTIONS = b"* BYE Too many connections\r\n"     # SPEC §2
IMAP_TOO_MANY_FROM_ADDRESS = b"* BYE Too many connections from your address\r\n"


@dataclass
class Gateway:
    """What `serve()` reports once every listener is bound."""
    config: GatewayConfig
    runtimes: list[ListenerRuntime]
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    demo_certificate: bool = False
    accept_scope: trio.CancelScope | None = None
    retiring: bool = False

    def stop_accepting(self, *, retire: bool = False) -> None:
        """Begin the drain: no new connections; serve() returns when sessions are done.

        A shutdown answers idle sessions 421 4.3.2 at once. A retirement (a reload replaced
        this worker) lets every session go on for up to shutdown_grace, then drains."""
        self.retiring = retire
        if self.accept_scope is not None:
            self.accept_scope.cancel()


async def _handle(rt: ListenerRuntime, sock) -> None:
    """One accepted connection (a trio socket), closed when this returns."""
    try:
        await _session(rt, sock)
    finally:
        sock.close()


async def _session(rt: ListenerRuntime, sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = sock.getpeername()
    except OSError:
        return
    stream = LeanSocketStream(sock)
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
        if counts.total(rt.index) > rt.listener.max_connections:
            log.event("reject", code=421, reason="too many connections")
            m.connections_rejected_total.labels(name, ltype, "max_connections").inc()
            await _refuse(rt, stream, R.TOO_MANY_CONNECTIONS, IMAP_TOO_MANY_CONNECTIONS)
            return
        if rt.listener.max_connections_per_ip:
            key = _per_ip_key(rt, peer[0], own_address)
            if key is not None:
                held = counts.per_ip.add(state.row, rt.index, key)
                if held < 0:        # no room to count it: past every max_connections (§2)
                    _report_full(counts.per_ip, log)
                    log.event("reject", code=421, reason="too many connections")
                    m.connections_rejected_total.labels(name, ltype, "max_connections").inc()
                    await _refuse(rt, stream, R.TOO_MANY_CONNECTIONS, IMAP_TOO_MANY_CONNECTIONS)
                    return
                ip_key = key
                if held > rt.listener.max_connections_per_ip:
                    log.event("reject", code=421, reason="too many connections from address")
                    m.connections_rejected_total.labels(name, ltype, "per_ip").inc()
                    await _refuse(rt, stream, R.TOO_MANY_FROM_ADDRESS,
                                  IMAP_TOO_MANY_FROM_ADDRESS)
                    return
        try:
            if rt.listener.protocol == "smtp":
                await SMTPSession(rt, stream, (peer[0], peer[1]), log, conn_id).run()
            else:
                await IMAPSession(rt, stream, (peer[0], peer[1]), log, conn_id).run()
        except Exception as exc:           # a bug in one session must not end the worker
            log.event("session_error", level="error", message=repr(exc))
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
    finally:
        counts.add(state.row, rt.index, -1)
        if ip_key is not None:
            counts.per_ip.remove(state.row, rt.index, ip_key)
        state.session_ended()
        m.connections_active.labels(name, ltype).dec()


async def _refuse(rt: ListenerRuntime, stream, smtp_reply, imap_reply: bytes) -> None:
    """Over a connection limit: the protocol's reply, none on an implicit listener; close."""
    with trio.move_on_after(5):
        if rt.listener.tls != "implicit":
            try:
                await stream.send_all(R.render(*smtp_reply) if rt.listener.protocol == "smtp"
                                      else imap_reply)
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
        from .tracking import TrackingLog
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
            [t for rt in runtimes if rt.listener.protocol == "smtp"
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
        log.event("draining", grace=config.shutdown_grace, retire=gateway.retiring)
        reaper.cancel()
        handlers.start_soon(state.pool.close_all)

        async def stop_watch_when_idle():
            while state.sessions:
                await state.no_sessions.wait()
            watch_scope.cancel()
        handlers.start_soon(stop_watch_when_idle)
        if gateway.retiring:
            handlers.start_soon(_retire, state, handlers.cancel_scope, config.shutdown_grace)
        else:
            state.drain()
            handlers.cancel_scope.deadline = trio.current_time() + config.shutdown_grace


async def _retire(state: WorkerState, scope: trio.CancelScope, grace: float) -> None:
    with trio.move_on_after(grace):
        while state.sessions:
            await state.no_sessions.wait()
    state.drain()
    scope.deadline = trio.current_time() + 5


async def serve_until_signal(config: GatewayConfig, log, *, sockets=None, state=None,
                             runtimes=None) -> None:
    """serve() until SIGTERM/SIGINT (drain, SPEC §9) or SIGUSR2 (retire after a reload);
    SIGUSR1 reopens the event and tracking logs (logrotate) and serving goes on."""
    if state is None:
        state = WorkerState(ConnectionCounts.for_config(config))
    with trio.open_signal_receiver(*SERVE_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(partial(serve, config, log, sockets=sockets,
                                                  state=state, runtimes=runtimes))
            await until_stopped(signals, gateway, state, log)


SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, RETIRE_SIGNAL, REOPEN_SIGNAL)


async def until_stopped(signals, gateway: Gateway, state: WorkerState, log) -> None:
    """Act on the signals of a serving process until one stops it: SIGUSR1 reopens the
    event log (log_file) and the tracking log and serving goes on; SIGTERM/SIGINT drain, SIGUSR2 retires (§9)."""
    async for signum in signals:
        if signum == REOPEN_SIGNAL:          # logrotate moved the files: reopen, serve on
            reopen = getattr(log, "reopen", None)    # the event log (log_file), then tracking
            if reopen is not None:
                reopen()
            if state.tracking is not None:
                state.tracking.reopen()
            continue
        log.event("shutdown", signal=signal.Signals(signum).name)
        gateway.stop_accepting(retire=signum == RETIRE_SIGNAL)
        break
