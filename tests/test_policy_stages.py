"""The policy seam (gateway/policy/stages.py): each stage's verdict from the rules, the leg
fit at RCPT, hooks joining in order, and labels taken from the verdict."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from gateway.config import parse_config
from gateway.policy.stages import (CONTINUE, Action, Facts, Hook, StagePolicy, Verdict,
                                   refuse, run_now)
from gateway.proto import replies as R
from harness import config_dict, listener_dict

TLS13 = SimpleNamespace(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verified=False)
TLS12_WEAK = SimpleNamespace(version="TLSv1.2", cipher="AES128-CCM8", verified=False)
TLS_VERIFIED = SimpleNamespace(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256",
                               verified=True)

RULES = [
    dict(sender="*", recipient="bank.example", sender_encryption="required",
         recipient_encryption="verify"),
    dict(sender="*", recipient="plain.example", recipient_encryption="none"),
    dict(sender="*", recipient="mirror.example", recipient_encryption="allowed"),
]
CLIENT_RULES = [
    dict(match="192.0.2.0/24", client_tls="required", cipher_strength="high"),
    dict(match="secure.example", client_tls="verify"),
    dict(match="strong.example", client_tls="optional", cipher_strength="high"),
]


def _policy(hooks=(), client_tls="optional", upstream_tls="preferred"):
    data = config_dict([listener_dict(upstream_port=25, upstream_tls=upstream_tls,
                                      client_tls=client_tls, rules=[dict(r) for r in RULES],
                                      client_rules=[dict(r) for r in CLIENT_RULES],
                                      profile="testca",
                                      upstream={"server_name": "mx.internal.test"})],
                       ca_file="/nonexistent/ca.pem")   # parsed only, never loaded
    return StagePolicy(parse_config(data).listeners[0], hooks)


def _facts(policy, ip="198.51.100.7", tls=None, sender="a@x.test"):
    facts = Facts("smtp", ip, 1234, tls=tls, sender=sender)
    policy.client_level(facts)
    return facts


def _leg(tls=None, offered=True, failed=False, in_transaction=True):
    """A leg to the policy's destination (upstream port 25, server_name mx.internal.test)."""
    return SimpleNamespace(closed=False, tls=tls, tls_offered=offered, tls_failed=failed,
                           in_transaction=in_transaction,
                           dest_key=("127.0.0.1", 25, "starttls", "mx.internal.test", "default",
                                     None))


def test_connect_stage_sets_level_and_strength_from_a_network_rule():
    p = _policy()
    f = _facts(p, ip="192.0.2.9")
    assert (f.client_level, f.cipher_strength) == ("required", "high")
    f = _facts(p)
    assert (f.client_level, f.cipher_strength) == ("optional", None)


@pytest.mark.parametrize("sender,tls,reply,close", [
    ("a@x.test", None, None, False),
    ("a@secure.example", None, R.MUST_USE_TLS, False),
    ("a@secure.example", TLS13, R.UNVERIFIED_CLIENT_CERT, True),
    ("a@secure.example", TLS_VERIFIED, None, False),
    ("a@strong.example", TLS12_WEAK, R.STRONGER_CIPHER, False),
    ("a@strong.example", TLS13, None, False),
])
def test_mail_stage(sender, tls, reply, close):
    p = _policy()
    v = run_now(p.mail(_facts(p, tls=tls), sender, {}))
    assert v.reply == reply and v.close == close
    assert v.refused == (reply is not None)


def test_mail_stage_at_verify_needs_a_verified_certificate():
    p = _policy(client_tls="verify")
    v = run_now(p.mail(_facts(p, tls=TLS13), "a@x.test", {}))
    assert v.reply == R.UNVERIFIED_CLIENT_CERT and v.close and v.label == "421_4.7.1"
    assert not run_now(p.mail(_facts(p, tls=TLS_VERIFIED), "a@x.test", {})).refused


@pytest.mark.parametrize("rcpt,tls,level,rule", [
    ("b@bank.example", TLS13, "verify", 0),
    ("b@plain.example", None, "none", 1),
    ("b@mirror.example", None, "none", 2),
    ("b@mirror.example", TLS13, "required", 2),
    ("b@other.test", None, "preferred", None),
])
def test_rcpt_stage_levels(rcpt, tls, level, rule):
    p = _policy()
    v = run_now(p.rcpt(_facts(p, tls=tls), rcpt, {}))
    assert not v.refused and (v.level, v.rule, v.new_leg) == (level, rule, False)


def test_rcpt_stage_refuses_a_pair_that_needs_client_tls():
    p = _policy()
    v = run_now(p.rcpt(_facts(p), "b@bank.example", {}))
    assert v.reply == R.MUST_USE_TLS and v.label == "530_5.7.0"


