"""`gateway policy` (SPEC §12): the same questions through the command and through real
sessions (smtplib through the gateway, the client address given by a PROXY header, to a sink
upstream that offers STARTTLS, lacks it, or fails it), compared reply by reply."""
from __future__ import annotations

import json
import smtplib
import ssl

import pytest
import trio
import trustme

from gateway.cli import main
from harness import (client_context, config_dict, in_thread, listener_dict, running_gateway,
                     running_sink, server_ssl_context)
from harness import to_toml as toml


def rule(recipient="*", sender="*", sender_encryption="optional",
         recipient_encryption="preferred", enabled=True) -> dict:
    return {"sender": sender, "recipient": recipient, "enabled": enabled,
            "sender_encryption": sender_encryption,
            "recipient_encryption": recipient_encryption}


CLIENT_RULES = [{"match": "10.0.0.0/8", "client_tls": "required"},
                {"match": "192.0.2.0/24", "client_tls": "none"},
                {"match": "tight.test", "client_tls": "required"},
                {"match": "*.certs.test", "client_tls": "verify"}]
RULES = [rule("secure.test", sender_encryption="required", recipient_encryption="required"),
         rule("*.wild.test", recipient_encryption="verify"),
         rule("legacy.test", recipient_encryption="none"),
         rule("off.test", recipient_encryption="required", enabled=False),
         rule("*", sender="*.partner.test", recipient_encryption="allowed")]


def config(sink_port, server_cert, upstream_profile) -> dict:
    data = config_dict([listener_dict(
        "inbound", upstream_port=sink_port, cert="main", profile="testca",
        client_rules=CLIENT_RULES, rules=RULES, proxy_protocol=True,
        trusted_proxies=["127.0.0.1"],
        upstream={"tls": "preferred", "server_name": "localhost",
                  "profile": upstream_profile})],
        server_cert=server_cert, ca_file=server_cert.ca)
    data["tls_profiles"]["tls13"] = {"clone": "default", "min_version": "TLSv1.3",
                                     "ca_file": str(server_cert.ca)}
    return data


# --- the two ways of asking ------------------------------------------------------------------

class Case:
    def __init__(self, client, tls, sender, rcpts, cert="none", cipher=None):
        self.client, self.tls, self.sender, self.rcpts = client, tls, sender, rcpts
        self.cert, self.cipher = cert, cipher

    def __repr__(self):
        return f"Case({self.client}, tls={self.tls}, {self.sender}, {self.rcpts}, {self.cert})"


class ProxySMTP(smtplib.SMTP):
    """smtplib behind a PROXY v1 header: the gateway sees *client* as the client address."""

    def __init__(self, client: str, *args, **kwargs):
        self._client = client
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(f"PROXY TCP4 {self._client} 127.0.0.1 40000 {port}\r\n".encode())
        return sock


def _text(code, text) -> str:
    return f"{code} {text.decode() if isinstance(text, bytes) else text}"


def session(port, case: Case, certs) -> dict:
    """The real session's answers: MAIL's reply, and each recipient's (None: not reached)."""
    ctx = client_context(certs["ca"])
    if case.cert == "verified":
        ctx.load_cert_chain(str(certs["client"].cert), str(certs["client"].key))
    elif case.cert == "unverified":
        ctx.load_cert_chain(*certs["stranger"])
    if case.cipher:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(case.cipher)
    out = {"mail": None, "rcpts": []}
    with ProxySMTP(case.client, "localhost", port, timeout=20) as s:
        s.ehlo("client.test")
        if case.tls and s.has_extn("starttls"):
            s.starttls(context=ctx)
            s.ehlo("client.test")
        code, text = s.mail(case.sender)
        out["mail"] = _text(code, text)
        if code != 250:
            return out
        for rcpt in case.rcpts:
            code, text = s.rcpt(rcpt)
            out["rcpts"].append("accepted" if code == 250 else _text(code, text))
        s.rset()
    return out


def command(capsys, path, case: Case, upstream: str) -> tuple[int, dict]:
    argv = ["policy", "-c", str(path), "--listener", "inbound", "--client", case.client,
            "--tls" if case.tls else "--no-tls", "--client-cert", case.cert,
            "--upstream-tls", upstream, "--sender", case.sender or "<>", "--json",
            "--rcpt", *case.rcpts]
    if case.cipher:
        argv += ["--cipher", case.cipher]
    capsys.readouterr()
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def as_session(answer: dict) -> dict:
    """The command's answer in the real session's terms."""
    mail = answer["mail"]["reply"] if answer["mail"] else None
    out = {"mail": mail, "rcpts": []}
    if mail is None or not mail.startswith("250 "):
        return out
    for r in answer["recipients"]:
        out["rcpts"].append("accepted" if r["accepted"] else r["reply"])
    return out


