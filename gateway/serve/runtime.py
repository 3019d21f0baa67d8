"""What a worker serves with: per-listener runtimes (upstream settings, policies, alert
mailer, the TLS contexts from listener_tls) and the state all sessions of the process share."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import trio

from .alerts import AlertMailer
from ..config import GatewayConfig, Listener
from .conncount import ConnectionCounts
from .listener_tls import ListenerTLS, build_tls
from ..observe.metrics import MESSAGE_RESULTS, REJECT_REASONS, NullMetrics
from ..observe.recent import NullRecent, RecentCounts
from ..relay.milter_hook import milter_factories
from ..relay.pool import UpstreamPool
from ..relay.spool import prepare_spool_dir
from ..relay.upstream import FAILURE_KINDS, TLS_ALERT_REASONS, UpstreamSettings
from ..relay.watchdog import ReceiveWatchdog
from ..policy.stages import StagePolicy


class WorkerState:
    """What every session of one process shares: draining (SPEC §9) and connection counts."""

    def __init__(self, counts=None, row: int = 0, metrics=None):
        self.draining = False                    # SMTP: idle sessions answer 421 4.3.2
        self.idle_grace = 0.0                    # ... once silent that long (a retirement)
        self.idle_scopes: set[trio.CancelScope] = set()      # SMTP sessions waiting idle
        self.imap_draining = False               # IMAP: sessions say BYE (drain_imap)
        self.imap_idle_scopes: set[trio.CancelScope] = set()  # IMAP waits before login
        self.drain_hooks: set = set()            # relayed IMAP sessions: called at drain_imap
        self.session_scopes: dict = {}           # each session's cancel scope -> its runtime
        self.retired_at: float | None = None     # trio time a reload retired this worker
        self.imap_deadline = math.inf            # IMAP sessions end by then (after a cut)
        self.counts = counts if counts is not None else ConnectionCounts(1, 1)
        self.row = row
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.tracking = None                     # TrackingLog when tracking_log is set
        self.sessions = 0                        # open connections in this process
        self.pool = UpstreamPool()               # idle SMTP upstream legs (§4.4)
        self.watchdog = ReceiveWatchdog()        # SMTP client-read timeouts
        self.no_sessions = trio.Event()
        self.recent = NullRecent()               # sessions/messages of the last minute

    def session_started(self) -> None:
        self.sessions += 1

    def session_ended(self) -> None:
        self.sessions -= 1
        if self.sessions == 0:
            self.no_sessions.set()
            self.no_sessions = trio.Event()

    def drain(self) -> None:
        """A shutdown: drain_smtp() and drain_imap()."""
        self.drain_smtp()
        self.drain_imap()

    def drain_smtp(self, idle_grace: float = 0.0) -> None:
        """Stop idle SMTP sessions (they answer 421 4.3.2); busy ones stop when next idle.
        With *idle_grace* (a retirement) a session waiting for a command outside a
        transaction is idle once it has been silent that long: a client in the middle of
        its exchange (EHLO, STARTTLS, QUIT after its message) is not cut."""
        self.draining = True
        self.idle_grace = idle_grace
        if not idle_grace:
            for scope in list(self.idle_scopes):
                scope.cancel()
            return
        when = trio.current_time() + idle_grace
        for scope in list(self.idle_scopes):
            if self.watchdog.running:
                self.watchdog.watch(scope, when)
            else:
                scope.deadline = min(scope.deadline, when)

    def drain_imap(self) -> None:
        """IMAP sessions before login say BYE; relayed ones say BYE at their next response
        boundary (`drain_hooks`). A retired worker does this only when reload_grace passes
        or the supervisor says so (SPEC §9)."""
        self.imap_draining = True
        for scope in list(self.imap_idle_scopes):
            scope.cancel()
        for hook in list(self.drain_hooks):
            hook()


@dataclass
class ListenerRuntime:
    listener: Listener
    hostname: str
    server_ctx: object | None
    upstream: UpstreamSettings
    log: object
    index: int = 0                      # position in config.listeners (connection counts)
    state: WorkerState | None = None
    stages: StagePolicy | None = None            # each stage's decision (policy/)
    strength_ctx: dict = field(default_factory=dict)   # cipher_strength → server context
    alerts: object = None                        # AlertMailer when alert e-mail is configured
    sni: dict = field(default_factory=dict)      # cipher_strength|None → SNISelector (§3.4)
    milter_spool: tuple = ("", 0)                # (spool_dir, milter_memory) with milters

    def server_ctx_for(self, strength: str | None):
        """The client-leg context, or its variant for a client rule's cipher strength."""
        if strength is None:
            return self.server_ctx
        return self.strength_ctx.get(strength, self.server_ctx)

    def sni_for(self, strength: str | None):
        """The SNI selector of a listener with several certificates (as server_ctx_for), or
        None: then nothing is read ahead of the handshake."""
        sni = self.sni
        if not sni:
            return None
        return sni.get(strength) or sni.get(None)


