"""`max_connections_per_ip` through the gateway (SPEC §2): the replies per protocol, silence
on an implicit listener, PROXY's real client address (IPv6 per prefix), the trusted proxies'
exemption, and across the workers of a supervised gateway, crashes included."""
from __future__ import annotations

import os
import re
import signal
import socket

import pytest
import trio

from gateway.net.proxy_protocol import build_v1, build_v2
from gateway.native.perip import PerIPTable, address_key
from harness import config_dict, in_thread, listener_dict, running_gateway, running_sink
from peers import free_port
from supervised import GatewayProcess, gone, poll, scrape, total, write_config

FROM_ADDRESS = b"421 4.7.0 Too many connections from your address\r\n"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"
IMAP_FROM_ADDRESS = b"* BYE Too many connections from your address\r\n"


def opened(port: int, header: bytes = b"") -> tuple[socket.socket, bytes]:
    """A connection (after an optional PROXY header) and its first line; b"" if closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    if header:
        sock.sendall(header)
    return sock, readline(sock)


def readline(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            return line
        if not data:
            return line
        line += data
    return line


def closed_after(sock: socket.socket) -> bool:
    """The peer closed the connection (after whatever was read already)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


async def until(condition, what: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def per_ip(gw, address: str, prefix: int = 64) -> int:
    rt = gw.runtimes[0]
    return rt.state.counts.per_ip.total(rt.index, address_key(address, prefix))


# --- one process -----------------------------------------------------------------------------

async def test_smtp_client_over_the_limit_gets_421_and_a_freed_place_is_taken():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          tls="off", max_connections_per_ip=2)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            held = []
            try:
                with trio.fail_after(20):
                    for _ in range(2):
                        held.append(await in_thread(opened, port))
                    assert per_ip(gw, "127.0.0.1") == 2
                    third, line = await in_thread(opened, port)
                    held.append((third, line))
                    third_closed = await in_thread(closed_after, third)
                    held[0][0].close()
                    await until(lambda: per_ip(gw, "127.0.0.1") == 1, "a count released")
                    fourth = await in_thread(opened, port)
                    held.append(fourth)
            finally:
                for sock, _ in held:
                    sock.close()
            await until(lambda: per_ip(gw, "127.0.0.1") == 0, "every count released")
    assert [ln[:4] for _, ln in held[:2]] == [b"220 ", b"220 "]
    assert line == FROM_ADDRESS and third_closed
    assert fourth[1].startswith(b"220 ")
    rejects = logs.of("reject", code=421)
    assert len(rejects) == 1 and rejects[0]["reason"] == "too many connections from address"


async def test_imap_client_over_the_limit_gets_bye():
    async with running_sink() as sink:
        data = config_dict([listener_dict("imap", upstream_port=sink.port, protocol="imap",
                                          tls="off", client_tls="none",
                                          max_connections_per_ip=1)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["imap"][1]
            with trio.fail_after(20):
                first, greeting = await in_thread(opened, port)
                try:
                    second, line = await in_thread(opened, port)
                    second.close()
                finally:
                    first.close()
    assert greeting.startswith(b"* OK")
    assert line == IMAP_FROM_ADDRESS
    assert logs.of("reject", reason="too many connections from address")


async def test_implicit_listener_closes_the_excess_connection_without_a_reply(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, tls="implicit",
                                          client_tls="required", cert="main",
                                          max_connections_per_ip=1)],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(20):
                first = await in_thread(socket.create_connection, ("127.0.0.1", port), 20)
                try:
                    # the first waits for our ClientHello, holding its place
                    await until(lambda: per_ip(gw, "127.0.0.1") == 1, "the first counted")
                    second = await in_thread(socket.create_connection, ("127.0.0.1", port), 20)
                    with second:
                        nothing = await in_thread(readline, second)
                finally:
                    first.close()
    assert nothing == b""                          # closed, not a byte sent
    assert logs.of("reject", reason="too many connections from address")


async def test_zero_turns_the_limit_off():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          tls="off", max_connections_per_ip=0)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            held = []
            try:
                with trio.fail_after(20):
                    for _ in range(4):
                        held.append(await in_thread(opened, port))
                    counted = per_ip(gw, "127.0.0.1")
            finally:
                for sock, _ in held:
                    sock.close()
    assert all(line.startswith(b"220 ") for _, line in held)
    assert counted == 0 and not logs.of("reject")


