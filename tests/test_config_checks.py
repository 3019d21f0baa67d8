"""Configuration checks (SPEC §12): every error of a file at once, an upstream that is the
listener's own bind, a private key readable by group or others."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.config import ConfigError, check_files, load_config, parse_config
from gateway.errors import ConfigErrors

from harness import NEUTRAL_CWD, gateway_subprocess_env


def base() -> dict:
    return {
        "gateway": {"hostname": "mx.test"},
        "listeners": [
            {"name": "inbound", "protocol": "smtp", "bind": "0.0.0.0:25",
             "upstream": {"address": "10.0.0.5:25"}},
            {"name": "imap", "protocol": "imap", "bind": "0.0.0.0:143",
             "upstream": {"address": "10.0.0.6:143"}},
        ],
    }


def errors_of(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    exc = info.value
    listed = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    return [(e.path, e.message) for e in listed]


def paths_of(data: dict) -> list[str]:
    return [path for path, _ in errors_of(data)]


def test_one_error_is_raised_as_itself():
    data = base()
    data["listeners"][0]["max_connections"] = 0
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert not isinstance(info.value, ConfigErrors)
    assert str(info.value) == "listeners[0].max_connections: must be at least 1 (got 0)"


def test_errors_in_several_sections_and_listeners_are_all_reported():
    data = base()
    data["gateway"]["workers"] = -1
    data["certificates"] = {"main": {"cert": "/c.pem"}, "other": {"cert": "/o.pem", "key": 3}}
    data["tls_profiles"] = {"p": {"clone": "default", "min_version": "SSLv3"}}
    data["listeners"][0]["tls"] = "sometimes"
    data["listeners"][1]["upstream"]["address"] = "nowhere"
    with pytest.raises(ConfigErrors) as info:
        parse_config(data)
    assert [e.path for e in info.value.errors] == [
        "gateway.workers", "certificates.main.key", "certificates.other.key",
        "tls_profiles.p.min_version", "listeners[0].tls", "listeners[1].upstream.address"]
    text = str(info.value)
    assert text.startswith("6 configuration errors: gateway.workers: must be at least 0")
    assert "listeners[1].upstream.address: " in text


def test_every_unknown_key_of_a_table_and_every_bad_rule():
    data = base()
    data["listeners"][0].update(max_conn=5, backlg=3, rules=[
        {"recipient": "a@b.example"}, {"sender": "ok.example"},
        {"recipient_encryption": "sometimes"}],
        client_rules=[{"match": "192.0.2.0/24"}, {"match": "10.0.0.1/8", "client_tls": "none"}])
    # the unknown keys, and the listener's other errors beside them (SPEC §12: all at once)
    rule_errors = ["listeners[0].client_rules[0]", "listeners[0].client_rules[1].match",
                   "listeners[0].rules[0].recipient",
                   "listeners[0].rules[2].recipient_encryption"]
    assert paths_of(data) == ["listeners[0].max_conn", "listeners[0].backlg", *rule_errors]
    del data["listeners"][0]["max_conn"], data["listeners"][0]["backlg"]
    assert paths_of(data) == rule_errors


def test_every_wrong_key_of_one_listener_is_reported_at_once():
    """Three wrong values in one listener, an unknown profile beside an unknown certificate,
    a wrong upstream key and timeout: each is its own line (they used to hide behind the
    first)."""
    data = base()
    data["listeners"][0].update(max_connections=0, backlog="many", bare_newline="keep",
                                certificate="nope", profile="nope2",
                                timeouts={"command": -1, "data": "x"})
    data["listeners"][0]["upstream"].update(pool_size=-1, mode="sometimes")
    assert paths_of(data) == [
        "listeners[0].certificate", "listeners[0].profile", "listeners[0].timeouts.command",
        "listeners[0].timeouts.data", "listeners[0].upstream.mode",
        "listeners[0].upstream.pool_size", "listeners[0].max_connections",
        "listeners[0].backlog", "listeners[0].bare_newline"]


def test_every_wrong_key_of_the_gateway_section_is_reported_at_once():
    data = base()
    data["gateway"] = {"workers": -1, "hostname": "bad host", "shutdown_grace": "long",
                       "spool_dir": "relative", "log_format": "xml", "metrics": "nowhere"}
    assert paths_of(data) == ["gateway.hostname", "gateway.workers", "gateway.metrics",
                              "gateway.log_format", "gateway.shutdown_grace",
                              "gateway.spool_dir"]


def test_a_profile_in_error_is_reported_once():
    """A profile cloning it and a listener naming it add no error of their own."""
    data = base()
    data["tls_profiles"] = {"broken": {"clone": "default", "ciphers": "NOPE"},
                            "child": {"clone": "broken", "min_version": "TLSv1.3"},
                            "typo": {"clone": "default", "ca_fil": "/x"}}
    data["listeners"][0]["profile"] = "child"
    data["listeners"][1]["upstream"]["profile"] = "typo"
    assert paths_of(data) == ["tls_profiles.typo.ca_fil", "tls_profiles.broken.ciphers"]


def test_duplicates_across_listeners_with_another_error():
    data = base()
    data["listeners"][1].update(name="inbound", bind="0.0.0.0:25", protocol="smtp")
    data["listeners"].append({"name": "x", "bind": "0.0.0.0:26", "tls": "nope",
                              "upstream": {"address": "10.0.0.5:25"}})
    assert errors_of(data) == [
        ("listeners[1].name", 'duplicate listener name "inbound" (also listeners[0])'),
        ("listeners[1].bind", '0.0.0.0:25 is already bound by listeners[0] ("inbound")'),
        ("listeners[2].tls", 'must be one of "starttls", "implicit", "off" (got "nope")')]


def test_no_listener_with_another_error():
    data = {"gateway": {"hostname": "mx test"}}
    assert paths_of(data) == ["gateway.hostname", "listeners"]


@pytest.mark.parametrize("bind, upstream", [
    ("127.0.0.1:2525", "127.0.0.1:2525"),
    ("0.0.0.0:25", "127.0.0.1:25"),
    ("0.0.0.0:25", "localhost:25"),
    ("[::]:25", "[::1]:25"),
    ("[::]:25", "127.0.0.1:25"),
    ("127.0.0.1:25", "localhost:25"),
    ("127.0.0.1:25", "0.0.0.0:25"),
    ("192.0.2.1:25", "192.0.2.1:25"),
    ("[2001:db8::1]:25", "[2001:DB8::1]:25"),
])
def test_upstream_equal_to_the_own_bind_is_an_error(bind, upstream):
    data = base()
    data["listeners"][0].update(bind=bind, upstream={"address": upstream})
    (path, message), = errors_of(data)
    assert path == "listeners[0].upstream.address"
    assert "is this listener's own bind address" in message and "relay to itself" in message


@pytest.mark.parametrize("bind, upstream", [
    ("0.0.0.0:25", "10.0.0.5:25"),
    ("127.0.0.1:25", "127.0.0.1:26"),
    ("127.0.0.1:25", "127.0.0.2:25"),
    ("192.0.2.1:25", "127.0.0.1:25"),
    ("127.0.0.1:0", "127.0.0.1:25"),
    ("0.0.0.0:25", "mx.internal.example:25"),
])
def test_other_upstreams_are_fine(bind, upstream):
    data = base()
    data["listeners"][0].update(bind=bind, upstream={"address": upstream})
    assert parse_config(data).listeners[0].upstream.port == int(upstream.rsplit(":", 1)[1])


def _cert_files(tmp_path, ca, mode: int):
    cert = ca.issue_cert("mx.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, mode)
    return cert_path, key_path


@pytest.mark.parametrize("mode, who", [(0o600, None), (0o640, "group"), (0o604, "others"),
                                       (0o644, "group and others"), (0o400, None)])
def test_a_private_key_readable_by_group_or_others_is_a_warning(tmp_path, ca, mode, who):
    cert_path, key_path = _cert_files(tmp_path, ca, mode)
    data = base()
    data["certificates"] = {"main": {"cert": str(cert_path), "key": str(key_path)}}
    warnings: list[str] = []
    assert check_files(parse_config(data), warnings) == []       # not a problem
    if who is None:
        assert warnings == []
    else:
        assert warnings == [f"certificates.main.key: the private key {key_path} is readable "
                            f"by {who} (mode {mode:04o}; chmod 600 it)"]
    assert check_files(parse_config(data)) == []                  # warnings not asked for


def _gateway(*args):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)


def test_gateway_check_prints_every_error_and_the_key_warning(tmp_path, ca):
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nworkers = -3\n\n[[listeners]]\nname = "a"\nbind = "127.0.0.1:25"\n'
                   'tls = "nope"\n[listeners.upstream]\naddress = "127.0.0.1:26"\n')
    result = _gateway("check", "-c", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: gateway.workers: must be at least 0 (got -3)",
        'error: listeners[0].tls: must be one of "starttls", "implicit", "off" (got "nope")']
    with pytest.raises(ConfigErrors):
        load_config(bad)

    cert_path, key_path = _cert_files(tmp_path, ca, 0o644)
    good = tmp_path / "good.toml"
    good.write_text(f'[certificates.main]\ncert = "{cert_path}"\nkey = "{key_path}"\n\n'
                    '[[listeners]]\nname = "a"\nbind = "127.0.0.1:25"\ncertificate = "main"\n'
                    '[listeners.upstream]\naddress = "127.0.0.1:26"\n')
    result = _gateway("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert (f"warning: certificates.main.key: the private key {key_path} is readable by group "
            "and others (mode 0644; chmod 600 it)") in result.stderr.splitlines()
