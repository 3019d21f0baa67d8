"""The policy seam: each stage of a transaction is decided here (SPEC §4.3, §4.6, §4.7).

A session (SMTP or IMAP) asks its listener's `StagePolicy` at every stage — connect, HELO,
MAIL, RCPT, DATA, end of headers, body, end of message — and acts on the `Verdict`: go on,
refuse with a reply (and perhaps close), or, at RCPT, carry the recipient at a resolved
upstream level. The session never decides policy itself; it moves bytes and legs.

The gateway's own policy comes first (the encryption and client rules of §4.3, below), then
every joined `Hook` in order: AUTH (§4.6) and milters (§4.7) join here without touching the
session loop. A hook's stage methods are coroutines because a hook may wait (a milter round
trip); the rules never wait, and with no hook joined a stage costs one coroutine. A hook that
needs the message body says so (`wants_body`); `eom()` answers may discard, quarantine or
carry edits. Metric labels come from the verdict (`Verdict.label`), not from reply text.

`gateway policy` (the operator's "what would happen") runs these same stages with the facts
given on its command line (`run_now()`), so its answer is the sessions' own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..proto import replies as R
from .levels import ClientLevel, SenderEncryption, UpstreamLevel
from ..rules import ClientPolicy, EncryptionPolicy, cipher_meets


class Action(Enum):
    CONTINUE = "continue"        # no objection: the next check, then the upstream, decides
    REFUSE = "refuse"            # answer `reply` (and close when `close`)
    DISCARD = "discard"          # end of message: 250 2.7.0 to the client, nothing upstream
    QUARANTINE = "quarantine"    # end of message: relayed with X-Gateway-Quarantine


@dataclass(frozen=True)
class Verdict:
    action: Action = Action.CONTINUE
    reply: tuple[int, object] | None = None
    close: bool = False
    label: str | None = None     # gateway_policy_rejections_total's reason for a refusal
    level: str | None = None     # RCPT: the recipient's upstream level, `allowed` resolved
    rule: int | None = None      # RCPT: index of the encryption rule (None: the default)
    new_leg: bool = False        # RCPT: the open leg can't carry it, but may be replaced
    reason: str = ""             # for the log (quarantine reason, hook name, ...)
    edits: tuple = ()            # end of message: the hooks' changes, in order

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE


CONTINUE = Verdict()


def refuse(reply: tuple[int, object], *, close: bool = False, reason: str = "") -> Verdict:
    """A refusal; its metric label is `<code>_<enhanced code>` (`530_5.7.0`)."""
    code, text = reply
    first = text if isinstance(text, str) else text[0]
    return Verdict(Action.REFUSE, reply, close, f"{code}_{first.split(' ')[0]}", reason=reason)


@dataclass
class Facts:
    """What the policy knows of one session, filled in by the session as stages pass (and by
    `gateway policy` from its command line)."""
    listener: str
    client_ip: str
    client_port: int = 0
    client_level: str = "optional"       # after the connect stage's client rule
    cipher_strength: str | None = None   # likewise
    tls: object = None                   # client leg TLSInfo (.version .cipher .verified)
    helo: str | None = None
    auth_user: str | None = None
    sender: str | None = None            # MAIL FROM of the open transaction
    recipients: list[str] = field(default_factory=list)   # accepted so far


class Hook:
    """One joiner of the seam (AUTH, a milter). Every stage goes on unless overridden."""
    name = "hook"
    wants_body = False           # body chunks and end of message go through this hook

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

    def __init__(self, listener, hooks: tuple[Hook, ...] = ()):
        self.listener = listener
        self.client_rules = ClientPolicy(listener)
        self.encryption = EncryptionPolicy(listener) if listener.protocol == "smtp" else None
        self.upstream_level = listener.upstream.tls
        self.auth_required = listener.auth == "required"
        self.hooks = tuple(hooks)
        self.body_hooks = tuple(h for h in self.hooks if h.wants_body)

    # --- connect ----------------------------------------------------------------------------

    def client_level(self, facts: Facts, log=None) -> None:
        """The connection's client level and cipher strength: the listener's, unless a rule
        by client network sets them (§4.3; logged as `client_rule`)."""
        facts.client_level, facts.cipher_strength = self.client_rules.at_connect(
            self.listener.client_tls, facts.client_ip, log)

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
        goes upstream."""
        if facts.client_level == "verify" and not (facts.tls and facts.tls.verified):
            return refuse(R.UNVERIFIED_CLIENT_CERT, close=True)
        return CONTINUE

    def mail_rules(self, facts: Facts, address: str) -> Verdict:
        """The client level's and the sender-domain client rule's checks (§4.2, §4.3), and
        AUTH on an `auth = "required"` listener (§4.6)."""
        tls = facts.tls
        if facts.client_level == "verify" and not (tls and tls.verified):
            return refuse(R.UNVERIFIED_CLIENT_CERT, close=True)
        if self.auth_required and facts.auth_user is None:
            return refuse(R.AUTH_REQUIRED)
        rule = self.client_rules.for_sender(address)
        if rule is not None:
            # a rule by sender domain can only tighten (§4.3)
            if rule.client_tls is not None and ClientLevel(rule.client_tls).requires_tls \
                    and tls is None:
                return refuse(R.MUST_USE_TLS)
            if rule.client_tls == "verify" and not tls.verified:
                return refuse(R.UNVERIFIED_CLIENT_CERT, close=True)
            if tls is not None and not cipher_meets(tls, rule.cipher_strength):
                return refuse(R.STRONGER_CIPHER)
        return CONTINUE

    async def mail(self, facts: Facts, address: str, params: dict) -> Verdict:
        verdict = self.mail_rules(facts, address)
        if verdict.refused:
            return verdict
        for hook in self.hooks:
            verdict = await hook.mail(facts, address, params)
            if verdict.refused:
                return verdict
        return CONTINUE

    # --- RCPT TO ----------------------------------------------------------------------------

    def rcpt_rules(self, facts: Facts, address: str, leg=None) -> Verdict:
        """The recipient's encryption rule (§4.3) and whether the transaction's open *leg*
        (None: none yet) can carry it: `level` to carry it at, `new_leg` when the leg must
        be replaced first (it carries no transaction yet), or `452 4.5.3`."""
        rule = None
        if facts.auth_user is not None:
            # authenticated: the upstream is the submission server, which applies the
            # outbound policy itself; its leg carries every transaction (§4.6)
            return Verdict()
        if self.encryption is None:
            level = self.upstream_level
        else:
            decision = self.encryption.decide(facts.sender or "", address)
            if SenderEncryption(decision.sender_encryption).requires_tls and facts.tls is None:
                # the pair must not travel in the clear on the client leg (§4.3)
                return refuse(R.MUST_USE_TLS)
            level, rule = decision.recipient_encryption, decision.rule
        level = resolve(level, facts.tls is not None)
        new_leg = False
        if leg is not None and not leg.closed and not level.satisfied_by(leg):
            if leg.in_transaction:
                return refuse(R.NEEDS_OTHER_POLICY)
            new_leg = True
        return Verdict(level=level, rule=rule, new_leg=new_leg)

    async def rcpt(self, facts: Facts, address: str, params: dict, leg=None) -> Verdict:
        verdict = self.rcpt_rules(facts, address, leg)
        if verdict.refused:
            return verdict
        for hook in self.hooks:
            answer = await hook.rcpt(facts, address, params)
            if answer.refused:
                return answer
        return verdict

    def login_level(self, facts: Facts) -> str:
        """IMAP: the upstream level of the leg a login opens (§3.2, `allowed` resolved)."""
        return resolve(self.upstream_level, facts.tls is not None)

    # --- the message ------------------------------------------------------------------------

    async def data(self, facts: Facts) -> Verdict:
        for hook in self.hooks:
            verdict = await hook.data(facts)
            if verdict.refused:
                return verdict
        return CONTINUE

    async def body(self, facts: Facts, chunk: bytes) -> Verdict:
        for hook in self.body_hooks:
            verdict = await hook.body(facts, chunk)
            if verdict.refused:
                return verdict
        return CONTINUE

    async def eom(self, facts: Facts) -> Verdict:
        edits: list = []
        final = CONTINUE
        for hook in self.body_hooks:
            verdict = await hook.eom(facts)
            edits.extend(verdict.edits)
            if verdict.action in (Action.REFUSE, Action.DISCARD):
                return verdict
            if verdict.action is Action.QUARANTINE:
                final = verdict
        if edits:
            return Verdict(final.action, final.reply, reason=final.reason, edits=tuple(edits))
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