def build_runtimes(config: GatewayConfig, log, state: WorkerState | None = None,
                   tls: tuple[list[ListenerTLS], bool] | None = None
                   ) -> tuple[list[ListenerRuntime], bool]:
    """Upstream settings, policies and TLS contexts (*tls* from build_tls(), built here when
    not given) for every listener. Returns (runtimes, demo_used)."""
    tls_list, demo_used = tls if tls is not None else build_tls(config, log)
    runtimes = []
    state = state if state is not None else WorkerState(
        ConnectionCounts.for_config(config))
    start_metrics(state.metrics, config, tls_list)
    if not isinstance(state.metrics, NullMetrics) and isinstance(state.recent, NullRecent):
        state.recent = RecentCounts.for_process([lst.name for lst in config.listeners])
    if any(listener.milters for listener in config.listeners):
        # still privileged here (a worker drops privileges after this): 0700, the workers'
        prepare_spool_dir(config.spool_dir, config.user, config.group)
    store = None
    if config.alert_recipients:       # the alert limiter all workers share (§8)
        from .state import StateStore, prepare_state_dir
        prepare_state_dir(config.state_dir, config.user, config.group)
        store = StateStore(config.state_dir)
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
            pool_size=up.pool_size if listener.protocol.pools_legs else 0,
            pool_idle=up.pool_idle, pool_max_reuse=up.pool_max_reuse,
            tls_resumption=config.profiles[up.profile].session_resumption,
            profile=up.profile, certificate=up.certificate,
            on_result=upstream_result_recorder(state.metrics, listener.name))
        alerts = None
        if listener.protocol.carries_messages and config.alert_recipients:
            alerts = AlertMailer(
                settings, sender=config.alert_sender or f"postmaster@{config.hostname}",
                recipients=config.alert_recipients, hostname=config.hostname,
                listener=listener.name, log=log.bind(listener=listener.name),
                interval=config.alert_interval, store=store)
        runtimes.append(ListenerRuntime(
            listener, config.hostname, server_ctx, settings, log.bind(listener=listener.name),
            index, state, stages=StagePolicy(listener, session_hooks=milter_factories(listener)),
            strength_ctx=strength_ctx, alerts=alerts, sni=ltls.sni,
            milter_spool=(config.spool_dir, config.milter_memory)))
    return runtimes, demo_used


def start_metrics(metrics, config: GatewayConfig, tls_list: list[ListenerTLS]) -> None:
    """What a worker exports from its start (SPEC §11): every counter an alert rule reads, at
    0 for every listener and reason (so Prometheus' `increase()` sees the first failure) —
    TLS alerts, upstream errors, connections refused, messages by result, each milter's
    errors and timeouts —, each milter's time histogram (so `rate()` sees the first
    messages), and the notAfter of every certificate it loaded."""
    for listener in config.listeners:
        for reason in REJECT_REASONS:
            metrics.connections_rejected_total.labels(listener.name, listener.type, reason)
        if listener.protocol.carries_messages:
            for result in MESSAGE_RESULTS:
                metrics.messages_total.labels(listener.name, listener.type, result)
        for reason in TLS_ALERT_REASONS:
            metrics.tls_alerts_total.labels(listener.name, reason)
        for reason in FAILURE_KINDS.values():
            metrics.upstream_errors_total.labels(listener.name, reason)
        for milter in listener.milters:
            for result in ("error", "timeout"):         # the milter rule's (MilterError)
                metrics.milter_results_total.labels(listener.name, milter.name, result)
            metrics.milter_seconds.labels(listener.name, milter.name)
    seen = set()
    for ltls in tls_list:
        for cert in ltls.certificates:
            if (cert.name, cert.key_type) not in seen:
                seen.add((cert.name, cert.key_type))
                metrics.certificate_expiry.labels(cert.name, cert.key_type).set(cert.not_after)


def upstream_result_recorder(metrics, listener: str):
    """`UpstreamSettings.on_result`: the time of each result of opening a leg, by result."""
    gauge = metrics.upstream_last_result

    def record(result: str) -> None:
        gauge.labels(listener, result).set(time.time())
    return record