@pytest.mark.parametrize("level_rcpt,leg,expect", [
    # a leg in a transaction that can't carry the recipient: 452 4.5.3
    ("b@plain.example", _leg(tls=TLS13), "452"),
    ("b@bank.example", _leg(tls=TLS13), "452"),               # verify needs a verified leg
    ("b@bank.example", _leg(tls=TLS_VERIFIED), "ok"),
    ("b@other.test", _leg(tls=None, offered=True), "452"),    # preferred: STARTTLS was there
    ("b@other.test", _leg(tls=None, offered=False), "ok"),    # not offered: plaintext is fine
    ("b@other.test", _leg(tls=None, offered=True, failed=True), "ok"),
    # between transactions the leg may be replaced instead
    ("b@plain.example", _leg(tls=TLS13, in_transaction=False), "new"),
])
def test_rcpt_stage_fits_the_open_leg(level_rcpt, leg, expect):
    p = _policy()
    facts = _facts(p, tls=TLS13)
    facts.recipients = ["a@accepted.test"]        # the transaction's first accepted recipient
    v = run_now(p.rcpt(facts, level_rcpt, {}, leg))
    if expect == "452":
        assert v.reply == R.NEEDS_OTHER_POLICY and v.label == "452_4.5.3"
    else:
        assert not v.refused and v.new_leg == (expect == "new")


@pytest.mark.parametrize("level_rcpt,leg", [
    ("b@plain.example", _leg(tls=TLS13)),
    ("b@bank.example", _leg(tls=None, offered=False)),
])
def test_rcpt_stage_replaces_a_leg_no_recipient_was_accepted_on(level_rcpt, leg):
    """MAIL went over the leg but the upstream refused every recipient so far: the leg is
    not yet the transaction's (§4.3), the next recipient may have another."""
    p = _policy()
    v = run_now(p.rcpt(_facts(p, tls=TLS13), level_rcpt, {}, leg))
    assert not v.refused and v.new_leg


class Recorder(Hook):
    def __init__(self, name, refuse_at=None, wants_body=False, eom=CONTINUE):
        self.name, self.refuse_at, self.wants_body, self._eom = name, refuse_at, wants_body, eom
        self.seen = []

    async def mail(self, facts, address, params):
        self.seen.append(("mail", address))
        return refuse((550, "5.7.1 no"), reason=self.name) if self.refuse_at == "mail" \
            else CONTINUE

    async def rcpt(self, facts, address, params):
        self.seen.append(("rcpt", address))
        return refuse((550, "5.7.1 no"), reason=self.name) if self.refuse_at == "rcpt" \
            else CONTINUE

    async def body(self, facts, chunk):
        self.seen.append(("body", chunk))
        return CONTINUE

    async def eom(self, facts):
        self.seen.append(("eom",))
        return self._eom


def test_hooks_run_after_the_rules_in_order_and_the_first_refusal_stops():
    first, second = Recorder("first", refuse_at="rcpt"), Recorder("second")
    p = _policy(hooks=(first, second))
    f = _facts(p)
    # the rules refuse first: no hook sees the pair
    assert run_now(p.rcpt(f, "b@bank.example", {})).reply == R.MUST_USE_TLS
    assert first.seen == []
    assert not run_now(p.mail(f, "a@x.test", {})).refused
    v = run_now(p.rcpt(f, "b@other.test", {}))
    assert v.refused and v.reason == "first" and v.label == "550_5.7.1"
    assert first.seen == [("mail", "a@x.test"), ("rcpt", "b@other.test")]
    assert second.seen == [("mail", "a@x.test")]


def test_rcpt_stage_keeps_the_rules_level_when_hooks_go_on():
    p = _policy(hooks=(Recorder("h"),))
    v = run_now(p.rcpt(_facts(p, tls=TLS13), "b@bank.example", {}))
    assert (v.level, v.rule) == ("verify", 0)


def test_body_and_end_of_message_go_to_body_hooks_and_collect_edits():
    a = Recorder("a", wants_body=True, eom=Verdict(edits=("edit-a",)))
    b = Recorder("b", wants_body=True,
                 eom=Verdict(Action.QUARANTINE, reason="b: looks odd", edits=("edit-b",)))
    c = Recorder("c")                       # no body: sees neither
    p = _policy(hooks=(a, c, b))
    f = _facts(p)
    run_now(p.body(f, b"chunk"))
    v = run_now(p.eom(f))
    assert v.action is Action.QUARANTINE and v.reason == "b: looks odd"
    assert v.edits == ("edit-a", "edit-b")
    assert ("body", b"chunk") in a.seen and ("body", b"chunk") in b.seen and c.seen == []


def test_end_of_message_discard_stops_later_hooks():
    a = Recorder("a", wants_body=True, eom=Verdict(Action.DISCARD, reason="a"))
    b = Recorder("b", wants_body=True)
    p = _policy(hooks=(a, b))
    assert run_now(p.eom(_facts(p))).action is Action.DISCARD
    assert b.seen == []


