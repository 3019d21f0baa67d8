"""The policy seam: each stage of a transaction is decided here (SPEC §4.3, §4.6, §4.7).

A session (SMTP or IMAP) asks its listener's `StagePolicy` at every stage — connect, HELO,
MAIL, RCPT, DATA, end of headers, body, end of message — and acts on the `Verdict`: go on,
refuse with a reply (and perhaps close), or, at RCPT, carry the recipient at a resolved
upstream level. The session never decides policy itself; it moves bytes and legs.

The gateway's own policy comes first (the encryption and client rules of §4.3 and AUTH's
checks of §4.6, below), then every joined `Hook` in order (the milters of §4.7), without
touching the session loop. A hook's stage methods are coroutines because a hook may wait (a
milter round trip); the rules never wait, and a session without hooks skips the stages only
hooks answer (connect, HELO, abort, close). A hook that
needs the message body says so (`wants_body`); `eom()` answers may discard, quarantine or
carry edits. Metric labels come from the verdict (`Verdict.label`), not from reply text.

The checks around the stages are verdicts too, each with its fixed label: the connection
limits before any session (`admit`, `admit_address`: `max_connections`, `per_ip`), a
refusal at connect or HELO (the session then answers every later command with it, §4.7),
AUTH's failure count (`auth_failed`), SMTPUTF8 towards an upstream without it
(`upstream_extensions`) and IMAP's LOGIN gate (`login`: `imap_tls_required`,
`imap_client_cert`). IMAP sessions go through the connect stage and the login gate as SMTP
sessions go through theirs.

Hooks that hold state per client session (a milter's connection) join through factories:
`StagePolicy(listener, session_hooks=(factory, ...))`, and each session works with
`policy.for_session(txn)` (the factories get the session's transaction, relay.transaction's
`Transaction`, not the session), a copy holding that session's own hooks (without factories
that is the listener's policy itself: nothing is built, nothing costs more).

The message goes to the body hooks as the session holds it (`body()` with each chunk of the
message text, headers included): streamed as it arrives to the first body hook and, after it,
to each hook while every earlier one declared it changes nothing (`may_change`); at the end
of the message (`eom(facts, message)`) every later hook first gets the message as the earlier
ones left it (`message.chunks()`, their edits applied with `message.apply()`), as Postfix's
cleanup applies one milter's changes before the next reads the queue file.

`gateway policy` (the operator's "what would happen") runs these same stages with the facts
given on its command line (`run_now()`), so its answer is the sessions' own.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum

from ..proto import replies as R
from ..proto.imap_server import PRIVACY_CERT, PRIVACY_TLS
from ..levels import CipherGrade, ClientLevel, SenderEncryption, UpstreamLevel
from .route import Route
from ..rules import ClientPolicy, EncryptionPolicy, cipher_meets


class Action(Enum):
    CONTINUE = "continue"        # no objection: the next check, then the upstream, decides
    REFUSE = "refuse"            # answer `reply` (and close when `close`)
    DISCARD = "discard"          # end of message: 250 2.7.0 to the client, nothing upstream
    QUARANTINE = "quarantine"    # end of message: relayed with X-Gateway-Quarantine


@dataclass(frozen=True)
class Verdict:
    action: Action = Action.CONTINUE
    reply: tuple[int | str, object] | None = None   # (code, text); IMAP: ("NO", text)
    close: bool = False
    label: str | None = None     # gateway_policy_rejections_total's reason for a refusal
    route: Route | None = None   # RCPT: the recipient's destination and TLS requirement
    new_leg: bool = False        # RCPT: the open leg can't carry it, but may be replaced
    reason: str = ""             # for the log (quarantine reason, hook name, ...)
    edits: tuple = ()            # end of message: the hooks' changes, in order
    quarantine: tuple = ()       # end of message: "<hook>: <reason>" of each quarantine

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE

    @property
    def level(self) -> UpstreamLevel | None:
        """RCPT: the recipient's upstream level (`allowed` resolved), its route's."""
        return self.route.level if self.route is not None else None

    @property
    def rule(self) -> int | None:
        """RCPT: index of the encryption rule that set the route (None: the default)."""
        return self.route.rule if self.route is not None else None


CONTINUE = Verdict()


def refuse(reply: tuple[int, object], *, close: bool = False, reason: str = "") -> Verdict:
    """A refusal; its metric label is `<code>_<enhanced code>` (`530_5.7.0`)."""
    code, text = reply
    first = text if isinstance(text, str) else text[0]
    return Verdict(Action.REFUSE, reply, close, f"{code}_{first.split(' ')[0]}", reason=reason)


# Connection limits (§2): refused before any session, counted in
# gateway_connections_rejected_total under these labels.
TOO_MANY_CONNECTIONS = Verdict(Action.REFUSE, R.TOO_MANY_CONNECTIONS, True, "max_connections",
                               reason="too many connections")
TOO_MANY_FROM_ADDRESS = Verdict(Action.REFUSE, R.TOO_MANY_FROM_ADDRESS, True, "per_ip",
                                reason="too many connections from address")
NO_SMTPUTF8_UPSTREAM = refuse(R.NO_SMTPUTF8_UPSTREAM)                # §4.1
AUTH_TOO_MANY_FAILURES = refuse(R.AUTH_TOO_MANY_FAILURES, close=True)  # §4.6
MAX_AUTH_FAILURES = 3
# IMAP's privacy gate at LOGIN/AUTHENTICATE (§5): the reply after the tag, and its label
IMAP_TLS_REQUIRED = Verdict(Action.REFUSE, tuple(PRIVACY_TLS.split(" ", 1)),
                            label="imap_tls_required")
IMAP_CLIENT_CERT = Verdict(Action.REFUSE, tuple(PRIVACY_CERT.split(" ", 1)),
                           label="imap_client_cert")


@dataclass
class Facts:
    """What the policy knows of one session, filled in by the session as stages pass (and by
    `gateway policy` from its command line)."""
    listener: str
    client_ip: str
    client_port: int = 0
    client_level: ClientLevel = ClientLevel.OPTIONAL   # after the connect stage's client rule
    cipher_strength: CipherGrade | None = None         # likewise
    tls: object = None                   # client leg TLSInfo (.version .cipher .verified)
    helo: str | None = None
    auth_user: str | None = None
    sender: str | None = None            # MAIL FROM of the open transaction
    recipients: list[str] = field(default_factory=list)   # accepted so far
    auth_mechanism: str | None = None    # the SASL mechanism of a successful AUTH
    queue_id: str | None = None          # the open transaction's tracking id
    milter_log: list = field(default_factory=list)   # this transaction's milter verdicts
    auth_failures: int = 0               # failed AUTH exchanges of the session (§4.6)


class Hook:
    """One joiner of the seam (AUTH, a milter). Every stage goes on unless overridden."""
    name = "hook"
    wants_body = False           # body chunks and end of message go through this hook
    may_change = False           # its end-of-message edits change what later hooks see

    async def connect(self, facts: Facts) -> Verdict:
        return CONTINUE

    async def helo(self, facts: Facts) -> Verdict:
        return CONTINUE

    async def mail(self, facts: Facts, address: str, params: dict) -> Verdict:
        return CONTINUE

    async def rcpt(self, facts: Facts, address: str, params: dict) -> Verdict:
        return CONTINUE

    async def data(self, facts: Facts) -> Verdict:
        return CONTINUE

    async def body(self, facts: Facts, chunk: bytes) -> Verdict:
        return CONTINUE

    async def eom(self, facts: Facts) -> Verdict:
        return CONTINUE

    async def abort(self, facts: Facts) -> None:
        return None

    async def close(self, facts: Facts) -> None:
        return None


def resolve(level, client_tls: bool) -> UpstreamLevel:
    """`allowed` mirrors the client leg (§3.2); other levels stand."""
    return UpstreamLevel(level).resolve(client_tls)


class StagePolicy:
    """One listener's policy: its rules, then its hooks, at each stage."""

    def __init__(self, listener, hooks: tuple[Hook, ...] = (), session_hooks: tuple = ()):
        self.listener = listener
        self.client_rules = ClientPolicy(listener)
        self.encryption = EncryptionPolicy(listener) if listener.protocol.takes_rules else None
        self.upstream_level = listener.upstream.tls
        self.destination = listener.upstream     # every route's, until §4.8's destinations
        # (level, rule, policy) -> (route, its verdict, its verdict with new_leg): built
        # once each, so deciding a recipient allocates neither
        self._routes: dict[tuple, tuple[Route, Verdict, Verdict]] = {}
        self.auth_required = listener.auth == "required"
        self.hooks = tuple(hooks)
        self.body_hooks = tuple(h for h in self.hooks if h.wants_body)
        self.session_hooks = tuple(session_hooks)     # factories: session -> Hook
        self._streaming: tuple[Hook, ...] | None = None   # fixed at DATA for the message

    def for_session(self, txn) -> "StagePolicy":
        """The policy one client session works with: with hook factories, a copy holding
        the session's own hooks (each made from the session's transaction, *txn*) after the
        listener's; without, this policy itself."""
        if not self.session_hooks:
            return self
        policy = copy.copy(self)
        policy.hooks = self.hooks + tuple(make(txn) for make in self.session_hooks)
        policy.body_hooks = tuple(h for h in policy.hooks if h.wants_body)
        return policy

    # --- connect ----------------------------------------------------------------------------

    def client_level(self, facts: Facts, log=None) -> None:
        """The connection's client level and cipher strength: the listener's, unless a rule
        by client network sets them (§4.3; logged as `client_rule`)."""
        facts.client_level, facts.cipher_strength = self.client_rules.at_connect(
            self.listener.client_tls, facts.client_ip, log)

    def admit(self, active: int) -> Verdict:
        """The listener's `max_connections` (§2), *active* counting this connection."""
        if active > self.listener.max_connections:
            return TOO_MANY_CONNECTIONS
        return CONTINUE

    def admit_address(self, held: int) -> Verdict:
        """`max_connections_per_ip` (§2): *held* connections from this client's address,
        this one included (-1: the worker's table had no room to count it)."""
        if held < 0:
            return TOO_MANY_CONNECTIONS
        if held > self.listener.max_connections_per_ip:
            return TOO_MANY_FROM_ADDRESS
        return CONTINUE

    async def connect(self, facts: Facts) -> Verdict:
        for hook in self.hooks:
            verdict = await hook.connect(facts)
            if verdict.refused:
                return verdict
        return CONTINUE

    async def helo(self, facts: Facts) -> Verdict:
        for hook in self.hooks:
            verdict = await hook.helo(facts)
            if verdict.refused:
                return verdict
        return CONTINUE

    # --- MAIL FROM --------------------------------------------------------------------------

    def auth_rules(self, facts: Facts) -> Verdict:
        """AUTH (§4.6): at `verify` the client certificate is checked before any credential
        goes upstream (as at MAIL FROM)."""
        if ClientLevel(facts.client_level).verifies and not (facts.tls and facts.tls.verified):
            return refuse(R.UNVERIFIED_CLIENT_CERT, close=True)
        return CONTINUE

    def auth_failed(self, facts: Facts) -> Verdict:
        """An AUTH the upstream refused (a cancelled one does not count): the third in a
        session ends it with `421 4.7.0` (§4.6)."""
        facts.auth_failures += 1
        if facts.auth_failures >= MAX_AUTH_FAILURES:
            return AUTH_TOO_MANY_FAILURES
        return CONTINUE

    def login(self, facts: Facts) -> Verdict:
        """IMAP's LOGIN/AUTHENTICATE gate (§5), decided again after each TLS handshake:
        before TLS at `required`/`verify` `NO [PRIVACYREQUIRED] TLS is required`; at
        `verify` without a verified client certificate `... Client certificate required`."""
        level = ClientLevel(facts.client_level)
        tls = facts.tls
        if level.requires_tls and tls is None:
            return IMAP_TLS_REQUIRED
        if level is ClientLevel.VERIFY and not (tls is not None and tls.verified):
            return IMAP_CLIENT_CERT
        return CONTINUE

    def mail_rules(self, facts: Facts, address: str) -> Verdict:
        """The client level's and the sender-domain client rule's checks (§4.2, §4.3), and
        AUTH on an `auth = "required"` listener (§4.6)."""
        tls = facts.tls
        verdict = self.auth_rules(facts)            # the client level's certificate check
        if verdict.refused:
            return verdict
        if self.auth_required and facts.auth_user is None:
            return refuse(R.AUTH_REQUIRED)
        rule = self.client_rules.for_sender(address)
        if rule is not None:
            # a rule by sender domain can only tighten (§4.3)
            level = rule.client_tls
            if level is not None and level.requires_tls and tls is None:
                return refuse(R.MUST_USE_TLS)
            if level is not None and level.verifies and not tls.verified:
                return refuse(R.UNVERIFIED_CLIENT_CERT, close=True)
            if tls is not None and not cipher_meets(tls, rule.cipher_strength):
                return refuse(R.STRONGER_CIPHER)
        return CONTINUE

    async def mail(self, facts: Facts, address: str, params: dict) -> Verdict:
        verdict = self.mail_rules(facts, address)
        if verdict.refused:
            return verdict
        final = CONTINUE
        for hook in self.hooks:
            verdict = await hook.mail(facts, address, params)
            if verdict.refused:
                return verdict
            if verdict.action is Action.DISCARD:
                final = verdict          # the message will be discarded at its end
        return final

    # --- RCPT TO ----------------------------------------------------------------------------

    def route(self, level: UpstreamLevel, rule: int | None = None,
              policy: str = "upstream.tls") -> Route:
        """The route of this listener's destination at *level* (resolved), set by *policy*
        (`rule` with the rule's index)."""
        return self._route_entry(level, rule, policy)[0]

    def _route_entry(self, level, rule, policy) -> tuple[Route, Verdict, Verdict]:
        entry = self._routes.get((level, rule, policy))
        if entry is None:
            route = Route(self.destination, level, rule=rule, policy=policy)
            entry = self._routes[(level, rule, policy)] = (
                route, Verdict(route=route), Verdict(route=route, new_leg=True))
        return entry

    def rcpt_rules(self, facts: Facts, address: str, leg=None) -> Verdict:
        """The recipient's route by the encryption rules (§4.3) and whether the
        transaction's open *leg* (None: none yet) can carry it: the verdict's `route`,
        `new_leg` when the leg must be replaced first (no recipient of the transaction
        accepted on it yet: `facts.recipients` is empty), or `452 4.5.3`."""
        if facts.auth_user is not None:
            # authenticated: the upstream is the submission server, which applies the
            # outbound policy itself; its leg carries every transaction (§4.6)
            return self._route_entry(self.session_leg_level(facts), None, "auth")[1]
        if self.encryption is None:
            level, rule, policy = self.upstream_level, None, "upstream.tls"
        else:
            decision = self.encryption.decide(facts.sender or "", address)
            if SenderEncryption(decision.sender_encryption).requires_tls and facts.tls is None:
                # the pair must not travel in the clear on the client leg (§4.3)
                return refuse(R.MUST_USE_TLS)
            level, rule = decision.recipient_encryption, decision.rule
            policy = "upstream.tls" if rule is None else "rule"
        return self.fit(self._route_entry(resolve(level, facts.tls is not None), rule, policy),
                        facts, leg)

    @staticmethod
    def fit(entry: tuple[Route, Verdict, Verdict], facts: Facts, leg) -> Verdict:
        """The verdict for a route (*entry*: the route and its two verdicts) given the open
        *leg*: carried, carried on a new leg, or `452 4.5.3` once the first accepted
        recipient fixed a leg that can't carry it (§4.3)."""
        route = entry[0]
        if leg is None or leg.closed or route.satisfied_by(leg):
            return entry[1]
        if leg.in_transaction and facts.recipients:
            return refuse(R.NEEDS_OTHER_POLICY)
        return entry[2]

    async def rcpt(self, facts: Facts, address: str, params: dict, leg=None) -> Verdict:
        """The rules' route, then each hook: a refusal ends it, a hook's route that is
        stricter than the one so far tightens it (refitted to the open leg), a discard is
        kept for the end of the message."""
        verdict = self.rcpt_rules(facts, address, leg)
        if verdict.refused:
            return verdict
        for hook in self.hooks:
            answer = await hook.rcpt(facts, address, params)
            if answer.refused:
                return answer
            route = answer.route
            if route is not None and verdict.route is not None \
                    and route.stricter_than(verdict.route):
                verdict = self.fit((route, Verdict(route=route),
                                    Verdict(route=route, new_leg=True)), facts, leg)
                if verdict.refused:
                    return verdict
            if answer.action is Action.DISCARD:
                verdict = Verdict(Action.DISCARD, route=verdict.route,
                                  new_leg=verdict.new_leg, reason=answer.reason)
        return verdict

    def upstream_extensions(self, leg) -> Verdict:
        """A transaction that uses SMTPUTF8 on a *leg* whose upstream lacks it (§4.1); asked
        only of transactions that use it."""
        if "SMTPUTF8" not in leg.extensions:
            return NO_SMTPUTF8_UPSTREAM
        return CONTINUE

    def session_leg_level(self, facts: Facts) -> UpstreamLevel:
        """The level of a leg a session opens for itself, not for a recipient: an IMAP login's,
        an SMTP AUTH's (§3.2, §4.6): `upstream.tls`, `allowed` resolved."""
        return resolve(self.upstream_level, facts.tls is not None)

    def session_route(self, facts: Facts) -> Route:
        """The route of a leg a session opens for itself (`session_leg_level`)."""
        return self._route_entry(self.session_leg_level(facts), None, "auth")[0]

    # --- the message ------------------------------------------------------------------------

    async def data(self, facts: Facts) -> Verdict:
        final = CONTINUE
        for hook in self.hooks:
            verdict = await hook.data(facts)
            if verdict.refused:
                return verdict
            if verdict.action is Action.DISCARD:
                final = verdict
        # which hooks get the message as it arrives is fixed now, for the whole message
        self._streaming = self.streamed() if self.body_hooks else None
        return final

    def streamed(self) -> tuple[Hook, ...]:
        """The body hooks that get the message as it arrives: the first, and each next one
        while every earlier one changes nothing."""
        out = []
        for hook in self.body_hooks:
            out.append(hook)
            if hook.may_change:
                break
        return tuple(out)

    async def body(self, facts: Facts, chunk: bytes) -> Verdict:
        """A chunk of the message text as it arrives; a refusal or discard ends the
        message's way through the hooks (the session answers it at the end of data)."""
        streaming = self._streaming if self._streaming is not None else self.streamed()
        for hook in streaming:
            verdict = await hook.body(facts, chunk)
            if verdict.action in (Action.REFUSE, Action.DISCARD):
                return verdict
        return CONTINUE

    async def eom(self, facts: Facts, message=None) -> Verdict:
        """The end of the message, hook by hook. A hook that was not streamed first gets
        *message* as the earlier hooks left it (`message.chunks()`); each hook's edits are
        applied to *message* (`message.apply(edits)`) before the next hook reads it. The
        answer carries every edit in order (the envelope's for the session to apply) and
        the quarantine reasons; a refusal or discard ends it at once."""
        edits: list = []
        quarantine: list = []
        final = CONTINUE
        streamed = self._streaming if self._streaming is not None else self.streamed()
        self._streaming = None
        for hook in self.body_hooks:
            if message is not None and hook not in streamed:
                for chunk in message.chunks():
                    verdict = await hook.body(facts, chunk)
                    if verdict.action in (Action.REFUSE, Action.DISCARD):
                        return verdict
            verdict = await hook.eom(facts)
            if verdict.action in (Action.REFUSE, Action.DISCARD):
                return verdict
            if verdict.edits:
                edits.extend(verdict.edits)
                if message is not None:
                    message.apply(verdict.edits)
            if verdict.action is Action.QUARANTINE:
                final = verdict
                quarantine.extend(verdict.quarantine or (verdict.reason,))
        if edits or quarantine:
            return Verdict(final.action, final.reply, reason=final.reason, edits=tuple(edits),
                           quarantine=tuple(quarantine))
        return final

    async def abort(self, facts: Facts) -> None:
        for hook in self.hooks:
            await hook.abort(facts)

    async def close(self, facts: Facts) -> None:
        for hook in self.hooks:
            await hook.close(facts)


def run_now(coro):
    """The result of a stage coroutine that never waits (the rules alone: `gateway policy`).
    A stage that would wait (a hook's I/O) is a RuntimeError here."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a policy stage waited outside a session")