OFFERED = [
    Case("127.0.0.1", False, "alice@client.test",
         ["bob@secure.test", "carol@x.wild.test", "zed@off.test"]),
    Case("127.0.0.1", True, "alice@client.test",
         ["bob@secure.test", "carol@x.wild.test", "dave@legacy.test"]),
    Case("10.1.2.3", False, "alice@client.test", ["bob@secure.test"]),
    Case("10.1.2.3", True, "a@tight.test", ["y@other.test", "x@legacy.test"]),
    Case("192.0.2.9", True, "alice@client.test", ["bob@secure.test", "dave@legacy.test"]),
    Case("127.0.0.1", False, "a@tight.test", ["y@other.test"]),
    Case("127.0.0.1", True, "a@mx.certs.test", ["y@other.test"]),
    Case("127.0.0.1", True, "a@mx.certs.test", ["y@other.test"], cert="unverified"),
    Case("127.0.0.1", True, "a@mx.certs.test", ["bob@secure.test"], cert="verified"),
    Case("127.0.0.1", True, "a@x.partner.test", ["p@any.test", "dave@legacy.test"]),
    Case("127.0.0.1", False, "a@x.partner.test", ["p@any.test", "q@legacy.test"]),
    Case("10.1.2.3", True, "", ["bob@secure.test", "carol@a.b.wild.test"],
         cipher="ECDHE-ECDSA-AES128-GCM-SHA256"),
    # a leg opened at none to an upstream that offers STARTTLS can't carry a preferred
    # recipient (no silent downgrade, SPEC §4.3)
    Case("127.0.0.1", True, "alice@client.test", ["dave@legacy.test", "zed@other.test"]),
    # the command runs the server core a session runs: its syntax checks answer too
    Case("127.0.0.1", True, "alice@client.test", ["bob", "carol@other.test"]),
    Case("127.0.0.1", True, "alice", ["carol@other.test"]),
]
ABSENT = [
    Case("127.0.0.1", True, "alice@client.test", ["zed@off.test", "bob@secure.test"]),
    Case("127.0.0.1", True, "alice@client.test", ["bob@secure.test", "zed@off.test"]),
    Case("127.0.0.1", True, "alice@client.test", ["carol@x.wild.test", "dave@legacy.test"]),
    # a failed `required` recipient holds no later one hostage (§4.3): the `preferred` one
    # opens a plaintext leg, a `required` one after it can't ride that (452 4.5.3)
    Case("127.0.0.1", True, "alice@client.test",
         ["bob@secure.test", "eve@secure.test", "zed@other.test", "x@secure.test"]),
]
FAILED = [
    Case("127.0.0.1", True, "alice@client.test",
         ["zed@off.test", "dave@legacy.test", "bob@secure.test"]),
    Case("127.0.0.1", True, "alice@client.test", ["bob@secure.test", "zed@off.test"]),
]


@pytest.mark.parametrize("upstream", ["offered", "absent", "failed"])
async def test_the_command_answers_what_a_session_gets(upstream, tmp_path, capsys,
                                                       server_cert, upstream_cert,
                                                       client_cert):
    cases = {"offered": OFFERED, "absent": ABSENT, "failed": FAILED}[upstream]
    stranger = trustme.CA().issue_cert("stranger.test")
    stranger_files = (tmp_path / "stranger.crt", tmp_path / "stranger.key")
    stranger.cert_chain_pems[0].write_to_path(str(stranger_files[0]))
    stranger.private_key_pem.write_to_path(str(stranger_files[1]))
    certs = {"ca": server_cert.ca, "client": client_cert, "stranger": stranger_files}
    sink_ctx = None
    if upstream != "absent":
        sink_ctx = server_ssl_context(upstream_cert)
        if upstream == "failed":                   # the gateway's upstream profile: TLS 1.3
            sink_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with running_sink(ssl_context=sink_ctx) as sink:
        data = config(sink.port, server_cert, "tls13" if upstream == "failed" else "testca")
        path = tmp_path / "gateway.toml"
        path.write_text(toml(data))
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["inbound"][1]
            with trio.fail_after(60):
                for case in cases:
                    real = await in_thread(session, port, case, certs)
                    code, answer = command(capsys, path, case, upstream)
                    assert as_session(answer) == real, (case, answer)
                    every = real["mail"].startswith("250 ") and all(
                        r == "accepted" for r in real["rcpts"])
                    assert code == (0 if every else 1), case
    if upstream == "offered":                       # the sessions saw what the cases say
        assert logs.of("client_rule", match="10.0.0.0/8")
        assert logs.of("client_rule", match="192.0.2.0/24")