def test_run_now_refuses_a_stage_that_waits():
    class Waits(Hook):
        async def mail(self, facts, address, params):
            import trio
            await trio.sleep(0)
            return CONTINUE

    p = _policy(hooks=(Waits(),))
    with pytest.raises(RuntimeError):
        run_now(p.mail(_facts(p), "a@x.test", {}))


def test_connection_limits_are_verdicts_with_fixed_labels():
    p = StagePolicy(dataclasses.replace(_policy().listener, max_connections_per_ip=2))
    assert p.admit(p.listener.max_connections) is CONTINUE
    over = p.admit(p.listener.max_connections + 1)
    assert (over.reply, over.close, over.label) == (R.TOO_MANY_CONNECTIONS, True,
                                                    "max_connections")
    assert p.admit_address(2) is CONTINUE
    assert (p.admit_address(3).reply, p.admit_address(3).label) == (R.TOO_MANY_FROM_ADDRESS,
                                                                    "per_ip")
    assert p.admit_address(-1).label == "max_connections"     # no room to count it


def test_auth_failures_smtputf8_and_the_imap_login_gate_are_verdicts():
    p = _policy(client_tls="verify")
    f = _facts(p)
    assert p.auth_failed(f) is CONTINUE and p.auth_failed(f) is CONTINUE
    third = p.auth_failed(f)
    assert (third.reply, third.close, third.label) == (R.AUTH_TOO_MANY_FAILURES, True,
                                                       "421_4.7.0")
    assert p.upstream_extensions(SimpleNamespace(extensions={"SMTPUTF8"})) is CONTINUE
    no = p.upstream_extensions(SimpleNamespace(extensions=set()))
    assert (no.reply, no.label) == (R.NO_SMTPUTF8_UPSTREAM, "553_5.6.7")
    assert p.login(f).label == "imap_tls_required"
    f.tls = TLS13
    assert (p.login(f).reply, p.login(f).label) == (
        ("NO", "[PRIVACYREQUIRED] Client certificate required"), "imap_client_cert")
    f.tls = TLS_VERIFIED
    assert p.login(f) is CONTINUE


def test_rcpt_stage_gives_a_route_built_once_per_level_and_rule():
    """SPEC §4.8: the RCPT stage decides a route — the destination (the listener's upstream),
    the level, the names to verify and the policy that set it; the same route object each
    time (deciding a recipient allocates none)."""
    p = _policy()
    facts = _facts(p, tls=TLS13)
    v = run_now(p.rcpt(facts, "b@bank.example", {}))
    route = v.route
    assert route.destination is p.listener.upstream
    assert (route.level, route.rule, route.policy) == ("verify", 0, "rule")
    assert route.names == ("mx.internal.test",)          # server_name, checked at verify
    assert run_now(p.rcpt(facts, "c@bank.example", {})).route is route
    other = run_now(p.rcpt(facts, "b@other.test", {})).route
    assert (other.level, other.rule, other.policy, other.names) == (
        "preferred", None, "upstream.tls", ())
    facts.auth_user = "alice"
    auth = run_now(p.rcpt(facts, "b@bank.example", {})).route
    assert (auth.level, auth.policy) == ("preferred", "auth")


def test_a_route_is_satisfied_only_by_a_leg_to_its_destination():
    p = _policy()
    route = p.route("required")
    leg = _leg(tls=TLS13)
    assert route.satisfied_by(leg)
    leg.dest_key = ("127.0.0.1", 2525) + leg.dest_key[2:]
    assert not route.satisfied_by(leg)
    facts = _facts(p, tls=TLS13)
    facts.recipients = ["a@accepted.test"]
    assert run_now(p.rcpt(facts, "b@other.test", {}, leg)).reply == R.NEEDS_OTHER_POLICY


class Tightener(Hook):
    name = "tightener"

    def __init__(self, route):
        self.route = route

    async def rcpt(self, facts, address, params):
        return Verdict(route=self.route)


def test_a_hook_tightens_the_route_but_never_loosens_it():
    p = _policy()
    p.hooks = (Tightener(p.route("verify", policy="tightener")),)
    facts = _facts(p, tls=TLS13)
    v = run_now(p.rcpt(facts, "b@other.test", {}))        # the rules say preferred
    assert (v.level, v.route.policy) == ("verify", "tightener")
    facts.recipients = ["a@accepted.test"]                # a TLS leg fixed: 452 now
    assert run_now(p.rcpt(facts, "b@other.test", {}, _leg(tls=TLS13))).refused
    p.hooks = (Tightener(p.route("none", policy="loose")),)
    v = run_now(p.rcpt(_facts(p, tls=TLS13), "b@bank.example", {}))
    assert (v.level, v.route.policy) == ("verify", "rule")
