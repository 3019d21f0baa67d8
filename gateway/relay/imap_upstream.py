"""The gateway's IMAP leg to the upstream server (SPEC §3.2, §5, §6).

`IMAPUpstreamLeg.open()` connects, (implicit mode) does the TLS handshake, reads the greeting,
learns the capabilities, negotiates STARTTLS as the level asks, re-reads CAPABILITY over TLS
and optionally sends ID with the client's address. The client's credentials go out only in
`login()`, on a leg that `open()` returned — one that satisfies the level. Every failure is an
`UpstreamFailure` carrying the SPEC §4.5 reply (the session turns it into NO [UNAVAILABLE]).

Safety (SPEC §5, §6): a PREAUTH greeting is refused (the connection would be somebody's
session, and STARTTLS is impossible in it); after STARTTLS exactly one tagged answer is
accepted — an untagged response before it, or any byte after it before the handshake, aborts
the leg (response injection) — and the capabilities seen in plaintext are forgotten.
"""
from __future__ import annotations

import base64

import trio

from ..errors import ProtocolError, TLSError
from ..proto import imap_wire as W
from ..proto import replies as R
from ..proto.imap_client import IMAPClient, Response
from .upstream import UpstreamFailure, UpstreamLegBase, UpstreamSettings

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, TLSError, OSError)
MAX_UNTAGGED_BYTES = W.MAX_COMMAND      # untagged data kept (and relayed) per command


def _keep(untagged: list[Response], resp: Response) -> None:
    if sum(len(r.raw) for r in untagged) + len(resp.raw) > MAX_UNTAGGED_BYTES:
        raise UpstreamFailure(R.UPSTREAM_LOST, "too much untagged data")
    untagged.append(resp)


