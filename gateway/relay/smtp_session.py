"""One client SMTP session: joins the sans-IO server core to the upstream leg (SPEC §4).

The session is the event loop: it moves bytes between the client stream and `SMTPServer`,
performs the client-side TLS handshake when the core says STARTTLS (or at once on an implicit
listener), asks the policy seam at each stage, and answers the core's events with the
upstream's own replies or the gateway's tempfails. It never answers DATA with 250 before the
upstream did. Its transaction side (`transaction.SessionTransaction`, `self.tx`) owns the
upstream leg — opened lazily at the first RCPT TO for the recipient's route — and the open
envelope; DATA is one loop (`_data_loop`) in one of two modes, the message streamed to the
upstream or held for the milters, which see the transaction, never this session.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import math
import re
import time

import trio

from ..observe.clock import per_second
from ..errors import TLSError
from ..levels import ClientLevel
from ..policy.stages import Action, Verdict
from ..proto import replies as R
from ..proto import smtp_server as S
from ..observe.tracking_log import TrackingRecord, now_rfc3339
from .milter_data import HeldData
from .streamed_data import StreamedData
from .client_session import ClientSession
from .transaction import GATEWAY, Envelope, SessionTransaction, relayed
from .upstream import UpstreamFailure, UpstreamLeg

_SHUTDOWN = object()         # _receive(): the worker is draining and this session is idle


class SMTPSession(ClientSession):
    def __init__(self, rt, stream, client_addr: tuple[str, int], log, conn_id: str):
        super().__init__(rt, stream, client_addr, log, conn_id)
        facts = self.facts
        # the transaction side: the upstream leg, the open envelope, the DATA clock, and
        # the policy every stage is decided by (policy/; with milters, this session's own
        # copy, whose hooks see the transaction, never this session)
        self.tx = tx = SessionTransaction(rt, log, client_addr, facts)
        self.policy = tx.policy
        # the one DATA loop's mode: the message streamed upstream, or held for milters
        self._data_mode = HeldData(tx) if self.policy.body_hooks else StreamedData(tx)
        self._hooks = bool(self.policy.hooks)
        # a rule by client network sets the level and cipher strength at connect time (§4.3)
        self.policy.client_level(facts, log)
        level = ClientLevel(facts.client_level)
        self.type = self.listener.type          # public / private: a label (§2, §11)
        self.messages = 0
        self._transactions = 0            # MAIL FROMs so far: the transactions' ids count them
        self._auth: _AuthExchange | None = None     # the SASL exchange in progress
        self._rx_scope: trio.CancelScope | None = None
        self._rx_idle = False
        self._line_start: float | None = None   # when the partial command line began
        self.core = S.SMTPServer.for_listener(self.listener, rt.hostname, level)

    # --- the session ------------------------------------------------------------------------

    async def run(self) -> None:
        start = trio.current_time()
        self.log.event("conn_open", type=self.type)
        try:
            if self.listener.tls == "implicit":
                if not await self._handshake():
                    return
                self.core.tls_established()
            if self.listener.pregreet_wait and not await self._pregreet():
                return
            if self._hooks:
                verdict = await self.policy.connect(self.facts)
                if verdict.refused:
                    self._refuse_session(verdict)
            if not self.core.closed:
                self.core.greeting()
            await self._flush()
            # one scope for every wait on the client (see _receive), not one per read
            with trio.CancelScope() as self._rx_scope:
                await self._loop()
            if self._rx_scope.cancelled_caught:
                await self._receive_ended()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError):
            pass
        finally:
            self._track_unsent()
            with trio.CancelScope(shield=True):
                if self._hooks:
                    with trio.move_on_after(5):
                        await self.policy.close(self.facts)
                if self._auth is not None:      # the client went away inside an exchange
                    self._auth_done("cancelled")
                if self.tx.leg is not None:
                    with trio.move_on_after(2):
                        await self.tx.release(end_transaction=True)
                await self._closed(start, messages=self.messages)

    async def _loop(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            for code, text in core.take_rejections():
                self._rejected(code, text, own=True)
            if event is S.NEED_DATA:
                await self._flush()
                data = await self._receive()
                if data is _SHUTDOWN:
                    core.respond(*R.SHUTTING_DOWN)
                    await self._flush()
                    return
                core.receive_data(data)
                continue
            if isinstance(event, (S.ConnectionClosed, S.Quit)):
                if self.tx.envelope is not None and core.in_data and self.tx.leg is not None:
                    await self.tx.leg.close()          # client vanished mid-message: drop it
                await self._flush(last=True)
                return
            handler = getattr(self, "_on_" + type(event).__name__)
            await handler(event)
            if self.tx.bound_lost and not core.closed:
                self._refuse(R.AUTH_LEG_LOST, close=True)
            if core.closed:
                await self._flush(last=True)
                return

    async def _receive(self):
        """Client bytes, or _SHUTDOWN when the worker drains an idle session.

        The wait runs under the session's receive scope (`run()`): the worker's watchdog
        cancels it when the command or data timeout passes while waiting (without a
        watchdog: a scope deadline, infinite when not waiting), and while the session is
        idle the drain may cancel it. Either ends `_loop()`; `_receive_ended()` answers."""
        t = self.listener.timeouts
        core = self.core
        state = self.rt.state
        in_data = core.in_data
        idle = not core.in_transaction and not in_data
        if idle and state.draining and not state.idle_grace:
            return _SHUTDOWN
        now = trio.current_time()
        if in_data:
            deadline = now + t.data
            if t.data_min_rate:
                # after a grace of `data` seconds DATA keeps up data_min_rate bytes a second,
                # not counting the time spent blocked on the upstream (§9)
                tx = self.tx
                floor = (tx.data_start + tx.data_blocked + t.data
                         + tx.data_received / t.data_min_rate)
                if floor < deadline:
                    deadline = floor
        elif core.buffered:
            # a command line must be complete within `command` seconds of its first byte:
            # a client trickling a byte at a time does not extend it (§9)
            if self._line_start is None:
                self._line_start = now
            deadline = self._line_start + t.command
        else:
            self._line_start = None
            deadline = now + t.command
        if idle and state.draining:
            # a retired worker (§9): a session silent that long outside a transaction is idle
            deadline = min(deadline, now + state.idle_grace)
        scope = self._rx_scope
        self._rx_idle = idle
        watchdog = state.watchdog
        if watchdog.running:                # the worker's timer (gateway.relay.watchdog)
            watchdog.watch(scope, deadline)
        else:
            scope.deadline = deadline
        if idle:
            state.idle_scopes.add(scope)
        try:
            data = await self.stream.receive_some(_DATA_READ if in_data else 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSError):
            data = b""
        finally:
            if watchdog.running:
                watchdog.unwatch(scope)
            else:
                scope.deadline = math.inf
            if idle:
                state.idle_scopes.discard(scope)
        self.bytes_in += len(data)
        if in_data:
            self.tx.data_received += len(data)
        return data

    async def _pregreet(self) -> bool:
        """`220-` first, then wait `pregreet_wait` seconds: a client that talks before the
        final `220 ` is a bot that does not wait for the server (Postfix postscreen's
        pregreet test): 554 and close (§4.1). False when the session ends here."""
        self.core.pregreeting()
        await self._flush()
        early = b""
        with trio.move_on_after(self.listener.pregreet_wait):
            try:
                early = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            if not early:
                return False                # gone before the greeting
        if not early:
            return True
        self.bytes_in += len(early)
        self.log.event("reject", code=554, reason="pregreet", bytes=len(early))
        self.metrics.connections_rejected_total.labels(self.name, self.type, "pregreet").inc()
        self.core.respond(*R.SYNC_ERROR, close=True)
        await self._flush(last=True)
        return False

    async def _receive_ended(self) -> None:
        """The receive scope fired: the drain of an idle session, or a timeout."""
        if self._rx_idle and self.rt.state.draining:
            self.core.respond(*R.SHUTTING_DOWN)
        else:
            self.core.respond(*R.TIMEOUT)
            self.log.event("reject", code=421, reason="timeout")
            self._track_unsent(R.TIMEOUT)       # a message cut by the timeout ends here
        await self._flush()

    # --- TLS on the client leg (the handshake: ClientSession._handshake) --------------------

    async def _on_StartTLS(self, event) -> None:
        self.core.respond(*R.READY_TLS)
        await self._flush()
        discarded = self.core.start_tls()
        if discarded:
            self.log.event("starttls_injection", level="warning", discarded=discarded)
        if not await self._handshake():
            self.core.close()
            return
        self.core.tls_established()
        await self._end_transaction()

    # --- envelope ---------------------------------------------------------------------------

    async def _on_Hello(self, event) -> None:
        self.facts.helo = event.name
        await self._end_transaction()
        if self._hooks:
            verdict = await self.policy.helo(self.facts)
            if verdict.refused:
                self._refuse_session(verdict)

    async def _on_Reset(self, event) -> None:
        await self._end_transaction()

    async def _end_transaction(self) -> None:
        self._track_unsent()
        if self._hooks and self.tx.envelope is not None:
            await self.policy.abort(self.facts)
        self.tx.envelope = None
        self.facts.sender = None
        if self.tx.leg is not None:
            await self.tx.leg.reset()

    async def _on_Mail(self, event: S.Mail) -> None:
        # the transaction's one id (§7): its tracking record, the milters' macro i, the
        # Received header and the `message` event all carry it
        self._transactions += 1
        txn_id = self.facts.queue_id = f"{self.conn_id}.{self._transactions}"
        if self._hooks:
            self._track_unsent()
            self.facts.milter_log = []
        verdict = await self.policy.mail(self.facts, event.address, event.params)
        if verdict.refused:
            self._refuse_by(verdict)
            # a refusal at MAIL FROM is counted and tracked too (§7, §11)
            code, text = verdict.reply
            self._end(Envelope(event, txn_id), _refused(code), f"{code} {_text(text)}",
                      0, [])
            return
        if self.tx.leg is not None:
            await self.tx.leg.reset()
        self._track_unsent()
        self.tx.envelope = Envelope(event, txn_id)
        if verdict.action is Action.DISCARD:     # a milter: dropped at its end (§4.7)
            self.tx.envelope.discard = verdict.reason
        self.facts.sender = event.address
        self.core.respond(*R.MAIL_OK)

    async def _on_Rcpt(self, event: S.Rcpt) -> None:
        txn = self.tx.envelope
        txn.attempted.append(event.address)
        if txn.failure is not None:
            self._refuse(txn.failure)
            return
        if txn.refusal is not None:
            txn.last_refusal = (txn.refusal.code, " / ".join(txn.refusal.lines))
            self.core.respond(*relayed(txn.refusal))
            return
        legs = self.tx
        leg = await legs.settle()
        if leg is None and legs.bound:
            # the authenticated leg broke: no credentials to log in again (§4.6)
            self._refuse(R.UPSTREAM_LOST, close=True)
            return
        # the leg is fixed by the transaction's first accepted recipient (§4.3)
        self.facts.recipients = txn.rcpts
        verdict = await self.policy.rcpt(self.facts, event.address, event.params, leg)
        if verdict.refused:
            self._refuse_by(verdict)
            return
        if verdict.action is Action.DISCARD:     # a milter: dropped at its end (§4.7)
            txn.discard = verdict.reason
        route = verdict.route
        if verdict.new_leg:
            # between transactions, or no recipient accepted on it yet: RSET and let go
            await legs.release(end_transaction=True)
            leg = None
        if leg is None and txn.failed_levels:
            failed = txn.failed_levels.get((route.key, route.level))
            if failed is not None:
                # TLS at this level failed once in this transaction: the same tempfail, no
                # second connection (nor alert) for each such recipient
                self._refuse(failed)
                return
        try:
            if leg is None:
                await self._flush()
                leg = await legs.open(route, client_helo=self.core.helo)
            if "SMTPUTF8" in txn.mail.params:
                verdict = self.policy.upstream_extensions(leg)
                if verdict.refused:
                    self._refuse_by(verdict)
                    return
            if not leg.in_transaction:
                mail, reply = await self._start_transaction(txn, event, route)
                leg = self.tx.leg               # the envelope reached the upstream on this leg
                txn.upstream_leg = "tls" if leg.tls is not None else "plain"
                txn.upstream_tls = f"{leg.tls.version} {leg.tls.cipher}" if leg.tls else None
                if mail.code // 100 != 2:
                    txn.refusal = mail
                    txn.last_refusal = (mail.code, " / ".join(mail.lines))
                    self.core.respond(*relayed(mail))
                    return
            else:
                self._note_dsn(event.params, leg)
                reply = await leg.rcpt(event)
        except UpstreamFailure as failure:
            await legs.failed(failure, [event.address])
            if failure.tls_required:
                # this recipient's level could not be had: its own 451 4.7.5, and the leg
                # is closed; a later recipient at another level may open one (§4.3)
                txn.failed_levels[(route.key, route.level)] = failure.reply
            else:
                txn.failure = failure.reply     # the upstream is unreachable or was lost
            self._refuse(failure.reply)
            return
        if reply.code // 100 == 2:
            txn.rcpts.append(event.address)
            self.facts.recipients = txn.rcpts
            if self._hooks:
                txn.rcpt_params[event.address] = event.params
        else:
            txn.last_refusal = (reply.code, " / ".join(reply.lines))
        self.core.respond(*relayed(reply))

    async def _start_transaction(self, txn: Envelope, rcpt: S.Rcpt, route):
        """MAIL replayed with the first RCPT (`Legs.start_transaction`)."""
        legs = self.tx
        self._note_dsn({**txn.mail.params, **rcpt.params}, legs.leg)
        return await legs.start_transaction(legs.mail_for_upstream(txn.mail), rcpt, route,
                                            client_helo=self.core.helo)

    def _note_dsn(self, params: dict, leg: UpstreamLeg) -> None:
        """DSN parameters towards an upstream without DSN are dropped (it would refuse them)
        and logged: a queue-less gateway cannot send the notices itself (§4.1)."""
        if "DSN" not in leg.extensions:
            dropped = [k for k in _DSN_PARAMS if k in params]
            if dropped:
                self.log.event("dsn_dropped", params=",".join(dropped))

    def _refuse_by(self, verdict: Verdict) -> None:
        """A policy stage's refusal: answered, logged and counted by the verdict's label."""
        self._refuse(verdict.reply, close=verdict.close, label=verdict.label)

    def _refuse_session(self, verdict: Verdict) -> None:
        """A refusal at connect or HELO (§4.7): logged and counted once, by the verdict's
        label; the core then answers every later command but QUIT, NOOP and RSET with it,
        so nothing of the session reaches the upstream. A closing one (or a 421) is sent
        at once and ends the session."""
        code, text = verdict.reply
        self._rejected(code, text, label=verdict.label)
        if verdict.close or code == 421:
            self.core.respond(code, text, close=True)
        else:
            self.core.refuse_session(code, text)

    def _refuse(self, reply: tuple[int, str], close: bool = False, label: str | None = None
                ) -> None:
        if self.tx.envelope is not None:
            self.tx.envelope.last_refusal = (reply[0], _text(reply[1]))
        self._rejected(*reply, label=label)
        self.core.respond(*reply, close=close)

    def _rejected(self, code: int, text, label: str | None = None, own: bool = False) -> None:
        """Log a refusal; count it as a policy rejection when a policy stage refused
        (*label*: the verdict's, from a fixed set) or when it is one of the gateway's own
        replies (*own*: the SMTP core's; else one of proto.replies') with a code §4.5 makes
        final or closing, as `<code>_<enhanced code>` of that fixed text. Label values never
        come from client, milter or upstream text (§11): an upstream's refusal relayed to
        the client is not a policy rejection (`gateway_messages_total` counts it)."""
        text = _text(text)
        self.log.event("reject", code=code, reason=text)
        if label is None and code in _COUNTED_CODES and (own or (code, text) in _OWN_REPLIES):
            label = f"{code}_{text.split(' ')[0]}"
        if label is not None:
            self.metrics.policy_rejections_total.labels(self.name, label).inc()

    # --- AUTH (§4.6) -----------------------------------------------------------------------

    async def _on_Auth(self, event: S.Auth) -> None:
        """Open a leg of this session's own at upstream.tls and relay the SASL exchange."""
        verdict = self.policy.auth_rules(self.facts)
        if verdict.refused:
            self._refuse_by(verdict)
            return
        if event.malformed:             # a bare CR, LF or NUL: nothing of it upstream (§4.6)
            self._auth = _AuthExchange(event.mechanism)
            self._auth_done("error")
            self._refuse(R.AUTH_BAD_RESPONSE)
            return
        await self.tx.release()
        self._auth = _AuthExchange(event.mechanism)
        self._auth.user_from(event.initial)
        route = self.policy.session_route(self.facts)
        try:
            await self._flush()
            leg = await self.tx.open(route, client_helo=self.core.helo, pooled=False)
        except UpstreamFailure as failure:
            await self.tx.failed(failure, [])
            self._auth_done("error")
            self._refuse(failure.reply)
            return
        await self._auth_relay(leg.auth(event.mechanism, event.initial))

    async def _on_AuthResponse(self, event: S.AuthResponse) -> None:
        auth = self._auth
        if event.too_long:
            auth.cancelled = True
            await self._auth_relay(self.tx.leg.auth_response("*"), answer=R.AUTH_LINE_TOO_LONG)
            return
        if event.malformed:
            # a bare CR, LF or NUL: never relayed; `*` ends the exchange upstream (§4.6)
            auth.cancelled = True
            await self._auth_relay(self.tx.leg.auth_response("*"), answer=R.AUTH_BAD_RESPONSE,
                                   result="error")
            return
        if event.line == "*":
            auth.cancelled = True
        else:
            auth.user_from(event.line)
        await self._auth_relay(self.tx.leg.auth_response(event.line))

    async def _auth_relay(self, sending, answer=None, result: str | None = None) -> None:
        """Await *sending* (the leg sending one line of the exchange: `leg.auth()` or
        `leg.auth_response()`) and relay the reply: a 334 challenge, or the final reply
        unchanged. *answer* replaces it when the gateway cancelled the exchange with `*`
        (an over-long or malformed response), and *result* is then the `auth` event's."""
        try:
            reply = await sending
        except UpstreamFailure as failure:
            await self.tx.failed(failure, [])
            self._auth_done(result or "error")
            self._refuse(answer or failure.reply)
            return
        if reply.code == 334 and answer is None:
            self.core.respond(*relayed(reply))
            return
        if reply.code == 235 and answer is None:
            auth = self._auth_done("success")
            self.facts.auth_mechanism = auth.mechanism
            self.facts.auth_user = auth.user or ""
            self.tx.bind()
            self.core.respond(*relayed(reply))
            return
        # refused or cancelled: the leg is closed, never pooled (§4.6)
        await self.tx.drop()
        cancelled = self._auth.cancelled
        self._auth_done(result or ("cancelled" if cancelled else "failure"))
        self.core.respond(*(answer or relayed(reply)))
        if not cancelled:
            verdict = self.policy.auth_failed(self.facts)
            if verdict.refused:
                self._refuse_by(verdict)

    def _auth_done(self, result: str) -> "_AuthExchange":
        """The exchange is over: logged and counted (never its lines); returns it."""
        auth, self._auth = self._auth, None
        self.log.event("auth", mechanism=auth.mechanism, user=auth.user or "", result=result)
        self.metrics.auth_total.labels(self.name, auth.mechanism, result).inc()
        return auth

    # --- message ----------------------------------------------------------------------------

    async def _on_Data(self, event) -> None:
        """The one DATA loop, in its mode (`_data_mode`): the message streamed to the
        upstream after its 354 (`StreamedData`), or held for the milters after the
        gateway's own (`HeldData`, §4.7)."""
        tx = self.tx
        txn = tx.envelope
        mode = self._data_mode
        header = self._received_header() if self.listener.received_header else None
        reply, refusal = await mode.begin()
        if not txn.data_started:
            # DATA refused: the message ends with that refusal when the transaction does
            txn.data_refused = True
            if refusal is None:             # the upstream's own, relayed
                self.core.respond(*reply)
            elif refusal is GATEWAY:
                self._refuse(reply)
            else:                           # a policy stage's
                self._refuse_by(refusal)
            return
        self.core.respond(*reply)
        try:
            if mode.keepalive is None:
                await mode.start(header)
                await self._data_loop(mode)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mode.keepalive.run)
                await mode.start(header)
                await self._data_loop(mode)
                mode.keepalive.cancel()
        finally:
            mode.close()

    async def _data_loop(self, mode) -> None:
        """The client's message, event by event, to *mode*, until the final dot is
        answered; a client gone mid-message is left for `_loop()` to see and end on."""
        core = self.core
        tx = self.tx
        while True:
            event = core.next_event()
            for code, text in core.take_rejections():
                self._rejected(code, text, own=True)
            if event is S.NEED_DATA:
                await mode.send()           # what one read brought goes out in one write
                await self._flush()
                core.receive_data(await self._receive())
                continue
            kind = type(event)
            if kind is S.DataChunk:
                tx.msg_bytes += len(event.data)
                await mode.chunk(event.data)
            elif kind is S.DataAbort:
                await mode.abort(event.reason)
            elif kind is S.DataEnd:
                reply, result, label = await mode.end(event)
                await self._message_done(tx.envelope, reply, event.size, result, label=label)
                return
            else:                           # ConnectionClosed: the client went away
                await mode.gone()
                return

    async def _message_done(self, txn: Envelope, reply, size: int,
                            result: str | None = None, label: str | None = None) -> None:
        """The answer to the final dot: the transaction ends (`_end`), the reply is sent; the
        leg dropped when it broke. *result* overrides the one the reply code gives
        (`discarded`); *label*: a policy stage's refusal (a milter's), counted under it."""
        code = reply[0]
        if result is None:
            result = "accepted" if code // 100 == 2 else _refused(code)
        if result not in ("accepted", "discarded"):
            self._rejected(code, reply[1], label=label)
        self._end(txn, result, f"{code} {_text(reply[1])}", size, txn.rcpts)
        leg = self.tx.leg
        if leg is not None and leg.closed:
            await self.tx.drop()
        self.tx.envelope = None
        self.core.respond(*reply)

    def _track_unsent(self, cut=None) -> None:
        """The transaction ends without an answer to a final dot (RSET, HELO, STARTTLS, a new
        MAIL, QUIT, the session's end, a timeout). It ends as a message when it was one:
        cut mid-DATA (the client vanished, a timeout: *cut* is the reply it got) it is a
        tempfail; with every recipient refused, or DATA refused, it ends with that refusal.
        A transaction the client gave up before DATA, with a recipient accepted, is no
        message and is not counted."""
        txn = self.tx.envelope
        if txn is None or txn.ended:
            return
        if txn.data_started:
            reply = f"{cut[0]} {_text(cut[1])}" if cut is not None else ""
            self._end(txn, "tempfail", reply, self.tx.msg_bytes, txn.rcpts)
        elif txn.last_refusal is not None and (not txn.rcpts or txn.data_refused):
            code, text = txn.last_refusal
            self._end(txn, _refused(code), f"{code} {text}", 0, txn.rcpts or txn.attempted)

    def _end(self, txn: Envelope, result: str, reply: str, size: int, rcpts) -> None:
        """The one place a transaction ends (SPEC §7, §11): counted in messages_total (and
        /status), logged as event=message, tracked; once per transaction, whatever calls."""
        if txn.ended:
            return
        txn.ended = True
        self.metrics.messages_total.labels(self.name, self.type, result).inc()
        self.rt.state.recent.message(self.rt.index)        # /status: the last minute
        if result == "accepted":
            self.messages += 1
            self.metrics.message_bytes_total.labels(self.name, self.type).inc(size)
        leg = self.tx.leg
        self.log.event(
            "message", id=txn.id, result=result, mail_from=txn.mail.address, rcpts=",".join(rcpts),
            size=size, reply=reply, client_tls=self.tls.version if self.tls else "none",
            upstream_tls=(leg.tls.version if leg is not None and leg.tls else "none"),
        )
        self._track(txn, result, reply, size, rcpts)

    def _track(self, txn: Envelope, result: str, reply: str, size: int, rcpts) -> None:
        tracking = self.rt.state.tracking
        if tracking is None:
            return
        leg = self.tx.leg
        tracking.write(TrackingRecord(
            id=txn.id, time=now_rfc3339(), listener=self.name,
            client=f"{self.client_addr[0]}:{self.client_addr[1]}", helo=self.core.helo,
            mail_from=txn.mail.address, recipients=list(rcpts), size=size,
            client_tls=f"{self.tls.version} {self.tls.cipher}" if self.tls else None,
            upstream=f"{self.rt.upstream.host}:{self.rt.upstream.port}",
            upstream_tls=txn.upstream_tls or (f"{leg.tls.version} {leg.tls.cipher}"
                                              if leg is not None and leg.tls is not None
                                              else None),
            upstream_leg=txn.upstream_leg, auth_user=self.facts.auth_user,
            result=result, reply=reply, milter=self._milter_record()))

    def _milter_record(self) -> list[dict] | None:
        """The milters' verdicts for this transaction's record (None without milters)."""
        if not self._hooks:
            return None
        entries, self.facts.milter_log = self.facts.milter_log, []
        return entries

    def _received_header(self) -> bytes:
        """The trace header, in Postfix's form (§4.4). Of its parts the client chose the HELO
        name (the core refuses one with a control character) and the recipient; both pass
        `_header_text` all the same, so no client text can end the header's lines. The
        address is a parsed IP, the TLS names are OpenSSL's, the rest the gateway's own."""
        ip = self.client_addr[0]
        helo = _header_text(self.core.helo or "unknown")
        esmtp = "ESMTP" if self.core.esmtp_session else "SMTP"
        lines = [f"Received: from {helo} (unknown [{ip}])"]
        if self.tls is not None:
            t = self.tls
            lines.append(f"\t(using {t.version} with cipher {t.cipher} ({t.bits}/{t.bits} bits))")
            esmtp += "S"
        if self.core.authenticated:
            esmtp += "A"                # ESMTPSA (ESMTPA on plaintext), as Postfix writes
        for_part = (f"\n\tfor <{_header_text(self.tx.envelope.rcpts[0])}>"
                    if len(self.tx.envelope.rcpts) == 1 else "")
        date = _received_date(int(time.time()))
        lines.append(f"\tby {self.rt.hostname} (mail-tls-gateway) with {esmtp} id {self.tx.envelope.id}"
                     f"{for_part}; {date}")
        text = "\n".join(lines).replace("\n", "\r\n") + "\r\n"
        return text.encode("utf-8", "surrogateescape")


