"""The rule matcher (SPEC §4.3, §10): the native core and its pure-Python twin against a table
of the vendors' semantics and, on generated rule sets, against each other and a naive
reference that scans the list in order."""
from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.native import matcher, matcher_py

REQUIRE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"
NATIVE = matcher.native_backend
needs_native = pytest.mark.skipif(NATIVE is None and not REQUIRE, reason="native core not built")

BACKENDS = [pytest.param(matcher_py, id="python"),
            pytest.param(NATIVE, id="native", marks=needs_native)]


def test_backend_env():
    if os.environ.get("GATEWAY_PURE_PYTHON") == "1":
        assert matcher.BACKEND == "python" and NATIVE is None
    elif REQUIRE:
        assert matcher.BACKEND == "native" and NATIVE is not None
    assert matcher.python_backend is matcher_py


# --- naive reference --------------------------------------------------------------------------

def ref_pattern(pattern: str, domain: str) -> bool:
    if pattern == "*":
        return True
    if domain == "":
        return False
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def ref_rules(rules, s, r) -> int:
    for i, (en, ps, pr) in enumerate(rules):
        if en and ref_pattern(ps, s) and ref_pattern(pr, r):
            return i
    return -1


def ref_net(networks, ip) -> int:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return -1
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    for i, text in enumerate(networks):
        n = ipaddress.ip_network(text, strict=False)
        if n.version == 6 and n.prefixlen >= 96 and n.subnet_of(
                ipaddress.ip_network("::ffff:0:0/96")):
            n = ipaddress.ip_network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
        if n.version == a.version and a in n:
            return i
    return -1


# --- the table ----------------------------------------------------------------------------

RULES = [
    (True, "partner.example", "*"),            # 0
    (False, "*", "blocked.test"),              # 1 disabled: skipped
    (True, "*.corp.example", "*.mail.test"),   # 2
    (True, "*", "legacy.test"),                # 3
    (True, "*", "*.legacy.test"),              # 4
    (True, "*.corp.example", "*"),             # 5
    (True, "a.test", "b.test"),                # 6
]

CASES = [
    ("partner.example", "anything.org", 0),    # first match wins over later rules
    ("x.partner.example", "legacy.test", 3),   # exact is not a suffix pattern
    ("", "blocked.test", -1),                  # disabled rule skipped, nothing else
    ("a.test", "blocked.test", -1),
    ("h.corp.example", "in.mail.test", 2),
    ("a.b.corp.example", "x.y.mail.test", 2),  # any depth
    ("corp.example", "in.mail.test", -1),      # *.x does not match the apex
    ("h.corp.example", "mail.test", 5),
    ("", "legacy.test", 3),                    # null sender matches `*`
    ("", "legacy.test.", -1),
    ("", "x.legacy.test", 4),
    ("", "legacy.test.x", -1),
    ("", "in.mail.test", -1),                  # null sender only `*`
    ("a.test", "b.test", 6),
    ("a.test", "c.b.test", -1),
    ("xa.test", "b.test", -1),
    ("h.corp.example", "", 5),
    ("nobody.org", "nowhere.org", -1),
    ("é.corp.example", "x.mail.test", 2),      # non-ASCII: compared as UTF-8
    ("..corp.example", ".mail.test", 2),       # empty labels
    ("x" * 100_000 + ".corp.example", "legacy.test", 3),
    ("a." * 3000 + "corp.example", "q." * 3000 + "mail.test", 2),
]


@pytest.mark.parametrize("b", BACKENDS)
def test_rule_table(b):
    m = b.DomainRuleMatcher(RULES)
    for s, r, want in CASES:
        assert ref_rules(RULES, s, r) == want, (s[:40], r[:40])
        assert m.match(s, r) == want, (s[:40], r[:40])
    assert m.match_many([(s, r) for s, r, _ in CASES]) == [w for _, _, w in CASES]
    assert m.match_many([]) == []


@pytest.mark.parametrize("b", BACKENDS)
def test_rule_edge_sets(b):
    assert b.DomainRuleMatcher([]).match("a", "b") == -1
    assert b.DomainRuleMatcher([(False, "*", "*")]).match("a", "b") == -1
    m = b.DomainRuleMatcher([(True, "", "*"), (True, "*", "*")])
    assert m.match("", "x") == 1                       # "" matches only `*`
    m = b.DomainRuleMatcher([(True, "\ud800.x", "*")])  # lone surrogate: no crash
    assert m.match("\ud800.x", "y") == 0 and m.match("x", "y") == -1


@pytest.mark.parametrize("b", BACKENDS)
def test_pattern_matcher(b):
    p = b.DomainPatternMatcher(["a.example", "*.b.example", "*", "c.example"])
    assert [p.match(d) for d in ["a.example", "x.b.example", "b.example", "", "c.example"]] \
        == [0, 1, 2, 2, 2]
    p = b.DomainPatternMatcher(["*.b.example", "b.example"])
    assert [p.match(d) for d in ["b.example", "y.x.b.example", "", "zb.example"]] == [1, 0, -1, -1]
    assert b.DomainPatternMatcher([]).match("x") == -1