def _proxied(sink_port: int, **extra) -> dict:
    return config_dict([listener_dict(upstream_port=sink_port, client_tls="none", tls="off",
                                      proxy_protocol=True, trusted_proxies=["127.0.0.1/32"],
                                      **extra)])


async def test_behind_proxy_the_real_client_address_counts_ipv6_per_64():
    """Limit 1: from behind the trusted proxy, 203.0.113.5 twice (the second refused) and
    203.0.113.6 once; IPv6 clients of one /64 share a count, another /64 has its own; the
    proxy's own health checks (PROXY LOCAL, v1 UNKNOWN) are not limited."""
    async with running_sink() as sink:
        async with running_gateway(_proxied(sink.port, max_connections_per_ip=1)) as (gw, logs):
            port = gw.addresses["smtp"][1]
            dst = ("127.0.0.1", port)
            dst6 = ("2001:db8:ffff::1", 25)
            headers = [
                build_v1(("203.0.113.5", 40001), dst),
                build_v2(("203.0.113.5", 40002), dst),
                build_v1(("203.0.113.6", 40003), dst),
                build_v2(("2001:db8:1:2::5", 40004), dst6),
                build_v1(("2001:db8:1:2:ffff::6", 40005), dst6),
                build_v2(("2001:db8:1:3::5", 40006), dst6),
                build_v2(None, None, command="LOCAL"),
                build_v2(None, None, command="LOCAL"),
                build_v1(None, None),
            ]
            held = []
            try:
                with trio.fail_after(30):
                    for header in headers:
                        held.append(await in_thread(opened, port, header))
                    counts = {a: per_ip(gw, a) for a in ("203.0.113.5", "203.0.113.6",
                                                         "2001:db8:1:2::", "2001:db8:1:3::",
                                                         "127.0.0.1")}
            finally:
                for sock, _ in held:
                    sock.close()
    lines = [line for _, line in held]
    assert lines[0].startswith(b"220 ") and lines[1] == FROM_ADDRESS
    assert lines[2].startswith(b"220 ")
    assert lines[3].startswith(b"220 ") and lines[4] == FROM_ADDRESS
    assert lines[5].startswith(b"220 ")
    assert all(line.startswith(b"220 ") for line in lines[6:])      # the proxy itself
    assert counts == {"203.0.113.5": 1, "203.0.113.6": 1, "2001:db8:1:2::": 1,
                      "2001:db8:1:3::": 1, "127.0.0.1": 0}
    assert [e["client"] for e in logs.of("reject", reason="too many connections from address")] \
        == ["203.0.113.5:40002", "[2001:db8:1:2:ffff::6]:40005"]


async def test_a_128_prefix_counts_each_ipv6_address():
    async with running_sink() as sink:
        data = _proxied(sink.port, max_connections_per_ip=1, per_ip_ipv6_prefix=128)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            dst6 = ("2001:db8:ffff::1", 25)
            held = []
            try:
                with trio.fail_after(20):
                    for n in (5, 6):
                        held.append(await in_thread(
                            opened, port, build_v2((f"2001:db8:1:2::{n}", 40000 + n), dst6)))
            finally:
                for sock, _ in held:
                    sock.close()
    assert all(line.startswith(b"220 ") for _, line in held)
    assert not logs.of("reject")


@pytest.mark.parametrize("trusted,served", [(["127.0.0.0/8"], 3), (["192.0.2.1/32"], 1)])
async def test_a_trusted_proxy_without_proxy_protocol_is_exempt(trusted, served):
    """A balancer that does not send PROXY: every connection comes from its address, which
    speaks for many clients; an address not in trusted_proxies is limited."""
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          tls="off", trusted_proxies=trusted,
                                          max_connections_per_ip=1)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            held = []
            try:
                with trio.fail_after(20):
                    for _ in range(3):
                        held.append(await in_thread(opened, port))
            finally:
                for sock, _ in held:
                    sock.close()
    assert sum(line.startswith(b"220 ") for _, line in held) == served
    assert sum(line == FROM_ADDRESS for _, line in held) == 3 - served