def test_text_output_names_rules_levels_and_replies(tmp_path, capsys, server_cert):
    path = tmp_path / "gateway.toml"
    path.write_text(toml(config(2525, server_cert, "testca")))
    code = main(["policy", "-c", str(path), "--listener", "inbound", "--client", "10.9.9.9",
                 "--sender", "alice@client.test", "--rcpt", "bob@secure.test",
                 "zed@off.test", "--rcpt", "dave@legacy.test"])
    out = capsys.readouterr().out
    assert code == 1
    assert "client rule: #0 10.0.0.0/8 (client_tls required)" in out
    assert "client level required" in out
    assert "#0 * -> secure.test: sender required, recipient required" in out
    assert "accepted at level required (opens the upstream leg at required: TLS" in out
    assert "default: sender optional, recipient preferred (upstream.tls) " \
           "(disabled, matching: #3)" in out
    assert "452 4.5.3 Recipient needs a different TLS policy" in out
    assert "milters    not consulted" in out
    assert "result     2 of 3 recipients would be accepted" in out


def test_exit_codes_and_errors(tmp_path, capsys, server_cert):
    path = tmp_path / "gateway.toml"
    path.write_text(toml(config(2525, server_cert, "testca")))
    base = ["policy", "-c", str(path), "--client", "127.0.0.1"]
    assert main([*base, "--listener", "inbound", "--rcpt", "a@other.test"]) == 0
    assert main([*base, "--listener", "nope", "--rcpt", "a@other.test"]) == 2
    assert "no listener 'nope'" in capsys.readouterr().err
    assert main(["policy", "-c", str(path), "--listener", "inbound", "--client", "mx",
                 "--rcpt", "a@other.test"]) == 2
    assert "--client: not an IP address" in capsys.readouterr().err
    assert main([*base, "--listener", "inbound"]) == 2            # --rcpt is required
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nworkers = -1\n")
    assert main(["policy", "-c", str(bad), "--listener", "inbound", "--client", "127.0.0.1",
                 "--rcpt", "a@b.test"]) == 2


def test_auth_facts(tmp_path, capsys, server_cert):
    """--auth: AUTH needs TLS (538), opens its leg at upstream.tls, and an authenticated
    transaction is not subject to the encryption rules (SPEC §4.6)."""
    data = config_dict([listener_dict(
        "submission", upstream_port=2525, cert="main", auth="required", rules=RULES,
        upstream={"tls": "required", "server_name": "localhost"})], server_cert=server_cert)
    path = tmp_path / "gateway.toml"
    path.write_text(toml(data))
    base = ["policy", "-c", str(path), "--listener", "submission", "--client", "127.0.0.1",
            "--sender", "alice@client.test", "--json", "--rcpt", "dave@legacy.test"]

    def ask(*extra):
        capsys.readouterr()
        code = main([*base, *extra])
        return code, json.loads(capsys.readouterr().out)
    code, anonymous = ask()
    assert code == 1 and anonymous["mail"]["reply"] == "530 5.7.0 Authentication required"
    code, plain = ask("--auth", "alice", "--no-tls")
    assert code == 1 and plain["auth"]["reply"].startswith("538 5.7.11")
    code, authed = ask("--auth", "alice")
    assert code == 0
    assert authed["auth"]["upstream_level"] == "required"
    [rcpt] = authed["recipients"]
    assert rcpt["reply"] == "accepted at level required"
    assert rcpt["rule"]["text"].startswith("authenticated: the encryption rules do not apply")
    code, no_tls_upstream = ask("--auth", "alice", "--upstream-tls", "absent")
    assert code == 1
    assert no_tls_upstream["auth"]["reply"] == \
        "451 4.7.5 TLS is required, but was not offered by host"
