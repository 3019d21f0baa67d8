"""What serving each protocol takes: its session and its refusal (SPEC §2, §4, §5).

The one place on the serve side that dispatches on the protocol: `serving(listener)` gives the
session class a connection is handed to, the bytes that answer a connection-limit verdict
before any session starts, and whether its client reads are timed by the worker's watchdog.
What a listener of each protocol may have and does is `gateway.config.protocols`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config.protocols import Protocol
from ..proto import replies as R
from ..relay.imap_session import IMAPSession
from ..relay.smtp_session import SMTPSession

IMAP_TOO_MANY_CONNECTIONS = b"* BYE Too many connections\r\n"     # SPEC §2
IMAP_TOO_MANY_FROM_ADDRESS = b"* BYE Too many connections from your address\r\n"
# the IMAP answer to a connection-limit verdict, by its label
_IMAP_LIMIT_REPLIES = {"max_connections": IMAP_TOO_MANY_CONNECTIONS,
                       "per_ip": IMAP_TOO_MANY_FROM_ADDRESS}


def _smtp_refusal(verdict) -> bytes:
    return R.render(*verdict.reply)            # 421 4.7.0 ..., the verdict's own reply


def _imap_refusal(verdict) -> bytes:
    return _IMAP_LIMIT_REPLIES[verdict.label]  # * BYE ..., by the verdict's label


@dataclass(frozen=True)
class Serving:
    session: type                      # (rt, stream, client_addr, log, conn_id) -> .run()
    refusal: Callable[..., bytes]      # a connection-limit verdict -> the bytes to send
    watched: bool                      # client reads timed by the worker's watchdog (command,
                                       # data timeouts; relay/watchdog.py)


_SERVING = {
    Protocol.SMTP: Serving(SMTPSession, _smtp_refusal, watched=True),
    Protocol.IMAP: Serving(IMAPSession, _imap_refusal, watched=False),
}


def serving(listener) -> Serving:
    """How *listener*'s connections are served."""
    return _SERVING[listener.protocol]
