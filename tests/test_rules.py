"""The listener's encryption policy (SPEC §4.3): rule evaluation table, address
normalisation, shadowed rules, client rules, cipher grades, the alert e-mail rate limit and
`gateway check`'s rule listing."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from gateway.native import matcher, matcher_py
from gateway.config import Rule, parse_config
from gateway.rules import (ClientPolicy, EncryptionPolicy, cipher_meets, domain_of,
                           pattern_covers, shadowed_rules)
from harness import NEUTRAL_CWD, config_dict, gateway_subprocess_env, listener_dict

# The vendors' rule table, in order (WatchGuard/ESA style): first enabled match wins.
RULES = [
    dict(sender="*", recipient="bank.example", sender_encryption="required",
         recipient_encryption="verify"),
    dict(sender="*", recipient="*.bank.example", sender_encryption="optional",
         recipient_encryption="required"),
    dict(sender="legacy.example", recipient="*", sender_encryption="none",
         recipient_encryption="none"),
    dict(sender="*", recipient="partner.example", recipient_encryption="required",
         enabled=False),
    dict(sender="*.corp.example", recipient="partner.example", sender_encryption="required",
         recipient_encryption="required"),
]

TABLE = [
    # sender, recipient, rule index or None, sender_encryption, recipient level
    ("a@x.test", "b@bank.example", 0, "required", "verify"),
    ("a@x.test", "b@BANK.example.", 0, "required", "verify"),        # case, trailing dot
    ("a@x.test", "b@mx.bank.example", 1, "optional", "required"),     # subdomain, not apex
    ("a@x.test", "b@a.b.bank.example", 1, "optional", "required"),    # any depth
    ("a@x.test", "b@notbank.example", None, "optional", "preferred"),
    ("a@legacy.example", "b@bank.example", 0, "required", "verify"),  # earlier rule first
    ("a@legacy.example", "b@other.test", 2, "none", "none"),
    ("a@sub.legacy.example", "b@other.test", None, "optional", "preferred"),
    ("a@x.test", "b@partner.example", None, "optional", "preferred"),  # rule 3 is disabled
    ("a@hq.corp.example", "b@partner.example", 4, "required", "required"),
    ("a@corp.example", "b@partner.example", None, "optional", "preferred"),  # apex
    ("", "b@bank.example", 0, "required", "verify"),                  # null sender: only *
    ("", "b@partner.example", None, "optional", "preferred"),
    ("a@b@legacy.example", "b@other.test", 2, "none", "none"),        # last @ counts
    ("postmaster", "b@bank.example", 0, "required", "verify"),
]


def _listener(rules=(), client_rules=(), client_tls="optional"):
    data = config_dict([listener_dict(upstream_port=25, upstream_tls="preferred",
                                      client_tls=client_tls, rules=[dict(r) for r in rules],
                                      upstream={"server_name": "mx.internal.test"},
                                      client_rules=[dict(r) for r in client_rules])])
    return parse_config(data).listeners[0]


@pytest.fixture(params=["python", "native"])
def backend(request, monkeypatch):
    """Run the policy on one matcher implementation."""
    if request.param == "native":
        if matcher.native_backend is None:
            pytest.skip("native matcher not built")
        impl = matcher.native_backend
    else:
        impl = matcher_py
    import gateway.rules as rules_module
    for name in ("DomainRuleMatcher", "DomainPatternMatcher", "NetworkMatcher"):
        monkeypatch.setattr(rules_module, name, getattr(impl, name))
    return request.param


@pytest.mark.parametrize("sender,recipient,index,sender_enc,level", TABLE)
def test_rule_table(backend, sender, recipient, index, sender_enc, level):
    policy = EncryptionPolicy(_listener(RULES))
    d = policy.decide(sender, recipient)
    assert (d.rule, d.sender_encryption, d.recipient_encryption) == (index, sender_enc, level)


def test_no_rules_is_the_default_rule():
    d = EncryptionPolicy(_listener()).decide("a@x.test", "b@y.test")
    assert (d.rule, d.sender_encryption, d.recipient_encryption) == (None, "optional",
                                                                      "preferred")


@pytest.mark.parametrize("address,domain", [
    ("a@Example.COM", "example.com"), ("a@example.com.", "example.com"), ("", ""),
    ("postmaster", ""), ("a@bücher.example", "xn--bcher-kva.example"), ("x@y@z.test", "z.test"),
])
def test_domain_of(address, domain):
    assert domain_of(address) == domain


@pytest.mark.parametrize("a,b,covers", [
    ("*", "x.test", True), ("*", "*", True), ("x.test", "*", False),
    ("*.x.test", "a.x.test", True), ("*.x.test", "x.test", False),
    ("*.x.test", "*.a.x.test", True), ("*.a.x.test", "*.x.test", False),
    ("*.x.test", "ax.test", False), ("*.x.test", "*.x.test", True), ("x.test", "x.test", True),
])
def test_pattern_covers(a, b, covers):
    assert pattern_covers(a, b) is covers


def test_shadowed_rules():
    rules = [Rule(sender="*", recipient="*.bank.example"),
             Rule(sender="a.test", recipient="mx.bank.example"),          # shadowed by 0
             Rule(sender="*", recipient="bank.example"),                  # apex: reachable
             Rule(sender="*", recipient="*", enabled=False),               # disabled: ignored
             Rule(sender="b.test", recipient="other.test"),
             Rule(sender="b.test", recipient="other.test", enabled=False),  # not "shadowed"
             Rule(sender="*", recipient="bank.example")]                  # shadowed by 2
    assert shadowed_rules(rules) == [(1, 0), (6, 2)]


def test_client_policy_first_match_by_kind(backend):
    lst = _listener(client_rules=[
        {"match": "192.0.2.0/24", "client_tls": "required", "cipher_strength": "high"},
        {"match": "192.0.2.7", "client_tls": "none"},
        {"match": "2001:db8::/32", "client_tls": "required"},
        {"match": "*.secure.test", "client_tls": "required"},
        {"match": "secure.test", "cipher_strength": "high"},
    ])
    policy = ClientPolicy(lst)
    assert policy.for_client("192.0.2.7").client_tls == "required"        # first match
    assert policy.for_client("192.0.2.7").cipher_strength == "high"
    assert policy.for_client("::ffff:192.0.2.9").client_tls == "required"
    assert policy.for_client("2001:db8::1").match == "2001:db8::/32"
    assert policy.for_client("198.51.100.1") is None
    assert policy.for_sender("a@mx.secure.test").client_tls == "required"
    assert policy.for_sender("a@Secure.Test").cipher_strength == "high"
    assert policy.for_sender("a@other.test") is None
    assert policy.for_sender("") is None


def test_cipher_meets():
    tls13 = SimpleNamespace(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")
    strong = SimpleNamespace(version="TLSv1.2", cipher="ECDHE-RSA-AES256-GCM-SHA384")
    unknown = SimpleNamespace(version="TLSv1.2", cipher="NOT-A-CIPHER")
    assert cipher_meets(tls13, "high") and cipher_meets(strong, "high")
    assert cipher_meets(strong, None) and cipher_meets(unknown, None)
    assert not cipher_meets(unknown, "medium")


def test_alert_mailer_rate_limit():
    from gateway.serve.alerts import AlertMailer
    now = [1000.0]
    mailer = AlertMailer(None, sender="gw@x.test", recipients=["ops@x.test"],
                         hostname="gw.x.test", listener="in", log=None, interval=3600,
                         clock=lambda: now[0])
    assert mailer.due("a.test", "tls_not_offered")
    assert not mailer.due("a.test", "tls_not_offered")
    assert mailer.due("a.test", "not_trusted")           # another reason
    assert mailer.due("b.test", "tls_not_offered")       # another domain
    now[0] += 3599
    assert not mailer.due("a.test", "tls_not_offered")
    now[0] += 2
    assert mailer.due("a.test", "tls_not_offered")
    msg = mailer.message(["a.test"], "tls_not_offered", "STARTTLS not offered")
    assert msg.startswith(b"From: <gw@x.test>\r\nTo: <ops@x.test>\r\n")
    assert b"Subject: TLS alert: tls_not_offered for a.test\r\n" in msg
    assert b"Auto-Submitted: auto-generated" in msg


def test_alert_config_is_validated():
    from gateway.errors import ConfigError
    data = config_dict([listener_dict(upstream_port=25)], alert_recipients=["not-an-address"])
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).startswith("gateway.alert_recipients[0]: ")


def test_check_lists_rules_and_flags_shadowed(tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text("""
[gateway]
hostname = "mx.test"
metrics = ""

