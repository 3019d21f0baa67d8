"""DATA with milters (SPEC §4.7): the part of an SMTP session between the client's DATA and
the answer to its final dot, when the listener has milters.

The upstream has accepted at least one recipient; the gateway answers DATA with its own
`354`, holds the message (`HeldMessage`: memory, then an unlinked spool file) and streams it
to the first milter as it arrives (the message text: CRLF lines, not dot-stuffed, the
gateway's Received: first). Meanwhile the upstream leg gets a NOOP every `NOOP_INTERVAL`
seconds. After the client's final dot one deadline (`upstream_data_done`) covers the rest: the
later milters each read the message as the earlier ones left it, every milter answers its end
of message, the envelope changes are applied on the leg (RSET, MAIL, the RCPTs), and the
(changed) message goes upstream; the client gets the upstream's final reply. A refused or
discarded message never reaches the upstream: the leg gets RSET instead of DATA. When the
deadline passes the client gets `451 4.7.1` while milters were answering, `451 4.4.2` once
the upstream transfer began (the leg is dropped before any final dot).
"""
from __future__ import annotations

import trio

from ..policy.stages import Action
from ..proto import replies as R
from ..proto import smtp_server as S
from ..proto.message import Unstuffer
from ..proto.milter import AddRecipient, ChangeFrom, DeleteRecipient
from .held_message import HeldMessage
from .milter_hook import MILTER_TEMPFAIL
from .spool import SpoolError
from .upstream import UpstreamFailure

NOOP_INTERVAL = 30.0            # seconds between NOOPs on the waiting upstream leg (<= 60)
GATEWAY_354 = (354, "End data with <CR><LF>.<CR><LF>")
DISCARDED = (250, "2.7.0 Message discarded")
NO_SPOOL = (451, "4.3.0 Insufficient system storage")
_SEND_AT = 262144               # message octets queued on the leg before a write


class _Keepalive:
    """NOOP on the waiting leg every NOOP_INTERVAL seconds until `stop()`."""

    def __init__(self, leg):
        self.leg = leg
        self.failure: UpstreamFailure | None = None
        self._lock = trio.Lock()
        self._scope = trio.CancelScope()

    async def run(self) -> None:
        with self._scope:
            while True:
                await trio.sleep(NOOP_INTERVAL)
                async with self._lock:
                    try:
                        reply = await self.leg.command("NOOP")
                    except UpstreamFailure as failure:
                        self.failure = failure
                        return
                    except BaseException:
                        self.leg.abandon()         # cancelled mid-command: out of step
                        raise
                    if reply.code != 250:
                        self.failure = UpstreamFailure(R.UPSTREAM_LOST,
                                                       f"NOOP answered {reply.code}")
                        return

    async def stop(self) -> None:
        """Wait for a NOOP in flight, then end the loop: the leg is the caller's again."""
        async with self._lock:
            self._scope.cancel()

    def cancel(self) -> None:
        """End the loop now (a NOOP in flight abandons the leg)."""
        self._scope.cancel()


async def transfer(session) -> None:
    """Answer the client's DATA, read the message and answer its final dot (the session's
    `_on_Data` with milters)."""
    s = session
    txn = s.txn
    leg = s.legs.leg
    if leg is None or leg.closed:
        s._refuse(R.UPSTREAM_LOST)
        return
    verdict = await s.policy.data(s.facts)
    if verdict.refused:
        s._refuse_by(verdict)
        return
    if verdict.action is Action.DISCARD:
        txn.discard = verdict.reason
    s.core.respond(*GATEWAY_354)
    txn.data_started = True
    s._msg_bytes = 0
    # the DATA clock, as without milters: a grace of `data` seconds from the 354, then the
    # data_min_rate floor, time the gateway spends blocked on its milters not counted (§9)
    s._data_start = trio.current_time()
    s._data_blocked = 0.0
    s._data_received = 0
    config = s.rt.milter_spool
    held = HeldMessage(config[0], config[1])
    keepalive = _Keepalive(leg)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keepalive.run)
            try:
                await _message(s, txn, held, keepalive)
            finally:
                keepalive.cancel()
    finally:
        held.close()


class _Reading:
    """What happened while the client sent the message."""
    aborted: str | None = None          # DataAbort's reason (size, bare_newline)
    stop = None                         # a body hook's refusal or discard
    spool: SpoolError | None = None


