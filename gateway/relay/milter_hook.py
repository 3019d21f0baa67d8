"""One milter for one client session, joined to the policy seam (SPEC §4.7).

`milter_factories(listener)` gives the `StagePolicy` one factory per configured milter; each
client session gets its own `MilterHook` (its own milter connection) from
`policy.for_session(txn)`, where *txn* is the session's `Transaction`
(relay.transaction: the listener's runtime, the log, the facts — never the session object).
The hook drives `MilterClient` stage by stage with the macros
Postfix sends by default, and turns the milter's answers into the seam's verdicts:

- continue / accept: go on (accept spares the milter the rest, as the client core knows);
- reject, tempfail, replycode: a refusal with the milter's reply (at RCPT for that recipient,
  at MAIL, DATA or the end of the message for the transaction; a refusal at connect or HELO
  answers every later command of the session but QUIT, NOOP and RSET: the session's core
  does that, `SMTPServer.refuse_session`);
- discard: the message is dropped at its end (250 2.7.0), never relayed;
- quarantine (end of message): relayed with `X-Gateway-Quarantine: <milter>: <reason>`;
- the end of message's changes ride on the verdict (`edits`).

A milter that cannot be reached, times out, closes or breaks the protocol gets its
`default_action`: `tempfail` (451 4.7.1) or `reject` (550 5.7.1) answers this stage and every
later one of the session, `accept` goes on without it. Each verdict that decides something
(and every end of message) is logged as event `milter`, counted in
`gateway_milter_results_total` and kept for the transaction's tracking record; its end of
message observes the time its answers took since MAIL FROM in `gateway_milter_seconds`.
A refusal is counted in `gateway_policy_rejections_total` as `milter_<result>` (reject,
tempfail, replycode; error or timeout for a failed milter's default_action), never by
its text.

The message reaches the hook as text (`body()` chunks: CRLF lines, not dot-stuffed, the
gateway's Received: first); the hook splits off the header fields itself and sends them one by
one, then end of headers, then the body.

Its changes are bounded (§4.7): the client core's `ChangeLimits` (1,000 header changes and
added recipients, 64 KiB a header, the changes within `max_message_size`), the replacement
body spooled as it arrives (`ReplacementBody`: memory up to `milter_memory`, then a file),
and the message as changed — the header fields it saw with its header changes applied, and
its body or the new one — at most `max_message_size`. Beyond any of them the milter failed
(`error`): its `default_action`, none of its changes applied.
"""
from __future__ import annotations

import re
from functools import partial

import trio

from .. import __version__
from ..policy.stages import CONTINUE, Action, Hook, Verdict
from ..proto import milter as M
from ..proto.message import HeaderSplitter, apply_header_edits, split_field
from .held_message import ReplacementBody
from .milter_client import MilterClient, MilterError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MILTER_TEMPFAIL = (451, "4.7.1 Service unavailable - try again later")
MILTER_REJECT = (550, "5.7.1 Message content rejected")
MTA_NAME = f"mail-tls-gateway {__version__}"


def milter_factories(listener) -> tuple:
    """One factory per milter of *listener*, each making a session's `MilterHook`."""
    return tuple(partial(MilterHook, spec) for spec in listener.milters)


