"""The gateway's SMTP leg to the upstream server (SPEC §3.2, §4.4, §4.5, §6).

`UpstreamLeg.open()` connects, reads the greeting, says EHLO, negotiates TLS as the level asks,
re-reads EHLO over TLS and optionally sends XCLIENT. Nothing of the envelope is sent before the
leg satisfies its level. Every failure becomes an `UpstreamFailure` carrying the SPEC's reply.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..errors import ProtocolError, TLSError
from ..levels import UpstreamLevel
from ..policy.route import destination_key
from ..proto import replies as R
from ..proto.smtp_client import Reply, SMTPClient
from ..net.sockstream import open_tcp
from .tls_legs import (HandshakeFailed, remember_upstream_session, resumed_info,
                       upstream_handshake)

# metric label (gateway_upstream_errors_total, gateway_tls_alerts_total) of each failure reply
FAILURE_KINDS = {
    R.UPSTREAM_UNAVAILABLE: "unavailable", R.UPSTREAM_TLS_NOT_OFFERED: "tls_not_offered",
    R.UPSTREAM_TLS_FAILED: "tls_failed", R.UPSTREAM_NOT_TRUSTED: "not_trusted",
    R.UPSTREAM_LOST: "lost"}
# the reasons of gateway_tls_alerts_total: the failures to get TLS a level required (SPEC §8)
TLS_ALERT_REASONS = ("tls_not_offered", "tls_failed", "not_trusted")
# what opening a leg came to, for the upstream's last result (`/status`, SPEC §11)
UPSTREAM_RESULTS = ("ok", "unreachable", "tls_failure")
_RESULT_OF_KIND = {"tls_not_offered": "tls_failure", "tls_failed": "tls_failure",
                   "not_trusted": "tls_failure"}


class UpstreamFailure(Exception):
    """The upstream leg could not be had or was lost.

    `reply` is what the client gets; `tls_required` marks failures to get TLS that the level
    required (those raise a tls_alert, SPEC §8)."""

    def __init__(self, reply: tuple[int, str], reason: str, *, tls_required: bool = False):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.tls_required = tls_required


@dataclass
class UpstreamSettings:
    """What a leg needs to know: one per listener in each worker (runtime.build_runtimes
    builds it from the configuration the worker started with); only `last_tls_session`
    changes, as legs open."""
    host: str
    port: int
    mode: str                      # starttls | implicit
    server_name: str | None
    helo_name: str
    tls_context: object            # SSL.Context for the upstream leg
    connect_timeout: float
    reply_timeout: float
    data_done_timeout: float
    forward_client: bool = False
    pool_size: int = 0             # idle legs kept per worker (gateway.relay.pool)
    pool_idle: float = 5.0
    pool_max_reuse: int = 100
    tls_resumption: bool = True    # the upstream profile's session_resumption
    # the upstream profile's name and the client certificate's: with the address, what a
    # pooled leg is (policy.route)
    profile: str = "default"
    certificate: str | None = None
    # this worker's last TLS session to the upstream and whether it was verified (tls_legs)
    last_tls_session: tuple | None = field(default=None, compare=False, repr=False)
    # called with each opening's result (one of UPSTREAM_RESULTS); None: not recorded
    on_result: object = field(default=None, compare=False, repr=False)


class TLSFallback(Exception):
    """`preferred`: STARTTLS offered, then refused or failed; the leg is opened once more in
    plaintext (§3.2)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UpstreamLegBase:
    """What the SMTP and IMAP upstream legs share: the TLS state of the leg, opening with
    the `preferred` fallback, the TLS handshake and closing. A subclass provides
    `establish(try_tls=..., **kwargs)` (connect, greeting, STARTTLS as the level asks)."""

    def __init__(self, settings: UpstreamSettings, level: UpstreamLevel | str):
        self.settings = settings
        self.level = UpstreamLevel(level)
        self.stream = None
        self.tls = None                 # TLSInfo once encrypted
        self.tls_offered = False
        self.tls_failed = False         # offered but refused/failed (preferred fell back)
        self.tls_error: str | None = None
        self.handshake_seconds = 0.0
        self.closed = False
        self.uses = 1                   # client sessions served (a pooled leg is reused)
        self.dest_key = destination_key(settings)   # its destination (policy.route)

    @property
    def requires_tls(self) -> bool:
        return self.level.requires_tls

    @classmethod
    async def open(cls, settings: UpstreamSettings, level: str, *, on_tls_error=None,
                   **kwargs):
        """A leg at *level*, or UpstreamFailure; the result goes to `settings.on_result`."""
        try:
            leg = await cls._open_leg(settings, level, on_tls_error, kwargs)
        except UpstreamFailure as failure:
            if settings.on_result is not None:
                kind = FAILURE_KINDS.get(failure.reply, "unavailable")
                settings.on_result(_RESULT_OF_KIND.get(kind, "unreachable"))
            raise
        if settings.on_result is not None:
            settings.on_result("ok")
        return leg

    @classmethod
    async def _open_leg(cls, settings: UpstreamSettings, level: str, on_tls_error, kwargs):
        leg = cls(settings, level)
        try:
            await leg.establish(try_tls=True, **kwargs)
        except TLSFallback as fb:
            if on_tls_error is not None:
                on_tls_error(fb.reason)
            await leg.close()
            leg = cls(settings, level)
            leg.tls_offered = leg.tls_failed = True
            leg.tls_error = fb.reason
            await leg.establish(try_tls=False, **kwargs)
        if leg.tls is not None:         # the greeting/EHLO read after TLS brought the tickets
            remember_upstream_session(leg.stream, leg.tls, settings)
        return leg

    async def _connect(self) -> None:
        """The TCP connection within connect_timeout; else 451 4.4.1."""
        s = self.settings
        try:
            with trio.fail_after(s.connect_timeout):
                self.stream = await open_tcp(s.host, s.port)
        except (OSError, trio.TooSlowError) as exc:
            raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, f"connect: {exc or 'timeout'}")

    def _tls_failed(self, reason: str):
        if self.level.falls_back:
            raise TLSFallback(reason)
        raise UpstreamFailure(R.UPSTREAM_TLS_FAILED, reason, tls_required=self.requires_tls)

    async def _handshake(self, *, fallback: bool) -> None:
        try:
            tls, self.handshake_seconds = await upstream_handshake(
                self.stream, self.settings, self.level)
        except HandshakeFailed as exc:
            if fallback:
                raise TLSFallback(exc.reason)
            raise UpstreamFailure(R.UPSTREAM_TLS_FAILED, exc.reason,
                                  tls_required=self.requires_tls
                                  or self.settings.mode == "implicit")
        self.stream = tls
        self.tls = resumed_info(tls.info, self.settings)

    def abandon(self) -> None:
        """Close at once without awaiting (a pooled leg found dead, no task using it)."""
        self.closed = True
        stream, self.stream = self.stream, None
        if stream is not None and hasattr(stream, "abandon"):
            stream.abandon()

    def idle_and_alive(self) -> bool:
        """An idle leg whose upstream has neither closed it nor said anything since."""
        stream = self.stream
        return (not self.closed and stream is not None
                and getattr(stream, "quiet", None) is not None and stream.quiet())

    async def _negotiate_tls(self, *, offered: bool, try_tls: bool) -> None:
        """Once the upstream's capabilities are known: STARTTLS as the level asks, then the
        `verify` gate (§3.2). A subclass provides `_starttls()` and `_goodbye()` (QUIT or
        LOGOUT before giving up)."""
        if self.settings.mode == "starttls" and offered:
            # recorded at every level: a leg opened at `none` never asked, but a later
            # `preferred` recipient must not ride it in the clear when TLS was there (§4.3)
            self.tls_offered = True
        if self.settings.mode == "starttls" and self.level.asks_tls and try_tls:
            if offered:
                self.tls_offered = True
                await self._starttls()
            elif self.requires_tls:
                await self._goodbye()
                raise UpstreamFailure(R.UPSTREAM_TLS_NOT_OFFERED, "STARTTLS not offered",
                                      tls_required=True)
        if self.level.verifies and not (self.tls and self.tls.verified):
            await self._goodbye()
            why = (self.tls.verify_error if self.tls else None) or "not verified"
            raise UpstreamFailure(R.UPSTREAM_NOT_TRUSTED, f"certificate: {why}",
                                  tls_required=True)

    async def close(self) -> None:
        """Close at once (shielded, bounded); mid-DATA this drops the message."""
        self.closed = True
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except Exception:
                    pass


