"""One connection to a milter, in trio, around the sans-IO `proto.milter` core (SPEC §4.7).

    client = MilterClient("inet:127.0.0.1:11332", connect_timeout=30, command_timeout=30,
                          content_timeout=300)
    await client.open()                         # connect + OPTNEG, within connect_timeout
    v = await client.connect("[192.0.2.1]", "192.0.2.1", 4711, macros={...})
    v = await client.helo("client.example", macros={...})
    v = await client.mail(["<a@example.com>", "SIZE=123"], macros={...})
    v = await client.rcpt(["<b@example.net>"], macros={...})
    v = await client.data(macros={...})
    v = await client.header("Subject", " hello")     # one per header, value after the colon
    v = await client.eoh()
    v = await client.body(chunk)                      # any size: sent in pieces <= 65,535
    v = await client.eom(macros={...})                # v.modifications: the changes
    v = await client.eom(max_size=N, on_body=spool.write)   # the new body to on_body
    await client.abort()                              # between messages
    await client.quit()                               # never raises; closes the socket

Each stage returns a `Verdict`; a stage the milter negotiated away, or asked not to answer,
returns at once without reading. Waits are bounded: connecting by `connect_timeout`,
negotiation and the envelope stages by `command_timeout`, headers, body and end of message
by `content_timeout` (as Postfix's milter_*_timeout); a PROGRESS from the milter restarts the
wait. Each bound covers the whole stage, writing included.

A milter's changes are bounded (`proto.milter.ChangeLimits`: headers, recipients, sizes; and
``eom(max_size=...)``); one that goes beyond them fails like a protocol error, read no
further. Given ``on_body``, the replacement body goes there piece by piece as it arrives
(an exception from it ends the stage: a `ProtocolError` as a failure of the milter, anything
else raised as it is), so no more than one packet of it is held here.

Every failure — refused or unreachable address, timeout, protocol error, garbage, the milter
closing mid-conversation — raises `MilterError` (``result`` is ``"timeout"`` or ``"error"``,
``reason`` says what happened, ``stage`` where). After a failure, or a cancellation from the
caller's own deadline in the middle of a stage, the connection is closed and every later
stage raises `MilterError` again: the session applies the milter's default_action.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import trio

from ..errors import GatewayError
from ..proto import milter as M
from ..proto.milter import Negotiated, Verdict
from ..net.sockstream import open_tcp

__all__ = ["MilterClient", "MilterError"]

RECEIVE_SIZE = 65536


class MilterError(GatewayError):
    """A milter could not be used: `result` ``timeout`` or ``error``, `reason`, `stage`."""

    def __init__(self, reason: str, *, stage: str, result: str = "error"):
        self.reason = reason
        self.stage = stage
        self.result = result
        super().__init__(f"milter {stage}: {reason}")


class MilterClient:
    def __init__(self, address: str, *, name: str | None = None,
                 connect_timeout: float = 30, command_timeout: float = 30,
                 content_timeout: float = 300,
                 actions: int = M.ALL_ACTIONS, protocol: int = M.OFFERED_PROTOCOL,
                 limits: M.ChangeLimits = M.ChangeLimits()):
        self.address = address
        self.name = name or address
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.core = M.MilterConnection(actions=actions, protocol=protocol, limits=limits)
        self._on_body = None            # eom(on_body=...): where REPLBODY pieces go
        self.negotiated: Negotiated | None = None
        self._stream: trio.abc.Stream | None = None
        self._broken: MilterError | None = None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> "MilterClient":
        await self.open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.quit()

    @property
    def active(self) -> bool:
        """Open, negotiated and still wanting this connection's events."""
        return self._broken is None and self._stream is not None and self.core.active

    async def open(self) -> Negotiated:
        """Connect and negotiate; `Negotiated` says what the milter asked for."""
        if self._stream is not None or self._broken is not None or self.core.negotiated:
            raise RuntimeError("open() once per MilterClient")
        try:
            target = M.parse_address(self.address)
        except ValueError as exc:
            raise self._fail(str(exc), "open") from None
        try:
            with trio.fail_after(self.connect_timeout):
                if target[0] == "unix":
                    self._stream = await trio.open_unix_socket(target[1])
                else:
                    self._stream = await open_tcp(target[1], target[2])
        except trio.TooSlowError:
            raise self._fail(f"no connection to {self.address} within "
                             f"{self.connect_timeout:g} s", "open", "timeout") from None
        except OSError as exc:
            raise self._fail(f"connect to {self.address}: {exc.strerror or exc}",
                             "open") from None
        event = await self._exchange(self.core.negotiate(), "negotiate", self.command_timeout)
        assert isinstance(event, Negotiated)
        self.negotiated = event
        return event

    async def quit(self) -> None:
        """Say QUIT (when the conversation is in order) and close. Never raises."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            if self._broken is None:
                data = self.core.quit()
                if data:
                    with trio.move_on_after(min(self.command_timeout, 5)):
                        await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RuntimeError,
                M.ProtocolError):
            pass
        finally:
            if self._broken is None:
                self._broken = MilterError("connection closed", stage="quit")
            await self._close(stream)

    aclose = quit

    # ------------------------------------------------------------------ stages

    async def connect(self, hostname: str, address: str | None = None, port: int = 0, *,
                      family: str | None = None,
                      macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("connect", self.command_timeout, self.core.connect,
                                 hostname, address, port, family=family, macros=macros)

    async def helo(self, name: str, *, macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("helo", self.command_timeout, self.core.helo, name,
                                 macros=macros)

    async def mail(self, args: Sequence[str], *,
                   macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("mail", self.command_timeout, self.core.mail, args,
                                 macros=macros)

    async def rcpt(self, args: Sequence[str], *,
                   macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("rcpt", self.command_timeout, self.core.rcpt, args,
                                 macros=macros)

    async def data(self, *, macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("data", self.command_timeout, self.core.data, macros=macros)

    async def header(self, name: str, value: str, *,
                     macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("header", self.content_timeout, self.core.header, name,
                                 value, macros=macros)

    async def eoh(self, *, macros: Mapping[str, str] | None = None) -> Verdict:
        return await self._stage("eoh", self.content_timeout, self.core.eoh, macros=macros)

    async def body(self, data: bytes, *, macros: Mapping[str, str] | None = None) -> Verdict:
        """Body bytes of any length, in BODY packets of at most 65,535 octets; the first
        verdict other than continue ends it. Empty data sends nothing."""
        view = memoryview(data)
        verdict = Verdict(M.Action.CONTINUE, "body", replied=False)
        for start in range(0, len(view), M.MAX_CHUNK):
            verdict = await self._stage("body", self.content_timeout, self.core.body,
                                        view[start:start + M.MAX_CHUNK], macros=macros)
            if verdict.action is not M.Action.CONTINUE:
                break
        return verdict

    async def eom(self, *, macros: Mapping[str, str] | None = None,
                  max_size: int | None = None, on_body=None) -> Verdict:
        """End of message: the verdict, with the milter's changes in `modifications`.
        *max_size*: octets of header changes and new body allowed together; *on_body*: a
        callable that takes the replacement body piece by piece (then no `ReplaceBody`
        rides on the verdict)."""
        self._on_body = on_body
        try:
            return await self._stage("eom", self.content_timeout, self.core.eom,
                                     macros=macros, max_size=max_size,
                                     stream_body=on_body is not None)
        finally:
            self._on_body = None

    async def abort(self) -> None:
        """Forget the current message (no reply expected)."""
        if self._broken is not None:
            raise MilterError(f"unusable after: {self._broken.reason}", stage="abort")
        try:
            data = self.core.abort()
        except (M.ProtocolError, RuntimeError) as exc:
            await self._abandon()
            raise self._fail(str(exc), "abort") from None
        if data and self._stream is not None:
            await self._send_bounded(data, "abort", self.command_timeout)

    # ------------------------------------------------------------------ internals

    def _fail(self, reason: str, stage: str, result: str = "error") -> MilterError:
        err = MilterError(reason, stage=stage, result=result)
        if self._broken is None:
            self._broken = err
        return err

    async def _close(self, stream) -> None:
        with trio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _abandon(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await self._close(stream)

    async def _stage(self, stage: str, timeout: float, method, *args, **kwargs) -> Verdict:
        if self._broken is not None:
            raise MilterError(f"unusable after: {self._broken.reason}", stage=stage)
        try:
            data = method(*args, **kwargs)
        except (M.ProtocolError, ValueError, RuntimeError) as exc:
            await self._abandon()
            raise self._fail(str(exc), stage) from None
        if not data:
            # skipped, or the milter is done with this message or connection: no I/O
            return self.core.next_event()
        if self._stream is None:
            raise self._fail("not connected", stage)
        event = await self._exchange(data, stage, timeout)
        assert isinstance(event, Verdict)
        if not self.core.active:
            await self._hang_up()
        return event

    async def _hang_up(self) -> None:
        """Accepted or refused at connect/HELO: nothing more goes to this milter; later
        stages repeat that verdict without I/O."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            with trio.move_on_after(min(self.command_timeout, 5)):
                await stream.send_all(M.encode_packet(M.C_QUIT))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self._close(stream)

    async def _send_bounded(self, data: bytes, stage: str, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            await self._abandon()
            raise self._fail(f"no progress within {timeout:g} s", stage, "timeout") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self._abandon()
            raise self._fail(f"connection lost: {exc}", stage) from None
        except BaseException:
            await self._abandon()
            self._fail("interrupted", stage)
            raise

    async def _exchange(self, data: bytes, stage: str, timeout: float):
        """Send `data`, then read until the stage's event; PROGRESS restarts the clock."""
        core = self.core
        stream = self._stream
        assert stream is not None
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                if data:
                    await stream.send_all(data)
                while True:
                    event = core.next_event()
                    if event is M.NEED_DATA:
                        core.receive_data(await stream.receive_some(RECEIVE_SIZE))
                        continue
                    if isinstance(event, M.Progress):
                        scope.deadline = trio.current_time() + timeout
                        continue
                    if isinstance(event, M.ReplaceBody):
                        self._on_body(event.data)
                        continue
                    return event
            # only reached when the scope was cancelled by its deadline
            raise trio.TooSlowError
        except trio.TooSlowError:
            await self._abandon()
            raise self._fail(f"no answer within {timeout:g} s", stage, "timeout") from None
        except M.ProtocolError as exc:
            await self._abandon()
            raise self._fail(exc.reason, stage) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self._abandon()
            raise self._fail(f"connection lost: {exc}", stage) from None
        except BaseException:
            # cancelled from outside (the session's own deadline) or a bug: the conversation
            # is out of step now, so the connection cannot be used again
            await self._abandon()
            self._fail("interrupted", stage)
            raise