class MilterHook(Hook):
    wants_body = True

    def __init__(self, spec, txn):
        self.spec = spec
        self.name = spec.name
        self.txn = txn                  # the session's Transaction, never the session
        self.client = MilterClient(spec.address, name=spec.name,
                                   connect_timeout=spec.connect_timeout,
                                   command_timeout=spec.command_timeout,
                                   content_timeout=spec.content_timeout)
        self.failed: Verdict | None = None      # default_action's refusal after a failure
        self.off = False                        # default_action accept: left out
        self._macros: dict[str, str] = {}       # every macro so far (for SETSYMLIST)
        self._splitter: HeaderSplitter | None = None
        self._eoh_sent = False
        self._in_message = False
        self.added: tuple[str, ...] = ()         # recipients its last end of message added
        self._spent = 0.0                        # this message's time in its answers
        # the message as this milter was given it: header fields (bounded by the splitter's
        # MAX_HEADER_BLOCK), the empty line after them, the body's size
        self._seen_fields: list[bytes] = []
        self._seen_separator = b""
        self._seen_body = 0
        self._new_body: ReplacementBody | None = None   # its end of message's new body

    @property
    def may_change(self) -> bool:
        return not self.off and self.failed is None and self.client.core.may_change

    # --- stages -----------------------------------------------------------------------------

    async def connect(self, facts) -> Verdict:
        rt = self.txn.rt
        # {daemon_name}: the gateway's hostname, Postfix's milter_macro_daemon_name default
        # ($myhostname); rspamd takes its authserv-id from it
        macros = {"j": rt.hostname, "_": f"unknown [{facts.client_ip}]",
                  "v": MTA_NAME, "{daemon_name}": rt.hostname,
                  "{daemon_addr}": rt.listener.host,
                  "{client_addr}": facts.client_ip, "{client_port}": str(facts.client_port),
                  "{client_name}": "unknown"}

        async def run():
            await self.client.open()
            return await self.client.connect(f"[{facts.client_ip}]", facts.client_ip,
                                             facts.client_port, macros=self._stage(macros))
        return await self._run("connect", run)

    async def helo(self, facts) -> Verdict:
        macros = {}
        tls = facts.tls
        if tls is not None:
            macros = {"{tls_version}": tls.version, "{cipher}": tls.cipher,
                      "{cipher_bits}": str(tls.bits)}
            if tls.verified:
                # as Postfix: only for a trusted client certificate, its subject CN and its
                # issuer's CN (the issuer's O when it has none)
                macros["{cert_subject}"] = tls.peer_cn or ""
                macros["{cert_issuer}"] = tls.issuer_cn or ""
        return await self._run("helo", lambda: self.client.helo(
            facts.helo or "unknown", macros=self._stage(macros)))

    async def mail(self, facts, address: str, params: dict) -> Verdict:
        self._in_message = True
        self._spent = 0.0
        macros = {"i": facts.queue_id or "", "{mail_addr}": address,
                  "{mail_host}": self.txn.rt.upstream.host, "{mail_mailer}": "smtp"}
        if facts.auth_user is not None:
            macros.update({"{auth_type}": facts.auth_mechanism or "",
                           "{auth_authen}": facts.auth_user})
            author = params.get("AUTH")
            if author and author != "<>":
                # MAIL FROM's AUTH= value as given (Postfix's sasl_sender); only on an
                # authenticated session (elsewhere the gateway sends AUTH=<> on, RFC 4954)
                macros["{auth_author}"] = _CONTROL.sub("?", author)
        args = [f"<{address}>", *_params(params)]
        return await self._run("mail", lambda: self.client.mail(
            args, macros=self._stage(macros)))

    async def rcpt(self, facts, address: str, params: dict) -> Verdict:
        macros = {"{rcpt_addr}": address, "{rcpt_host}": self.txn.rt.upstream.host,
                  "{rcpt_mailer}": "smtp"}
        args = [f"<{address}>", *_params(params)]
        return await self._run("rcpt", lambda: self.client.rcpt(
            args, macros=self._stage(macros)))

    async def data(self, facts) -> Verdict:
        self._splitter = HeaderSplitter()
        self._eoh_sent = False
        self._seen_fields = []
        self._seen_separator = b""
        self._seen_body = 0
        return await self._run("data", lambda: self.client.data(
            macros=self._stage({"i": facts.queue_id or ""})))

    async def body(self, facts, chunk: bytes) -> Verdict:
        if self.failed is not None or self.off:
            return self.failed or CONTINUE
        fields, body = self._splitter.feed(chunk)
        return await self._content(facts, fields, body)

    async def eom(self, facts) -> Verdict:
        if self.failed is not None or self.off:
            return self.failed or CONTINUE
        splitter = self._splitter
        if splitter is not None:
            fields, body = splitter.finish()
            verdict = await self._content(facts, fields, body)
            if verdict.action is not Action.CONTINUE:
                return verdict
        self._splitter = None
        self._in_message = False
        self.added = ()
        rt = self.txn.rt
        spool_dir, memory = rt.milter_spool
        limit = rt.listener.max_message_size
        self._new_body = new_body = ReplacementBody(spool_dir, memory, limit)
        verdict = CONTINUE
        try:
            verdict = await self._run(
                "eom", lambda: self.client.eom(macros=self._stage({"i": facts.queue_id or ""}),
                                               max_size=limit, on_body=new_body.write),
                check=lambda answer: self._changed_size(answer, new_body, limit))
        finally:
            self._new_body = None
            if not any(edit is new_body for edit in verdict.edits):
                new_body.close()             # not handed over with the changes
        rt.state.metrics.milter_seconds.labels(rt.listener.name, self.name).observe(
            self._spent)
        return verdict

    async def abort(self, facts) -> None:
        self._splitter = None
        if not self._in_message or self.failed is not None or self.off:
            return
        self._in_message = False
        try:
            await self.client.abort()
        except MilterError as exc:
            self._failure("abort", exc.result, exc.reason)

    async def close(self, facts) -> None:
        await self.client.quit()

    # --- internals --------------------------------------------------------------------------

    async def _content(self, facts, fields: list[bytes], body: bytes) -> Verdict:
        """Header fields, then end of headers once the block ended, then body bytes."""
        client = self.client
        self._seen_fields.extend(fields)
        self._seen_body += len(body)
        if self._splitter is not None and self._splitter.eoh:
            self._seen_separator = self._splitter.separator
        for raw in fields:
            name, value = split_field(raw)
            verdict = await self._run("header", lambda: client.header(name, value))
            if verdict.action is not Action.CONTINUE:
                return verdict
        if not self._eoh_sent and self._splitter is not None and self._splitter.eoh:
            self._eoh_sent = True
            verdict = await self._run("eoh", lambda: client.eoh(
                macros=self._stage({"i": facts.queue_id or ""})))
            if verdict.action is not Action.CONTINUE:
                return verdict
        if body:
            return await self._run("body", lambda: client.body(body))
        return CONTINUE

    def _stage(self, macros: dict[str, str]) -> dict[str, str]:
        """The macros to offer at a stage: the stage's own, or, when the milter chose its
        lists (SETSYMLIST), every one known so far (the client picks what it asked for)."""
        self._macros.update(macros)
        negotiated = self.client.negotiated
        if negotiated is not None and negotiated.symlists:
            return dict(self._macros)
        return macros

    def _changed_size(self, answer: M.Verdict, new_body: ReplacementBody,
                      limit: int) -> str | None:
        """Why the message as *answer* changes it may not go on (over *limit* octets,
        headers included), or None."""
        if answer.action not in (M.Action.CONTINUE, M.Action.ACCEPT, M.Action.QUARANTINE):
            return None                          # nothing of it is applied
        try:
            new_body.finish()
        except M.ChangeLimitError as exc:
            return exc.reason
        fields = apply_header_edits(self._seen_fields, answer.modifications)
        body = new_body.size if new_body.started else self._seen_body
        separator = len(self._seen_separator) or (2 if body else 0)
        size = sum(len(f) + 2 for f in fields) + separator + body
        if size > limit:
            return f"the message as changed has {size} octets (max_message_size {limit})"
        return None

    async def _run(self, stage: str, call, check=None) -> Verdict:
        if self.failed is not None:
            return self.failed
        if self.off:
            return CONTINUE
        started = trio.current_time()
        try:
            answer = await call()
            problem = check(answer) if check is not None else None
            if problem is not None:
                return self._failure(stage, "error", problem)
        except MilterError as exc:
            return self._failure(stage if exc.stage in ("open", "negotiate") else exc.stage,
                                 exc.result, exc.reason)
        except trio.Cancelled:
            # the session's deadline (the one after the final dot) or its end: the
            # conversation is out of step now and the milter is not asked again
            self._failure(stage, "timeout", "cut short by the session's deadline")
            raise
        finally:
            self._spent += trio.current_time() - started
        return self._verdict(stage, answer)

    def _verdict(self, stage: str, answer: M.Verdict) -> Verdict:
        action = answer.action
        if answer.replied and (action is not M.Action.CONTINUE or stage == "eom"):
            self._record(stage, action.value, answer)
        if stage == "eom":
            self.added = tuple(m.address.strip().strip("<>") for m in answer.modifications
                               if isinstance(m, M.AddRecipient))
        edits = answer.modifications
        new_body = self._new_body
        if stage == "eom" and new_body is not None and new_body.started:
            edits += (new_body,)                 # the new body, spooled as it came
        if action in (M.Action.CONTINUE, M.Action.ACCEPT):
            return Verdict(edits=edits) if edits else CONTINUE
        if action is M.Action.DISCARD:
            return Verdict(Action.DISCARD, reason=self.name)
        if action is M.Action.QUARANTINE:
            note = f"{self.name}: {answer.reason or 'quarantined'}"
            return Verdict(Action.QUARANTINE, reason=note, edits=edits, quarantine=(note,))
        # counted as milter_<result>, never by the milter's words (§11)
        return Verdict(Action.REFUSE, answer.reply, label=f"milter_{action.value}",
                       reason=self.name)

    def _failure(self, stage: str, result: str, reason: str) -> Verdict:
        self._record(stage, result, reason=reason)
        action = self.spec.default_action
        if action == "accept":
            self.off = True
            return CONTINUE
        self.failed = Verdict(Action.REFUSE,
                              MILTER_TEMPFAIL if action == "tempfail" else MILTER_REJECT,
                              label=_FAILURE_LABELS.get(result, "milter_error"),
                              reason=self.name)
        return self.failed

    def _record(self, stage: str, result: str, answer: M.Verdict | None = None,
                reason: str | None = None) -> None:
        txn = self.txn
        fields = {}
        if answer is not None and answer.reply is not None:
            code, text = answer.reply
            fields["reply"] = f"{code} {text if isinstance(text, str) else ' / '.join(text)}"
        if answer is not None and answer.reason:
            fields["reason"] = answer.reason
        if reason is not None:
            fields["reason"] = reason
        level = "warning" if result in ("error", "timeout") else "info"
        txn.log.event("milter", level=level, milter=self.name, stage=stage, result=result,
                      **fields)
        txn.rt.state.metrics.milter_results_total.labels(txn.rt.listener.name, self.name,
                                                         result).inc()
        txn.facts.milter_log.append({"milter": self.name, "stage": stage,
                                         "result": result})


# gateway_policy_rejections_total's reason when a failed milter's default_action refuses
_FAILURE_LABELS = {"error": "milter_error", "timeout": "milter_timeout"}


def _params(params: dict) -> list[str]:
    return [f"{k}={v}" if v is not None else k for k, v in params.items()]