class IMAPUpstreamLeg(UpstreamLegBase):
    def __init__(self, settings: UpstreamSettings, level: str):
        super().__init__(settings, level)
        self.client = IMAPClient()

    async def establish(self, *, try_tls: bool, client_addr=None) -> None:
        s = self.settings
        await self._connect()
        try:
            if s.mode == "implicit":
                await self._handshake(fallback=False)
            greeting = await self._read(phase="greeting")
            if greeting.tag is not None or greeting.kind not in ("OK", "PREAUTH"):
                raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE,
                                      f"greeting: {greeting.raw[:80]!r}")
            if greeting.kind == "PREAUTH":
                if self.requires_tls and self.tls is None:
                    raise UpstreamFailure(R.UPSTREAM_TLS_NOT_OFFERED, "PREAUTH greeting",
                                          tls_required=True)
                raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, "PREAUTH greeting")
            if not self.client.capabilities:
                await self.capability()
            await self._negotiate_tls(offered="STARTTLS" in self.client.capabilities,
                                      try_tls=try_tls)
            if s.forward_client and client_addr and "ID" in self.client.capabilities:
                ip, port = client_addr[0], client_addr[1]
                tag, data = self.client.raw_command(
                    f'ID ("x-originating-ip" {W.quote(ip)} "x-originating-port" '
                    f'{W.quote(str(port))})')
                await self._send(data)
                await self._tagged(tag)
        except BaseException:
            await self.close()
            raise

    async def capability(self) -> None:
        tag, pieces = self.client.command("CAPABILITY")
        await self._send(pieces[0])
        tagged, _ = await self._tagged(tag)
        if tagged.kind != "OK":
            raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, "CAPABILITY refused")

    async def _starttls(self) -> None:
        tag, pieces = self.client.command("STARTTLS")
        await self._send(pieces[0])
        resp = await self._read()
        if resp.tag is None:
            # untagged data between STARTTLS and its answer: in plaintext, unauthenticated
            self._tls_failed(f"untagged response after STARTTLS: {resp.raw[:60]!r}")
        if resp.tag != tag or resp.kind != "OK":
            self._tls_failed(f"STARTTLS refused: {resp.raw[:80]!r}")
        if self.client.has_leftover():
            # response injection (CVE-2021-38371 class): bytes after the one answer (§6)
            self._tls_failed("response injection after STARTTLS")
        await self._handshake(fallback=self.level.falls_back)
        self.client.reset()                  # plaintext capabilities forgotten
        await self.capability()

    async def login(self, event) -> tuple[bool, list[Response], Response]:
        """Send the client's credentials; (ok, untagged responses, tagged answer)."""
        caps = self.client.capabilities
        plain_ok = "AUTH=PLAIN" in caps
        login_ok = "LOGINDISABLED" not in caps and event.authzid in (b"", event.user)
        if event.mechanism == "PLAIN" and plain_ok or not login_ok and plain_ok:
            tag, untagged, tagged = await self._authenticate_plain(event)
        elif login_ok:
            tag, pieces = self.client.command("LOGIN", event.user, event.password)
            tagged, untagged = await self._run(tag, pieces)
        else:
            raise UpstreamFailure(R.UPSTREAM_UNAVAILABLE, "no usable login method upstream")
        return tagged.kind == "OK", untagged, tagged

    async def _authenticate_plain(self, event):
        b64 = base64.b64encode(event.authzid + b"\0" + event.user + b"\0" + event.password)
        b64 = b64 or b"="
        if "SASL-IR" in self.client.capabilities:
            tag, pieces = self.client.command("AUTHENTICATE", b"PLAIN", b64)
            tagged, untagged = await self._run(tag, pieces)
            return tag, untagged, tagged
        tag, pieces = self.client.command("AUTHENTICATE", b"PLAIN")
        await self._send(pieces[0])
        untagged: list[Response] = []
        sent = False
        while True:
            resp = await self._read()
            if resp.continuation:
                await self._send(b"*\r\n" if sent else b64 + b"\r\n")
                sent = True
            elif resp.untagged:
                _keep(untagged, resp)
            elif resp.tag == tag:
                return tag, untagged, resp
            else:
                raise UpstreamFailure(R.UPSTREAM_LOST, "unexpected tagged response")

    async def _run(self, tag: str, pieces: list[bytes]) -> tuple[Response, list[Response]]:
        """Send a command (its later pieces after each "+ ") and read up to its answer."""
        await self._send(pieces[0])
        rest = list(pieces[1:])
        untagged: list[Response] = []
        while True:
            resp = await self._read()
            if resp.continuation:
                if not rest:
                    raise UpstreamFailure(R.UPSTREAM_LOST, "unexpected continuation")
                await self._send(rest.pop(0))
            elif resp.untagged:
                _keep(untagged, resp)
            elif resp.tag == tag:
                return resp, untagged
            else:
                raise UpstreamFailure(R.UPSTREAM_LOST, "unexpected tagged response")

    async def _tagged(self, tag: str) -> tuple[Response, list[Response]]:
        untagged = []
        while True:
            resp = await self._read()
            if resp.tag == tag:
                return resp, untagged
            if resp.tag is not None:
                raise UpstreamFailure(R.UPSTREAM_LOST, "unexpected response")
            _keep(untagged, resp)

    # --- I/O --------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _BROKEN as exc:
            self.closed = True
            raise UpstreamFailure(R.UPSTREAM_LOST, f"send: {exc!r}")

    async def _read(self, phase: str = "reply") -> Response:
        lost = R.UPSTREAM_UNAVAILABLE if phase == "greeting" else R.UPSTREAM_LOST
        try:
            with trio.fail_after(self.settings.reply_timeout):
                while True:
                    resp = self.client.next_response()
                    if resp is not None:
                        return resp
                    self.client.receive_data(await self.stream.receive_some(65536))
        except trio.TooSlowError:
            self.closed = True
            raise UpstreamFailure(lost, f"{phase} timeout")
        except ProtocolError as exc:
            self.closed = True
            raise UpstreamFailure(lost, str(exc))
        except _BROKEN as exc:
            self.closed = True
            raise UpstreamFailure(lost, f"{phase}: {exc!r}")

    # --- closing ----------------------------------------------------------------------------

    async def _goodbye(self) -> None:
        """LOGOUT, not waiting more than 2 s, ignoring failures."""
        try:
            with trio.move_on_after(2):
                tag, pieces = self.client.command("LOGOUT")
                await self._send(pieces[0])
        except UpstreamFailure:
            pass
