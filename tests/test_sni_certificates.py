"""Several certificates on one listener, chosen by SNI (SPEC §3.4): `certificates = [...]`
by subjectAltName (exact, then `*.` wildcard, else the first), an ECDSA + RSA pair per entry,
the configuration errors, what `gateway check` lists and what a reload re-reads. Over real
sockets with `openssl s_client -servername` and `-sigalgs`."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import trio
import trustme

from gateway.config import ConfigError, parse_config
from gateway.serve.listener_tls import build_tls
from gateway.observe.logs import EventLog
from gateway.tls.sni import SNISelector

from harness import (NEUTRAL_CWD, config_dict, gateway_subprocess_env, listener_dict,
                     running_gateway, running_sink)
from peers import openssl_s_client_starttls_async, require


class Pair:
    def __init__(self, directory, name: str, issued: trustme.LeafCert):
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        issued.private_key_pem.write_to_path(str(self.key))
        os.chmod(self.key, 0o600)
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert), append=True)


@pytest.fixture
def certs(tmp_path, ca):
    """main: mx.example.com; org: *.example.org; special: mail.example.org (an exact name a
    wildcard of an earlier entry also covers); dual: ECDSA + RSA for dual.example."""
    def pair(name, *names, key_type=trustme.KeyType.ECDSA):
        return Pair(tmp_path, name, ca.issue_cert(*names, common_name=f"{name}-cn",
                                                  key_type=key_type))
    out = {
        "main": pair("main", "mx.example.com", "localhost"),
        "org": pair("org", "*.example.org"),
        "special": pair("special", "mail.example.org"),
        "dual": pair("dual", "dual.example"),
        "dual_rsa": pair("dual_rsa", "dual.example", "rsa-only.example",
                         key_type=trustme.KeyType.RSA),
    }
    out["ca"] = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(out["ca"]))
    return out


def cert_section(certs) -> dict:
    section = {name: {"cert": str(certs[name].cert), "key": str(certs[name].key)}
               for name in ("main", "org", "special", "dual")}
    section["dual"].update(rsa_cert=str(certs["dual_rsa"].cert),
                           rsa_key=str(certs["dual_rsa"].key))
    return section


def sni_config(certs, upstream_port: int, **listener) -> dict:
    data = config_dict([listener_dict(upstream_port=upstream_port, **listener)])
    data["certificates"] = cert_section(certs)
    data["listeners"][0]["certificates"] = ["main", "org", "special", "dual"]
    return data


def peer_cn(text: str) -> str | None:
    m = re.search(r"Peer certificate: .*?CN\s*=\s*([\w.-]+)", text)
    return m.group(1) if m else None


# --- the selector ------------------------------------------------------------------------------

def test_selector_exact_then_wildcard_then_the_first():
    sel = SNISelector([("main", ["mx.example.com"]), ("org", ["*.example.org", "Org.Example."]),
                       ("special", ["mail.example.org", "mx.example.com"])])
    assert sel.choose(None) == sel.choose("") == "main"
    assert sel.choose("MX.example.com.") == "main"           # the first entry holding it
    assert sel.choose("mail.example.org") == "special"       # exact before the wildcard
    assert sel.choose("x.example.org") == "org"
    assert sel.choose("org.example") == "org"
    assert sel.choose("example.org") == "main"                # a wildcard needs a label
    assert sel.choose("a.b.example.org") == "main"            # ... and only one
    assert sel.choose("unknown.test") == "main"


# --- over sockets --------------------------------------------------------------------------------

@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_openssl_servername_picks_each_certificate(certs, tls):
    require("openssl")
    async with running_sink() as sink:
        data = sni_config(certs, sink.port, tls=tls)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            proto = "smtp" if tls == "starttls" else None

            async def served(servername: str | None, *extra: str) -> str:
                args = ["-servername", servername] if servername else ["-noservername"]
                with trio.fail_after(30):
                    return await openssl_s_client_starttls_async(
                        "127.0.0.1", port, proto, cafile=certs["ca"],
                        extra_args=[*args, *extra])

            seen = {name: await served(name) for name in (
                "mx.example.com", "x.example.org", "mail.example.org", "a.b.example.org",
                "unknown.test", "dual.example", None)}
    cns = {name: peer_cn(text) for name, text in seen.items()}
    assert cns == {"mx.example.com": "main-cn", "x.example.org": "org-cn",
                   "mail.example.org": "special-cn", "a.b.example.org": "main-cn",
                   "unknown.test": "main-cn", "dual.example": "dual-cn", None: "main-cn"}, seen
    for text in seen.values():
        assert "Verification: OK" in text, text                 # each pair with its chain
    events = logs.of("tls", side="client")
    assert {e.get("sni") for e in events} == {
        "mx.example.com", "x.example.org", "mail.example.org", "a.b.example.org",
        "unknown.test", "dual.example", None}


@pytest.mark.parametrize("args", [
    ["-tls1_3", "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"],
    ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
], ids=["tls13-rsa-sigalgs", "tls12-rsa-cipher"])
async def test_a_client_without_ecdsa_gets_the_rsa_pair(certs, args):
    require("openssl")
    async with running_sink() as sink:
        data = sni_config(certs, sink.port)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                rsa = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", cafile=certs["ca"],
                    extra_args=["-servername", "dual.example", *args])
                ecdsa = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", cafile=certs["ca"],
                    extra_args=["-servername", "dual.example"])
    assert peer_cn(rsa) == "dual_rsa-cn" and "Verification: OK" in rsa, rsa
    assert peer_cn(ecdsa) == "dual-cn" and "ECDSA" in ecdsa, ecdsa


async def test_one_certificate_entry_with_two_pairs_needs_no_sni(certs):
    """An entry with ECDSA + RSA is one context: OpenSSL picks the pair, no read-ahead."""
    require("openssl")
    async with running_sink() as sink:
        data = sni_config(certs, sink.port)
        data["listeners"][0]["certificates"] = ["dual"]
        (ltls,), _ = build_tls(parse_config(data), EventLog(stream=open(os.devnull, "w")))
        assert ltls.sni == {}
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                rsa = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", extra_args=[
                        "-noservername", "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"])
                ecdsa = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", extra_args=["-noservername"])
    assert peer_cn(rsa) == "dual_rsa-cn" and peer_cn(ecdsa) == "dual-cn"


async def test_sni_with_cipher_strength_variant_and_a_tls_error(certs):
    """A client rule's cipher-strength variant has its own selector; a client that sends
    garbage instead of a ClientHello gets the usual tls_error."""
    require("openssl")
    async with running_sink() as sink:
        data = sni_config(certs, sink.port, client_rules=[
            {"match": "127.0.0.0/8", "cipher_strength": "high"}])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(60):
                text = await openssl_s_client_starttls_async(
                    "127.0.0.1", port, "smtp", extra_args=["-servername", "x.example.org"])
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    got = b""

                    async def until(marker: bytes) -> None:
                        nonlocal got
                        while marker not in got:
                            chunk = await stream.receive_some(4096)
                            assert chunk, got
                            got += chunk
                        got = b""
                    await until(b"\r\n")
                    await stream.send_all(b"EHLO c.test\r\n")
                    await until(b"250 ")
                    await stream.send_all(b"STARTTLS\r\n")
                    await until(b"220 ")
                    # a handshake record that holds no ClientHello
                    await stream.send_all(b"\x16\x03\x01\x00\x05hello, not TLS" + b"\0" * 64)
                    while await stream.receive_some(4096):
                        pass
    assert peer_cn(text) == "org-cn", text
    assert logs.of("tls_error", side="client")


# --- configuration ---------------------------------------------------------------------------

def _base(certs) -> dict:
    data = sni_config(certs, 2600)
    return data


@pytest.mark.parametrize("mutate, path, words", [
    (lambda d: d["listeners"][0].update(certificate="main"), "listeners[0].certificates",
     "either certificate or certificates"),
    (lambda d: d["listeners"][0].update(certificates=[]), "listeners[0].certificates",
     "at least one"),
    (lambda d: d["listeners"][0].update(certificates=["main", "nope"]),
     "listeners[0].certificates[1]", 'unknown certificate "nope"'),
    (lambda d: d["listeners"][0].update(certificates=["main", "main"]),
     "listeners[0].certificates[1]", "listed twice"),
    (lambda d: d["listeners"][0].update(certificates="main"), "listeners[0].certificates",
     "array of strings"),
    (lambda d: d["certificates"]["dual"].pop("rsa_key"), "certificates.dual.rsa_key",
     "is required with rsa_cert"),
    (lambda d: d["certificates"]["dual"].pop("rsa_cert"), "certificates.dual.rsa_cert",
     "is required with rsa_key"),
])
def test_configuration_errors(certs, mutate, path, words):
    data = _base(certs)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == path and words in info.value.message, str(info.value)


def test_listener_model(certs):
    config = parse_config(_base(certs))
    lst = config.listeners[0]
    assert lst.certificate is None and lst.certificates == ("main", "org", "special", "dual")
    assert lst.certificate_names == lst.certificates
    assert config.certificates["dual"].rsa_key == str(certs["dual_rsa"].key)
    assert not any("demonstration" in w for w in config.warnings)


@pytest.mark.parametrize("entry, words", [
    ({"cert": "dual_rsa", "key": "dual_rsa", "rsa_cert": "main", "rsa_key": "main"},
     "certificates.bad.rsa_cert: an RSA pair goes beside an ECDSA cert/key pair"),
    ({"cert": "dual", "key": "dual", "rsa_cert": "main", "rsa_key": "main"},
     "certificates.bad.rsa_key: key file"),
])
def test_key_types_of_a_pair_are_checked_at_start_and_by_check(certs, entry, words):
    data = _base(certs)
    data["certificates"]["bad"] = {k: str(getattr(certs[v], "cert" if "cert" in k else "key"))
                                   for k, v in entry.items()}
    data["listeners"][0]["certificates"] = ["main", "bad"]
    config = parse_config(data)
    with pytest.raises(ValueError) as info:
        build_tls(config, EventLog(stream=open(os.devnull, "w")))
    assert words in str(info.value)
    from gateway.config import check_files
    problems = check_files(config)
    assert any(words in p for p in problems), problems


def test_reload_rereads_the_certificates(certs, tmp_path, ca):
    """build_tls (the supervisor's, at start and at each reload) reads the files again."""
    data = _base(certs)
    config = parse_config(data)
    with open(os.devnull, "w") as devnull:
        (before,), _ = build_tls(config, EventLog(stream=devnull))
        assert before.sni[None].choose("new.example.org") is before.sni[None].choose("x.example.org")
        Pair(tmp_path, "org", ca.issue_cert("new.example.net", common_name="org2"))
        (after,), _ = build_tls(config, EventLog(stream=devnull))
    sel = after.sni[None]
    assert sel.choose("x.example.org") is sel.default                 # no longer served
    assert sel.choose("new.example.net") is not sel.default


def test_gateway_check_lists_each_listeners_names(certs, tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(
        "".join(f'[certificates.{name}]\n' + "".join(f'{k} = "{v}"\n' for k, v in e.items())
                for name, e in cert_section(certs).items())
        + '[[listeners]]\nname = "mx"\nbind = "127.0.0.1:2525"\n'
          'certificates = ["main", "org", "special", "dual"]\n'
          '[listeners.upstream]\naddress = "127.0.0.1:2600"\n'
          '[[listeners]]\nname = "one"\nbind = "127.0.0.1:2465"\ntls = "implicit"\n'
          'certificate = "special"\n[listeners.upstream]\naddress = "127.0.0.1:2600"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60,
                            env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["mx:", "certificates", "by", "SNI", "(no", "SNI", "or", "no", "match:", "main)"] \
        in lines
    assert ["main", "ECDSA", "mx.example.com,", "localhost"] in lines
    assert ["org", "ECDSA", "*.example.org"] in lines
    assert ["dual", "ECDSA+RSA", "dual.example,", "rsa-only.example"] in lines
    assert ["one:", "certificate"] in lines
    assert ["special", "ECDSA", "mail.example.org"] in lines
    syntax = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path),
                             "--syntax-only"], capture_output=True, text=True, timeout=60,
                            env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert syntax.returncode == 0 and "ECDSA" not in syntax.stdout
    assert ["mx:", "certificates", "by", "SNI", "(no", "SNI", "or", "no", "match:", "main)"] \
        in [line.split() for line in syntax.stdout.splitlines()]


# --- the TLS stream ------------------------------------------------------------------------------

class _Trickle(trio.abc.Stream):
    """At most one byte per receive: the ClientHello arrives in pieces."""

    def __init__(self, inner):
        self.inner = inner

    async def send_all(self, data):
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(1)

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.parametrize("trickle", [False, True])
async def test_stream_reads_the_name_before_building_the_connection(certs, trickle):
    from gateway.tls.context import client_context, server_context
    from gateway.tls.profiles import PREDEFINED
    from gateway.tls.stream import TLSStream
    default = PREDEFINED["default"]
    main = server_context(default, str(certs["main"].cert), str(certs["main"].key))
    org = server_context(default, str(certs["org"].cert), str(certs["org"].key))
    sel = SNISelector([(main, ["mx.example.com"]), (org, ["*.example.org"])])
    for name, expect in (("a.example.org", "org-cn"), ("other.test", "main-cn"), (None, "main-cn")):
        s, c = trio.testing.memory_stream_pair()
        if trickle:
            s = _Trickle(s)
        server = TLSStream(s, main, server_side=True, sni=sel)
        client = TLSStream(c, client_context(default), server_side=False, server_hostname=name)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
        assert client.info.peer_subject.startswith(f"CN={expect}")
        assert server.client_server_name == name
        assert server.context is (org if expect == "org-cn" else main)
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"


async def test_stream_peer_closing_before_its_client_hello_ends(certs):
    from gateway.errors import TLSError
    from gateway.tls.context import server_context
    from gateway.tls.profiles import PREDEFINED
    from gateway.tls.stream import TLSStream
    main = server_context(PREDEFINED["default"], str(certs["main"].cert),
                          str(certs["main"].key))
    s, c = trio.testing.memory_stream_pair()
    server = TLSStream(s, main, server_side=True, sni=SNISelector([(main, [])]))
    with trio.fail_after(20):
        await c.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        await c.aclose()
        with pytest.raises(TLSError, match="closed during handshake"):
            await server.do_handshake()
    with pytest.raises(ValueError):
        TLSStream(c, main, server_side=False, sni=SNISelector([(main, [])]))
