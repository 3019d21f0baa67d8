"""The IMAP gateway end to end over loopback: imaplib, raw sockets and openssl s_client
against the gateway, relaying to a private Dovecot (STARTTLS and implicit TLS upstream) or to
small fake upstreams that misbehave on purpose."""
from __future__ import annotations

import imaplib
import socket
from functools import partial

import pytest
import trio

from dovecot import DovecotInstance
from fake_upstream import ImapUpstream, serving
from harness import client_context, config_dict, in_thread, listener_dict, running_gateway
from peers import instance_dir, openssl_s_client_starttls_async, parse_tls_version, require


MESSAGE = (b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: gateway test\r\n"
           b"\r\nline one\r\n.dot line\r\n{5}\r\na LOGOUT\r\n\r\nend\r\n")
T = 10      # seconds: the bound of every blocking socket operation in a thread


@pytest.fixture(scope="module")
def dovecot(pubdir, upstream_cert):
    require("dovecot")
    with DovecotInstance(instance_dir(pubdir, "dovecot"), cert=upstream_cert) as dc:
        yield dc


def imap_listener(name, port, *, tls="starttls", client_tls="required", upstream_tls="verify",
                  mode="starttls", **extra):
    up = {"mode": mode}
    if upstream_tls == "verify":
        up.update(server_name="upstream.test", profile="testca")
    return listener_dict(name, upstream_port=port, cert="main", protocol="imap", tls=tls,
                         client_tls=client_tls, upstream_tls=upstream_tls, upstream=up, **extra)


def gateway_config(listener, server_cert):
    return config_dict([listener], server_cert=server_cert, ca_file=server_cert.ca)


def _idle_until_exists(c: imaplib.IMAP4, deliver) -> bytes:
    """IDLE on *c*, call deliver(), return the untagged line announcing the new message."""
    c.sock.settimeout(T)
    tag = c._new_tag()
    c.send(tag + b" IDLE\r\n")
    assert c.readline().startswith(b"+")
    deliver()
    while True:
        line = c.readline()
        assert line, "connection closed during IDLE"
        if line.endswith(b"EXISTS\r\n"):
            break
    c.send(b"DONE\r\n")
    while True:
        done = c.readline()
        if done.startswith(tag):
            assert done.split()[1] == b"OK"
            return line


def _mailbox_session(c: imaplib.IMAP4, dovecot: DovecotInstance, ctx, *,
                     auth_plain: bool = False) -> dict:
    out = {}
    if auth_plain:
        out["login"] = c.authenticate(
            "PLAIN", lambda _: f"\0{dovecot.user}\0{dovecot.password}".encode())
    else:
        out["login"] = c.login(dovecot.user, dovecot.password)
    tag = c._new_tag()                      # (imaplib itself refuses STARTTLS after login)
    c.send(tag + b" STARTTLS\r\n")           # relayed: the upstream answers it
    c.sock.settimeout(T)
    while not (line := c.readline()).startswith(tag):
        assert line
    out["starttls_after_login"] = line.decode()
    typ, data = c.select("INBOX")
    before = int(data[0])
    typ, data = c.append("INBOX", None, None, MESSAGE)
    out["append"] = typ
    typ, data = c.fetch(str(before + 1).encode(), "(BODY.PEEK[])")
    out["fetched"] = data[0][1]

    def deliver():
        with imaplib.IMAP4_SSL("localhost", dovecot.tls_port, ssl_context=ctx,
                               timeout=T) as d:
            d.login(dovecot.user, dovecot.password)
            d.append("INBOX", None, None, b"Subject: during IDLE\r\n\r\nhi\r\n")
    out["exists"] = _idle_until_exists(c, deliver)
    out["logout"] = c.logout()[0]
    return out


async def test_imaplib_starttls_to_dovecot_starttls_verify(dovecot, server_cert):
    data = gateway_config(imap_listener("imap", dovecot.port), server_cert)
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imap"][1]
        ctx = client_context(server_cert.ca)

        def talk():
            c = imaplib.IMAP4("localhost", port, timeout=T)
            caps = c.capabilities
            refused = c._simple_command("LOGIN", "alice", "secret")
            c.starttls(ssl_context=ctx)
            return caps, refused, c.capabilities, _mailbox_session(c, dovecot, ctx)
        with trio.fail_after(30):
            caps, refused, tls_caps, out = await in_thread(talk)
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps
    assert not any(c.startswith("AUTH=") for c in caps)
    assert refused == ("NO", [b"[PRIVACYREQUIRED] TLS is required"])
    assert "STARTTLS" not in tls_caps and "AUTH=PLAIN" in tls_caps
    assert out["login"][0] == "OK"
    assert "BAD" in out["starttls_after_login"]
    assert out["append"] == "OK"
    assert out["fetched"] == MESSAGE
    assert out["exists"].endswith(b"EXISTS\r\n")
    assert out["logout"] == "BYE"
    client = logs.of("tls", side="client")
    upstream = logs.of("tls", side="upstream")
    assert client and client[0]["version"].startswith("TLSv1.")
    assert upstream and upstream[0]["verified"] is True
    login = logs.of("login", result="ok")
    assert login and login[0]["user"] == "alice"
    assert "secret" not in str(logs.events)
    assert logs.of("reject") and logs.of("conn_open") and logs.of("conn_close")


