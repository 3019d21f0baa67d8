"""One client IMAP session (SPEC §5): the pre-login core, the upstream leg, then a relay.

Before login the session moves bytes between the client stream and `IMAPServer`, does the
client-side TLS handshake (at once on an implicit listener, or when the core says STARTTLS),
and at LOGIN/AUTHENTICATE opens the upstream leg and sends the credentials there: the leg is
the session's `Legs`' (`legs.Legs`, as an SMTP session's), for the policy's session route (the
listener's upstream at `upstream.tls` resolved against the client leg, §3.2), never pooled (it
carries the user's login, §5), a failure reported as SMTP's are. The whole pre-login phase is
bounded by `imap_login` seconds. After a successful login both directions are relayed unparsed
(IDLE, COMPRESS and every extension pass through) until either side closes or nothing moved for
`imap_idle` seconds (then `* BYE Autologout`).

Draining (SPEC §9): a session still before login gets `* BYE Server shutting down`; a relayed
session gets `* BYE [UNAVAILABLE] Server shutting down` at the next point where the
server→client stream is between responses (`proto.imap_boundary`; never inside a line or a
literal, never once COMPRESS may be on), else it runs on until `shutdown_grace` closes it
without a word. A worker a reload retires keeps its IMAP sessions: they drain so only when
`reload_grace` passes or the supervisor cuts the generation (`WorkerState.drain_imap`).
"""
from __future__ import annotations

import trio

from ..errors import TLSError
from ..levels import ClientLevel
from ..proto import imap_server as S
from ..proto.imap_boundary import ResponseBoundary
from .imap_upstream import IMAPUpstreamLeg
from .client_session import ClientSession
from .legs import Legs
from .upstream import UpstreamFailure

_SHUTDOWN = object()
BYE_UNAVAILABLE = b"* BYE [UNAVAILABLE] Server shutting down\r\n"   # a relayed session cut (§9)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, TLSError)


def unavailable_text(reply: tuple[int, str]) -> str:
    """``(451, "4.7.5 TLS is required, ...")`` -> ``"TLS is required, ..."`` (SPEC §5)."""
    return reply[1].split(" ", 1)[1] if " " in reply[1] else reply[1]


