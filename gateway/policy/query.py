"""`gateway policy`: what a listener's policy would do with one session, without mail (SPEC §12).

The operator gives the facts of the handshakes and of the upstream (`Question`); `ask()` runs
the listener's own `StagePolicy` stages over them, as a session does — the client rule at
connect, MAIL FROM, each RCPT TO against the upstream leg the first accepted recipient opens
— with `run_now()` (no event loop). Milters are not consulted (`StagePolicy` is built without
hooks), and the upstream's own replies are not known: an accepted recipient is "accepted at
level X", for the upstream to answer.

What the policy does not decide, the listener's own server core does, as in a session: the
command drives `SMTPServer.for_listener` with the commands a session would send (EHLO, AUTH,
MAIL, each RCPT) and answers the events it hands on with the stages, so the pre-TLS gate
(`530 5.7.0 Must issue a STARTTLS command first`), AUTH's 502 and 538, the address syntax
and `max_recipients` (`452 4.5.3 Too many recipients`) are the core's own answers. Only the
upstream is modelled: a recipient whose level's TLS could not be had gets that failure, and
so does every later one at that level, while one at another level may open a leg of its own
(§4.3).

The hypothetical upstream leg (`--upstream-tls`): `offered` — STARTTLS offered, the handshake
succeeds and the certificate verifies (a TLS leg that satisfies every level); `absent` — no
STARTTLS (plaintext; `451 4.7.5 ... not offered` where the level requires TLS); `failed` —
offered, then refused or failed (`preferred` falls back to plaintext; `451 4.7.5 TLS handshake
with upstream failed` where TLS is required). A leg opened at `none` records whether TLS was
offered, as SPEC §4.3 says (a later `preferred` recipient then needs a new transaction).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..proto import replies as R
from ..proto.smtp_server import ConnectionClosed, SMTPServer
from ..rules import cipher_meets, domain_of
from ..levels import ClientLevel, UpstreamLevel
from .route import destination_key
from .stages import Facts, StagePolicy, resolve, run_now

UPSTREAM_FACTS = ("offered", "absent", "failed")
CLIENT_CERTS = ("verified", "unverified", "none")
DEFAULT_CIPHER = "TLS_AES_256_GCM_SHA384"          # TLS 1.3's, when --cipher is not given


class QueryError(Exception):
    """The question cannot be asked of this configuration (unknown listener, IMAP, ...)."""


@dataclass
class Question:
    listener: str
    client: str
    tls: bool = True
    client_cert: str = "none"          # verified | unverified | none
    cipher: str | None = None          # the negotiated suite (OpenSSL name); TLS 1.3 default
    auth_user: str | None = None       # the session authenticated as this user (AUTH)
    upstream_tls: str = "offered"      # offered | absent | failed
    sender: str = ""                   # "" = the null sender <>
    rcpts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClientTLS:
    """The client leg's TLS as the stages read it (the shape of tls.stream.TLSInfo)."""
    version: str
    cipher: str
    verified: bool


@dataclass
class Leg:
    """A hypothetical upstream leg: what `UpstreamLevel.satisfied_by` reads."""
    level: str
    tls: ClientTLS | None
    tls_offered: bool
    tls_failed: bool
    closed: bool = False
    in_transaction: bool = False
    dest_key: tuple = ()            # its destination (route.destination_key)

    def describe(self) -> str:
        if self.tls is not None:
            return "TLS, certificate verified"
        if self.tls_failed:
            return "plaintext (STARTTLS failed)"
        return "plaintext (STARTTLS offered, not used)" if self.tls_offered \
            else "plaintext (no STARTTLS)"


def _reply(reply) -> str:
    code, text = reply
    return f"{code} {text if isinstance(text, str) else ' / '.join(text)}"