async def test_imaplib_implicit_to_dovecot_implicit_required(dovecot, server_cert):
    data = gateway_config(imap_listener("imaps", dovecot.tls_port, tls="implicit",
                                        upstream_tls="required", mode="implicit"), server_cert)
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imaps"][1]
        ctx = client_context(server_cert.ca)

        def talk():
            c = imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx, timeout=T)
            return c.welcome, _mailbox_session(c, dovecot, ctx, auth_plain=True)
        with trio.fail_after(30):
            welcome, out = await in_thread(talk)
    assert welcome.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and welcome.endswith(b"mx.test ready")
    assert b"STARTTLS" not in welcome and b"AUTH=PLAIN" in welcome
    assert out["fetched"] == MESSAGE
    assert out["exists"].endswith(b"EXISTS\r\n")
    assert logs.of("tls", side="upstream")[0]["version"].startswith("TLSv1.")
    assert logs.of("login", result="ok", mechanism="PLAIN", user="alice")
    assert "BAD" in out["starttls_after_login"]


async def test_openssl_s_client_starttls_imap(dovecot, server_cert):
    data = gateway_config(imap_listener("imap", dovecot.port), server_cert)
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imap"][1]
        with trio.fail_after(30):
            text = await openssl_s_client_starttls_async("127.0.0.1", port, "imap",
                                                         cafile=server_cert.ca, timeout=20)
    assert parse_tls_version(text) in ("TLSv1.2", "TLSv1.3"), text
    assert "Verification: OK" in text, text
    tls = logs.of("tls", side="client")
    assert tls and tls[0]["version"] == parse_tls_version(text)


def _raw_lines_until(sock, tag: bytes, buf: bytearray) -> bytes:
    """Read until a line starting with *tag* arrives; returns everything read so far."""
    while True:
        for line in bytes(buf).split(b"\r\n")[:-1]:
            if line.startswith(tag):
                return bytes(buf)
        chunk = sock.recv(65536)
        assert chunk, f"closed before {tag!r}: {bytes(buf)!r}"
        buf += chunk


async def test_starttls_injection_is_discarded(dovecot, server_cert):
    data = gateway_config(imap_listener("imap", dovecot.port), server_cert)
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imap"][1]
        ctx = client_context(server_cert.ca)

        def talk():
            with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
                buf = bytearray()
                _raw_lines_until(raw, b"* OK", buf)
                raw.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
                buf = bytearray()
                plain = _raw_lines_until(raw, b"a ", buf)
                tls = ctx.wrap_socket(raw, server_hostname="localhost")
                tls.sendall(b"c CAPABILITY\r\n")
                after = _raw_lines_until(tls, b"c ", bytearray())
                tls.sendall(b"d LOGOUT\r\n")
                return plain, after
        with trio.fail_after(30):
            plain, after = await in_thread(talk)
    assert plain == b"a OK Begin TLS negotiation now\r\n"
    assert b"\r\nb " not in b"\r\n" + after and b"c OK" in after
    inj = logs.of("starttls_injection")
    assert inj and inj[0]["discarded"] == len(b"b CAPABILITY\r\n")