async def _message(s, txn, held: HeldMessage, keepalive: _Keepalive) -> None:
    core = s.core
    facts = s.facts
    policy = s.policy
    state = _Reading()
    unstuff = Unstuffer()

    async def take(text: bytes) -> None:
        if state.aborted is not None or state.spool is not None or state.stop is not None \
                or txn.discard is not None:
            return                       # refused already: nothing more is held or sent
        start = trio.current_time()
        try:
            held.feed(text)
        except SpoolError as exc:
            state.spool = exc
            s.log.event("spool_error", level="error", reason=str(exc))
            return
        try:
            verdict = await policy.body(facts, text)
        finally:
            # the spool and the first milter's answers are the gateway's time, not the
            # client's: like time blocked writing upstream, not held against its rate
            s._data_blocked += trio.current_time() - start
        if verdict.action in (Action.REFUSE, Action.DISCARD):
            state.stop = verdict

    if s.listener.received_header:
        await take(s._received_header())
    while True:
        event = core.next_event()
        for code, text in core.take_rejections():
            s._rejected(code, text, own=True)
        if event is S.NEED_DATA:
            await s._flush()
            core.receive_data(await s._receive())
            continue
        if isinstance(event, S.DataChunk):
            s._msg_bytes += len(event.data)
            await take(unstuff.feed(event.data))
            continue
        if isinstance(event, S.DataAbort):
            state.aborted = event.reason
            continue
        if isinstance(event, S.DataEnd):
            break
        # the client went away mid-message (ConnectionClosed): the session's loop sees it
        # again and ends; the milters forget the message
        await policy.abort(facts)
        return
    await _finish(s, txn, held, keepalive, state, event)


async def _finish(s, txn, held, keepalive, state: _Reading, end: S.DataEnd) -> None:
    facts = s.facts
    policy = s.policy
    result = None
    reply = None
    label = None                   # a milter's refusal: its policy_rejections label
    relay = False
    if end.aborted == "size" or state.aborted == "size":
        reply = R.TOO_BIG
    elif end.aborted == "bare_newline" or state.aborted == "bare_newline":
        reply = R.BARE_NEWLINE
    elif state.spool is not None:
        reply = NO_SPOOL
    elif keepalive.failure is not None:
        await s.legs.failed(keepalive.failure, txn.rcpts)
        reply = keepalive.failure.reply
    elif state.stop is not None:
        reply, result = _stopped(state.stop)
        label = state.stop.label
    elif txn.discard is not None:
        reply, result = DISCARDED, "discarded"
    if reply is not None:
        await policy.abort(facts)
    deadline = trio.current_time() + s.listener.timeouts.upstream_data_done
    if reply is None:
        held.finish()
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                verdict = await policy.eom(facts, held)
            except SpoolError as exc:
                s.log.event("spool_error", level="error", reason=str(exc))
                verdict = None
                reply = NO_SPOOL
        if scope.cancelled_caught:
            reply, label = MILTER_TEMPFAIL, "milter_timeout"
            await policy.abort(facts)
        elif verdict is not None:
            if verdict.action in (Action.REFUSE, Action.DISCARD):
                reply, result = _stopped(verdict)
                label = verdict.label
            else:
                relay = True
    await keepalive.stop()
    if keepalive.failure is not None and relay:
        await s.legs.failed(keepalive.failure, txn.rcpts)
        reply, relay = keepalive.failure.reply, False
    if relay:
        if verdict.quarantine:
            held.quarantine(verdict.quarantine)
        reply, result = await _relay(s, txn, held, verdict.edits, deadline)
    leg = s.legs.leg
    if leg is not None and not leg.closed and leg.in_transaction:
        await leg.reset()            # refused or discarded: RSET, never DATA
    await s._message_done(txn, reply, end.size, result, label=label)


def _stopped(verdict):
    if verdict.action is Action.DISCARD:
        return DISCARDED, "discarded"
    return verdict.reply, None


