"""Listeners and the process that serves them (one process; the supervisor comes with SPEC §9).

Everything expensive is done once here at start-up: TLS contexts per listener and upstream,
certificates loaded, the demo certificate generated if a listener needs one and has none.
"""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field

import trio

from .config import GatewayConfig, Listener
from .logs import new_conn_id
from .proto import replies as R
from .relay.smtp_session import SMTPSession
from .relay.upstream import UpstreamSettings
from .tls import context as tls_context
from .tls.certs import demo_certificate


@dataclass
class ListenerRuntime:
    listener: Listener
    hostname: str
    server_ctx: object | None
    upstream: UpstreamSettings
    log: object
    active: int = 0


@dataclass
class Gateway:
    """What `serve()` reports once every listener is bound."""
    config: GatewayConfig
    runtimes: list[ListenerRuntime]
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    demo_certificate: bool = False


def _needs_server_tls(listener: Listener) -> bool:
    return listener.tls == "implicit" or (listener.tls == "starttls"
                                          and listener.client_tls != "none")


def build_runtimes(config: GatewayConfig, log) -> tuple[list[ListenerRuntime], bool]:
    """TLS contexts and upstream settings for every listener. Returns (runtimes, demo_used)."""
    demo_pems = None
    runtimes = []
    for listener in config.listeners:
        profile = config.profiles[listener.profile]
        server_ctx = None
        if _needs_server_tls(listener):
            verify_clients = listener.client_tls == "verify" or any(
                r.client_tls == "verify" for r in listener.client_rules)
            if listener.certificate is None:
                if demo_pems is None:
                    demo_pems = demo_certificate(config.hostname)
                    log.event("demo_certificate", level="warning",
                              message="using a generated self-signed demonstration "
                                      "certificate: insecure, configure a certificate")
                server_ctx = tls_context.server_context(
                    profile, cert_pem=demo_pems[0], key_pem=demo_pems[1],
                    request_client_cert=verify_clients)
            else:
                cert = config.certificates[listener.certificate]
                server_ctx = tls_context.server_context(
                    profile, cert.cert, cert.key, request_client_cert=verify_clients)
        up = listener.upstream
        up_cert = config.certificates.get(up.certificate) if up.certificate else None
        verify_upstream = up.tls == "verify" or any(
            r.recipient_encryption == "verify" for r in listener.rules)
        client_ctx = tls_context.client_context(
            config.profiles[up.profile], verify=verify_upstream,
            cert_path=up_cert.cert if up_cert else None,
            key_path=up_cert.key if up_cert else None)
        t = listener.timeouts
        settings = UpstreamSettings(
            host=up.host, port=up.port, mode=up.mode, server_name=up.server_name,
            helo_name=config.hostname, tls_context=client_ctx,
            connect_timeout=t.upstream_connect, reply_timeout=t.upstream_reply,
            data_done_timeout=t.upstream_data_done, forward_client=listener.forward_client)
        runtimes.append(ListenerRuntime(listener, config.hostname, server_ctx, settings,
                                        log.bind(listener=listener.name)))
    return runtimes, demo_pems is not None


async def _bind(listener: Listener) -> trio.SocketListener:
    host = listener.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    await sock.bind((host, listener.port))
    sock.listen(listener.backlog)
    return trio.SocketListener(sock)


async def _handle(rt: ListenerRuntime, stream: trio.SocketStream) -> None:
    try:
        peer = stream.socket.getpeername()
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        await stream.aclose()
        return
    client = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    conn_id = new_conn_id()
    log = rt.log.bind(conn=conn_id, client=client)
    rt.active += 1
    try:
        if rt.active > rt.listener.max_connections:
            log.event("reject", code=421, reason="too many connections")
            with trio.move_on_after(5):
                if rt.listener.tls != "implicit":
                    try:
                        await stream.send_all(R.render(*R.TOO_MANY_CONNECTIONS))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await stream.aclose()
            return
        if rt.listener.protocol == "smtp":
            await SMTPSession(rt, stream, (peer[0], peer[1]), log, conn_id).run()
        else:
            await stream.aclose()      # IMAP arrives with SPEC §5
    finally:
        rt.active -= 1


async def serve(config: GatewayConfig, log, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Bind every listener and serve until cancelled; reports a `Gateway` when bound."""
    runtimes, demo = build_runtimes(config, log)
    gateway = Gateway(config, runtimes, demo_certificate=demo)
    async with trio.open_nursery() as nursery:
        for rt in runtimes:
            sock_listener = await _bind(rt.listener)
            host, port = sock_listener.socket.getsockname()[:2]
            gateway.addresses[rt.listener.name] = (host, port)
            rt.log.event("listening", bind=f"{host}:{port}", protocol=rt.listener.protocol,
                         tls=rt.listener.tls, client_tls=rt.listener.client_tls,
                         upstream=f"{rt.upstream.host}:{rt.upstream.port}",
                         upstream_tls=rt.listener.upstream.tls)

            async def handler(stream, rt=rt):
                await _handle(rt, stream)
            nursery.start_soon(trio.serve_listeners, handler, [sock_listener])
        task_status.started(gateway)


def run(config: GatewayConfig, log, demo: bool = False) -> int:
    """Blocking entry point of `gateway run`: serve until SIGTERM/SIGINT, then exit 0."""

    async def main():
        async with trio.open_nursery() as nursery:
            if demo:
                from .sink import Sink
                up = config.listeners[0].upstream
                sink = Sink(hostname="sink.demo")
                await nursery.start(sink.serve, up.host, up.port)
                log.event("demo_sink", bind=f"{up.host}:{up.port}")
            await nursery.start(serve, config, log)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.event("shutdown", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

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