# The Received header's date (RFC 5322, UTC), formatted once per second.
_received_date = per_second(lambda second: email.utils.format_datetime(
    datetime.datetime.fromtimestamp(second, datetime.timezone.utc)))


_HEADER_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _header_text(text: str) -> str:
    """Client text for a header the gateway writes: control characters (CR, LF, NUL, TAB...)
    become ``?``, so it can never end or fold a line."""
    return _HEADER_CONTROL.sub("?", text)


class _AuthExchange:
    """One AUTH exchange: its mechanism and the authentication identity read from a PLAIN
    or LOGIN response (never the password; nothing of the exchange is logged)."""

    def __init__(self, mechanism: str):
        self.mechanism = mechanism
        self.user: str | None = None
        self.cancelled = False
        self._responses = 0

    def user_from(self, response: str | None) -> None:
        if response is None:
            return
        first = self._responses == 0
        self._responses += 1
        if self.user is not None or not first or response == "=":
            return
        try:
            raw = base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return
        if self.mechanism == "PLAIN":
            parts = raw.split(b"\0")
            raw = parts[1] if len(parts) == 3 else b""
        elif self.mechanism != "LOGIN":
            return
        self.user = raw.decode("utf-8", "replace")[:256] or None


_DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")
_COUNTED_CODES = frozenset((421, 530, 550, 552, 553, 554, 555))   # refusals counted as policy
# the gateway's own replies (proto.replies): the only texts a policy_rejections label is read
# from, so its values form a fixed set (§11)
_OWN_REPLIES = frozenset(v for v in vars(R).values()
                         if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int)
                         and isinstance(v[1], str))
_DATA_READ = 262144          # client bytes read at once during DATA (commands: 64 KiB)


def _text(text) -> str:
    return text if isinstance(text, str) else " / ".join(text)


def _refused(code: int) -> str:
    """The result of a transaction refused with *code*."""
    return "tempfail" if code // 100 == 4 else "rejected"