[[listeners]]
name = "inbound"
bind = "127.0.0.1:2525"
client_tls = "optional"

[listeners.upstream]
address = "127.0.0.1:2526"
tls = "preferred"

[[listeners.client_rules]]
match = "192.0.2.0/24"
client_tls = "required"

[[listeners.rules]]
recipient = "*.bank.example"
recipient_encryption = "required"

[[listeners.rules]]
sender = "a.test"
recipient = "mx.bank.example"
recipient_encryption = "none"

[[listeners.rules]]
enabled = false
recipient = "partner.example"
sender_encryption = "required"
""")
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--syntax-only", "-c",
                             str(conf)], capture_output=True, text=True, timeout=60,
                            env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "inbound: encryption rules" in out and "inbound: client rules" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["0", "yes", "*", "*.bank.example", "optional", "required"] in lines
    assert ["1", "yes", "a.test", "mx.bank.example", "optional", "none", "never", "matches:",
            "shadowed", "by", "rule", "0"] in lines
    assert ["2", "no", "*", "partner.example", "required", "preferred", "disabled"] in lines
    assert ["0", "192.0.2.0/24", "network", "required", "-"] in lines
    assert "listeners[0].rules[1]: can never match" in result.stderr


def test_network_rule_cipher_strength_gets_its_own_server_context():
    from OpenSSL import SSL

    from gateway.observe.logs import EventLog
    from gateway.tls.grades import grade_suites as cipher_names
    from gateway.serve.runtime import build_runtimes
    # an operator list with a MEDIUM suite (CCM8) among HIGH ones
    data = config_dict([listener_dict(upstream_port=25, profile="ccm", client_rules=[
        {"match": "192.0.2.0/24", "cipher_strength": "high"}])])
    data["tls_profiles"] = {"ccm": {"clone": "default", "ciphers":
                                    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256"}}
    with open("/dev/null", "w") as devnull:
        (rt,), _ = build_runtimes(parse_config(data), EventLog(stream=devnull))
    strict = rt.server_ctx_for("high")
    assert strict is not rt.server_ctx and rt.server_ctx_for(None) is rt.server_ctx
    offered = set(SSL.Connection(strict, None).get_cipher_list())
    tls12 = {c for c in offered if not c.startswith("TLS_")}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256"} and tls12 <= cipher_names("high")
    base = set(SSL.Connection(rt.server_ctx, None).get_cipher_list())
    assert "ECDHE-ECDSA-AES128-CCM8" in base and offered < base
