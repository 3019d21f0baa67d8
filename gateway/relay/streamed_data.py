"""DATA without milters (SPEC §4.4): one mode of the session's one DATA loop.

The client's DATA is replayed upstream and answered with the upstream's own reply; after its
`354` the message goes to the leg as it arrives: the session's loop hands each chunk to
`chunk()` (held on the leg, written at `send()` when the session next waits for the client,
or at `HOLD_LIMIT`), so the chunks of one read and a final dot in the same read leave in one
write. The answer to the final dot is the upstream's. The other mode is
`milter_data.HeldData`; both see the session only as a `Transaction`.

The session's loop calls, in order: `begin()` (the answer to DATA), `start(header)` once the
message is under way, then `chunk()` / `send()` / `abort()` as the client's data comes,
and `end()` at its final dot (or `gone()` when the client vanished), `close()` always.
"""
from __future__ import annotations

import trio

from ..proto import replies as R
from .transaction import GATEWAY, Transaction, relayed
from .upstream import UpstreamFailure

HOLD_LIMIT = 262144          # message bytes held for one upstream write at most


class StreamedData:
    keepalive = None            # the upstream waits for nothing: no NOOPs meanwhile

    def __init__(self, tx: Transaction):
        self.tx = tx
        self.broken = False         # the leg failed or was dropped mid-message

    async def begin(self):
        """DATA upstream: (the reply for the client, GATEWAY when it is the gateway's own
        refusal, else None: the upstream's 354 or refusal, relayed)."""
        tx = self.tx
        leg = tx.leg
        if leg is None:
            return R.UPSTREAM_LOST, GATEWAY
        try:
            reply = await leg.command("DATA")
        except UpstreamFailure as failure:
            await tx.failed(failure, tx.envelope.rcpts)
            return failure.reply, GATEWAY
        if reply.code == 354:
            self.broken = False
            tx.data_begins(trio.current_time())
        else:
            tx.envelope.last_refusal = (reply.code, " / ".join(reply.lines))
        return relayed(reply), None

    async def start(self, header: bytes | None) -> None:
        """The gateway's Received: header goes out with the first chunk."""
        if header is not None:
            self.tx.leg.hold_data(header)

    async def chunk(self, data: bytes) -> None:
        if self.broken:
            return
        leg = self.tx.leg
        leg.hold_data(data)
        if leg.held_size >= HOLD_LIMIT:
            await self.send()

    async def send(self) -> None:
        """Write what is held (the session is about to wait for the client); the time
        blocked on the upstream is not held against the client's rate (§9)."""
        tx = self.tx
        leg = tx.leg
        if self.broken or leg is None or not leg.held_size or not leg.in_data:
            return
        start = trio.current_time()
        try:
            await leg.send_data()
            tx.data_blocked += trio.current_time() - start
        except UpstreamFailure as failure:
            self.broken = True
            await tx.failed(failure, tx.envelope.rcpts)

    async def abort(self, reason: str) -> None:
        """The message is refused before its end (size, bare CR/LF): drop the upstream
        before the terminating dot, so it discards the partial message (§4.4)."""
        self.broken = True
        if self.tx.leg is not None:
            await self.tx.leg.close()

    async def gone(self) -> None:
        """The client vanished mid-message: drop the leg (no final dot)."""
        if self.tx.leg is not None:
            await self.tx.leg.close()

    async def end(self, event):
        """The answer to the final dot: (reply, result or None, policy label or None)."""
        if event.aborted == "size":
            return R.TOO_BIG, None, None
        if event.aborted == "bare_newline":
            return R.BARE_NEWLINE, None, None
        if self.broken:
            return R.UPSTREAM_LOST, None, None
        tx = self.tx
        try:
            return relayed(await tx.leg.finish_data()), None, None
        except UpstreamFailure as failure:
            await tx.failed(failure, tx.envelope.rcpts)
            return failure.reply, None, None

    def close(self) -> None:
        return None
