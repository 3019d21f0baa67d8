"""`cipher_strength` only narrows (SPEC §3.3): a grade filters the TLS ≤ 1.2 list a profile
has, in its order and with its @SECLEVEL, never adds a suite; an empty result is a
configuration error. Over a socket with `openssl s_client -cipher`, for a client rule."""
from __future__ import annotations

import pytest
import trio

from gateway.config import ConfigError, parse_config
from gateway.levels import CipherGrade
from gateway.tls.grades import expand, grade_suites, narrow
from gateway.tls.profiles import MOZILLA_INTERMEDIATE, MOZILLA_OLD, PREDEFINED, clone

from harness import config_dict, listener_dict, running_gateway, running_sink
from peers import openssl_s_client_starttls_async, require

# HIGH, MEDIUM (CCM8), HIGH, static RSA (HIGH), MEDIUM (SEED), with a security level
OPERATOR = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-CCM8:ECDHE-RSA-AES128-GCM-SHA256:"
            "AES256-SHA:SEED-SHA:@SECLEVEL=1")


def test_the_grades_as_openssl_expands_them():
    assert "ECDHE-ECDSA-AES128-CCM8" in grade_suites("medium")
    assert "ECDHE-ECDSA-AES128-CCM8" not in grade_suites("high")
    assert grade_suites("high") < grade_suites("medium")
    assert not any(name.startswith("TLS_") for name in expand(MOZILLA_INTERMEDIATE))


def test_a_grade_keeps_the_operator_list_order_and_seclevel():
    high = narrow(OPERATOR, "high")
    assert high == ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:AES256-SHA:"
                    "@SECLEVEL=1")
    assert narrow(OPERATOR, CipherGrade.MEDIUM) == OPERATOR     # every suite is at least MEDIUM
    assert expand(high) == ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256",
                            "AES256-SHA")


@pytest.mark.parametrize("base", [MOZILLA_INTERMEDIATE, MOZILLA_OLD])
def test_a_grade_never_widens_the_predefined_lists(base):
    for grade in CipherGrade:
        assert expand(narrow(base, grade)) == expand(base)        # all of them are HIGH


def test_clone_with_a_grade_narrows_the_cloned_list():
    base = clone(PREDEFINED["default"], "ops", ciphers=OPERATOR)
    high = clone(base, "ops-high", cipher_strength="high")
    assert set(expand(high.ciphers)) <= set(expand(base.ciphers))
    assert "ECDHE-ECDSA-AES128-CCM8" not in expand(high.ciphers)
    default_high = clone(PREDEFINED["default"], "d", cipher_strength="high")
    assert "ECDHE-ECDSA-AES256-SHA" not in expand(default_high.ciphers)   # HIGH, not Mozilla's


def test_a_grade_on_a_profile_keeps_only_its_suites():
    data = config_dict([listener_dict(upstream_port=25)])
    data["tls_profiles"] = {"ops": {"clone": "default", "ciphers": OPERATOR},
                            "ops_high": {"clone": "ops", "cipher_strength": "high"}}
    profiles = parse_config(data).profiles
    assert profiles["ops_high"].ciphers == narrow(OPERATOR, "high")
    assert profiles["ops_high"].cipher_strength == "high"


def test_a_grade_that_leaves_nothing_is_a_config_error():
    data = config_dict([listener_dict(upstream_port=25)])
    data["tls_profiles"] = {"medonly": {"clone": "default", "ciphers": "SEED-SHA:AES128-CCM8"},
                            "x": {"clone": "medonly", "cipher_strength": "high"}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == "tls_profiles.x.cipher_strength"
    assert "leaves no suite" in info.value.message


def test_a_client_rule_grade_that_leaves_nothing_is_a_config_error():
    data = config_dict([listener_dict(upstream_port=25, profile="medonly", client_rules=[
        {"match": "192.0.2.0/24", "cipher_strength": "high"}])])
    data["tls_profiles"] = {"medonly": {"clone": "default", "ciphers": "SEED-SHA:AES128-CCM8"}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == "listeners[0].client_rules[0].cipher_strength"
    assert 'profile "medonly"' in info.value.message and "leaves no suite" in info.value.message


def _handshake_ok(text: str) -> bool:
    return "Ciphersuite:" in text                     # what `s_client -brief` prints on success


async def test_high_client_rule_does_not_widen_the_default_profile_over_a_socket(server_cert):
    """ECDHE-ECDSA-AES256-SHA is HIGH but not in Mozilla's intermediate list: a client rule
    `cipher_strength = "high"` must not make the listener accept it."""
    require("openssl")
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main", client_rules=[
            {"match": "127.0.0.0/8", "cipher_strength": "high"}])], server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                cbc = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp",
                    extra_args=["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA"])
                gcm = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp",
                    extra_args=["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"])
    assert not _handshake_ok(cbc), cbc
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in gcm, gcm       # the rule's context works
    errors = logs.of("tls_error", side="client")
    assert len(errors) == 1 and "no shared cipher" in errors[0]["reason"]


