"""TLS levels and cipher grades as types (gateway.levels; SPEC §3.1-§3.3, §4.3)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gateway.config import ClientRule, Listener, Rule, Upstream, parse_config
from gateway.errors import ConfigError
from gateway.levels import CipherGrade, ClientLevel, SenderEncryption, UpstreamLevel
from gateway.tls.profiles import CIPHER_STRENGTH, PREDEFINED, clone

# ---------------------------------------------------------------------------------------------
# The words: members equal, print and serialise as the configuration's words


def test_members_are_the_configuration_words_in_order():
    assert list(ClientLevel) == ["none", "optional", "required", "verify"]
    assert list(UpstreamLevel) == ["none", "preferred", "allowed", "required", "verify"]
    assert list(SenderEncryption) == ["required", "optional", "none"]
    assert list(CipherGrade) == ["medium", "high"]


@pytest.mark.parametrize("member", [*ClientLevel, *UpstreamLevel, *SenderEncryption,
                                    *CipherGrade])
def test_member_prints_and_serialises_as_its_word(member):
    word = member.value
    assert member == word and hash(member) == hash(word)
    assert str(member) == word and f"{member}" == word and f"{member:>10}" == f"{word:>10}"
    assert json.dumps({"level": member}) == json.dumps({"level": word})
    assert type(member)(word) is member
    assert {word: 1}[member] == 1


def test_an_unknown_word_is_no_member():
    with pytest.raises(ValueError):
        ClientLevel("may")
    with pytest.raises(ValueError):
        UpstreamLevel("encrypt")
    with pytest.raises(ValueError):
        CipherGrade("low")


# ---------------------------------------------------------------------------------------------
# requires_tls, offers_tls


def test_client_level_requires_and_offers_tls():
    assert {lvl for lvl in ClientLevel if lvl.requires_tls} == {"required", "verify"}
    assert {lvl for lvl in ClientLevel if lvl.offers_tls} == {"optional", "required", "verify"}


def test_upstream_level_requires_tls():
    assert {lvl for lvl in UpstreamLevel if lvl.requires_tls} == {"required", "verify"}


def test_sender_encryption_requires_tls():
    assert {enc for enc in SenderEncryption if enc.requires_tls} == {"required"}


# ---------------------------------------------------------------------------------------------
# stricter_than


def test_client_level_stricter_than_follows_none_optional_required_verify():
    order = ["none", "optional", "required", "verify"]
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert ClientLevel(a).stricter_than(ClientLevel(b)) is (i > j), (a, b)
            assert ClientLevel(a).stricter_than(b) is (i > j), (a, b)   # a word works too


def test_client_level_order_is_not_the_alphabet():
    # string comparison would rank "none" above "optional" and "verify" above all: ranking
    # must go through stricter_than
    assert ClientLevel.OPTIONAL.stricter_than(ClientLevel.NONE)
    assert not ClientLevel.NONE.stricter_than(ClientLevel.OPTIONAL)
    assert ClientLevel.VERIFY.stricter_than("required")


def test_client_level_stricter_than_rejects_an_unknown_word():
    with pytest.raises(ValueError):
        ClientLevel.REQUIRED.stricter_than("may")


def test_cipher_grade_stricter_than():
    assert CipherGrade.HIGH.stricter_than(CipherGrade.MEDIUM)
    assert CipherGrade.HIGH.stricter_than("medium")
    assert CipherGrade.HIGH.stricter_than(None)
    assert CipherGrade.MEDIUM.stricter_than(None)          # any grade beats no grade
    assert not CipherGrade.MEDIUM.stricter_than(CipherGrade.HIGH)
    assert not CipherGrade.MEDIUM.stricter_than("medium")
    assert not CipherGrade.HIGH.stricter_than("high")


# ---------------------------------------------------------------------------------------------
# Cipher grades and OpenSSL


def test_cipher_grade_openssl_strings():
    assert CipherGrade.MEDIUM.openssl == "HIGH:MEDIUM:!aNULL:!eNULL"
    assert CipherGrade.HIGH.openssl == "HIGH:!aNULL:!eNULL"
    for grade in CipherGrade:
        assert "!aNULL" in grade.openssl and "!eNULL" in grade.openssl


def test_cipher_strength_mapping_still_answers_to_words():
    assert CIPHER_STRENGTH["high"] == CipherGrade.HIGH.openssl
    assert CIPHER_STRENGTH["medium"] == CipherGrade.MEDIUM.openssl
    assert list(CIPHER_STRENGTH) == ["medium", "high"]
    profile = clone(PREDEFINED["default"], "p", cipher_strength=CipherGrade.MEDIUM)
    assert profile.ciphers == PREDEFINED["default"].ciphers     # a grade only narrows (§3.3)


# ---------------------------------------------------------------------------------------------
# UpstreamLevel.resolve


@pytest.mark.parametrize("client_tls", [True, False])
def test_resolve_leaves_every_level_but_allowed(client_tls):
    for level in UpstreamLevel:
        if level is not UpstreamLevel.ALLOWED:
            assert level.resolve(client_tls) is level


def test_resolve_allowed_mirrors_the_client_leg():
    assert UpstreamLevel.ALLOWED.resolve(True) is UpstreamLevel.REQUIRED
    assert UpstreamLevel.ALLOWED.resolve(False) is UpstreamLevel.NONE


# ---------------------------------------------------------------------------------------------
# UpstreamLevel.satisfied_by: every leg state against every level (§4.3)


def leg(*, closed=False, tls=None, offered=False, failed=False):
    info = None if tls is None else SimpleNamespace(verified=(tls == "verified"))
    return SimpleNamespace(closed=closed, tls=info, tls_offered=offered, tls_failed=failed)


# leg state → the levels it satisfies (`allowed` unresolved is judged as `none`)
SATISFIES = [
    ("plaintext, TLS not offered", leg(), {"none", "allowed", "preferred"}),
    ("plaintext, TLS offered and not tried", leg(offered=True), {"none", "allowed"}),
    ("plaintext after a failed STARTTLS", leg(offered=True, failed=True),
     {"none", "allowed", "preferred"}),
    ("TLS, certificate not verified", leg(tls="unverified", offered=True),
     {"preferred", "required"}),
    ("TLS, certificate verified", leg(tls="verified", offered=True),
     {"preferred", "required", "verify"}),
    ("TLS on an implicit leg (nothing offered)", leg(tls="verified"),
     {"preferred", "required", "verify"}),
    ("closed, was plaintext", leg(closed=True), set()),
    ("closed, was plaintext after a failed STARTTLS", leg(closed=True, offered=True,
                                                          failed=True), set()),
    ("closed, was TLS verified", leg(closed=True, tls="verified", offered=True), set()),
]


@pytest.mark.parametrize("state, the_leg, satisfied", SATISFIES, ids=[s[0] for s in SATISFIES])
def test_satisfied_by(state, the_leg, satisfied):
    for level in UpstreamLevel:
        assert level.satisfied_by(the_leg) is (level in satisfied), (state, level)


def test_satisfied_by_reads_verified_at_verify_only():
    unverified, verified = leg(tls="unverified"), leg(tls="verified")
    assert UpstreamLevel.REQUIRED.satisfied_by(unverified)
    assert not UpstreamLevel.VERIFY.satisfied_by(unverified)
    assert UpstreamLevel.VERIFY.satisfied_by(verified)


def test_resolved_allowed_is_satisfied_like_its_result():
    plain, tls = leg(), leg(tls="unverified", offered=True)
    assert UpstreamLevel.ALLOWED.resolve(True).satisfied_by(tls)
    assert not UpstreamLevel.ALLOWED.resolve(True).satisfied_by(plain)
    assert UpstreamLevel.ALLOWED.resolve(False).satisfied_by(plain)
    assert not UpstreamLevel.ALLOWED.resolve(False).satisfied_by(tls)


# ---------------------------------------------------------------------------------------------
# The configuration holds members


def config_data(**listener) -> dict:
    return {
        "gateway": {"hostname": "mx.test"},
        "tls_profiles": {"withca": {"clone": "default", "ca_file": "/tls/ca.pem",
                                    "cipher_strength": "high"}},
        "listeners": [dict({"name": "in", "protocol": "smtp", "bind": "127.0.0.1:0",
                            "upstream": {"address": "mx.up:25", "tls": "allowed"}},
                           **listener)],
    }


def test_parse_config_gives_members():
    config = parse_config(config_data(
        client_tls="verify", profile="withca",
        client_rules=[{"match": "192.0.2.0/24", "client_tls": "required",
                       "cipher_strength": "medium"},
                      {"match": "*.example", "cipher_strength": "high"}],
        rules=[{"sender": "*", "recipient": "a.example", "sender_encryption": "required",
                "recipient_encryption": "verify"},
               {"sender": "*", "recipient": "b.example"}]))
    lst = config.listeners[0]
    assert lst.client_tls is ClientLevel.VERIFY
    assert lst.upstream.tls is UpstreamLevel.ALLOWED
    assert lst.client_rules[0].client_tls is ClientLevel.REQUIRED
    assert lst.client_rules[0].cipher_strength is CipherGrade.MEDIUM
    assert lst.client_rules[1].client_tls is None
    assert lst.client_rules[1].cipher_strength is CipherGrade.HIGH
    assert lst.rules[0].sender_encryption is SenderEncryption.REQUIRED
    assert lst.rules[0].recipient_encryption is UpstreamLevel.VERIFY
    # the defaults of a rule: optional, and the upstream's level
    assert lst.rules[1].sender_encryption is SenderEncryption.OPTIONAL
    assert lst.rules[1].recipient_encryption is UpstreamLevel.ALLOWED
    assert config.profiles["withca"].cipher_strength is CipherGrade.HIGH


@pytest.mark.parametrize("tls, given, expected", [
    ("starttls", None, ClientLevel.OPTIONAL),
    ("implicit", None, ClientLevel.REQUIRED),
    ("implicit", "optional", ClientLevel.REQUIRED),
    ("off", None, ClientLevel.NONE),
    ("starttls", "none", ClientLevel.NONE),
])
def test_listener_level_defaults_are_members(tls, given, expected):
    extra = {"tls": tls} if given is None else {"tls": tls, "client_tls": given}
    assert parse_config(config_data(**extra)).listeners[0].client_tls is expected


def test_dataclasses_built_from_words_hold_members():
    up = Upstream(host="mx.up", port=25, tls="verify")
    assert up.tls is UpstreamLevel.VERIFY
    assert Upstream(host="mx.up", port=25).tls is UpstreamLevel.PREFERRED
    lst = Listener(name="x", protocol="smtp", host="::", port=25, upstream=up,
                   client_tls="required")
    assert lst.client_tls is ClientLevel.REQUIRED
    rule = Rule(sender_encryption="none", recipient_encryption="allowed")
    assert rule.sender_encryption is SenderEncryption.NONE
    assert rule.recipient_encryption is UpstreamLevel.ALLOWED
    cr = ClientRule(match="192.0.2.0/24", cipher_strength="high")
    assert cr.client_tls is None and cr.cipher_strength is CipherGrade.HIGH
    assert cr == ClientRule(match="192.0.2.0/24", cipher_strength=CipherGrade.HIGH)


# A typo in a level or grade gives the same message as before the types (exact text).
TYPOS = [
    (dict(client_tls="may"), "listeners[0].client_tls",
     'must be one of "none", "optional", "required", "verify" (got "may")'),
    (dict(upstream={"address": "mx.up:25", "tls": "encrypt"}), "listeners[0].upstream.tls",
     'must be one of "none", "preferred", "allowed", "required", "verify" (got "encrypt")'),
    (dict(rules=[{"sender_encryption": "preferred"}]), "listeners[0].rules[0].sender_encryption",
     'must be one of "required", "optional", "none" (got "preferred")'),
    (dict(rules=[{"recipient_encryption": "may"}]),
     "listeners[0].rules[0].recipient_encryption",
     'must be one of "required", "preferred", "allowed", "none", "verify" (got "may")'),
    (dict(client_rules=[{"match": "192.0.2.0/24", "client_tls": "Required"}]),
     "listeners[0].client_rules[0].client_tls",
     'must be one of "none", "optional", "required", "verify" (got "Required")'),
    (dict(client_rules=[{"match": "192.0.2.0/24", "cipher_strength": "low"}]),
     "listeners[0].client_rules[0].cipher_strength",
     'must be one of "medium", "high" (got "low")'),
    (dict(client_tls=""), "listeners[0].client_tls",
     'must be one of "none", "optional", "required", "verify" (got "")'),
    (dict(client_tls=2), "listeners[0].client_tls", "expected a string, got integer 2"),
]


@pytest.mark.parametrize("listener, path, message", TYPOS, ids=[t[1] for t in TYPOS])
def test_level_typo_message(listener, path, message):
    with pytest.raises(ConfigError) as info:
        parse_config(config_data(**listener))
    assert (info.value.path, info.value.message) == (path, message)


def test_profile_grade_typo_message():
    data = config_data()
    data["tls_profiles"]["withca"]["cipher_strength"] = "HIGH"
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == "tls_profiles.withca.cipher_strength"
    assert info.value.message == 'must be one of "medium", "high" (got "HIGH")'


def test_level_properties():
    assert [lvl.verifies for lvl in ClientLevel] == [False, False, False, True]
    assert [lvl.verifies for lvl in UpstreamLevel] == [False, False, False, False, True]
    assert [lvl.asks_tls for lvl in UpstreamLevel] == [False, True, True, True, True]
    assert [lvl.falls_back for lvl in UpstreamLevel] == [False, True, False, False, False]


@pytest.mark.parametrize("kwargs, offers, clients, upstream", [
    (dict(), True, False, False),
    (dict(client_tls="none"), False, False, False),
    (dict(client_tls="none", client_rules=(ClientRule("10.0.0.0/8", "optional"),)),
     True, False, False),
    (dict(client_tls="none", client_rules=(ClientRule("*.example", cipher_strength="high"),)),
     False, False, False),
    (dict(client_tls="verify"), True, True, False),
    (dict(client_rules=(ClientRule("10.0.0.0/8", "verify"),)), True, True, False),
    (dict(up_tls="verify"), True, False, True),
    (dict(rules=(Rule(recipient="a.example", recipient_encryption="verify"),)),
     True, False, True),
    (dict(rules=(Rule(recipient="a.example", recipient_encryption="required"),)),
     True, False, False),
])
def test_listener_needs_verify(kwargs, offers, clients, upstream):
    """The listener's "does any level offer TLS / need a verified certificate" predicates,
    which the TLS contexts, `gateway policy` and the W^X warning read."""
    up = Upstream(host="mx.up", port=25, tls=kwargs.pop("up_tls", "preferred"))
    lst = Listener(name="x", protocol="smtp", host="::", port=25, upstream=up, **kwargs)
    assert (lst.offers_client_tls, lst.verifies_clients, lst.verifies_upstream) == \
        (offers, clients, upstream)
