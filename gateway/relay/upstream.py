"""The gateway's SMTP leg to the upstream server (SPEC §3.2, §4.4, §4.5, §6).

`UpstreamLeg.open()` connects, reads the greeting, says EHLO, negotiates TLS as the level asks,
re-reads EHLO over TLS and optionally sends XCLIENT. Nothing of the envelope is sent before the
leg satisfies its level. Every failure becomes an `UpstreamFailure` carrying the SPEC's reply.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import trio

from ..errors import ProtocolError, TLSError
from ..proto import replies as R
from ..proto.smtp_client import Reply, SMTPClient
from ..net.sockstream import open_tcp
from .tls_legs import (HandshakeFailed, remember_upstream_session, resumed_info,
                       upstream_handshake)

TLS_LEVELS_REQUIRING_TLS = ("required", "verify")


class UpstreamFailure(Exception):
    """The upstream leg could not be had or was lost.

    `reply` is what the client gets; `tls_required` marks failures to get TLS that the level
    required (those raise a tls_alert, SPEC §8)."""

    def __init__(self, reply: tuple[int, str], reason: str, *, tls_required: bool = False):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.tls_required = tls_required


def resolve_level(level: str, client_tls: bool) -> str:
    """`allowed` mirrors the client leg (§3.2); other levels stand."""
    if level == "allowed":
        return "required" if client_tls else "none"
    return level


@dataclass
class UpstreamSettings:
    """What a leg needs to know, fixed per listener at start-up."""
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
    # this worker's last TLS session to the upstream and whether it was verified (tls_legs)
    last_tls_session: tuple | None = field(default=None, compare=False, repr=False)


class TLSFallback(Exception):
    """`preferred`: STARTTLS offered, then refused or failed; the leg is opened once more in
    plaintext (§3.2)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UpstreamLegBase:
    """What the SMTP and IMAP upstream legs share: the TLS state of the leg, opening with
    the `preferred` fallback, the TLS handshake and closing. A subclass provides
    `_open(try_tls=..., **kwargs)` (connect, greeting, STARTTLS as the level asks)."""

    def __init__(self, settings: UpstreamSettings, level: str):
        self.settings = settings
        self.level = level
        self.stream = None
        self.tls = None                 # TLSInfo once encrypted
        self.tls_offered = False
        self.tls_failed = False         # offered but refused/failed (preferred fell back)
        self.tls_error: str | None = None
        self.handshake_seconds = 0.0
        self.closed = False
        self.uses = 1                   # client sessions served (a pooled leg is reused)

    @property
    def requires_tls(self) -> bool:
        return self.level in TLS_LEVELS_REQUIRING_TLS

    @classmethod
    async def open(cls, settings: UpstreamSettings, level: str, *, on_tls_error=None,
                   **kwargs):
        leg = cls(settings, level)
        try:
            await leg._open(try_tls=True, **kwargs)
        except TLSFallback as fb:
            if on_tls_error is not None:
                on_tls_error(fb.reason)
            await leg.close()
            leg = cls(settings, level)
            leg.tls_offered = leg.tls_failed = True
            leg.tls_error = fb.reason
            await leg._open(try_tls=False, **kwargs)
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
        if self.level == "preferred":
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
        if self.settings.mode == "starttls" and self.level != "none" and try_tls:
            if offered:
                self.tls_offered = True
                await self._starttls()
            elif self.requires_tls:
                await self._goodbye()
                raise UpstreamFailure(R.UPSTREAM_TLS_NOT_OFFERED, "STARTTLS not offered",
                                      tls_required=True)
        if self.level == "verify" and not (self.tls and self.tls.verified):
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
    def __init__(self, settings: UpstreamSettings, level: str):
        super().__init__(settings, level)
        self.client = SMTPClient()
        self.extensions: dict[str, str] = {}
        self.in_transaction = False     # MAIL sent and not yet finished/RSET
        self.in_data = False            # DATA answered 354, the final dot not yet sent
        self._held: list[bytes] = []    # message data waiting for the next send_data()
        self.held_size = 0

    # --- policy -----------------------------------------------------------------------------

    def satisfies(self, level: str) -> bool:
        """Can a recipient whose resolved level is *level* travel on this leg? (§4.3)"""
        if self.closed:
            return False
        if level == "verify":
            return self.tls is not None and self.tls.verified
        if level == "required":
            return self.tls is not None
        if level == "preferred":
            return self.tls is not None or not self.tls_offered or self.tls_failed
        return self.tls is None       # none

    def reusable(self) -> bool:
        """Between transactions with nothing buffered either way: fit for the pool."""
        return (not self.closed and self.stream is not None and not self.in_transaction
                and not self.in_data and not self._held and not self.client.has_leftover())

    # --- opening ----------------------------------------------------------------------------

    async def _open(self, *, try_tls: bool, client_addr=None, client_helo=None) -> None:
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
            self.extensions = self.client.parse_ehlo(reply)
            return
        reply = await self.command(f"HELO {self.settings.helo_name}")
        if reply.code != 250:
            raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, f"HELO refused {reply.code}")
        self.extensions = {}

    async def _starttls(self) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            self._tls_failed(f"STARTTLS refused: {reply.code} {reply.text}")
        if self.client.has_leftover():
            # response injection (CVE-2021-38371 class): bytes after the one reply (§6)
            self._tls_failed("response injection after STARTTLS")
        await self._handshake(fallback=self.level == "preferred")
        self.client.reset()
        await self._ehlo()

    async def _xclient(self, client_addr, client_helo) -> None:
        ip, port = client_addr[0], client_addr[1]
        try:
            if ipaddress.ip_address(ip).version == 6:
                ip = "IPV6:" + ip
        except ValueError:
            pass
        attrs = [f"ADDR={ip}", f"PORT={port}", "NAME=[UNAVAILABLE]"]
        if client_helo:
            attrs.append(f"HELO={_xtext(client_helo)}")
        reply = await self.command("XCLIENT " + " ".join(attrs))
        if reply.code == 220:            # a new greeting: say EHLO again
            await self._ehlo()

    # --- commands ---------------------------------------------------------------------------

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        await self._send(self.client.send(line))
        return await self._read_reply(timeout=timeout)

    async def commands(self, lines: list[str]) -> list[Reply | None]:
        """Several commands in one write, then their replies in order (RFC 2920 PIPELINING;
        only when the upstream offers it, else one by one)."""
        if len(lines) == 1 or "PIPELINING" not in self.extensions:
            replies = []
            for line in lines:                # one by one, stopping at the first refusal
                replies.append(await self.command(line))
                if replies[-1].code // 100 != 2:
                    break
            return replies + [None] * (len(lines) - len(replies))
        await self._send(b"".join(self.client.send(line) for line in lines))
        return [await self._read_reply() for _ in lines]

    async def send_data(self, data: bytes = b"") -> None:
        """Send what is held, then *data*, in one write."""
        if self._held:
            held = self._held
            if data:
                held.append(data)
            data = held[0] if len(held) == 1 else b"".join(held)
            self._held = []
            self.held_size = 0
        if data:
            await self._send(data)

    def hold_data(self, data: bytes) -> None:
        """Data to go out with the next send_data() (one write instead of several)."""
        self._held.append(data)
        self.held_size += len(data)

    async def finish_data(self) -> Reply:
        await self.send_data(b".\r\n")
        self.in_data = False
        reply = await self._read_reply(timeout=self.settings.data_done_timeout)
        self.in_transaction = False
        return reply

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError, OSError) as exc:
            self.closed = True
            raise UpstreamFailure(R.UPSTREAM_LOST, f"send: {exc!r}")

    async def _read_reply(self, timeout: float | None = None, phase: str = "reply") -> Reply:
        timeout = self.settings.reply_timeout if timeout is None else timeout
        lost = R.UPSTREAM_UNAVAILABLE if phase == "greeting" else R.UPSTREAM_LOST
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
            raise UpstreamFailure(lost, f"{phase} timeout")
        except ProtocolError as exc:
            self.closed = True
            raise UpstreamFailure(lost if phase == "greeting" else R.UPSTREAM_LOST, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError, OSError) as exc:
            self.closed = True
            raise UpstreamFailure(lost, f"{phase}: {exc!r}")

    # --- closing ----------------------------------------------------------------------------

    async def reset(self) -> None:
        """End an unfinished transaction (RSET) so the leg can carry the next one."""
        self._held, self.held_size = [], 0
        if self.in_data:                # an RSET now would be message text: drop the leg
            await self.close()
        elif self.in_transaction and not self.closed:
            try:
                reply = await self.command("RSET")
                if reply.code != 250:
                    await self.close()
            except UpstreamFailure:
                await self.close()
        self.in_transaction = False

    async def _goodbye(self) -> None:
        """QUIT, not waiting more than 2 s, ignoring failures."""
        try:
            with trio.move_on_after(2):
                await self.command("QUIT")
        except UpstreamFailure:
            pass

    async def quit(self) -> None:
        if not self.closed:
            await self._goodbye()
        await self.close()

    async def close(self) -> None:
        """Close at once; mid-DATA this drops the message (no terminating dot is sent)."""
        self._held, self.held_size = [], 0
        await super().close()


def _xtext(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)