def open_leg(level: str, upstream_tls: str, mode: str) -> tuple[Leg | None, tuple | None]:
    """(the leg a recipient at *level* opens, None) or (None, the failure reply)."""
    level = UpstreamLevel(level)
    tls = ClientTLS("TLSv1.3", DEFAULT_CIPHER, True)
    if mode == "implicit":                      # TLS from the first byte, whatever the level
        if upstream_tls == "offered":
            return Leg(level, tls, True, False), None
        return None, R.UPSTREAM_TLS_FAILED
    if level is UpstreamLevel.NONE:             # never asks, but knows what was offered
        return Leg(level, None, upstream_tls != "absent", False), None
    if upstream_tls == "offered":
        return Leg(level, tls, True, False), None
    if upstream_tls == "absent":
        if level.requires_tls:
            return None, R.UPSTREAM_TLS_NOT_OFFERED
        return Leg(level, None, False, False), None
    if level.requires_tls:
        return None, R.UPSTREAM_TLS_FAILED
    return Leg(level, None, True, True), None   # preferred: once more in plaintext


def _pattern_matches(pattern: str, domain: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def rule_text(rule) -> str:
    return (f"{rule.sender} -> {rule.recipient}: sender {rule.sender_encryption}, "
            f"recipient {rule.recipient_encryption}")


def _client_rule(listener, rule) -> dict | None:
    if rule is None:
        return None
    index = next(i for i, r in enumerate(listener.client_rules) if r is rule)
    return {"index": index, "match": rule.match,
            "client_tls": str(rule.client_tls) if rule.client_tls else None,
            "cipher_strength": str(rule.cipher_strength) if rule.cipher_strength else None}


def _listener(config, name: str):
    for listener in config.listeners:
        if listener.name == name:
            if not listener.protocol.carries_messages:
                raise QueryError(f"listener {name!r} is {listener.protocol}: gateway policy "
                                 "answers for SMTP listeners")
            return listener
    names = ", ".join(repr(lst.name) for lst in config.listeners)
    raise QueryError(f"no listener {name!r} (listeners: {names})")


class _Dialogue:
    """The listener's own SMTP server core (`SMTPServer.for_listener`, as a session starts
    it), driven with the question's commands. The core answers what is pure protocol itself
    — the pre-TLS gate, AUTH's 502 and 538, the recipient limit, syntax — exactly as in a
    session; the events it hands on, the stages answer."""

    def __init__(self, listener, level: ClientLevel, tls: bool):
        self.core = SMTPServer.for_listener(listener, "gateway.invalid", level)
        if tls:                       # implicit, or after STARTTLS: the client greets again
            self.core.tls_established()
        self.say(("EHLO" if listener.esmtp else "HELO") + " client.invalid")

    def say(self, line: str):
        """One command line: (the core's own refusal, None) or (None, its event)."""
        core = self.core
        core.receive_data(line.encode("utf-8", "surrogateescape") + b"\r\n")
        event = core.next_event()
        refused = core.take_rejections()
        core.data_to_send()
        if refused:
            return refused[-1], None
        if isinstance(event, ConnectionClosed):   # after too many errors: closed
            return R.TOO_MANY_ERRORS, None
        return None, event

    def answer(self, reply, close: bool = False) -> None:
        """The session's answer to the event the core handed on."""
        self.core.respond(*reply, close=close)
        self.core.data_to_send()

    @property
    def closed(self) -> bool:
        return self.core.closed


def _check_question(config, q: Question):
    listener = _listener(config, q.listener)
    try:
        ipaddress.ip_address(q.client)
    except ValueError:
        raise QueryError(f"--client: not an IP address: {q.client!r}") from None
    if q.upstream_tls not in UPSTREAM_FACTS:
        raise QueryError(f"--upstream-tls: one of {', '.join(UPSTREAM_FACTS)}")
    if q.client_cert not in CLIENT_CERTS:
        raise QueryError(f"--client-cert: one of {', '.join(CLIENT_CERTS)}")
    return listener


def ask(config, q: Question) -> dict:
    """The answer to *q* under *config*: a JSON-ready dict (see format_text for its parts)."""
    listener = _check_question(config, q)
    policy = StagePolicy(listener)             # no hooks: milters are not consulted
    facts = Facts(listener.name, q.client)
    notes: list[str] = []
    answer: dict = {"listener": listener.name, "client": q.client, "connect": None,
                    "tls": None, "auth": None, "mail": None, "upstream_tls": q.upstream_tls,
                    "recipients": [], "accepted": False, "notes": notes,
                    "milters": f"not consulted ({len(getattr(listener, 'milters', ()))} "
                               "configured)"}

    # connect: the client rule by network sets the level and the cipher grade
    policy.client_level(facts)
    run_now(policy.connect(facts))
    level = ClientLevel(facts.client_level)
    offers = listener.tls == "starttls" and level.offers_tls and listener.esmtp
    answer["connect"] = {
        "client_rule": _client_rule(listener, policy.client_rules.for_client(q.client)),
        "client_level": str(level),
        "cipher_strength": str(facts.cipher_strength) if facts.cipher_strength else None,
        "starttls_offered": offers}

    tls = _client_tls(listener, q, facts, offers, level, answer)
    if tls is False:
        return _unanswered(answer, q, "not reached (the TLS handshake fails)")
    facts.tls = tls
    dialogue = _Dialogue(listener, level, tls is not None)

    leg = None
    if q.auth_user is not None:
        leg = _auth(listener, policy, facts, q, dialogue, answer, notes)
        if dialogue.closed:
            answer["mail"] = None
            return _unanswered(answer, q, "not reached (the connection was closed)")

    # MAIL FROM: the core's checks, then the stage's
    sender_rule = policy.client_rules.for_sender(q.sender)
    mail = {"sender": q.sender or "<>", "sender_rule": _client_rule(listener, sender_rule)}
    answer["mail"] = mail
    refused, event = dialogue.say(f"MAIL FROM:<{q.sender}>")
    if event is not None:
        verdict = run_now(policy.mail(facts, event.address, event.params))
        refused = verdict.reply if verdict.refused else None
        dialogue.answer(refused or R.MAIL_OK, close=verdict.close)
    mail["reply"] = _reply(refused or R.MAIL_OK)
    if refused is not None:
        return _unanswered(answer, q, "not reached (the connection was closed)"
                           if dialogue.closed else "503 5.5.1 Error: need MAIL command")
    facts.sender = q.sender
    _recipients(listener, policy, facts, q, dialogue, leg, answer)
    return answer


def _unanswered(answer: dict, q: Question, why: str) -> dict:
    for rcpt in q.rcpts:
        answer["recipients"].append({"address": rcpt, "rule": None, "upstream_level": None,
                                     "reply": why, "accepted": False})
    answer["accepted"] = False
    return answer


def _client_tls(listener, q: Question, facts: Facts, offers: bool, level, answer: dict):
    """The client leg's TLS as the question has it (None: plaintext; False: the handshake
    fails on the cipher grade)."""
    notes = answer["notes"]
    use_tls = q.tls
    if listener.tls == "implicit" and not use_tls:
        notes.append("an implicit-TLS listener: every session is TLS")
        use_tls = True
    elif listener.tls != "implicit" and use_tls and not offers:
        why = ("the listener has tls = off" if listener.tls == "off" else
               "esmtp = false: no EHLO, no STARTTLS" if not listener.esmtp else
               f"client level {level}: STARTTLS is not offered")
        notes.append(f"{why}; the session is plaintext")
        use_tls = False
    if not use_tls:
        answer["tls"] = None
        return None
    cipher = q.cipher or DEFAULT_CIPHER
    requested = listener.verifies_clients
    if q.client_cert != "none" and not requested:
        notes.append("this listener requests no client certificate: none is verified")
    tls = ClientTLS("TLSv1.3" if cipher.startswith("TLS_") else "TLSv1.2", cipher,
                    q.client_cert == "verified" and requested)
    answer["tls"] = {"version": tls.version, "cipher": tls.cipher,
                     "client_cert": q.client_cert, "verified": tls.verified}
    if not cipher_meets(tls, facts.cipher_strength):
        answer["tls"]["handshake"] = (f"fails: {cipher} is not of cipher grade "
                                      f"{facts.cipher_strength}")
        answer["mail"] = None
        return False
    return tls


def _auth(listener, policy, facts: Facts, q: Question, dialogue: _Dialogue, answer: dict,
          notes: list) -> Leg | None:
    """AUTH (SPEC §4.6): the core's gate (502 without AUTH, 538 before TLS), the stage's
    certificate check, then its leg at upstream.tls, which carries the transactions."""
    auth = {"user": q.auth_user}
    answer["auth"] = auth
    leg = None
    mechanism = (listener.auth_mechanisms or ("PLAIN",))[0]
    refused, event = dialogue.say(f"AUTH {mechanism}")
    if event is not None:
        verdict = policy.auth_rules(facts)
        if verdict.refused:
            refused = verdict.reply
            dialogue.answer(refused, close=verdict.close)
        else:
            upstream_level = policy.session_leg_level(facts)
            leg, refused = open_leg(upstream_level, q.upstream_tls, listener.upstream.mode)
            if refused is not None:
                dialogue.answer(refused)
            else:
                dialogue.answer(_AUTH_OK)
                auth["reply"] = "relayed to the upstream (its answer decides)"
                auth["upstream_level"] = str(upstream_level)
                auth["leg"] = leg.describe()
                facts.auth_user = q.auth_user
    if refused is not None:
        auth["reply"] = _reply(refused)
    if facts.auth_user is None:
        notes.append("AUTH did not succeed: the session goes on unauthenticated")
    return leg


def _recipients(listener, policy, facts: Facts, q: Question, dialogue: _Dialogue, leg,
                answer: dict) -> None:
    """RCPT TO, each through the core and the stage, against the leg the first accepted
    recipient opened; a level whose TLS could not be had is not tried again (§4.3)."""
    failed: dict = {}                           # level -> its failure (451 4.7.5)
    accepted = 0
    for rcpt in q.rcpts:
        entry: dict = {"address": rcpt, "rule": None, "upstream_level": None,
                       "accepted": False}
        answer["recipients"].append(entry)
        _describe_rule(listener, policy, facts, q, rcpt, entry)
        refused, event = dialogue.say(f"RCPT TO:<{rcpt}>")
        if event is None:
            entry["reply"] = _reply(refused)
            continue
        verdict = run_now(policy.rcpt(facts, event.address, event.params, leg))
        if verdict.refused:
            dialogue.answer(verdict.reply)
            entry["reply"] = _reply(verdict.reply)
            continue
        rcpt_level = verdict.level if verdict.level is not None else leg.level
        entry["upstream_level"] = str(rcpt_level)
        if verdict.new_leg:
            leg = None
        if leg is None:
            failure = failed.get(rcpt_level)    # no second try at a level that failed
            if failure is None:
                leg, failure = open_leg(rcpt_level, q.upstream_tls, listener.upstream.mode)
            if failure is not None:
                failed[rcpt_level] = failure
                dialogue.answer(failure)
                entry["reply"] = _reply(failure)
                continue
            leg.dest_key = destination_key(listener.upstream)
            entry["leg"] = f"opens the upstream leg at {rcpt_level}: {leg.describe()}"
        dialogue.answer(_RCPT_OK)
        leg.in_transaction = True
        facts.recipients.append(rcpt)           # the first one fixed the leg (§4.3)
        accepted += 1
        entry["accepted"] = True
        entry["reply"] = f"accepted at level {rcpt_level}"
    answer["accepted"] = bool(q.rcpts) and accepted == len(q.rcpts)


def _describe_rule(listener, policy, facts: Facts, q: Question, rcpt: str,
                   entry: dict) -> None:
    """The encryption rule the recipient matches, for the answer (the stage decides)."""
    if facts.auth_user is not None:
        entry["rule"] = {"index": None, "text": "authenticated: the encryption rules do "
                         "not apply (the submission upstream applies its own policy)"}
        return
    if policy.encryption is None:
        return
    decision = policy.encryption.decide(q.sender, rcpt)
    if decision.rule is None:
        entry["rule"] = {"index": None, "text": "default: sender optional, recipient "
                         f"{listener.upstream.tls} (upstream.tls)"}
    else:
        entry["rule"] = {"index": decision.rule,
                         "text": rule_text(listener.rules[decision.rule])}
    skipped = [i for i, r in enumerate(listener.rules)
               if not r.enabled and (decision.rule is None or i < decision.rule)
               and _pattern_matches(r.sender, domain_of(q.sender))
               and _pattern_matches(r.recipient, domain_of(rcpt))]
    if skipped:
        entry["disabled_rules_matching"] = skipped
    entry["upstream_level"] = str(resolve(decision.recipient_encryption,
                                          facts.tls is not None))


# the core's state follows the upstream's answer code (235 to AUTH, 250 to RCPT); its text,
# the upstream's own, is not known here and goes nowhere
_UPSTREAM_TEXT = "(the upstream's)"
_AUTH_OK = (235, _UPSTREAM_TEXT)
_RCPT_OK = (250, _UPSTREAM_TEXT)


def _rule_of(rule: dict | None) -> str:
    if rule is None:
        return "none"
    text = f"#{rule['index']} {rule['match']}"
    parts = [f"client_tls {rule['client_tls']}" if rule["client_tls"] else "",
             f"cipher_strength {rule['cipher_strength']}" if rule["cipher_strength"] else ""]
    parts = [p for p in parts if p]
    return text + (f" ({', '.join(parts)})" if parts else "")


def format_text(answer: dict) -> str:
    """The answer as the command prints it."""
    out = []
    c = answer["connect"]
    out.append(f"listener   {answer['listener']}, client {answer['client']}")
    out.append(f"connect    client rule: {_rule_of(c['client_rule'])}")
    grade = c["cipher_strength"] or "the profile's"
    out.append(f"           client level {c['client_level']}, cipher grade {grade}, STARTTLS "
               f"{'offered' if c['starttls_offered'] else 'not offered'}")
    tls = answer["tls"]
    if tls is None:
        out.append("TLS        none (plaintext session)")
    else:
        line = (f"TLS        {tls['version']} {tls['cipher']}, client certificate "
                f"{tls['client_cert']}")
        if tls.get("handshake"):
            line += f"; handshake {tls['handshake']}"
        out.append(line)
    auth = answer.get("auth")
    if auth is not None:
        line = f"AUTH       {auth['user']}: {auth['reply']}"
        if auth.get("leg"):
            line += f"; leg at {auth['upstream_level']}: {auth['leg']}"
        out.append(line)
    mail = answer.get("mail")
    if mail is not None:
        out.append(f"MAIL FROM  <{mail['sender'].strip('<>')}>  sender rule: "
                   f"{_rule_of(mail['sender_rule'])}  ->  {mail['reply']}")
    out.append(f"upstream   --upstream-tls {answer['upstream_tls']}")
    rows = [("RCPT TO", "RULE", "UPSTREAM", "REPLY")]
    for r in answer["recipients"]:
        rule = r["rule"]
        text = "-" if rule is None else (
            rule["text"] if rule["index"] is None else f"#{rule['index']} {rule['text']}")
        if r.get("disabled_rules_matching"):
            text += " (disabled, matching: " + ", ".join(
                f"#{i}" for i in r["disabled_rules_matching"]) + ")"
        reply = r["reply"] + (f" ({r['leg']})" if r.get("leg") else "")
        rows.append((r["address"], text, r["upstream_level"] or "-", reply))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))
                   + "  " + row[3])
    out.append(f"milters    {answer['milters']}")
    for note in answer["notes"]:
        out.append(f"note       {note}")
    n = sum(1 for r in answer["recipients"] if r["accepted"])
    out.append(f"result     {n} of {len(answer['recipients'])} recipients would be accepted")
    return "\n".join(out)
