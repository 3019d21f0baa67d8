"""What the SMTP and IMAP sessions share: the client leg (SPEC §3.1, §4, §5, §11).

`ClientSession` holds a session's client stream, its facts for the policy seam, and its byte
counts; it runs the client-side TLS handshake (`_handshake`, at once on an implicit listener
or after STARTTLS), sends what the protocol core has to send (`_flush`), and ends the session
(`_closed`: the stream closed, the duration observed under the listener's protocol, the
`conn_close` event). The failed-leg report both make is `legs.report_leg_failure`. The
protocol cores and everything that differs (commands, drains, the transaction) stay in
`smtp_session` and `imap_session`.
"""
from __future__ import annotations

import trio

from ..policy.stages import Facts
from ..tls.stream import TLSStream
from .tls_legs import accept_client_tls


class ClientSession:
    core = None                         # the protocol's sans-IO server core (the subclass')

    def __init__(self, rt, stream, client_addr: tuple[str, int], log, conn_id: str):
        self.rt = rt                    # ListenerRuntime (gateway.serve.runtime)
        self.listener = listener = rt.listener
        self.stream = stream
        self.client_addr = client_addr
        self.log = log
        self.conn_id = conn_id
        self.facts = Facts(listener.name, client_addr[0], client_addr[1])
        self.metrics = rt.state.metrics
        self.name = listener.name
        self.tls = None                 # client leg TLSInfo
        self.bytes_in = 0
        self.bytes_out = 0

    async def _handshake(self) -> bool:
        """The client leg's TLS handshake (at the cipher strength a client rule set); False
        when it failed (logged and counted by `accept_client_tls`)."""
        tls = await accept_client_tls(self.rt, self.stream, self.facts.cipher_strength,
                                      self.log)
        if tls is None:
            return False
        self.stream = tls
        self.tls = self.facts.tls = tls.info
        return True

    async def _flush(self, last: bool = False) -> None:
        """Send the core's output; *last*: the session ends, so a TLS stream sends it with
        its close_notify in one write and closes."""
        out = self.core.data_to_send()
        if out:
            self.bytes_out += len(out)
            if last and isinstance(self.stream, TLSStream):
                await self.stream.aclose_after(out)
            else:
                await self.stream.send_all(out)

    async def _closed(self, start: float, **fields) -> None:
        """The session is over: close the client stream (within a second), observe its
        duration, log `conn_close` with the byte counts and *fields*."""
        with trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except Exception:
                pass
        duration = trio.current_time() - start
        self.metrics.session_seconds.labels(self.name, self.listener.protocol).observe(duration)
        self.log.event("conn_close", duration=round(duration, 3), bytes_in=self.bytes_in,
                       bytes_out=self.bytes_out, **fields)