async def test_a_full_table_refuses_a_new_address_and_says_so_once():
    """A table is sized for every connection max_connections allows (test_perip.py), so it
    is full only past that (a reload that raised max_connections): then a new address is
    refused as over max_connections, never let in uncounted (SPEC §2: the count never stops
    applying)."""
    async with running_sink() as sink:
        async with running_gateway(_proxied(sink.port, max_connections_per_ip=1)) as (gw, logs):
            port = gw.addresses["smtp"][1]
            counts = gw.runtimes[0].state.counts
            counts.per_ip = PerIPTable(1, slots=1)      # room for one address
            dst = ("127.0.0.1", port)
            held = []
            try:
                with trio.fail_after(20):
                    for n, client in enumerate(("203.0.113.5", "203.0.113.6", "203.0.113.6",
                                                "203.0.113.5")):
                        held.append(await in_thread(
                            opened, port, build_v1((client, 40000 + n), dst)))
                    while_held = (per_ip(gw, "203.0.113.5"), per_ip(gw, "203.0.113.6"))
            finally:
                for sock, _ in held:
                    sock.close()
            await until(lambda: gw.runtimes[0].state.sessions == 0, "every session ended")
            after = (per_ip(gw, "203.0.113.5"), per_ip(gw, "203.0.113.6"))
    lines = [line for _, line in held]
    assert lines[0].startswith(b"220 ")
    assert lines[1:3] == [TOO_MANY] * 2             # .6: no room to count it, refused
    assert lines[3] == FROM_ADDRESS                 # .5 still counted and limited
    assert while_held == (1, 0) and after == (0, 0)
    assert len(logs.of("per_ip_table_full")) == 1
    assert [e["reason"] for e in logs.of("reject")] == [
        "too many connections", "too many connections", "too many connections from address"]


# --- a supervised gateway with two workers ---------------------------------------------------

def _worker_of(gw: GatewayProcess, sock: socket.socket, event: str = "conn_open") -> int:
    """The pid of the worker that logged *event* for the client port of *sock*."""
    client = f"client=127.0.0.1:{sock.getsockname()[1]}"
    rx = rf"event={event}\b.*{re.escape(client)}(\s|$)|{re.escape(client)}\s.*event={event}\b"
    line = gw.wait_for(rx, timeout=20)[0]
    return int(re.search(r"\bworker=(\d+)", line).group(1))


def _active(metrics_port: int) -> float:
    return total(scrape(metrics_port), "gateway_connections_active")


def _hold_three_on_both_workers(gw, port, metrics_port) -> list[tuple[socket.socket, int]]:
    """Three idle, greeted connections from 127.0.0.1 that two workers share (a connection
    landing where it would make one worker hold all three is closed and tried again)."""
    held: list[tuple[socket.socket, int]] = []
    for _ in range(60):
        sock, line = opened(port)
        assert line.startswith(b"220 "), line
        pid = _worker_of(gw, sock)
        if [p for _, p in held].count(pid) < 2:
            held.append((sock, pid))
            if len(held) == 3:
                return held
        else:
            sock.close()
            poll(lambda: _active(metrics_port) == len(held), 10, what="the extra one closed")
    raise AssertionError("SO_REUSEPORT never spread the connections over both workers")


