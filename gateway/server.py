"""Listeners and the process that serves them (one process; the supervisor comes with SPEC §9).

Everything expensive is done once here at start-up: TLS contexts per listener and upstream,
certificates loaded, the demo certificate generated if a listener needs one and has none.
"""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from .alerts import AlertMailer
from .config import GatewayConfig, Listener
from .conncount import ConnectionCounts
from .logs import new_conn_id
from .metrics import NullMetrics
from .net.accept import accept_loop
from .net.bind import bind_socket
from .net.proxy_stream import read_proxy_header
from .net.sockstream import LeanSocketStream
from .proto import replies as R
from .relay.imap_session import IMAPSession
from .relay.smtp_session import SMTPSession
from .relay.pool import UpstreamPool
from .relay.upstream import UpstreamSettings
from .relay.watchdog import ReceiveWatchdog, tick_for
from .rules import ClientPolicy, EncryptionPolicy
from .tls import context as tls_context
from .tls.certs import demo_certificate
from .tls.profiles import clone as clone_profile


IMAP_TOO_MANY_CONNECTIONS = b"* BYE Too many connections\r\n"     # SPEC §2
RETIRE_SIGNAL = signal.SIGUSR2      # supervisor → old worker after a reload


class WorkerState:
    """What every session of one process shares: draining (SPEC §9) and connection counts."""

    def __init__(self, counts=None, row: int = 0, metrics=None):
        self.draining = False
        self.idle_scopes: set[trio.CancelScope] = set()
        self.counts = counts if counts is not None else ConnectionCounts(1, 1)
        self.row = row
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.tracking = None                     # TrackingLog when tracking_log is set
        self.sessions = 0                        # open connections in this process
        self.pool = UpstreamPool()               # idle SMTP upstream legs (§4.4)
        self.watchdog = ReceiveWatchdog()        # SMTP client-read timeouts
        self.no_sessions = trio.Event()

    def session_started(self) -> None:
        self.sessions += 1

    def session_ended(self) -> None:
        self.sessions -= 1
        if self.sessions == 0:
            self.no_sessions.set()
            self.no_sessions = trio.Event()

    def drain(self) -> None:
        """Stop idle sessions (they answer 421 4.3.2); busy ones stop when next idle."""
        self.draining = True
        for scope in list(self.idle_scopes):
            scope.cancel()


@dataclass
class ListenerRuntime:
    listener: Listener
    hostname: str
    server_ctx: object | None
    upstream: UpstreamSettings
    log: object
    index: int = 0                      # position in config.listeners (connection counts)
    state: WorkerState | None = None
    policy: EncryptionPolicy | None = None       # SMTP encryption rules (§4.3)
    client_policy: ClientPolicy | None = None    # client rules (§4.3)
    strength_ctx: dict = field(default_factory=dict)   # cipher_strength → server context
    alerts: object = None                        # AlertMailer when alert e-mail is configured

    def server_ctx_for(self, strength: str | None):
        """The client-leg context, or its variant for a client rule's cipher strength."""
        if strength is None:
            return self.server_ctx
        return self.strength_ctx.get(strength, self.server_ctx)


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


def _needs_server_tls(listener: Listener) -> bool:
    if listener.tls == "implicit":
        return True
    return listener.tls == "starttls" and (listener.client_tls != "none" or any(
        r.client_tls not in (None, "none") for r in listener.client_rules))


@dataclass
class ListenerTLS:
    """A listener's TLS contexts: the client leg's (and its cipher-strength variants) and
    the upstream leg's."""
    server_ctx: object | None
    strength_ctx: dict
    client_ctx: object


def build_tls(config: GatewayConfig, log) -> tuple[list[ListenerTLS], bool]:
    """Every listener's TLS contexts, and whether the demo certificate is used.

    The supervisor builds them once, before it forks, so that every worker inherits the same
    contexts: the same certificate (a demo certificate too) and the same TLS session-ticket
    keys, so a client's ticket from one worker resumes on any other. Raises on a certificate
    or key that cannot be loaded."""
    demo_pems = None
    out = []
    for listener in config.listeners:
        profile = config.profiles[listener.profile]
        server_ctx = None
        strength_ctx = {}
        if _needs_server_tls(listener):
            verify_clients = listener.client_tls == "verify" or any(
                r.client_tls == "verify" for r in listener.client_rules)
            if listener.certificate is None:
                if demo_pems is None:
                    demo_pems = demo_certificate(config.hostname)
                    log.event("demo_certificate", level="warning",
                              message="using a generated self-signed demonstration "
                                      "certificate: insecure, configure a certificate")
                make = partial(tls_context.server_context, cert_pem=demo_pems[0],
                               key_pem=demo_pems[1], request_client_cert=verify_clients)
            else:
                cert = config.certificates[listener.certificate]
                make = partial(tls_context.server_context, cert_path=cert.cert,
                               key_path=cert.key, request_client_cert=verify_clients)
            server_ctx = make(profile)
            for strength in {r.cipher_strength for r in listener.client_rules
                             if r.is_network and r.cipher_strength}:
                strength_ctx[strength] = make(clone_profile(
                    profile, f"{profile.name}+{strength}", cipher_strength=strength))
        up = listener.upstream
        up_cert = config.certificates.get(up.certificate) if up.certificate else None
        verify_upstream = up.tls == "verify" or any(
            r.recipient_encryption == "verify" for r in listener.rules)
        client_ctx = tls_context.client_context(
            config.profiles[up.profile], verify=verify_upstream,
            cert_path=up_cert.cert if up_cert else None,
            key_path=up_cert.key if up_cert else None)
        out.append(ListenerTLS(server_ctx, strength_ctx, client_ctx))
    return out, demo_pems is not None