class UpstreamLeg(UpstreamLegBase):
    """The SMTP leg: the sans-IO client core (`proto.smtp_client.SMTPClient`) holds the
    protocol state (extensions, transaction, message data queued); this class moves its
    bytes and bounds each wait."""

    def __init__(self, settings: UpstreamSettings, level: str):
        super().__init__(settings, level)
        self.client = SMTPClient()

    @property
    def extensions(self) -> dict[str, str]:
        return self.client.extensions

    @property
    def in_transaction(self) -> bool:
        """MAIL accepted and not yet finished or RSET."""
        return self.client.in_transaction

    @property
    def in_data(self) -> bool:
        """DATA answered 354 and the final dot not yet sent."""
        return self.client.in_data

    @property
    def held_size(self) -> int:
        """Message bytes queued for the next send_data()."""
        return self.client.buffered

    def reusable(self) -> bool:
        """Open, between transactions with nothing buffered either way, no SASL exchange ever
        begun on it (the client core's `reusable`, SPEC §4.6) and nothing heard since the
        last reply (§6): fit for the pool."""
        return (not self.closed and self.stream is not None and self.client.reusable
                and self.idle_and_alive())

    def idle_and_alive(self) -> bool:
        """No command outstanding, and the upstream has neither closed the connection nor
        said anything since its last reply: not in the parser (`unsolicited`), not on the
        socket (§6: such a leg is retired, never reused)."""
        client = self.client
        return (not client.pending and not client.unsolicited and not client.has_leftover()
                and super().idle_and_alive())

    def _solicit(self) -> None:
        """Before a command of a transaction (or the MAIL that opens one) with no command
        outstanding: whatever the upstream sent since its last reply answers nothing and
        must not be taken for this command's reply (§6). The leg is lost (451 4.4.2) and
        the command is not sent (no DATA, no final dot after a stray line)."""
        client = self.client
        if client.pending:
            return
        quiet = getattr(self.stream, "quiet", None)
        if client.unsolicited:
            why = f"unsolicited reply: {client.pending_bytes()[:40]!r}"
        elif quiet is not None and not quiet():
            why = "unsolicited data (or close) from upstream"
        else:
            return
        self.closed = True
        raise UpstreamFailure(R.UPSTREAM_LOST, why)

    # --- opening ----------------------------------------------------------------------------

    async def establish(self, *, try_tls: bool, client_addr=None, client_helo=None) -> None:
        s = self.settings
        await self._connect()
        try:
            if s.mode == "implicit":
                await self._handshake(fallback=False)
            greeting = await self._read_reply(phase="greeting")
            if greeting.code != 220:
                raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, f"greeting {greeting.code}")
            await self._ehlo()
            await self._negotiate_tls(offered="STARTTLS" in self.extensions, try_tls=try_tls)
            if s.forward_client and client_addr and "XCLIENT" in self.extensions:
                await self._xclient(client_addr, client_helo)
        except BaseException:
            await self.close()
            raise

    async def _ehlo(self) -> None:
        reply = await self.command(f"EHLO {self.settings.helo_name}")
        if reply.code == 250:
            return
        reply = await self.command(f"HELO {self.settings.helo_name}")
        if reply.code != 250:
            raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, f"HELO refused {reply.code}")

    async def _starttls(self) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            self._tls_failed(f"STARTTLS refused: {reply.code} {reply.text}")
        if self.client.has_leftover():
            # response injection (CVE-2021-38371 class): bytes after the one reply (§6)
            self._tls_failed("response injection after STARTTLS")
        await self._handshake(fallback=self.level.falls_back)
        self.client.reset()
        await self._ehlo()

    async def _xclient(self, client_addr, client_helo) -> None:
        self.client.xclient(client_addr[0], client_addr[1], client_helo)
        reply = await self._exchange()
        if reply.code == 220:            # a new greeting: say EHLO again
            await self._ehlo()

    # --- commands ---------------------------------------------------------------------------

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        if self.client.in_transaction:
            self._solicit()
        self.client.command(line)
        return await self._exchange(timeout)

    async def _exchange(self, timeout: float | None = None) -> Reply:
        """Send what the core queued, then read one reply."""
        await self._send(self.client.data_to_send())
        return await self._read_reply(timeout=timeout)

    async def auth(self, mechanism: str, initial: str | None) -> Reply:
        """AUTH with its initial response: the first reply of the exchange (§4.6)."""
        self.client.auth(mechanism, initial)
        return await self._exchange()

    async def auth_response(self, line: str) -> Reply:
        """One response of the exchange in progress (``*`` cancels): the next reply."""
        self.client.auth_response(line)
        return await self._exchange()

    async def start_transaction(self, mail, rcpt) -> tuple[Reply, Reply | None]:
        """MAIL replayed with the first RCPT (server core events: `.address`, `.params`), in
        one write where the upstream offers PIPELINING (RFC 2920); else one by one, with no
        RCPT after a refused MAIL. Returns (MAIL's reply, RCPT's reply or None)."""
        self._solicit()
        client = self.client
        client.mail(mail.address, mail.params)
        if "PIPELINING" in client.extensions:
            client.rcpt(rcpt.address, rcpt.params)
            await self._send(client.data_to_send())
            return await self._read_reply(), await self._read_reply()
        reply = await self._exchange()
        if reply.code // 100 != 2:
            return reply, None
        return reply, await self.rcpt(rcpt)

    async def rcpt(self, rcpt) -> Reply:
        """One more RCPT in the open transaction."""
        self._solicit()
        self.client.rcpt(rcpt.address, rcpt.params)
        return await self._exchange()

    async def send_data(self, data: bytes = b"") -> None:
        """Send the message data queued, then *data*, in one write."""
        client = self.client
        if data:
            client.message_data(data)
        out = client.data_to_send()
        if out:
            await self._send(out)

    def hold_data(self, data: bytes) -> None:
        """Message data to go out with the next send_data() (one write instead of several)."""
        self.client.message_data(data)

    async def finish_data(self) -> Reply:
        self._solicit()                 # a word from the upstream mid-message: no final dot
        self.client.end_message()
        await self._send(self.client.data_to_send())
        return await self._read_reply(timeout=self.settings.data_done_timeout,
                                      phase="data_done")

    async def _send(self, data: bytes) -> None:
        if self.client.unsolicited:
            # queued after bytes that answer nothing (SMTPClient: sticky): never sent (§6)
            self.closed = True
            raise UpstreamFailure(R.UPSTREAM_LOST, "unsolicited reply from upstream")
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError, OSError) as exc:
            self.closed = True
            raise UpstreamFailure(R.UPSTREAM_LOST, f"send: {exc!r}")

    async def _read_reply(self, timeout: float | None = None, phase: str = "reply") -> Reply:
        """The next reply within *timeout*. A greeting or reply that does not come in time is
        `451 4.4.1` (the upstream times out); the final reply to a message that does not, or
        a connection lost, is `451 4.4.2` (§4.5)."""
        timeout = self.settings.reply_timeout if timeout is None else timeout
        lost = R.UPSTREAM_UNAVAILABLE if phase == "greeting" else R.UPSTREAM_LOST
        late = R.UPSTREAM_LOST if phase == "data_done" else R.UPSTREAM_UNAVAILABLE
        try:
            reply = self.client.next_reply()     # already read (pipelined replies): no wait
            if reply is not None:
                return reply
            # a bare scope, not trio.fail_after (a generator context manager per reply)
            with trio.CancelScope(deadline=trio.current_time() + timeout):
                while True:
                    data = await self.stream.receive_some(65536)
                    self.client.receive_data(data)
                    reply = self.client.next_reply()
                    if reply is not None:
                        return reply
            raise trio.TooSlowError     # only reached when the deadline cancelled the scope
        except trio.TooSlowError:
            self.closed = True
            raise UpstreamFailure(late, f"{phase} timeout")
        except ProtocolError as exc:
            self.closed = True
            raise UpstreamFailure(lost if phase == "greeting" else R.UPSTREAM_LOST, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError, OSError) as exc:
            self.closed = True
            raise UpstreamFailure(lost, f"{phase}: {exc!r}")

    # --- closing ----------------------------------------------------------------------------

    async def reset(self) -> None:
        """End an unfinished transaction (RSET) so the leg can carry the next one."""
        client = self.client
        if client.in_data:              # an RSET now would be message text: drop the leg
            await self.close()
        elif client.in_transaction and not self.closed:
            client.discard_output()
            try:
                reply = await self.command("RSET")
                if reply.code != 250:
                    await self.close()
            except UpstreamFailure:
                await self.close()

    async def _goodbye(self) -> None:
        """QUIT, not waiting more than 2 s, ignoring failures."""
        try:
            with trio.move_on_after(2):
                await self.command("QUIT")
        except UpstreamFailure:
            pass

    async def quit(self) -> None:
        # inside a SASL exchange a QUIT would be read as a response: just close (§4.6)
        if not self.closed and not self.client.in_sasl:
            await self._goodbye()
        await self.close()

    async def close(self) -> None:
        """Close at once; mid-DATA this drops the message (no terminating dot is sent)."""
        self.client.discard_output()
        await super().close()
