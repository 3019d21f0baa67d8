"""What an SMTP session's transactions are, apart from its event loop (SPEC §4.4, §4.6, §4.7).

`Envelope` is one transaction's state: MAIL, the recipients accepted and tried, the refusals
that answer later commands, the message's progress. `SessionTransaction` is the session's
transaction side, one per client session: the upstream leg (`Legs`: opening it for a route,
the pool, AUTH binding, failure reporting), the open envelope, the policy and the facts it
decides on, and the DATA clock. `SMTPSession` keeps the event loop — the client stream, the
server core, replies — and works through it.

Milter hooks and the DATA path (its two modes: `StreamedData`, `milter_data.HeldData`) see a
session only through the `Transaction` protocol below: these members and no others, never
the session object (tests/test_transaction.py checks they hold no reference to it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..proto import smtp_server as S
from .legs import Legs
from .upstream import UpstreamFailure, UpstreamLeg


# a DATA mode's begin(): the reply is the gateway's own refusal (logged as one), not relayed
GATEWAY = "gateway"


def relayed(reply) -> tuple[int, list[str]]:
    """An upstream reply as the client sees it (enhanced code added, text sanitised, §4.1)."""
    return reply.code, reply.relay_lines()


@dataclass
class Envelope:
    mail: S.Mail
    id: str                                    # made at MAIL FROM: tracking, macro i, Received
    rcpts: list[str] = field(default_factory=list)
    failure: tuple[int, str] | None = None     # a leg failure answers every later RCPT
    # (destination key, level) whose TLS could not be had (451 4.7.5): its later RCPTs get
    # that reply, the others are decided on their own (§4.3)
    failed_levels: dict = field(default_factory=dict)
    refusal: object = None                     # the upstream's refusal of MAIL, likewise
    attempted: list[str] = field(default_factory=list)   # every RCPT, accepted or not
    last_refusal: tuple[int, str] | None = None
    upstream_leg: str | None = None            # "tls" / "plain": the leg MAIL went over
    upstream_tls: str | None = None            # that leg's "version cipher"
    discard: str | None = None                 # a milter discards the message at its end
    rcpt_params: dict = field(default_factory=dict)   # accepted RCPTs' parameters (milters)
    data_started: bool = False                 # the client got 354: the message is under way
    data_refused: bool = False                 # DATA was refused (last_refusal says how)
    ended: bool = False                        # counted, logged and tracked (_end)


class Transaction(Protocol):
    """The interface milter hooks and the DATA path use — the whole of it:

    - `rt`: the listener's runtime (hostname, listener, upstream settings, milter spool,
      metrics), `log`: the session's event log, `facts`: what the policy knows of the
      session, `policy`: its stages (with the session's own hooks);
    - `envelope`: the open transaction (`Envelope`), None between transactions;
    - `leg`: the upstream leg, or None; `failed(failure, rcpts)`: report a failed leg
      (logged, counted, alerted) and close it; `drop()`: close it now, before any final
      dot; `mail_for_upstream(mail)`: MAIL as it goes upstream (`AUTH=<>` unless bound);
    - `data_blocked`: seconds of this message's DATA the gateway spent blocked (on the
      upstream, the spool, its milters), not held against the client's rate (§9); a mode
      adds to it.
    """

    rt: object
    log: object
    facts: object
    policy: object
    envelope: Envelope | None
    leg: UpstreamLeg | None
    data_blocked: float

    async def failed(self, failure: UpstreamFailure, rcpts) -> None: ...

    async def drop(self) -> None: ...

    def mail_for_upstream(self, mail: S.Mail) -> S.Mail: ...


class SessionTransaction(Legs):
    """The transaction side of one client SMTP session (a `Transaction`)."""

    def __init__(self, rt, log, client_addr: tuple[str, int], facts):
        super().__init__(rt, log, client_addr)
        self.facts = facts
        self.policy = rt.stages.for_session(self)   # with milters, this session's own copy
        self.envelope: Envelope | None = None
        self.data_start = 0.0           # DATA: when the 354 went out,
        self.data_blocked = 0.0         # the time spent blocked (upstream, spool, milters),
        self.data_received = 0          # the client's bytes since,
        self.msg_bytes = 0              # and the message's size as the client sent it

    def data_begins(self, now: float) -> None:
        """The client got 354: the DATA clock starts (§9)."""
        self.data_start = now
        self.data_blocked = 0.0
        self.data_received = 0
        self.msg_bytes = 0
        self.envelope.data_started = True