def build_runtimes(config: GatewayConfig, log, state: WorkerState | None = None,
                   tls: tuple[list[ListenerTLS], bool] | None = None
                   ) -> tuple[list[ListenerRuntime], bool]:
    """Upstream settings, policies and TLS contexts (*tls* from build_tls(), built here when
    not given) for every listener. Returns (runtimes, demo_used)."""
    tls_list, demo_used = tls if tls is not None else build_tls(config, log)
    runtimes = []
    state = state if state is not None else WorkerState(
        ConnectionCounts(1, len(config.listeners)))
    for index, (listener, ltls) in enumerate(zip(config.listeners, tls_list)):
        up = listener.upstream
        server_ctx, strength_ctx, client_ctx = (ltls.server_ctx, ltls.strength_ctx,
                                                ltls.client_ctx)
        t = listener.timeouts
        settings = UpstreamSettings(
            host=up.host, port=up.port, mode=up.mode, server_name=up.server_name,
            helo_name=config.hostname, tls_context=client_ctx,
            connect_timeout=t.upstream_connect, reply_timeout=t.upstream_reply,
            data_done_timeout=t.upstream_data_done, forward_client=listener.forward_client,
            pool_size=up.pool_size if listener.protocol == "smtp" else 0,
            pool_idle=up.pool_idle, pool_max_reuse=up.pool_max_reuse,
            tls_resumption=config.profiles[up.profile].session_resumption)
        smtp = listener.protocol == "smtp"
        alerts = None
        if smtp and config.alert_recipients:
            alerts = AlertMailer(
                settings, sender=config.alert_sender or f"postmaster@{config.hostname}",
                recipients=config.alert_recipients, hostname=config.hostname,
                listener=listener.name, log=log.bind(listener=listener.name),
                interval=config.alert_interval)
        runtimes.append(ListenerRuntime(
            listener, config.hostname, server_ctx, settings, log.bind(listener=listener.name),
            index, state, policy=EncryptionPolicy(listener) if smtp else None,
            client_policy=ClientPolicy(listener), strength_ctx=strength_ctx, alerts=alerts))
    return runtimes, demo_used


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
    if rt.listener.proxy_protocol:
        m, name = rt.state.metrics, rt.listener.name
        got = await read_proxy_header(
            stream, peer, rt.log.bind(client=_fmt_addr(peer)),
            trusted_proxies=rt.listener.trusted_proxies,
            timeout=rt.listener.timeouts.tls_handshake,
            rejected=lambda reason: m.connections_rejected_total.labels(name, reason).inc())
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
    m, name = state.metrics, rt.listener.name
    m.connections_total.labels(name, rt.listener.protocol).inc()
    m.connections_active.labels(name).inc()
    try:
        if counts.total(rt.index) > rt.listener.max_connections:
            log.event("reject", code=421, reason="too many connections")
            m.connections_rejected_total.labels(name, "max_connections").inc()
            with trio.move_on_after(5):
                if rt.listener.tls != "implicit":
                    try:
                        await stream.send_all(R.render(*R.TOO_MANY_CONNECTIONS)
                                              if rt.listener.protocol == "smtp"
                                              else IMAP_TOO_MANY_CONNECTIONS)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await stream.aclose()
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
        state.session_ended()
        m.connections_active.labels(name).dec()


def _fmt_addr(peer) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


async def serve(config: GatewayConfig, log, *, sockets=None, state: WorkerState | None = None,
                runtimes=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve every listener; reports a `Gateway` once bound.

    *sockets*: listening stdlib sockets, one per listener, owned by a supervisor (else bound
    here). Runs until cancelled, or until `Gateway.stop_accepting()`: then idle sessions get
    421 4.3.2, transactions in flight get `shutdown_grace` seconds, and serve() returns."""
    state = state if state is not None else WorkerState(
        ConnectionCounts(1, len(config.listeners)))
    if state.tracking is None and config.tracking_log:
        from .tracking import TrackingLog
        state.tracking = TrackingLog(config.tracking_log)
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


def run(config: GatewayConfig, log, demo: bool = False) -> int:
    """`gateway run`: the supervisor with workers, or one process with --single-process."""
    if not config.single_process:
        from .supervisor import Supervisor
        return Supervisor(config, log, demo=demo).run()
    return run_single(config, log, demo)


async def run_demo_sink(config: GatewayConfig, log, *, task_status=trio.TASK_STATUS_IGNORED):
    from .sink import Sink
    up = config.listeners[0].upstream
    sink = Sink(hostname="sink.demo")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve, up.host, up.port)
        log.event("demo_sink", bind=f"{up.host}:{up.port}")
        task_status.started()


async def serve_until_signal(config: GatewayConfig, log, *, sockets=None, state=None,
                             runtimes=None) -> None:
    """serve() until SIGTERM/SIGINT (drain, SPEC §9) or SIGUSR2 (retire after a reload)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, RETIRE_SIGNAL) as signals:
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(partial(serve, config, log, sockets=sockets,
                                                  state=state, runtimes=runtimes))
            async for signum in signals:
                log.event("shutdown", signal=signal.Signals(signum).name)
                gateway.stop_accepting(retire=signum == RETIRE_SIGNAL)
                break


def run_single(config: GatewayConfig, log, demo: bool = False) -> int:
    async def main():
        async with trio.open_nursery() as nursery:
            if demo:
                await nursery.start(run_demo_sink, config, log)
            await serve_until_signal(config, log)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        fatal, rest = group.split(OSError)      # e.g. a port already in use
        if rest is not None or fatal is None:
            raise
        for exc in fatal.exceptions:
            log.event("fatal", level="error", message=str(exc))
        return 1
    return 0