async def test_literal_password_is_not_executed(dovecot, server_cert):
    """`\\r\\nb LOGOUT\\r\\n` inside a LOGIN literal is password text, not a command."""
    data = gateway_config(imap_listener("imap", dovecot.port, client_tls="optional",
                                        upstream_tls="required"), server_cert)
    async with running_gateway(data) as (gw, logs):
        port = gw.addresses["imap"][1]
        password = b"x\r\nb LOGOUT\r\n"

        def talk():
            with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
                _raw_lines_until(raw, b"* OK", bytearray())
                raw.sendall(b"a LOGIN alice {%d}\r\n" % len(password))
                cont = _raw_lines_until(raw, b"+ ", bytearray())
                raw.sendall(password + b"\r\n")
                failed = _raw_lines_until(raw, b"a ", bytearray())
                raw.sendall(b"c LOGIN alice secret\r\nd NOOP\r\n")
                ok = _raw_lines_until(raw, b"d ", bytearray())
                raw.sendall(b"e LOGOUT\r\n")
                return cont, failed, ok
        with trio.fail_after(30):
            cont, failed, ok = await in_thread(talk)
    assert cont.startswith(b"+ ")
    assert b"a NO " in failed and b"BYE" not in failed and b"b " not in failed
    assert b"c OK " in ok and b"d OK " in ok
    assert [e["result"] for e in logs.of("login")] == ["no", "ok"]


# --- fake upstreams (tests/fake_upstream.py) ----------------------------------------------------

async def _with_fake(fake: ImapUpstream, server_cert, upstream_tls: str, talk, **extra):
    async with serving(fake) as port:
        kw = {"client_tls": "optional", **extra}
        data = gateway_config(imap_listener("imap", port, upstream_tls=upstream_tls, **kw),
                              server_cert)
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                result = await in_thread(talk, gw.addresses["imap"][1])
    return result, logs


def _plain_login(port):
    c = imaplib.IMAP4("127.0.0.1", port, timeout=T)
    try:
        return c._simple_command("LOGIN", "alice", "secret")
    finally:
        c.shutdown()


@pytest.mark.parametrize("fake,reason", [
    (ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake\r\n",
                  starttls_answer=b"TAG OK\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
     b"TLS handshake with upstream failed"),
    (ImapUpstream(b"* PREAUTH [CAPABILITY IMAP4rev1] fake\r\n"),
     b"TLS is required, but was not offered by host"),
    (ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n"),
     b"TLS is required, but was not offered by host"),
], ids=["response-injection", "preauth", "no-starttls"])
async def test_bad_upstreams_refused_under_required(fake, reason, server_cert):
    answer, logs = await _with_fake(fake, server_cert, "required", _plain_login)
    assert answer == ("NO", [b"[UNAVAILABLE] " + reason])
    assert fake.connections == 1
    assert b"secret" not in fake.received and b"LOGIN" not in fake.received
    assert logs.of("tls_alert") and logs.of("upstream_error")
    assert logs.of("login", result="unavailable")


async def test_untagged_data_after_starttls_aborts(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake\r\n",
                        starttls_answer=b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"
                                        b"TAG OK go\r\n")
    answer, logs = await _with_fake(fake, server_cert, "required", _plain_login)
    assert answer == ("NO", [b"[UNAVAILABLE] TLS handshake with upstream failed"])
    assert b"secret" not in fake.received


async def test_literal_reaches_upstream_as_literal_and_id_forwarded(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] fake\r\n")
    password = b"x\r\nb LOGOUT\r\n"

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
            _raw_lines_until(raw, b"* OK", bytearray())
            raw.sendall(b"a LOGIN alice {%d+}\r\n%s\r\nc NOOP\r\n" % (len(password), password))
            out = _raw_lines_until(raw, b"c ", bytearray())
            raw.sendall(b"z LOGOUT\r\n")
            _raw_lines_until(raw, b"z ", bytearray())
            return out
    out, logs = await _with_fake(fake, server_cert, "none", talk, forward_client=True)
    assert b"a OK done" in out and b"c OK done" in out and b"b " not in out
    received = bytes(fake.received)
    assert b'ID ("x-originating-ip" "127.0.0.1" "x-originating-port" "' in received
    # rendered as a synchronising literal (the fake offers no LITERAL+), bytes intact
    assert b" LOGIN alice {%d}\r\n%s\r\n" % (len(password), password) in received
    assert b"\r\nb LOGOUT" not in received.replace(password, b"")
    assert received.index(b"ID (") < received.index(b"LOGIN")
    assert b"c NOOP\r\n" in received and b"z LOGOUT\r\n" in received


async def test_authenticate_plain_with_continuation_relays(server_cert):
    import base64
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] fake\r\n")
    ir = base64.b64encode(b"\0alice\0secret")

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
            _raw_lines_until(raw, b"* OK", bytearray())
            raw.sendall(b"a AUTHENTICATE PLAIN\r\n")
            cont = _raw_lines_until(raw, b"+", bytearray())
            raw.sendall(ir + b"\r\n")
            return cont, _raw_lines_until(raw, b"a ", bytearray())
    (cont, out), logs = await _with_fake(fake, server_cert, "none", talk)
    assert cont == b"+ \r\n" and b"a OK done" in out
    assert b"AUTHENTICATE PLAIN " + ir + b"\r\n" in bytes(fake.received)    # SASL-IR upstream
    assert logs.of("login", result="ok", mechanism="PLAIN", user="alice")


