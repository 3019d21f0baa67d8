"""The upstream leg of one client session, SMTP or IMAP (SPEC §4.3, §4.4, §4.6, §5, §6, §8).

`Legs` owns the session's leg: opening one for a route (taken from the worker's pool when one
there satisfies the route and the listener's protocol `pools_legs`, else connected anew, a leg
of the session's type: `UpstreamLeg`, or the IMAP session's `IMAPUpstreamLeg`), replaying MAIL
with the first RCPT on it (once more on a new leg when a pooled one turns out dead), retiring a
leg the upstream spoke on between transactions, giving it back to the pool or QUITting it, the
AUTH binding (an authenticated leg is the session's alone, never pooled, and its loss ends the
session), and reporting a failed leg (logged, counted, a TLS alert where the level required
TLS: `failed` for a transaction's recipients, `lost` for any leg, e.g. an IMAP login's).

It decides no reply: the session answers the client (and the policy seam decides routes); a
leg that failed is reported here and the caller answers with `failure.reply`.
"""
from __future__ import annotations

from .tls_legs import fallback_logger, record_upstream_leg
from .upstream import FAILURE_KINDS, UpstreamFailure, UpstreamLeg


class Legs:
    def __init__(self, rt, log, client_addr: tuple[str, int], leg_type=UpstreamLeg):
        self.rt = rt                    # ListenerRuntime (gateway.serve.runtime)
        self.log = log
        self.client_addr = client_addr
        self.leg_type = leg_type        # the protocol's upstream leg (its `open`)
        self.leg: UpstreamLeg | None = None
        self.from_pool = False          # the leg came from the pool, no transaction yet
        self.bound = False              # an authenticated leg: this session's alone (§4.6)
        self.bound_lost = False         # ... and it broke: the session ends (421 4.4.2)

    # --- opening ----------------------------------------------------------------------------

    async def open(self, route, *, pooled: bool = True, **establish):
        """The session's leg for *route*: from the pool when one there satisfies it (never
        for a protocol whose legs carry a login: its `pool_size` is 0, serve/runtime.py),
        else a new one to the route's destination (today always the listener's upstream)
        at its level; *establish* goes to the leg's opening (SMTP:
        `client_helo`, the client's, for XCLIENT). UpstreamFailure when it can't be had."""
        rt = self.rt
        level = route.level
        leg = rt.state.pool.take(route, rt.upstream) if pooled else None
        if leg is not None:
            self.from_pool = True
            record_upstream_leg(rt, self.log, leg, level, reused=True)
        else:
            leg = await self.leg_type.open(rt.upstream, level, client_addr=self.client_addr,
                                           on_tls_error=fallback_logger(rt, self.log),
                                           **establish)
            record_upstream_leg(rt, self.log, leg, level)
        self.leg = leg
        return leg

    async def settle(self) -> UpstreamLeg | None:
        """The leg a transaction may use now, or None: a leg the upstream spoke on (a 421
        before timing out, a stray line) or closed while it sat between transactions is
        retired, never reused (§6); a closed leg is forgotten."""
        leg = self.leg
        if leg is None:
            return None
        if not leg.closed and not leg.in_transaction and not leg.idle_and_alive():
            self.log.event("upstream_reuse_failed", level="debug", reason="unsolicited")
            await leg.close()
        if leg.closed:
            if not self.bound:          # a bound leg's loss is the session's to answer
                self.leg = None
            return None
        return leg

    async def start_transaction(self, mail, rcpt, route, **establish):
        """MAIL replayed with the first RCPT, pipelined where the upstream allows: (MAIL's
        reply, RCPT's reply or None). On a leg just taken from the pool, a failure or a 421
        to MAIL means the upstream gave up on the idle connection: once more on a new
        connection (nothing was accepted on the old one)."""
        leg = self.leg
        reused, self.from_pool = self.from_pool, False
        try:
            replies = await leg.start_transaction(mail, rcpt)
            if not reused or replies[0].code != 421:
                return replies
        except UpstreamFailure:
            if not reused:
                raise
        await leg.close()
        self.leg = None
        self.log.event("upstream_reuse_failed", level="debug")
        leg = await self.open(route, pooled=False, **establish)
        return await leg.start_transaction(mail, rcpt)

    def mail_for_upstream(self, mail):
        """MAIL as it goes upstream: its AUTH= parameter as given on an authenticated
        session, `AUTH=<>` on another (RFC 4954 §5: the submitter is not vouched for)."""
        if "AUTH" in mail.params and not self.bound:
            return type(mail)(mail.address, {**mail.params, "AUTH": "<>"})
        return mail

    # --- AUTH (§4.6) ------------------------------------------------------------------------

    def bind(self) -> None:
        """The leg carried a successful AUTH: the session's alone from now on."""
        self.bound = True

    # --- letting go -------------------------------------------------------------------------

    async def release(self, *, end_transaction: bool = False) -> None:
        """Give the leg to the worker's pool, or QUIT it; an open transaction is reset first
        when the session ends (never in the middle of DATA: that leg is closed). A bound leg
        is never pooled (§4.6), nor is any leg that ever began a SASL exchange (the pool
        asks the leg, `reusable()`)."""
        leg, self.leg = self.leg, None
        if leg is None:
            return
        if self.bound:                  # never pooled, never handed on (§4.6)
            self.bound = False
            await leg.quit()
            return
        pool = self.rt.state.pool
        try:
            if end_transaction and leg.in_transaction and not leg.in_data and not leg.closed \
                    and pool.poolable(leg.settings):
                await leg.reset()
            if not pool.give(leg):
                await leg.quit()
        except BaseException:             # cancelled (the session's 2 s bound): close now
            leg.abandon()
            raise

    async def drop(self) -> None:
        """Close the leg now (mid-DATA: before any final dot) and forget it."""
        leg, self.leg = self.leg, None
        if leg is not None:
            await leg.close()

    async def failed(self, failure: UpstreamFailure, rcpts) -> None:
        """The leg could not be had or was lost: logged and counted, a TLS alert naming the
        recipients' domains when the level required TLS (§8); the leg is closed. A bound
        leg's loss ends the session (`bound_lost`): no credentials are kept to log in
        again (§4.6)."""
        rt = self.rt
        domains = sorted({r.rpartition("@")[2].lower() for r in rcpts}) \
            if failure.tls_required else ()
        kind = await self.lost(failure, failure.reply[0], domains=",".join(domains))
        if failure.tls_required and rt.alerts is not None:
            rt.alerts.notify(domains, kind, failure.reason)

    async def lost(self, failure: UpstreamFailure, code, **alert) -> str:
        """The leg could not be had or was lost (`report_leg_failure`: *code* is what the
        client is answered with, *alert* names whom the TLS alert is about); the leg is
        closed and forgotten, a bound one's loss noted (`bound_lost`). Returns the kind."""
        kind = report_leg_failure(self.rt, self.log, failure, code, **alert)
        await self.drop()
        if self.bound:
            self.bound_lost = True
        return kind


def report_leg_failure(rt, log, failure, code, **alert) -> str:
    """A leg that could not be had or was lost: the `upstream_error` event (with the *code*
    the client is answered with) and its count; where the level required TLS, the
    `tls_alert` event (with *alert*: the recipients' domains, the IMAP user) and its count
    (§8). Returns the failure's kind (its metric label)."""
    name, metrics = rt.listener.name, rt.state.metrics
    kind = FAILURE_KINDS.get(failure.reply, "other")
    log.event("upstream_error", level="warning", reason=failure.reason, code=code)
    metrics.upstream_errors_total.labels(name, kind).inc()
    if failure.tls_required:
        log.event("tls_alert", level="warning", **alert, reason=failure.reason)
        metrics.tls_alerts_total.labels(name, kind).inc()
    return kind
