"""Configuration parsing and validation (SPEC §2, §3, §4.1, §4.3, §9, §12)."""
from __future__ import annotations

import copy
import dataclasses
import socket
from pathlib import Path

import pytest

from gateway.config import (ClientRule, GatewayConfig, Timeouts, check_files, demo_config,
                            load_config, parse_config, parse_domain_pattern, parse_hostport)
from gateway.errors import ConfigError
from gateway.tls.profiles import PREDEFINED

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "gateway.example.toml"


def base() -> dict:
    """A minimal valid configuration: one SMTP listener and a second (IMAP) one."""
    return {
        "gateway": {"hostname": "mx.test"},
        "certificates": {"main": {"cert": "/tls/cert.pem", "key": "/tls/key.pem"}},
        "tls_profiles": {"withca": {"clone": "default", "ca_file": "/tls/ca.pem"}},
        "listeners": [
            {"name": "inbound", "protocol": "smtp", "bind": "0.0.0.0:25",
             "upstream": {"address": "10.0.0.5:25"}},
            {"name": "imap", "protocol": "imap", "bind": "0.0.0.0:143",
             "upstream": {"address": "10.0.0.6:143"}},
        ],
    }


def error_of(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def error_at(data: dict, path: str) -> ConfigError:
    """The error at *path* (or, for a path ending in ".", under it) among every error the
    file has: one wrong value may make another key wrong too, and all are reported."""
    err = error_of(data)
    found = [e for e in getattr(err, "errors", None) or [err]
             if (e.path.startswith(path) if path.endswith(".") else e.path == path)]
    assert found, str(err)
    return found[0]


def L(i: int, **kw):
    """A mutation: update listeners[i] with kw."""
    def apply(d):
        d["listeners"][i].update(kw)
    return apply


def U(i: int, **kw):
    def apply(d):
        d["listeners"][i]["upstream"].update(kw)
    return apply


def P(name: str, table: dict):
    def apply(d):
        d.setdefault("tls_profiles", {})[name] = table
    return apply


def G(**kw):
    def apply(d):
        d["gateway"].update(kw)
    return apply


def rules(i: int, *items):
    return L(i, rules=[dict(r) for r in items])


def client_rules(i: int, *items):
    return L(i, client_rules=[dict(r) for r in items])


def both(*mutations):
    def apply(d):
        for m in mutations:
            m(d)
    return apply


OK_RULE = {"sender": "*", "recipient": "*", "sender_encryption": "optional",
           "recipient_encryption": "preferred"}

# (id, mutation, exact key path, words the message must contain)
ERRORS = [
    # unknown keys, everywhere
    ("top-unknown", lambda d: d.update(extra=1), "extra", "unknown key"),
    ("gateway-unknown", G(hostnme="x"), "gateway.hostnme", "unknown key"),
    ("listener-unknown", L(1, colour="red"), "listeners[1].colour", "unknown key"),
    ("upstream-unknown", U(1, tls_mode="none"), "listeners[1].upstream.tls_mode", "unknown key"),
    ("timeouts-unknown", L(0, timeouts={"idle": 3}), "listeners[0].timeouts.idle",
     "unknown key"),
    ("rule-unknown", rules(0, OK_RULE, OK_RULE, OK_RULE, dict(OK_RULE, recipent="x")),
     "listeners[0].rules[3].recipent", "unknown key"),
    ("client-rule-unknown", client_rules(0, {"match": "192.0.2.0/24", "level": "none"}),
     "listeners[0].client_rules[0].level", "unknown key"),
    ("cert-unknown", lambda d: d["certificates"]["main"].update(chain="x"),
     "certificates.main.chain", "unknown key"),
    ("profile-unknown", P("p", {"clone": "default", "minversion": "TLSv1.2"}),
     "tls_profiles.p.minversion", "unknown key"),
    # types
    ("workers-type", G(workers="4"), "gateway.workers", "integer"),
    ("workers-bool", G(workers=True), "gateway.workers", "integer"),
    ("workers-negative", G(workers=-1), "gateway.workers", "at least 0"),
    ("esmtp-type", L(0, esmtp="yes"), "listeners[0].esmtp", "true or false"),
    ("name-type", L(0, name=5), "listeners[0].name", "string"),
    ("listeners-not-array", lambda d: d.update(listeners={"name": "x"}), "listeners",
     "array of tables"),
    ("no-listeners", lambda d: d.update(listeners=[]), "listeners", "at least one"),
    ("max-connections", L(0, max_connections=0), "listeners[0].max_connections", "at least 1"),
    ("backlog-type", L(0, backlog=1.5), "listeners[0].backlog", "integer"),
    ("trusted-proxies-type", L(0, trusted_proxies="10.0.0.1"), "listeners[0].trusted_proxies",
     "array"),
    ("trusted-proxies-bad", L(0, proxy_protocol=True, trusted_proxies=["10.0.0.1", "nope"]),
     "listeners[0].trusted_proxies[1]", "not an IP"),
    ("proxy-without-trusted", L(0, proxy_protocol=True), "listeners[0].trusted_proxies",
     "proxy_protocol"),
    ("missing-name", lambda d: d["listeners"][0].pop("name"), "listeners[0].name", "required"),
    ("missing-bind", lambda d: d["listeners"][1].pop("bind"), "listeners[1].bind", "required"),
    ("missing-upstream", lambda d: d["listeners"][1].pop("upstream"), "listeners[1].upstream",
     "required"),
    ("missing-address", lambda d: d["listeners"][0]["upstream"].pop("address"),
     "listeners[0].upstream.address", "required"),
    # enums list the allowed values
    ("protocol-enum", L(1, protocol="pop3"), "listeners[1].protocol", '"smtp", "imap"'),
    ("type-enum", L(0, type="dmz"), "listeners[0].type", '"public", "private"'),
    ("tls-enum", L(0, tls="ssl"), "listeners[0].tls", '"starttls", "implicit", "off"'),
    ("client-tls-enum", L(0, client_tls="may"), "listeners[0].client_tls",
     '"none", "optional", "required", "verify"'),
    ("upstream-tls-enum", U(1, tls="encrypt"), "listeners[1].upstream.tls",
     '"none", "preferred", "allowed", "required", "verify"'),
    ("upstream-mode-enum", U(0, mode="ssl"), "listeners[0].upstream.mode",
     '"starttls", "implicit"'),
    ("bare-newline-enum", L(0, bare_newline="fix"), "listeners[0].bare_newline",
     '"reject", "normalize"'),
    ("auth-enum", L(0, auth="on"), "listeners[0].auth", '"off", "passthrough"'),
    ("log-format-enum", G(log_format="text"), "gateway.log_format", '"logfmt", "json"'),
    ("sender-enc-enum", rules(0, dict(OK_RULE, sender_encryption="preferred")),
     "listeners[0].rules[0].sender_encryption", '"required", "optional", "none"'),
    ("recipient-enc-enum", rules(0, OK_RULE, dict(OK_RULE, recipient_encryption="may")),
     "listeners[0].rules[1].recipient_encryption", '"verify"'),
    ("rule-enabled-type", rules(0, dict(OK_RULE, enabled="yes")),
     "listeners[0].rules[0].enabled", "true or false"),
    ("client-rule-strength", client_rules(0, {"match": "192.0.2.0/24",
                                              "cipher_strength": "low"}),
     "listeners[0].client_rules[0].cipher_strength", '"medium", "high"'),
    ("client-rule-level", client_rules(0, {"match": "192.0.2.0/24", "client_tls": "may"}),
     "listeners[0].client_rules[0].client_tls", '"optional"'),
    ("client-rule-empty", client_rules(0, {"match": "192.0.2.0/24"}),
     "listeners[0].client_rules[0]", "client_tls or cipher_strength"),
    # host:port
    ("bind-no-port", L(0, bind="0.0.0.0"), "listeners[0].bind", "host:port"),
    ("bind-bad-port", L(0, bind="0.0.0.0:70000"), "listeners[0].bind", "65535"),
    ("bind-port-text", L(0, bind="0.0.0.0:smtp"), "listeners[0].bind", "port"),
    ("bind-bad-ipv4", L(0, bind="300.1.2.3:25"), "listeners[0].bind", "IPv4"),
    ("bind-bare-ipv6", L(0, bind="::1:25"), "listeners[0].bind", "brackets"),
    ("bind-bad-ipv6", L(0, bind="[fe80::zz]:25"), "listeners[0].bind", "IPv6"),
    ("bind-bad-host", L(0, bind="bad host:25"), "listeners[0].bind", "host name"),
    ("upstream-port-zero", U(1, address="10.0.0.6:0"), "listeners[1].upstream.address",
     "between 1 and 65535"),
    ("metrics-bad", G(metrics="9108"), "gateway.metrics", "host:port"),
    # names and references
    ("duplicate-name", L(1, name="inbound"), "listeners[1].name", "duplicate"),
    ("duplicate-bind", L(1, bind="0.0.0.0:25"), "listeners[1].bind", "already bound"),
    ("unknown-certificate", L(0, certificate="other"), "listeners[0].certificate",
     'unknown certificate "other"'),
    ("unknown-profile", L(0, profile="nope"), "listeners[0].profile", 'unknown TLS profile'),
    ("unknown-upstream-profile", U(1, profile="nope"), "listeners[1].upstream.profile",
     "unknown TLS profile"),
    ("unknown-upstream-cert", U(1, certificate="nope"), "listeners[1].upstream.certificate",
     "unknown certificate"),
    ("cert-missing-key", lambda d: d["certificates"]["main"].pop("key"),
     "certificates.main.key", "required"),
    # §3.3 profiles
    ("profile-no-clone", P("p", {"min_version": "TLSv1.2"}), "tls_profiles.p", "clone"),
    ("profile-clone-not-first", P("p", {"min_version": "TLSv1.2", "clone": "default"}),
     "tls_profiles.p.clone", "first"),
    ("profile-redefine-predefined", P("default", {"clone": "default"}),
     "tls_profiles.default", "clone it"),
    ("profile-redefine-strict", P("strict", {"min_version": "TLSv1.2"}),
     "tls_profiles.strict", "read-only"),
    ("profile-clone-unknown", P("p", {"clone": "modern"}), "tls_profiles.p.clone",
     'unknown profile "modern"'),
    ("profile-clone-cycle", both(P("a", {"clone": "b"}), P("b", {"clone": "a"})),
     "tls_profiles.", "cycle"),
    ("profile-bad-version", P("p", {"clone": "default", "min_version": "SSLv3"}),
     "tls_profiles.p.min_version", '"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"'),
    ("profile-min-above-max", P("p", {"clone": "default", "min_version": "TLSv1.3",
                                      "max_version": "TLSv1.2"}),
     "tls_profiles.p.min_version", "above"),
    ("profile-inherited-min-above-max", P("p", {"clone": "strict", "max_version": "TLSv1.2"}),
     "tls_profiles.p.max_version", "above"),
    ("profile-strength-enum", P("p", {"clone": "default", "cipher_strength": "low"}),
     "tls_profiles.p.cipher_strength", '"medium", "high"'),
    ("profile-ciphers-and-strength-leave-nothing", P("p", {
        "clone": "default", "cipher_strength": "high", "ciphers": "SEED-SHA:AES128-CCM8"}),
     "tls_profiles.p.cipher_strength", "leaves no suite"),
    ("profile-bad-ciphers", P("p", {"clone": "default", "ciphers": "NOT-A-CIPHER"}),
     "tls_profiles.p.ciphers", "OpenSSL"),
    ("profile-bad-groups", P("p", {"clone": "default", "groups": "X25519:bogus"}),
     "tls_profiles.p.groups", "OpenSSL"),
    ("profile-verify-depth", P("p", {"clone": "default", "verify_depth": -1}),
     "tls_profiles.p.verify_depth", "at least 0"),
    # §2 listener TLS modes
    ("implicit-none", L(0, tls="implicit", client_tls="none"), "listeners[0].client_tls",
     "implicit"),
    ("off-required", L(0, tls="off", client_tls="required"), "listeners[0].client_tls", "off"),
    ("off-verify", L(1, tls="off", client_tls="verify"), "listeners[1].client_tls", "off"),
    # §3.1 verify needs a CA
    ("verify-without-ca", L(0, client_tls="verify"), "listeners[0].client_tls",
     "ca_file or ca_path"),
    ("client-rule-verify-without-ca",
     client_rules(0, {"match": "192.0.2.0/24", "client_tls": "verify"}),
     "listeners[0].client_rules[0].client_tls", "ca_file or ca_path"),
    # §4.1 esmtp
    ("esmtp-false-required", L(0, esmtp=False, client_tls="required"), "listeners[0].esmtp",
     "STARTTLS"),
    ("esmtp-false-verify", L(0, esmtp=False, client_tls="verify", profile="withca"),
     "listeners[0].esmtp", "STARTTLS"),
    # §3.2 upstream
    ("upstream-verify-ip", U(1, tls="verify"), "listeners[1].upstream.tls", "server_name"),
    ("upstream-verify-ipv6", U(1, tls="verify", address="[2001:db8::5]:143"),
     "listeners[1].upstream.tls", "server_name"),
    ("upstream-implicit-none", U(0, mode="implicit", tls="none"), "listeners[0].upstream.tls",
     "implicit"),
    ("rule-verify-upstream-ip", rules(0, dict(OK_RULE, recipient_encryption="verify")),
     "listeners[0].rules[0].recipient_encryption", "server_name"),
    # §4.6 auth
    ("auth-on-none", L(0, client_tls="none", auth="passthrough"), "listeners[0].auth",
     "passthrough"),
    ("auth-on-off-listener", L(0, tls="off", auth="passthrough"), "listeners[0].auth",
     "passthrough"),
    ("auth-mechanism-bad", L(0, auth_mechanisms=["PLAIN", "bad mech"]),
     "listeners[0].auth_mechanisms[1]", "SASL"),
    # §4.3 rule patterns
    ("pattern-too-long", rules(0, OK_RULE, OK_RULE, OK_RULE,
                               dict(OK_RULE, recipient="a" * 60 + "." + "b" * 60 + "."
                                    + "c" * 60 + "." + "d" * 30)),
     "listeners[0].rules[3].recipient", "200"),
    ("pattern-inner-star", rules(0, dict(OK_RULE, sender="mail.*.example")),
     "listeners[0].rules[0].sender", "*"),
    ("pattern-address", rules(0, dict(OK_RULE, recipient="bob@example.com")),
     "listeners[0].rules[0].recipient", "address"),
    ("pattern-empty", rules(0, dict(OK_RULE, recipient="")),
     "listeners[0].rules[0].recipient", "empty"),
    ("pattern-bad-label", rules(0, dict(OK_RULE, sender="exa mple.com")),
     "listeners[0].rules[0].sender", "label"),
    ("pattern-type", rules(0, dict(OK_RULE, sender=["a.example"])),
     "listeners[0].rules[0].sender", "string"),
    ("rules-on-imap", rules(1, OK_RULE), "listeners[1].rules", "SMTP"),
    ("rules-not-array", L(0, rules={"sender": "*"}), "listeners[0].rules", "array of tables"),
    # client rules
    ("client-rule-bad-cidr", client_rules(0, {"match": "192.0.2.0/33", "client_tls": "none"}),
     "listeners[0].client_rules[0].match", "not an IP"),
    ("client-rule-host-bits", client_rules(0, {"match": "192.0.2.1/24", "client_tls": "none"}),
     "listeners[0].client_rules[0].match", "192.0.2.0/24"),
    ("client-rule-bad-domain", client_rules(0, {"match": "a*b.example", "client_tls":
                                                "required"}),
     "listeners[0].client_rules[0].match", "*"),
    ("client-rule-domain-on-none", both(L(0, client_tls="none"), client_rules(
        0, {"match": "192.0.2.0/24", "client_tls": "none"},
        {"match": "partner.example", "client_tls": "required"})),
     "listeners[0].client_rules[1].match", "none"),
    ("client-rule-domain-on-off", both(L(0, tls="off"), client_rules(
        0, {"match": "*.partner.example", "client_tls": "required"})),
     "listeners[0].client_rules[0].match", "none"),
    ("client-rule-domain-loosens", client_rules(
        0, {"match": "partner.example", "client_tls": "none"}),
     "listeners[0].client_rules[0].client_tls", "tighten"),
    ("client-rule-none-on-implicit", both(L(0, tls="implicit"), client_rules(
        0, {"match": "192.0.2.0/24", "client_tls": "none"})),
     "listeners[0].client_rules[0].client_tls", "implicit"),
    ("client-rule-required-on-off", both(L(0, tls="off"), client_rules(
        0, {"match": "192.0.2.0/24", "client_tls": "required"})),
     "listeners[0].client_rules[0].client_tls", "off"),
    # §9 timeouts
    ("timeout-zero", L(0, timeouts={"command": 0}), "listeners[0].timeouts.command",
     "positive"),
    ("timeout-negative", L(1, timeouts={"imap_idle": -5}), "listeners[1].timeouts.imap_idle",
     "positive"),
    ("timeout-type", L(0, timeouts={"data": "3m"}), "listeners[0].timeouts.data", "seconds"),
    ("timeouts-not-table", L(0, timeouts=30), "listeners[0].timeouts", "table"),
    ("shutdown-grace-negative", G(shutdown_grace=-1), "gateway.shutdown_grace", "positive"),
    ("reload-grace-negative", G(reload_grace=-1), "gateway.reload_grace", "positive"),
    ("reload-grace-type", G(reload_grace="1h"), "gateway.reload_grace", "seconds"),
    ("hostname-bad", G(hostname="mx example"), "gateway.hostname", "host name"),
    # milters (SPEC 4.7)
    ("milter-address", L(0, milters=[{"name": "rs", "address": "tcp:1.2.3.4:5"}]),
     "listeners[0].milters[0].address", "inet:HOST:PORT or unix:/path"),
    ("milter-address-port", L(0, milters=[{"name": "rs", "address": "inet:127.0.0.1:0"}]),
     "listeners[0].milters[0].address", "port must be between"),
    ("milter-unix-relative", L(0, milters=[{"name": "rs", "address": "unix:run/x.sock"}]),
     "listeners[0].milters[0].address", "unix:/path"),
    ("milter-name-missing", L(0, milters=[{"address": "unix:/run/x.sock"}]),
     "listeners[0].milters[0].name", "is required"),
    ("milter-duplicate", L(0, milters=[{"name": "a", "address": "unix:/x"},
                                        {"name": "a", "address": "unix:/y"}]),
     "listeners[0].milters[1].name", "duplicate milter name"),
    ("milter-default-action", L(0, milters=[{"name": "a", "address": "unix:/x",
                                              "default_action": "pass"}]),
     "listeners[0].milters[0].default_action", '"tempfail", "accept", "reject"'),
    ("milter-timeout", L(0, milters=[{"name": "a", "address": "unix:/x",
                                       "content_timeout": -1}]),
     "listeners[0].milters[0].content_timeout", ""),
    ("milter-unknown", L(0, milters=[{"name": "a", "address": "unix:/x", "port": 1}]),
     "listeners[0].milters[0].port", "unknown key"),
    ("milter-on-imap", L(1, milters=[{"name": "a", "address": "unix:/x"}]),
     "listeners[1].milters", "SMTP listeners only"),
    ("spool-dir-relative", G(spool_dir="spool"), "gateway.spool_dir", "absolute path"),
    ("state-dir-relative", G(state_dir="state"), "gateway.state_dir", "absolute path"),
    ("milter-memory-negative", G(milter_memory=-1), "gateway.milter_memory", ""),
]


@pytest.mark.parametrize("mutate,path,words", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_validation_error_names_the_key_path(mutate, path, words):
    data = base()
    mutate(data)
    err = error_at(data, path)
    assert words in err.message, str(err)
    assert str(err) == f"{err.path}: {err.message}"


def test_unknown_key_suggests_the_close_one():
    data = base()
    data["listeners"][0]["upstream"]["adress"] = "x"
    err = error_of(data)
    assert err.path == "listeners[0].upstream.adress"
    assert 'unknown key "adress"' in err.message
    assert '"address"' in err.message


def test_base_config_is_valid():
    config = parse_config(base())
    assert isinstance(config, GatewayConfig)
    assert [lst.name for lst in config.listeners] == ["inbound", "imap"]


def test_defaults():
    data = base()
    del data["gateway"]
    config = parse_config(data)
    assert config.hostname == socket.getfqdn()
    assert config.workers == 0
    assert config.user is None and config.group is None
    assert config.metrics == "127.0.0.1:9108"
    assert config.log_format == "logfmt"
    assert config.tracking_log is None
    assert config.shutdown_grace == 30
    assert config.reload_grace == 3600
    assert config.state_dir == "/var/lib/gateway"
    lst = config.listeners[0]
    assert (lst.protocol, lst.type, lst.host, lst.port) == ("smtp", "public", "0.0.0.0", 25)
    assert (lst.tls, lst.client_tls, lst.certificate, lst.profile) == \
        ("starttls", "optional", None, "default")
    assert (lst.max_connections, lst.backlog) == (1000, 50)
    assert lst.esmtp and lst.smtputf8 and lst.received_header
    assert not lst.dsn and not lst.proxy_protocol and not lst.forward_client
    assert lst.max_message_size == 52428800 and lst.max_recipients == 1000
    assert lst.bare_newline == "reject" and lst.auth == "off"
    assert lst.auth_mechanisms == ("PLAIN", "LOGIN")
    assert lst.timeouts == Timeouts()
    assert (lst.timeouts.tls_handshake, lst.timeouts.command, lst.timeouts.data,
            lst.timeouts.upstream_connect, lst.timeouts.upstream_reply,
            lst.timeouts.upstream_data_done, lst.timeouts.imap_login,
            lst.timeouts.imap_idle) == (30, 300, 180, 30, 300, 540, 60, 1800)
    up = lst.upstream
    assert (up.host, up.port, up.mode, up.tls, up.server_name, up.profile, up.certificate) == \
        ("10.0.0.5", 25, "starttls", "preferred", None, "default", None)
    assert set(PREDEFINED) <= set(config.profiles)


def test_timeouts_override_only_named_keys():
    data = base()
    data["listeners"][0]["timeouts"] = {"command": 60, "data": 2.5}
    t = parse_config(data).listeners[0].timeouts
    assert (t.command, t.data, t.tls_handshake) == (60, 2.5, 30)


@pytest.mark.parametrize("tls,given,expected", [
    ("implicit", None, "required"),
    ("implicit", "optional", "required"),
    ("implicit", "required", "required"),
    ("off", None, "none"),
    ("off", "optional", "optional"),
    ("starttls", None, "optional"),
    ("starttls", "none", "none"),
    ("starttls", "required", "required"),
])
def test_client_tls_defaults_per_mode(tls, given, expected):
    data = base()
    data["listeners"][0]["tls"] = tls
    if given is not None:
        data["listeners"][0]["client_tls"] = given
    assert parse_config(data).listeners[0].client_tls == expected


def test_verify_with_ca_profile_is_accepted():
    data = base()
    data["listeners"][0].update(client_tls="verify", profile="withca")
    data["listeners"][0]["client_rules"] = [{"match": "10.0.0.0/8", "client_tls": "verify"}]
    lst = parse_config(data).listeners[0]
    assert lst.client_tls == "verify" and lst.profile == "withca"


def test_esmtp_false_on_optional_listener_warns():
    data = base()
    data["listeners"][0]["esmtp"] = False
    config = parse_config(data)
    assert "listeners[0]: esmtp = false disables STARTTLS" in config.warnings


def test_missing_certificate_warns():
    config = parse_config(base())
    assert any(w.startswith("listeners[0]:") and "demonstration" in w for w in config.warnings)
    data = base()
    for lst in data["listeners"]:
        lst["certificate"] = "main"
    assert parse_config(data).warnings == ()


def test_upstream_verify_to_ip_with_server_name_or_hostname_is_fine():
    data = base()
    data["listeners"][0]["upstream"].update(tls="verify", server_name="mx.internal.test")
    data["listeners"][1]["upstream"].update(tls="verify", address="imap.internal.test:143")
    config = parse_config(data)
    assert config.listeners[0].upstream.server_name == "mx.internal.test"
    assert config.listeners[1].upstream.host == "imap.internal.test"


def test_clone_profiles():
    data = base()
    data["tls_profiles"] = {
        "partners": {"clone": "default", "min_version": "TLSv1.3", "cipher_strength": "high",
                     "ca_file": "/ca.pem"},
        "child": {"clone": "partners", "ciphers": "ECDHE-RSA-AES128-GCM-SHA256"},
        "legacy": {"clone": "compatible", "verify_depth": 3, "session_resumption": False},
    }
    profiles = parse_config(data).profiles
    assert profiles["default"] is PREDEFINED["default"]
    partners = profiles["partners"]
    assert partners.name == "partners" and not partners.predefined
    assert partners.min_version == "TLSv1.3" and partners.max_version == "TLSv1.3"
    assert partners.cipher_strength == "high"
    # a grade narrows the cloned list (all of Mozilla's intermediate suites are HIGH)
    assert partners.ciphers == PREDEFINED["default"].ciphers
    assert partners.ca_file == "/ca.pem"
    assert partners.groups == PREDEFINED["default"].groups
    child = profiles["child"]        # cloned from an operator profile defined before it
    assert child.ca_file == "/ca.pem" and child.min_version == "TLSv1.3"
    assert child.ciphers == "ECDHE-RSA-AES128-GCM-SHA256" and child.cipher_strength is None
    legacy = profiles["legacy"]
    assert legacy.min_version == "TLSv1" and legacy.ciphers == PREDEFINED["compatible"].ciphers
    assert legacy.verify_depth == 3 and legacy.session_resumption is False
    assert PREDEFINED["default"].min_version == "TLSv1.2"     # the predefined stay untouched


def test_clone_of_profile_defined_later():
    data = base()
    data["tls_profiles"] = {"a": {"clone": "b"}, "b": {"clone": "strict"}}
    profiles = parse_config(data).profiles
    assert profiles["a"].min_version == "TLSv1.3"


def test_rules_are_normalised():
    data = base()
    data["listeners"][0]["rules"] = [
        {"sender": "*", "recipient": "Partner.Example."},
        {"sender": "*.BANK.example", "recipient": "*", "sender_encryption": "required",
         "recipient_encryption": "verify", "enabled": False},
        {"sender": "bücher.example", "recipient": "*"},
    ]
    data["listeners"][0]["upstream"]["server_name"] = "mx.internal"
    rules = parse_config(data).listeners[0].rules
    assert rules[0].recipient == "partner.example"
    assert rules[0].sender_encryption == "optional"
    assert rules[0].recipient_encryption == "preferred"       # the upstream's level by default
    assert rules[1].sender == "*.bank.example" and rules[1].enabled is False
    assert rules[2].sender == "xn--bcher-kva.example"


def test_rule_recipient_encryption_defaults_to_upstream_level():
    data = base()
    data["listeners"][0]["upstream"]["tls"] = "required"
    data["listeners"][0]["rules"] = [{"recipient": "x.example"}]
    assert parse_config(data).listeners[0].rules[0].recipient_encryption == "required"


def test_pattern_of_exactly_200_characters_is_accepted():
    pattern = ".".join(["a" * 49] * 4)
    assert len(pattern) == 199
    assert parse_domain_pattern(pattern + "b", "p") == pattern + "b"
    with pytest.raises(ConfigError) as info:
        parse_domain_pattern(pattern + "bb", "p")
    assert "200" in info.value.message


def test_client_rules_are_normalised():
    data = base()
    data["listeners"][0]["client_rules"] = [
        {"match": "192.0.2.7", "client_tls": "none"},
        {"match": "2001:DB8::/32", "cipher_strength": "high"},
        {"match": "*.Partner.example", "client_tls": "required"},
    ]
    rules = parse_config(data).listeners[0].client_rules
    assert rules[0] == ClientRule(match="192.0.2.7/32", client_tls="none")
    assert rules[0].is_network
    assert rules[1].match == "2001:db8::/32" and rules[1].cipher_strength == "high"
    assert rules[2].match == "*.partner.example" and not rules[2].is_network


def test_client_rule_optional_on_implicit_means_required():
    data = base()
    data["listeners"][0]["tls"] = "implicit"
    data["listeners"][0]["client_rules"] = [{"match": "10.0.0.0/8", "client_tls": "optional"}]
    assert parse_config(data).listeners[0].client_rules[0].client_tls == "required"


@pytest.mark.parametrize("text,expected", [
    ("0.0.0.0:25", ("0.0.0.0", 25)),
    ("[::]:587", ("::", 587)),
    ("[2001:db8::1]:25", ("2001:db8::1", 25)),
    ("mail.internal.example:143", ("mail.internal.example", 143)),
    ("localhost:2525", ("localhost", 2525)),
])
def test_hostport(text, expected):
    assert parse_hostport(text, "x") == expected


def test_bind_port_zero_allowed_and_not_a_duplicate():
    data = base()
    for lst in data["listeners"]:
        lst["bind"] = "127.0.0.1:0"
    config = parse_config(data)
    assert [lst.port for lst in config.listeners] == [0, 0]


def test_metrics_may_be_disabled():
    data = base()
    data["gateway"]["metrics"] = ""
    assert parse_config(data).metrics == ""


def test_example_file_parses():
    config = load_config(EXAMPLE)
    names = [lst.name for lst in config.listeners]
    assert names == ["inbound", "submission", "smtps", "imap", "imaps"]
    by = {lst.name: lst for lst in config.listeners}
    assert by["inbound"].port == 25 and len(by["inbound"].rules) == 7
    assert config.alert_recipients == ("postmaster@example.com",)
    assert len(by["inbound"].client_rules) == 3
    assert by["submission"].auth == "required" and by["submission"].host == "::"
    assert by["smtps"].tls == "implicit" and by["smtps"].client_tls == "required"
    assert by["imap"].protocol == "imap" and by["imaps"].port == 993
    assert [m.name for m in by["inbound"].milters] == ["rspamd", "opendkim"]
    assert by["inbound"].milters[1].default_action == "accept"
    assert config.spool_dir == "/var/lib/gateway/spool" and config.milter_memory == 1048576
    assert config.reload_grace == 3600
    assert {"partners", "clientcerts", "legacy"} <= set(config.profiles)
    assert config.source and config.source.endswith("gateway.example.toml")


def test_example_file_mentions_every_key():
    text = EXAMPLE.read_text()
    from gateway import config as c
    for key in (c._GATEWAY_KEYS + c._CERT_KEYS + c._PROFILE_KEYS + c._LISTENER_KEYS
                + c._TIMEOUT_KEYS + c._UPSTREAM_KEYS + c._CLIENT_RULE_KEYS + c._RULE_KEYS
                + c._MILTER_KEYS):
        assert f"{key} =" in text or f"[listeners.{key}]" in text \
            or f"[[listeners.{key}]]" in text, key


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[gateway]\nhostname = "mx.test"\nworkers = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert "TOML syntax error" in info.value.message
    assert "line 3" in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "cannot read" in info.value.message


def test_check_files(tmp_path, ca):
    cert = ca.issue_cert("mx.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    data = base()
    data["certificates"] = {"main": {"cert": str(cert_path), "key": str(key_path)}}
    del data["tls_profiles"]
    assert check_files(parse_config(data)) == []

    other = ca.issue_cert("other.test")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    data["certificates"]["mismatch"] = {"cert": str(cert_path), "key": str(other_key)}
    data["certificates"]["gone"] = {"cert": str(tmp_path / "missing.pem"), "key": str(key_path)}
    data["gateway"].update(user="no-such-user-xyz", group="no-such-group-xyz")
    problems = check_files(parse_config(data))
    assert any(p.startswith("certificates.mismatch:") for p in problems), problems
    assert any(p.startswith("certificates.gone.cert:") and "cannot read" in p
               for p in problems), problems
    assert 'gateway.user: no such user "no-such-user-xyz"' in problems
    assert 'gateway.group: no such group "no-such-group-xyz"' in problems


def test_demo_config():
    config = demo_config()
    smtp, smtps = config.listeners
    assert config.hostname == "localhost" and config.metrics == "127.0.0.1:9108"
    assert (smtp.name, smtp.host, smtp.port, smtp.tls, smtp.client_tls) == \
        ("demo-smtp", "127.0.0.1", 2525, "starttls", "optional")
    assert (smtps.name, smtps.port, smtps.tls, smtps.client_tls) == \
        ("demo-smtps", 4465, "implicit", "required")
    for lst in config.listeners:
        assert lst.certificate is None
        assert (lst.upstream.host, lst.upstream.port, lst.upstream.tls, lst.upstream.mode) == \
            ("127.0.0.1", 2526, "none", "starttls")
    assert set(PREDEFINED) <= set(config.profiles)
    other = demo_config("127.0.0.2", 3000)
    assert other.listeners[0].upstream.port == 3000


def test_config_is_frozen_and_replaceable():
    config = parse_config(base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 3
    assert dataclasses.replace(config, workers=3).workers == 3


def test_parse_does_not_modify_its_input():
    data = base()
    data["listeners"][0]["rules"] = [{"recipient": "A.example"}]
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


# --- AUTH (SPEC §4.6) -------------------------------------------------------------------------

def _auth(**listener):
    d = base()
    d["listeners"][0].update(listener)
    return d


@pytest.mark.parametrize("listener,path,words", [
    (dict(auth="required", client_tls="none"), "listeners[0].auth", "needs TLS"),
    (dict(auth="passthrough"), "listeners[0].upstream.tls", '"required" or "verify"'),
    (dict(auth="required", upstream={"address": "10.0.0.5:587", "tls": "allowed"}),
     "listeners[0].upstream.tls", "plaintext_auth"),
    (dict(auth="required", auth_mechanisms=["PLAIN", "GSSAPI"],
          upstream={"address": "10.0.0.5:587", "tls": "required"}),
     "listeners[0].auth_mechanisms[1]", "cannot be relayed"),
    (dict(auth="sometimes"), "listeners[0].auth", "passthrough"),
])
def test_auth_configuration_errors(listener, path, words):
    err = error_at(_auth(**listener), path)
    assert words in str(err)


def test_auth_over_plaintext_upstream_needs_plaintext_auth_and_warns():
    cfg = parse_config(_auth(auth="required", upstream={
        "address": "127.0.0.1:587", "tls": "none", "plaintext_auth": True}))
    assert cfg.listeners[0].auth == "required" and cfg.listeners[0].upstream.plaintext_auth
    assert any("plaintext_auth" in w for w in cfg.warnings)
    ok = parse_config(_auth(auth="passthrough", auth_mechanisms=["SCRAM-SHA-256"],
                            upstream={"address": "10.0.0.5:587", "tls": "verify",
                                      "server_name": "mx.internal.test"}))
    assert ok.listeners[0].auth_mechanisms == ("SCRAM-SHA-256",)
    assert not any("plaintext_auth" in w for w in ok.warnings)