class IMAPSession(ClientSession):
    def __init__(self, rt, stream, client_addr: tuple[str, int], log, conn_id: str):
        super().__init__(rt, stream, client_addr, log, conn_id)
        # a rule by client network sets the level and cipher strength at connect time (§4.3);
        # every stage is decided there (policy/), as for SMTP
        self.policy = rt.stages.for_session(self)
        self.policy.client_level(self.facts, log)
        level = ClientLevel(self.facts.client_level)
        self.legs = Legs(rt, log, client_addr, IMAPUpstreamLeg)   # the upstream leg
        self.user: str | None = None
        self._deadline = 0.0
        self.core = S.IMAPServer(
            hostname=rt.hostname,
            offer_starttls=self.listener.tls == "starttls" and level.offers_tls,
            require_tls=level.requires_tls,
            require_client_cert=level.verifies)
        self._gate_login()

    # --- the session ------------------------------------------------------------------------

    async def run(self) -> None:
        start = trio.current_time()
        self._deadline = start + self.listener.timeouts.imap_login
        self.log.event("conn_open", type=self.listener.type)
        try:
            if self.listener.tls == "implicit":
                if not await self._handshake():
                    return
                self.core.tls_established(self.tls.verified)
                self._gate_login()
            if not await self._connect_stage():
                return
            self.core.greeting()
            await self._flush()
            await self._prelogin()
            if self.core.logged_in and self.legs.leg is not None:
                await self._relay()
        except _BROKEN:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.legs.drop()
                await self._closed(start, user=self.user or "")

    async def _prelogin(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            for line, label in core.take_rejections():
                self._rejected(line, label)
            if event is S.NEED_DATA:
                await self._flush()
                data = await self._receive()
                if data is _SHUTDOWN:
                    core.bye(S.BYE_SHUTDOWN)
                    await self._flush()
                    return
                if data is None:
                    core.bye(S.BYE_TIMEOUT)
                    self.log.event("reject", code="BYE", reason="login timeout")
                    await self._flush()
                    return
                core.receive_data(data)
                continue
            if isinstance(event, (S.ConnectionClosed, S.Logout)):
                await self._flush()
                return
            if isinstance(event, S.StartTLS):
                core.starttls_ok()
                await self._flush()
                discarded = core.start_tls()
                if discarded:
                    self.log.event("starttls_injection", level="warning", discarded=discarded)
                if not await self._handshake():
                    return
                core.tls_established(self.tls.verified)
                self._gate_login()
                continue
            if isinstance(event, S.Login):
                await self._login(event)
                await self._flush()
                if core.logged_in:
                    return

    async def _receive(self):
        """Client bytes before login; None when imap_login is over; _SHUTDOWN when draining."""
        state = self.rt.state
        if state.imap_draining:
            return _SHUTDOWN
        with trio.CancelScope() as drain_scope:
            state.imap_idle_scopes.add(drain_scope)
            try:
                with trio.move_on_at(self._deadline):
                    try:
                        data = await self.stream.receive_some(65536)
                    except _BROKEN:
                        data = b""
                    self.bytes_in += len(data)
                    return data
                return None
            finally:
                state.imap_idle_scopes.discard(drain_scope)
        return _SHUTDOWN

    def _rejected(self, line: str, label: str | None = None) -> None:
        """Log a refusal; count it under *label*, a policy verdict's (never from its text)."""
        tag, _, rest = line.partition(" ")
        self.log.event("reject", code=rest.split(" ", 1)[0], reason=rest)
        if label is not None:
            self.metrics.policy_rejections_total.labels(self.name, label).inc()

    # --- the stages (policy/) ---------------------------------------------------------------

    async def _connect_stage(self) -> bool:
        """The connect stage (§4.7's order, as for SMTP): a refusal there is the session's
        `* BYE` with the verdict's text, counted under its label. False: refused."""
        verdict = await self.policy.connect(self.facts)
        if not verdict.refused:
            return True
        code, text = verdict.reply
        text = unavailable_text((code, text if isinstance(text, str) else " ".join(text)))
        self._rejected(f"* BYE {text}", verdict.label)
        self.core.bye(f"* BYE {text}\r\n".encode("utf-8", "replace"))
        await self._flush()
        return False

    def _gate_login(self) -> None:
        """The login stage's TLS and certificate checks for the session as it stands (§5),
        handed to the core, which answers LOGIN/AUTHENTICATE with them."""
        verdict = self.policy.login(self.facts)
        if verdict.refused:
            code, text = verdict.reply
            self.core.gate_login((f"{code} {text}", verdict.label))
        else:
            self.core.gate_login(None)

    # --- login ------------------------------------------------------------------------------

    async def _login(self, event: S.Login) -> None:
        user = event.user.decode("utf-8", "replace")
        legs = self.legs
        try:
            leg = legs.leg
            if leg is None or leg.closed:
                await self._flush()
                leg = await legs.open(self.policy.session_route(self.facts))
            ok, untagged, tagged = await leg.login(event)
        except UpstreamFailure as failure:
            await legs.lost(failure, "NO [UNAVAILABLE]", user=user)
            text = unavailable_text(failure.reply)
            self.core.login_result(False, f"{event.tag} NO [UNAVAILABLE] {text}\r\n".encode())
            self.log.event("login", user=user, mechanism=event.mechanism, result="unavailable",
                           reason=failure.reason)
            return
        # the upstream's answer, under the client's tag
        data = b"".join(r.raw for r in untagged)
        data += event.tag.encode() + tagged.raw[len(tagged.tag):]
        self.core.login_result(ok, data)
        self.log.event("login", user=user, mechanism=event.mechanism,
                       result="ok" if ok else tagged.kind.lower(),
                       client_tls=self.tls.version if self.tls else "none",
                       upstream_tls=leg.tls.version if leg.tls else "none")
        if ok:
            self.user = user

    # --- after login ------------------------------------------------------------------------

    async def _relay(self) -> None:
        """Both directions unparsed until either side closes or imap_idle passes. A drain
        (shutdown, or a reload retiring this worker) ends the session with `* BYE
        [UNAVAILABLE]` when the server→client stream is between responses (SPEC §9)."""
        leg = self.legs.leg
        idle = self.listener.timeouts.imap_idle
        to_upstream = self.core.take_trailing()
        to_client = leg.client.take_leftover()
        ended = False
        boundary = ResponseBoundary()
        boundary.client_sent(to_upstream)
        sending = False                      # a chunk to the client is being written
        draining = False
        state = self.rt.state

        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            scope.deadline = trio.current_time() + idle

            def on_drain() -> None:
                nonlocal draining
                draining = True
                if not sending and boundary.at_boundary:
                    scope.cancel()

            async def pump(src, dst, first: bytes, inbound: bool) -> None:
                nonlocal ended, sending
                try:
                    if first:
                        sending = not inbound
                        await dst.send_all(first)
                        sending = False
                        if not inbound:
                            boundary.feed(first)
                        self._count(inbound, len(first))
                    while True:
                        data = await src.receive_some(65536)
                        if not data:
                            break
                        scope.deadline = trio.current_time() + idle
                        if inbound:
                            boundary.client_sent(data)
                            await dst.send_all(data)
                        else:
                            sending = True
                            await dst.send_all(data)
                            sending = False
                            boundary.feed(data)
                            if draining and boundary.at_boundary:
                                scope.cancel()
                                return
                        self._count(inbound, len(data))
                except _BROKEN + (OSError,):
                    pass
                ended = True
                scope.cancel()

            state.drain_hooks.add(on_drain)
            if state.imap_draining:
                on_drain()
            try:
                nursery.start_soon(pump, self.stream, leg.stream, to_upstream, True)
                nursery.start_soon(pump, leg.stream, self.stream, to_client, False)
            except BaseException:
                state.drain_hooks.discard(on_drain)
                raise
        state.drain_hooks.discard(on_drain)
        if draining and not ended:
            if boundary.at_boundary and not sending:
                self.log.event("reject", code="BYE", reason="shutting down")
                with trio.move_on_after(2):
                    try:
                        await self.stream.send_all(BYE_UNAVAILABLE)
                    except _BROKEN:
                        pass
            return
        if not ended:                         # imap_idle passed without a byte either way
            self.log.event("reject", code="BYE", reason="idle timeout")
            with trio.move_on_after(2):
                try:
                    await self.stream.send_all(S.BYE_TIMEOUT)
                except _BROKEN:
                    pass

    def _count(self, inbound: bool, n: int) -> None:
        if inbound:
            self.bytes_in += n
        else:
            self.bytes_out += n