# the profile's own list: HIGH (CBC-SHA1), HIGH (GCM), MEDIUM (CCM8) for an ECDSA certificate;
# OpenSSL 3 takes the 64-bit CCM8 tag only at security level 0
OWN = ("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-CCM8:"
       "@SECLEVEL=0")


def test_a_grade_narrows_the_profiles_own_ciphers():
    data = config_dict([listener_dict(upstream_port=25)])
    data["tls_profiles"] = {"own": {"clone": "default", "ciphers": OWN,
                                    "cipher_strength": "high"}}
    own = parse_config(data).profiles["own"]
    assert own.cipher_strength == "high"
    assert own.ciphers == "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-GCM-SHA256:@SECLEVEL=0"
    # medium keeps all three; a grade leaving nothing of the own list is a config error
    data["tls_profiles"]["own"]["cipher_strength"] = "medium"
    assert expand(parse_config(data).profiles["own"].ciphers) == expand(OWN)
    data["tls_profiles"] = {"own": {"clone": "default", "ciphers": "ECDHE-ECDSA-AES128-CCM8",
                                    "cipher_strength": "high"}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == "tls_profiles.own.cipher_strength"
    assert "leaves no suite" in info.value.message


async def test_a_grade_in_the_same_profile_as_its_ciphers_over_a_socket(server_cert):
    """`ciphers` and `cipher_strength = "high"` in one profile (SPEC §3.3): the listener
    refuses a client offering only the MEDIUM suite of that list, and takes the HIGH ones;
    the same list without the grade takes the MEDIUM suite (the offer itself is good)."""
    require("openssl")
    async with running_sink() as sink:
        data = config_dict([listener_dict("graded", upstream_port=sink.port, cert="main",
                                          profile="own_high"),
                            listener_dict("ungraded", upstream_port=sink.port, cert="main",
                                          profile="own")], server_cert=server_cert)
        data["tls_profiles"] = {"own": {"clone": "default", "ciphers": OWN},
                                "own_high": {"clone": "default", "ciphers": OWN,
                                             "cipher_strength": "high"}}
        async with running_gateway(data) as (gw, logs):
            graded, ungraded = gw.addresses["graded"][1], gw.addresses["ungraded"][1]

            async def offer(port, suite):
                return await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp",
                    extra_args=["-tls1_2", "-cipher", suite + ":@SECLEVEL=0"])
            with trio.fail_after(60):
                ccm8 = await offer(graded, "ECDHE-ECDSA-AES128-CCM8")
                cbc = await offer(graded, "ECDHE-ECDSA-AES128-SHA")
                gcm = await offer(graded, "ECDHE-ECDSA-AES128-GCM-SHA256")
                control = await offer(ungraded, "ECDHE-ECDSA-AES128-CCM8")
    assert not _handshake_ok(ccm8), ccm8
    assert "ECDHE-ECDSA-AES128-SHA" in cbc and _handshake_ok(cbc), cbc
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in gcm and _handshake_ok(gcm), gcm
    assert "ECDHE-ECDSA-AES128-CCM8" in control and _handshake_ok(control), control
    errors = logs.of("tls_error", side="client")
    assert len(errors) == 1 and "no shared cipher" in errors[0]["reason"]
