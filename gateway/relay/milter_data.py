"""DATA with milters (SPEC §4.7): `HeldData`, the mode of the session's one DATA loop between
the client's DATA and the answer to its final dot when the listener has milters (the other
mode is `streamed_data.StreamedData`). It sees the session only as a `Transaction`.

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
from .transaction import GATEWAY, Transaction
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


class _Reading:
    """What happened while the client sent the message."""
    aborted: str | None = None          # DataAbort's reason (size, bare_newline)
    stop = None                         # a body hook's refusal or discard
    spool: SpoolError | None = None


class HeldData:
    """DATA with milters: a mode of the session's one DATA loop (its calls are the ones
    `streamed_data.StreamedData` documents). `begin()` sets `keepalive`, which the session
    runs beside the loop while the message is read."""

    def __init__(self, tx: Transaction):
        self.tx = tx
        self.keepalive: _Keepalive | None = None
        self.held: HeldMessage | None = None
        self.state = _Reading()
        self.unstuff = Unstuffer()

    async def begin(self):
        """(the gateway's own 354, None) once the DATA stage lets it, or a refusal: (its
        reply, the stage's verdict), or (the gateway's own reply, GATEWAY)."""
        tx = self.tx
        leg = tx.leg
        if leg is None or leg.closed:
            return R.UPSTREAM_LOST, GATEWAY
        verdict = await tx.policy.data(tx.facts)
        if verdict.refused:
            return verdict.reply, verdict
        if verdict.action is Action.DISCARD:
            tx.envelope.discard = verdict.reason
        # the DATA clock, as without milters: a grace of `data` seconds from the 354, then
        # the data_min_rate floor, time the gateway spends blocked on its milters not
        # counted (§9)
        tx.data_begins(trio.current_time())
        config = tx.rt.milter_spool
        self.held = HeldMessage(config[0], config[1])
        self.keepalive = _Keepalive(leg)
        self.state = _Reading()
        self.unstuff = Unstuffer()
        return GATEWAY_354, None

    async def start(self, header: bytes | None) -> None:
        if header is not None:
            await self._take(header)

    async def chunk(self, data: bytes) -> None:
        await self._take(self.unstuff.feed(data))

    async def send(self) -> None:
        return None                      # nothing goes upstream before the final dot

    async def abort(self, reason: str) -> None:
        self.state.aborted = reason

    async def gone(self) -> None:
        """The client went away mid-message: the milters forget it."""
        await self.tx.policy.abort(self.tx.facts)

    def close(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            held.close()
        keepalive, self.keepalive = self.keepalive, None
        if keepalive is not None:
            keepalive.cancel()

    async def _take(self, text: bytes) -> None:
        state = self.state
        tx = self.tx
        if state.aborted is not None or state.spool is not None or state.stop is not None \
                or tx.envelope.discard is not None:
            return                       # refused already: nothing more is held or sent
        start = trio.current_time()
        try:
            self.held.feed(text)
        except SpoolError as exc:
            state.spool = exc
            tx.log.event("spool_error", level="error", reason=str(exc))
            return
        try:
            verdict = await tx.policy.body(tx.facts, text)
        finally:
            # the spool and the first milter's answers are the gateway's time, not the
            # client's: like time blocked writing upstream, not held against its rate
            tx.data_blocked += trio.current_time() - start
        if verdict.action in (Action.REFUSE, Action.DISCARD):
            state.stop = verdict

    async def end(self, end: S.DataEnd):
        """After the client's final dot, within `upstream_data_done`: the milters' ends of
        message, then the (changed) message upstream. (reply, result, label)."""
        tx = self.tx
        reply, result, label = await self._refused(end)
        deadline = trio.current_time() + tx.rt.listener.timeouts.upstream_data_done
        verdict = None
        if reply is None:
            reply, result, label, verdict = await self._eom(deadline)
        keepalive = self.keepalive
        await keepalive.stop()
        if keepalive.failure is not None and verdict is not None:
            await tx.failed(keepalive.failure, tx.envelope.rcpts)
            reply, verdict = keepalive.failure.reply, None
        if verdict is not None:
            if verdict.quarantine:
                self.held.quarantine(verdict.quarantine)
            reply, result = await _relay(tx, self.held, verdict.edits, deadline)
        leg = tx.leg
        if leg is not None and not leg.closed and leg.in_transaction:
            await leg.reset()            # refused or discarded: RSET, never DATA
        return reply, result, label

    async def _refused(self, end: S.DataEnd):
        """(reply, result, label) when the message was refused before its end, else
        (None, None, None)."""
        tx = self.tx
        state = self.state
        reply = result = label = None
        if end.aborted == "size" or state.aborted == "size":
            reply = R.TOO_BIG
        elif end.aborted == "bare_newline" or state.aborted == "bare_newline":
            reply = R.BARE_NEWLINE
        elif state.spool is not None:
            reply = NO_SPOOL
        elif self.keepalive.failure is not None:
            await tx.failed(self.keepalive.failure, tx.envelope.rcpts)
            reply = self.keepalive.failure.reply
        elif state.stop is not None:
            reply, result = _stopped(state.stop)
            label = state.stop.label
        elif tx.envelope.discard is not None:
            reply, result = DISCARDED, "discarded"
        if reply is not None:
            await tx.policy.abort(tx.facts)
        return reply, result, label

    async def _eom(self, deadline: float):
        """Every milter's end of message within *deadline*: (reply, result, label, and
        the verdict to relay the message with, None when it is refused)."""
        tx = self.tx
        self.held.finish()
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                verdict = await tx.policy.eom(tx.facts, self.held)
            except SpoolError as exc:
                tx.log.event("spool_error", level="error", reason=str(exc))
                return NO_SPOOL, None, None, None
        if scope.cancelled_caught:
            await tx.policy.abort(tx.facts)
            return MILTER_TEMPFAIL, None, "milter_timeout", None
        if verdict.action in (Action.REFUSE, Action.DISCARD):
            reply, result = _stopped(verdict)
            return reply, result, verdict.label, None
        return None, None, None, verdict


def _stopped(verdict):
    if verdict.action is Action.DISCARD:
        return DISCARDED, "discarded"
    return verdict.reply, None


async def _relay(tx: Transaction, held: HeldMessage, edits, deadline: float):
    """Envelope changes, then DATA and the message, within the deadline: (reply, result)."""
    leg = tx.leg
    if leg is None or leg.closed:
        return R.UPSTREAM_LOST, None
    with trio.CancelScope(deadline=deadline) as scope:
        try:
            refused = await _envelope(tx, edits)
            if refused is not None:
                return refused
            leg = tx.leg
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
            await tx.failed(failure, tx.envelope.rcpts)
            return failure.reply, None
        except SpoolError as exc:
            tx.log.event("spool_error", level="error", reason=str(exc))
            await tx.drop()           # before any final dot
            return NO_SPOOL, None
    # the deadline passed: drop the leg before any final dot (§4.7)
    assert scope.cancelled_caught
    await tx.drop()
    tx.log.event("upstream_error", level="warning", reason="deadline after the final dot",
                code=451)
    return R.UPSTREAM_LOST, None


async def _envelope(tx: Transaction, edits):
    """The milters' envelope changes on the leg: RSET, MAIL, the RCPTs. None when done
    (or nothing changed), else (reply, result) for the client."""
    changes = [e for e in edits if isinstance(e, (ChangeFrom, AddRecipient, DeleteRecipient))]
    if not changes:
        return None
    txn = tx.envelope
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
    facts = tx.facts
    facts.sender = sender
    if not rcpts:
        tx.log.event("milter_no_recipients", level="warning")
        return DISCARDED, "discarded"
    leg = tx.leg
    await leg.reset()
    if leg.closed:
        raise UpstreamFailure(R.UPSTREAM_LOST, "RSET before the changed envelope failed")
    mail = tx.mail_for_upstream(S.Mail(sender, params))
    first = None
    accepted: list[str] = []
    for address, rparams in rcpts:
        if address in added:
            verdict = tx.policy.rcpt_rules(facts, address, leg)
            if verdict.refused or verdict.new_leg:
                _dropped(tx, address, "the leg cannot carry its level")
                continue
        rcpt = S.Rcpt(address, rparams)
        if first is None:
            first = rcpt
            mail_reply, reply = await leg.start_transaction(mail, rcpt)
            if mail_reply.code // 100 != 2:
                tx.log.event("milter_sender_refused", level="warning", mail_from=sender,
                            reply=f"{mail_reply.code} {mail_reply.text}")
                return MILTER_TEMPFAIL, None
        else:
            reply = await leg.rcpt(rcpt)
        if reply is not None and reply.code // 100 == 2:
            accepted.append(address)
        else:
            _dropped(tx, address, f"{reply.code} {reply.text}" if reply else "refused")
    txn.rcpts = accepted
    facts.recipients = accepted
    txn.mail = mail
    if not accepted:
        return MILTER_TEMPFAIL, None
    return None


def _dropped(tx: Transaction, address: str, why: str) -> None:
    """A recipient a milter added that the leg cannot take: logged, and tracked under the
    milter that added it."""
    by = next((h.name for h in tx.policy.body_hooks
               if address in getattr(h, "added", ())), "")
    tx.log.event("milter_rcpt_dropped", level="warning", milter=by, rcpt=address, reason=why)
    tx.facts.milter_log.append({"milter": by, "stage": "eom", "result": "rcpt_dropped",
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