async def _relay(s, txn, held: HeldMessage, edits, deadline: float):
    """Envelope changes, then DATA and the message, within the deadline: (reply, result)."""
    leg = s.legs.leg
    if leg is None or leg.closed:
        return R.UPSTREAM_LOST, None
    with trio.CancelScope(deadline=deadline) as scope:
        try:
            refused = await _envelope(s, txn, edits)
            if refused is not None:
                return refused
            leg = s.legs.leg
            reply = await leg.command("DATA")
            if reply.code != 354:
                return (reply.code, reply.relay_lines()), None
            for chunk in held.upstream_chunks():
                leg.hold_data(chunk)
                if leg.held_size >= _SEND_AT:
                    await leg.send_data()
            await leg.send_data()
            final = await leg.finish_data()
            return (final.code, final.relay_lines()), None
        except UpstreamFailure as failure:
            await s.legs.failed(failure, txn.rcpts)
            return failure.reply, None
        except SpoolError as exc:
            s.log.event("spool_error", level="error", reason=str(exc))
            await s.legs.drop()           # before any final dot
            return NO_SPOOL, None
    # the deadline passed: drop the leg before any final dot (§4.7)
    assert scope.cancelled_caught
    await s.legs.drop()
    s.log.event("upstream_error", level="warning", reason="deadline after the final dot",
                code=451)
    return R.UPSTREAM_LOST, None


async def _envelope(s, txn, edits):
    """The milters' envelope changes on the leg: RSET, MAIL, the RCPTs. None when done
    (or nothing changed), else (reply, result) for the client."""
    changes = [e for e in edits if isinstance(e, (ChangeFrom, AddRecipient, DeleteRecipient))]
    if not changes:
        return None
    sender, params = txn.mail.address, dict(txn.mail.params)
    rcpts: list[tuple[str, dict]] = [(r, txn.rcpt_params.get(r, {})) for r in txn.rcpts]
    added: set[str] = set()
    for change in changes:
        if isinstance(change, ChangeFrom):
            sender = _bare(change.address)
            params = _esmtp(change.args) if change.args is not None else params
        elif isinstance(change, AddRecipient):
            address = _bare(change.address)
            if all(r.lower() != address.lower() for r, _ in rcpts):
                rcpts.append((address, _esmtp(change.args)))
                added.add(address)
        else:
            address = _bare(change.address).lower()
            rcpts = [(r, p) for r, p in rcpts if r.lower() != address]
    txn.rcpts = []
    facts = s.facts
    facts.sender = sender
    if not rcpts:
        s.log.event("milter_no_recipients", level="warning")
        return DISCARDED, "discarded"
    leg = s.legs.leg
    await leg.reset()
    if leg.closed:
        raise UpstreamFailure(R.UPSTREAM_LOST, "RSET before the changed envelope failed")
    mail = s.legs.mail_for_upstream(S.Mail(sender, params))
    first = None
    accepted: list[str] = []
    for address, rparams in rcpts:
        if address in added:
            verdict = s.policy.rcpt_rules(facts, address, leg)
            if verdict.refused or verdict.new_leg:
                _dropped(s, address, "the leg cannot carry its level")
                continue
        rcpt = S.Rcpt(address, rparams)
        if first is None:
            first = rcpt
            mail_reply, reply = await leg.start_transaction(mail, rcpt)
            if mail_reply.code // 100 != 2:
                s.log.event("milter_sender_refused", level="warning", mail_from=sender,
                            reply=f"{mail_reply.code} {mail_reply.text}")
                return MILTER_TEMPFAIL, None
        else:
            reply = await leg.rcpt(rcpt)
        if reply is not None and reply.code // 100 == 2:
            accepted.append(address)
        else:
            _dropped(s, address, f"{reply.code} {reply.text}" if reply else "refused")
    txn.rcpts = accepted
    facts.recipients = accepted
    txn.mail = mail
    if not accepted:
        return MILTER_TEMPFAIL, None
    return None


def _dropped(s, address: str, why: str) -> None:
    """A recipient a milter added that the leg cannot take: logged, and tracked under the
    milter that added it."""
    by = next((h.name for h in s.policy.body_hooks
               if address in getattr(h, "added", ())), "")
    s.log.event("milter_rcpt_dropped", level="warning", milter=by, rcpt=address, reason=why)
    s.facts.milter_log.append({"milter": by, "stage": "eom", "result": "rcpt_dropped",
                               "rcpt": address})


def _bare(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _esmtp(args: str | None) -> dict:
    params: dict = {}
    for item in (args or "").split():
        key, eq, value = item.partition("=")
        params[key.upper()] = value if eq else None
    return params