def test_per_address_limit_across_two_workers_survives_a_killed_worker(tmp_path, server_cert):
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=sink_port, metrics_port=metrics_port,
                 server_cert=server_cert, client_tls="optional", workers=2,
                 extra="max_connections_per_ip = 3")
    gw = GatewayProcess(cfg)
    held: list[tuple[socket.socket, int]] = []
    extra: list[socket.socket] = []
    killed = None
    try:
        gw.wait_for(r"event=listening", count=2)
        poll(lambda: _active(metrics_port) == 0, 10, what="the metrics endpoint")
        held = _hold_three_on_both_workers(gw, port, metrics_port)
        assert len({pid for _, pid in held}) == 2

        fourth, line = opened(port)                 # 3 held over both workers: the 4th
        extra.append(fourth)
        assert line == FROM_ADDRESS
        assert closed_after(fourth)
        refuser = _worker_of(gw, fourth, "reject")
        assert [p for _, p in held].count(refuser) < 3     # it counted the other's too
        rejected = poll(lambda: total(scrape(metrics_port), "gateway_connections_rejected_total",
                                      reason="per_ip") or None, 10, what="the per_ip counter")
        assert rejected == 1

        sock, _ = held.pop(0)                       # one leaves: one more gets in
        sock.close()
        poll(lambda: _active(metrics_port) == 2, 10, what="one closed")
        again, line = opened(port)
        assert line.startswith(b"220 ")
        held.append((again, _worker_of(gw, again)))

        # kill -9 a worker holding some of the three: its counts go with its row
        killed = held[0][1]
        on_killed = [s for s, p in held if p == killed]
        survivors = [(s, p) for s, p in held if p != killed]
        os.kill(killed, signal.SIGKILL)
        gw.wait_for(rf"event=worker_exit .*worker_pid={killed}")
        gw.wait_for(r"event=listening", count=3)
        for s in on_killed:
            assert closed_after(s)
            s.close()
        held = survivors
        for _ in range(3 - len(survivors)):         # room again for exactly the killed ones
            sock, line = opened(port)
            extra.append(sock)
            assert line.startswith(b"220 "), line
        sock, line = opened(port)
        extra.append(sock)
        assert line == FROM_ADDRESS
        assert total(scrape(metrics_port), "gateway_connections_rejected_total",
                     reason="per_ip") == 2
    finally:
        for s, _ in held:
            s.close()
        for s in extra:
            s.close()
        if killed is not None and not gone(killed):
            os.kill(killed, signal.SIGKILL)
        assert gw.stop() == 0


def _from(address: str, port: int) -> tuple[socket.socket, bytes]:
    """A connection from *address* (any of 127/8 is loopback) and its first line."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
        return sock, readline(sock)
    except BaseException:
        sock.close()
        raise


def test_many_addresses_up_to_max_connections_leave_the_per_address_limit_on(tmp_path,
                                                                              server_cert):
    """The trial: thousands of addresses held open filled a worker's table and switched the
    limit off. Here max_connections is 64 (each worker's table sized for it): 60 addresses
    of 127/8 and 3 connections from 127.0.9.9 held across two workers, and the 4th from
    127.0.9.9 is still refused as over its address's limit."""
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=sink_port, metrics_port=metrics_port,
                 server_cert=server_cert, client_tls="optional", workers=2,
                 extra="max_connections = 64\nmax_connections_per_ip = 3")
    gw = GatewayProcess(cfg)
    held: list[socket.socket] = []
    try:
        gw.wait_for(r"event=listening", count=2)
        lines = []
        for n in range(60):
            sock, line = _from(f"127.0.{1 + n // 200}.{1 + n % 200}", port)
            held.append(sock)
            lines.append(line)
        for _ in range(3):
            sock, line = _from("127.0.9.9", port)
            held.append(sock)
            lines.append(line)
        fourth, refused = _from("127.0.9.9", port)
        held.append(fourth)
        assert closed_after(fourth)
        poll(lambda: _active(metrics_port) == 63, 10, what="the refused one gone")
        other, greeted = _from("127.0.9.10", port)     # the 64th connection: still room
        held.append(other)
        rejected = poll(lambda: total(scrape(metrics_port), "gateway_connections_rejected_total",
                                      reason="per_ip") or None, 10, what="the per_ip counter")
    finally:
        for s in held:
            s.close()
        assert gw.stop() == 0
    assert all(line.startswith(b"220 ") for line in lines), lines
    assert refused == FROM_ADDRESS
    assert greeted.startswith(b"220 ")
    assert rejected == 1
    assert not [ln for ln in gw.lines if "per_ip_table_full" in ln]
