"""The TLS handshakes of both legs, shared by the SMTP and IMAP sessions (SPEC §3, §7).

`accept_client_tls` runs the gateway's server-side handshake on a client stream with the
listener's context (or a client rule's cipher-strength variant; with several certificates,
the one for the client's SNI), logs the `tls` or
`tls_error` event and counts it. `upstream_handshake` runs the client-side handshake to the
upstream with the settings' context, SNI and (at `verify`) the name check.
"""
from __future__ import annotations

import dataclasses

import trio

from ..errors import TLSError
from ..levels import UpstreamLevel
from ..tls.stream import TLSStream

_FAILURES = (TLSError, trio.TooSlowError, trio.BrokenResourceError)


class HandshakeFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or "handshake timeout"


async def accept_client_tls(rt, stream, strength: str | None, log) -> TLSStream | None:
    """The client leg's handshake; the TLS stream, or None after logging the failure."""
    name, metrics = rt.listener.name, rt.state.metrics
    tls = TLSStream(stream, rt.server_ctx_for(strength), server_side=True,
                    sni=rt.sni_for(strength))
    start = trio.current_time()
    try:
        with trio.fail_after(rt.listener.timeouts.tls_handshake):
            await tls.do_handshake()
    except _FAILURES as exc:
        log.event("tls_error", level="warning", side="client", reason=_reason(exc))
        metrics.tls_handshakes_total.labels(name, "client", "none", "error").inc()
        return None
    info = tls.info
    metrics.tls_handshakes_total.labels(name, "client", info.version, "ok").inc()
    metrics.tls_handshake_seconds.labels(name, "client").observe(trio.current_time() - start)
    log.event("tls", side="client", version=info.version, cipher=info.cipher, bits=info.bits,
              verified=info.verified, peer=info.peer_subject,
              resumed=True if info.resumed else None, sni=tls.client_server_name)
    return tls


async def upstream_handshake(stream, settings, level: str) -> tuple[TLSStream, float]:
    """The upstream leg's handshake: (TLS stream, seconds); HandshakeFailed with the reason.

    It offers the TLS session of this worker's last leg to the same upstream (SPEC §4.4),
    unless the profile turns resumption off; see remember_upstream_session()."""
    tls = TLSStream(stream, settings.tls_context, server_side=False,
                    server_hostname=settings.server_name or settings.host,
                    verify_hostname=UpstreamLevel(level).verifies)
    cached = settings.last_tls_session if settings.tls_resumption else None
    if cached is not None:
        tls.offer_session(cached[0])
    start = trio.current_time()
    try:
        with trio.fail_after(settings.connect_timeout):
            await tls.do_handshake()
    except _FAILURES as exc:
        raise HandshakeFailed(_reason(exc)) from None
    return tls, trio.current_time() - start


def resumed_info(info, settings):
    """A resumed upstream session counts as verified only if the one it resumes was."""
    cached = settings.last_tls_session
    if not info.resumed or not info.verified or (cached is not None and cached[1]):
        return info
    return dataclasses.replace(info, verified=False,
                               verify_error="resumed a session that was not verified")


def remember_upstream_session(tls: TLSStream, info, settings) -> None:
    """Keep the leg's TLS session (with whether it was verified) for the next leg."""
    if not settings.tls_resumption:
        return
    try:
        session = tls.session()
    except Exception:               # no session to keep: the next leg does a full handshake
        return
    if session is not None:
        settings.last_tls_session = (session, info.verified)


def fallback_logger(rt, log):
    """on_tls_error for a `preferred` leg that falls back to plaintext: log and count it."""
    def tls_error(reason: str) -> None:
        log.event("tls_error", level="warning", side="upstream", reason=reason,
                  fallback="plaintext")
        rt.state.metrics.tls_handshakes_total.labels(rt.listener.name, "upstream", "none",
                                                     "error").inc()
    return tls_error


def record_upstream_leg(rt, log, leg, level: str, *, reused: bool = False) -> None:
    """The `tls` (or plaintext `upstream`) event of a leg, and the handshake metrics of a new
    one; a leg taken from the pool (`reused=true`, no handshake) is logged the same way."""
    flag = True if reused else None
    if leg.tls is None:
        log.event("upstream", tls="none", policy=level, offered=leg.tls_offered, reused=flag)
        return
    info = leg.tls
    if not reused:
        metrics, name = rt.state.metrics, rt.listener.name
        metrics.tls_handshakes_total.labels(name, "upstream", info.version, "ok").inc()
        metrics.tls_handshake_seconds.labels(name, "upstream").observe(leg.handshake_seconds)
    log.event("tls", side="upstream", version=info.version, cipher=info.cipher, bits=info.bits,
              verified=info.verified, peer=info.peer_subject,
              resumed=True if info.resumed else None, reused=flag)