async def test_oversized_literal_before_login_gets_bad_and_is_not_read(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
            _raw_lines_until(raw, b"* OK", bytearray())
            raw.sendall(b"a LOGIN alice {70000}\r\n")
            bad = _raw_lines_until(raw, b"a ", bytearray())
            big = b"y" * 70000
            raw.sendall(b"b LOGIN alice {70000+}\r\n" + big + b"\r\nc NOOP\r\n")
            rest = _raw_lines_until(raw, b"c ", bytearray())
            return bad, rest
    (bad, rest), logs = await _with_fake(fake, server_cert, "none", talk)
    assert bad == b"a BAD [TOOBIG] Command too long\r\n"
    assert b"b BAD [TOOBIG] Command too long\r\n" in rest and b"c OK NOOP completed" in rest
    assert fake.connections == 0


async def test_too_many_connections_bye(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as first:
            _raw_lines_until(first, b"* OK", bytearray())
            with socket.create_connection(("127.0.0.1", port), timeout=T) as second:
                data = bytearray()
                while True:
                    chunk = second.recv(4096)
                    if not chunk:
                        return bytes(data)
                    data += chunk
    out, logs = await _with_fake(fake, server_cert, "none", talk, max_connections=1)
    assert out == b"* BYE Too many connections\r\n"


async def test_login_timeout_says_bye(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
            data = bytearray()
            while True:
                chunk = raw.recv(4096)
                if not chunk:
                    return bytes(data)
                data += chunk
    out, logs = await _with_fake(fake, server_cert, "none", talk,
                                 timeouts={"imap_login": 0.5})
    assert out.endswith(b"* BYE Autologout; idle for too long\r\n")


async def test_verify_needs_a_client_certificate(server_cert, client_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")

    def talk(port):
        anon = client_context(server_cert.ca)
        with_cert = client_context(server_cert.ca)
        with_cert.load_cert_chain(str(client_cert.cert), str(client_cert.key))
        out = []
        for ctx in (anon, with_cert):
            c = imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx, timeout=T)
            out.append(c._simple_command("LOGIN", "alice", "secret"))
            c.shutdown()
        return out
    out, logs = await _with_fake(fake, server_cert, "none", talk, tls="implicit",
                                 client_tls="verify", profile="testca")
    assert out[0] == ("NO", [b"[PRIVACYREQUIRED] Client certificate required"])
    assert out[1] == ("OK", [b"done"])
    assert b"LOGIN" in bytes(fake.received) and fake.connections == 1


async def test_preferred_falls_back_to_plaintext_after_refused_starttls(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake\r\n",
                        starttls_answer=b"TAG NO not today\r\n")
    answer, logs = await _with_fake(fake, server_cert, "preferred", _plain_login)
    assert answer == ("OK", [b"done"])
    assert fake.connections == 2                     # retried once in plaintext (§3.2)
    assert logs.of("tls_error", side="upstream", fallback="plaintext")
    assert bytes(fake.received).count(b"LOGIN") == 1


async def test_idle_timeout_after_login_says_bye(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")

    def talk(port):
        with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
            _raw_lines_until(raw, b"* OK", bytearray())
            raw.sendall(b"a LOGIN alice secret\r\n")
            data = bytearray()
            while True:
                chunk = raw.recv(4096)
                if not chunk:
                    return bytes(data)
                data += chunk
    out, logs = await _with_fake(fake, server_cert, "none", talk,
                                 timeouts={"imap_idle": 0.5})
    assert out == b"a OK done\r\n* BYE Autologout; idle for too long\r\n"
    assert logs.of("reject", reason="idle timeout")


async def test_unverifiable_upstream_certificate(dovecot, server_cert):
    # the default profile trusts the system CAs, not the test CA that signed Dovecot's cert
    listener = imap_listener("imap", dovecot.port, client_tls="optional")
    listener["upstream"]["profile"] = "default"
    data = gateway_config(listener, server_cert)
    async with running_gateway(data) as (gw, logs):
        with trio.fail_after(30):
            answer = await in_thread(_plain_login, gw.addresses["imap"][1])
    assert answer == ("NO", [b"[UNAVAILABLE] Server certificate not trusted"])
    assert logs.of("tls_alert", user="alice")


class RecordingMetrics:
    """Stands in for gateway.observe.metrics.Metrics: keeps (metric, labels) -> total."""

    def __init__(self):
        from gateway.observe.metrics import ATTRIBUTES
        self.values: dict = {}
        for name in ATTRIBUTES:
            setattr(self, name, _Family(self.values, name))


class _Family:
    def __init__(self, values, name, labels=()):
        self.values, self.name, self.key = values, name, (name, tuple(labels))

    def labels(self, *labels):
        return _Family(self.values, self.name, labels)

    def inc(self, n=1):
        self.values[self.key] = self.values.get(self.key, 0) + n

    def dec(self, n=1):
        self.inc(-n)

    def observe(self, v):
        self.inc(1)

    def set(self, v):
        self.values[self.key] = v


async def test_metrics_of_an_imap_session(dovecot, server_cert):
    from harness import LogCapture
    from gateway.config import parse_config
    from gateway.observe.logs import EventLog
    from gateway.serve.runtime import WorkerState
    from gateway.serve.server import serve
    metrics = RecordingMetrics()
    config = parse_config(gateway_config(imap_listener("imap", dovecot.port), server_cert))
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(partial(serve, config, EventLog(fmt="json", stream=LogCapture()),
                                         state=WorkerState(metrics=metrics)))
        port = gw.addresses["imap"][1]
        ctx = client_context(server_cert.ca)

        def talk():
            c = imaplib.IMAP4("localhost", port, timeout=T)
            c._simple_command("LOGIN", "alice", "secret")
            c.starttls(ssl_context=ctx)
            c.login(dovecot.user, dovecot.password)
            c.logout()
        with trio.fail_after(30):
            await in_thread(talk)
        nursery.cancel_scope.cancel()          # a session still closing records on its way out
    v = metrics.values
    assert v[("connections_total", ("imap", "public", "imap"))] == 1
    assert v[("session_seconds", ("imap", "imap"))] == 1
    assert any(k[0] == "tls_handshakes_total" and k[1][1] == "client" and k[1][3] == "ok"
               for k in v)
    assert any(k[0] == "tls_handshakes_total" and k[1][1] == "upstream" and k[1][3] == "ok"
               for k in v)
    assert v[("policy_rejections_total", ("imap", "imap_tls_required"))] == 1


async def test_a_refusal_at_the_connect_stage_ends_the_session_with_bye(server_cert,
                                                                       monkeypatch):
    """SPEC §13: IMAP sessions go through the same stages as SMTP ones. A hook joined to the
    listener's policy refuses at connect: the client gets `* BYE` with the refusal's text,
    the upstream never hears of the session, and the refusal is counted under the verdict's
    fixed label."""
    from gateway.serve import runtime
    from gateway.config import parse_config
    from gateway.observe.logs import EventLog
    from gateway.policy.stages import Action, Hook, Verdict
    from gateway.serve.runtime import WorkerState
    from gateway.serve.server import serve
    from harness import LogCapture

    class Refusing(Hook):
        async def connect(self, facts):
            return Verdict(Action.REFUSE, (554, "5.7.1 Go away"), label="milter_reject")

    monkeypatch.setattr(runtime, "milter_factories", lambda listener: (lambda s: Refusing(),))
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")
    metrics = RecordingMetrics()
    async with trio.open_nursery() as nursery, serving(fake) as up_port:
        config = parse_config(gateway_config(imap_listener(
            "imap", up_port, client_tls="optional",
            upstream_tls="none"), server_cert))
        gw = await nursery.start(partial(serve, config, EventLog(fmt="json", stream=LogCapture()),
                                         state=WorkerState(metrics=metrics)))
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream(*gw.addresses["imap"])
            got = b""
            while chunk := await stream.receive_some(4096):
                got += chunk
        nursery.cancel_scope.cancel()
    assert got == b"* BYE Go away\r\n"
    assert fake.connections == 0
    assert metrics.values[("policy_rejections_total", ("imap", "milter_reject"))] == 1


async def test_shutdown_says_bye_before_login(server_cert):
    fake = ImapUpstream(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake\r\n")
    async with serving(fake) as up_port:
        data = gateway_config(imap_listener("imap", up_port,
                                            client_tls="optional", upstream_tls="none"),
                              server_cert)
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                stream = await trio.open_tcp_stream(*gw.addresses["imap"])
                buf = b""
                while b"ready\r\n" not in buf:
                    buf += await stream.receive_some(4096)
                gw.stop_accepting()
                rest = b""
                while chunk := await stream.receive_some(4096):
                    rest += chunk
    assert rest == b"* BYE Server shutting down\r\n"