NETS = ["192.0.2.0/24", "2001:db8::/32", "10.0.0.1/32", "10.0.0.0/8", "::ffff:172.16.0.0/108",
        "2001:db8:1::1/128", "::/0", "0.0.0.0/0"]


@pytest.mark.parametrize("b", BACKENDS)
def test_network_table(b):
    n = b.NetworkMatcher(NETS)
    cases = [("192.0.2.77", 0), ("::ffff:192.0.2.77", 0), ("2001:db8:1::1", 1), ("10.0.0.1", 2),
             ("10.9.9.9", 3), ("::ffff:10.0.0.1", 2), ("172.16.3.4", 4), ("172.32.0.1", 7),
             ("fe80::1", 6), ("fe80::1%eth0", 6), ("::ffff:a00:1", 2), ("1.2.3.4", 7),
             ("::", 6), ("", -1), ("1.2.3", -1), ("01.2.3.4", -1), ("1.2.3.256", -1),
             ("1:2:3:4:5:6:7:8:9", -1), (":1::2", -1), ("1::2::3", -1), ("fe80::1%", -1),
             ("fe80::1%a%b", -1), ("10.0.0.1/32", -1), ("é", -1), ("1" * 10_000, -1),
             ("::1.2.3.4", 6), ("1:2:3:4:5:6:1.2.3.4", 6), ("1:2:3:4:5:6:7:1.2.3.4", -1)]
    for ip, want in cases:
        assert ref_net(NETS, ip) == want, ip
        assert n.match(ip) == want, ip
    n = b.NetworkMatcher(["2001:db8::/32", "192.0.2.1/32"])
    assert n.match("1.2.3.4") == -1 and n.match("::1") == -1 and n.match("192.0.2.1") == 1
    assert b.NetworkMatcher([]).match("1.2.3.4") == -1
    with pytest.raises(ValueError):
        b.NetworkMatcher(["not-a-net"])


# --- generated: native vs python vs reference -----------------------------------------------

LABEL = st.sampled_from(["a", "b", "c", "xn--d", "é", ""])
DOMAIN = st.lists(LABEL, min_size=0, max_size=4).map(".".join)
PATTERN = st.one_of(st.just("*"), DOMAIN, DOMAIN.map(lambda d: "*." + d))
RULE = st.tuples(st.booleans(), PATTERN, PATTERN)


def _impls():
    out = [matcher_py]
    if NATIVE is not None or REQUIRE:
        out.append(NATIVE)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(RULE, max_size=20), st.lists(st.tuples(DOMAIN, DOMAIN), min_size=1, max_size=20))
def test_rules_generated(rules, pairs):
    want = [ref_rules(rules, s, r) for s, r in pairs]
    for b in _impls():
        m = b.DomainRuleMatcher(rules)
        assert [m.match(s, r) for s, r in pairs] == want
        assert m.match_many(pairs) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(PATTERN, max_size=15), st.lists(DOMAIN, min_size=1, max_size=20))
def test_patterns_generated(patterns, domains):
    want = [next((i for i, p in enumerate(patterns) if ref_pattern(p, d)), -1) for d in domains]
    for b in _impls():
        m = b.DomainPatternMatcher(patterns)
        assert [m.match(d) for d in domains] == want


V4 = st.tuples(st.sampled_from([0, 10, 192, 255]), st.sampled_from([0, 1, 168]),
               st.sampled_from([0, 2]), st.sampled_from([0, 1, 255])).map(
    lambda t: ".".join(map(str, t)))
V6 = st.tuples(st.sampled_from([0, 0x2001, 0xfe80]), st.sampled_from([0, 0xdb8]),
               st.sampled_from([0, 1, 0xffff])).map(
    lambda t: str(ipaddress.IPv6Address((t[0] << 112) | (t[1] << 96) | t[2])))
MAPPED = V4.map(lambda a: "::ffff:" + a)
NET = st.one_of(
    st.tuples(V4, st.sampled_from([0, 1, 8, 16, 24, 31, 32])).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(V6, st.sampled_from([0, 1, 16, 32, 64, 127, 128])).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(MAPPED, st.sampled_from([96, 104, 120, 128])).map(lambda t: f"{t[0]}/{t[1]}"))
IP_TEXT = st.one_of(V4, V6, MAPPED, V6.map(lambda a: a + "%eth0"),
                    st.text(alphabet="0123456789abcdef:.%/", max_size=20))


@settings(max_examples=200, deadline=None)
@given(st.lists(NET, max_size=12), st.lists(IP_TEXT, min_size=1, max_size=20))
def test_networks_generated(nets, ips):
    want = [ref_net(nets, ip) for ip in ips]
    for b in _impls():
        m = b.NetworkMatcher(nets)
        assert [m.match(ip) for ip in ips] == want


@needs_native
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.%x/ ", max_size=45))
def test_ip_parsing_matches_ipaddress(text):
    n = NATIVE.NetworkMatcher(["0.0.0.0/0", "::/0"])
    assert n.match(text) == matcher_py.NetworkMatcher(["0.0.0.0/0", "::/0"]).match(text)
