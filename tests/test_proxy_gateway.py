"""PROXY protocol on listeners (SPEC §9): HAProxy in front with send-proxy-v2, and hand-made
v1/v2 headers from trusted and untrusted peers."""
from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest
import trio

from gateway.net.proxy_protocol import build_v1, build_v2
from harness import config_dict, in_thread, listener_dict, running_gateway, running_sink
from peers import free_port, require, wait_for_port


def _proxy_listener(sink_port, trusted=("127.0.0.1/32",)):
    return listener_dict(upstream_port=sink_port, client_tls="none", proxy_protocol=True,
                         trusted_proxies=list(trusted), forward_client=True)


def _session_with_header(port: int, header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(header)
        f = s.makefile("rb")
        try:
            greeting = f.readline()
        except ConnectionResetError:          # closed with our header unread
            return b""
        if greeting:
            s.sendall(b"QUIT\r\n")
            f.readline()
        return greeting


@pytest.mark.parametrize("build", [build_v1, build_v2])
async def test_trusted_header_gives_the_real_client_address(build):
    async with running_sink() as sink:
        data = config_dict([_proxy_listener(sink.port)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            header = build(("203.0.113.5", 40001), ("127.0.0.1", port))
            with trio.fail_after(20):
                greeting = await in_thread(_session_with_header, port, header)
    assert greeting.startswith(b"220 ")
    assert logs.of("conn_open")[0]["client"] == "203.0.113.5:40001"


@pytest.mark.parametrize("header", [b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n",
                                    b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x00"])
async def test_malformed_header_closes_the_connection(header):
    async with running_sink() as sink:
        data = config_dict([_proxy_listener(sink.port)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(20):
                greeting = await in_thread(_session_with_header, port, header)
    assert greeting == b""
    assert "bad PROXY header" in logs.of("reject")[0]["reason"]
    assert not logs.of("conn_open")


async def test_untrusted_peer_is_refused():
    async with running_sink() as sink:
        data = config_dict([_proxy_listener(sink.port, trusted=("192.0.2.1/32",))])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            header = build_v2(("203.0.113.5", 40001), ("127.0.0.1", port))
            with trio.fail_after(20):
                greeting = await in_thread(_session_with_header, port, header)
    assert greeting == b""
    assert "untrusted" in logs.of("reject")[0]["reason"]


HAPROXY_CFG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    server gw1 127.0.0.1:{gw} send-proxy-v2
"""


@pytest.mark.peers
async def test_haproxy_send_proxy_v2(pubdir):
    haproxy = require("haproxy")
    async with running_sink(xclient=True) as sink:
        data = config_dict([_proxy_listener(sink.port)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            front = free_port()
            cfg = pubdir / f"haproxy-{front}.cfg"
            cfg.write_text(HAPROXY_CFG.format(front=front, gw=port))
            proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                await in_thread(lambda: wait_for_port("127.0.0.1", front, 20))

                def send():
                    with smtplib.SMTP("127.0.0.1", front, timeout=20,
                                      source_address=("127.0.0.2", 0)) as s:
                        s.sendmail("alice@client.test", ["bob@example.test"],
                                   b"Subject: via haproxy\r\n\r\nhi\r\n")
                with trio.fail_after(30):
                    await in_thread(send)
                    await sink.wait_for_messages(1)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    # the message's session is the client's (wait_for_port's probe also crossed HAProxy, from
    # 127.0.0.1, and its conn_open may be logged after the client's)
    delivered = logs.of("message")
    assert len(delivered) == 1
    assert delivered[0]["client"].startswith("127.0.0.2:")     # not HAProxy's 127.0.0.1
    assert sink.messages[0].xclient.get("ADDR") == "127.0.0.2"
    assert b"[127.0.0.2]" in sink.messages[0].data               # Received header


def _connect_from(source: str, port: int, header: bytes) -> bytes:
    """Send *header* from the local address *source*; what came back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        s.sendall(header)
        try:
            return s.recv(4096)
        except ConnectionResetError:
            return b""


async def test_proxy_refusals_are_counted_under_the_spec_names(tmp_path):
    """SPEC §11: `gateway_connections_rejected_total{reason}` `proxy_untrusted` and
    `proxy_malformed`, at 0 for the listener from the start, one increment per refusal, on
    a real gateway's /metrics."""
    from harness import to_toml
    from supervised import GatewayProcess, samples_of, scrape

    port, metrics_port = free_port(), free_port()
    async with running_sink() as sink:
        listener = _proxy_listener(sink.port)
        listener.update(name="edge", bind=f"127.0.0.1:{port}", type="private")
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict([listener], workers=1, shutdown_grace=5,
                                           metrics=f"127.0.0.1:{metrics_port}")))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                before = await in_thread(scrape, metrics_port)
                header = build_v2(("203.0.113.5", 40001), ("127.0.0.1", port))
                untrusted = await in_thread(_connect_from, "127.0.0.2", port, header)
                malformed = await in_thread(_connect_from, "127.0.0.1", port,
                                            b"PROXY TCP4 1.2.3.4\r\n")
                trusted = await in_thread(_session_with_header, port, header)
                await in_thread(lambda: gw.wait_for(r"event=reject ", count=2))
                await in_thread(lambda: gw.wait_for(r"event=conn_close "))
                after = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    assert untrusted == malformed == b"" and trusted.startswith(b"220 ")

    def rejected(samples, reason):
        return samples_of(samples, "gateway_connections_rejected_total", listener="edge",
                          type="private", reason=reason)
    assert rejected(before, "proxy_untrusted") == rejected(before, "proxy_malformed") == [0]
    assert rejected(after, "proxy_untrusted") == [1]
    assert rejected(after, "proxy_malformed") == [1]
    # the refused connections never became sessions; the trusted one did
    assert samples_of(after, "gateway_connections_total", listener="edge", type="private",
                      protocol="smtp") == [1]


async def test_a_trusted_proxy_that_sends_no_header_is_closed_at_the_handshake_timeout():
    """No PROXY header at all (a client that waits for a greeting): closed when the listener's
    tls_handshake timeout passes, logged with a reason that says so (it used to end in
    "bad PROXY header: " and nothing)."""
    async with running_sink() as sink:
        listener = _proxy_listener(sink.port)
        listener["timeouts"] = {"tls_handshake": 0.5}
        data = config_dict([listener])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(20):
                greeting = await in_thread(_session_with_header, port, b"")
    assert greeting == b""
    assert logs.of("reject")[0]["reason"] == "bad PROXY header: timeout"
