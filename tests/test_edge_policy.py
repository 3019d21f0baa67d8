"""Edge policy that must hold (issue #17 items 1, 3, 4): no silent downgrade of a `preferred`
recipient onto a leg opened at `none`, the timeout replies of §4.5, DSN parameters dropped
and logged, and a tracking record for a refusal at MAIL FROM."""
from __future__ import annotations

import json
import smtplib
import socket

import trio

from fake_upstream import Conn, scripted_upstream, stall
from harness import (client_context, config_dict, in_thread, listener_dict, running_gateway,
                     running_sink, server_ssl_context, smtp_send)


async def test_preferred_recipient_never_rides_a_none_leg_when_tls_was_offered(upstream_cert):
    rules = [dict(sender="*", recipient="plain.example", recipient_encryption="none")]
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="preferred",
                                          rules=rules)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    first = s.rcpt("a@plain.example")
                    second = s.rcpt("b@other.test")
                    s.data(b"Subject: plain\r\n\r\nhello\r\n")
                    s.mail("alice@client.test")
                    third = s.rcpt("b@other.test")
                    s.data(b"Subject: preferred\r\n\r\nhello\r\n")
                return first, second, third

            with trio.fail_after(30):
                first, second, third = await in_thread(session)
    assert first[0] == 250 and third[0] == 250
    assert second == (452, b"4.5.3 Recipient needs a different TLS policy, send it in a new "
                           b"transaction")
    assert [(m.rcpts, m.tls) for m in sink.messages] == [
        (["a@plain.example"], False), (["b@other.test"], True)]
    plain_legs = logs.of("upstream", tls="none")
    assert plain_legs and plain_legs[0]["offered"] is True


async def _serve(script: dict, *, task_status=trio.TASK_STATUS_IGNORED):
    async with scripted_upstream(**script) as up:
        task_status.started(up.port)
        await trio.sleep_forever()


def _upstream(silent_at: bytes) -> dict:
    """A fake upstream that answers like a plain MTA until the command *silent_at* (or the
    final dot, b"."), then says nothing."""
    return dict(ehlo=["8BITMIME"], on={silent_at: stall()})


async def _through(upstream_port, **timeouts):
    data = config_dict([listener_dict(upstream_port=upstream_port,
                                      timeouts={"upstream_connect": 1, "upstream_reply": 1,
                                                "upstream_data_done": 1, **timeouts})])
    async with running_gateway(data) as (gw, logs):
        with trio.fail_after(30):
            reply = await in_thread(lambda: smtp_send(gw.addresses["smtp"][1]))
    return reply, logs


async def test_upstream_reply_timeout_is_451_4_4_1(nursery):
    port = await nursery.start(_serve, _upstream(b"MAIL"))
    reply, logs = await _through(port)
    assert reply == (451, b"4.4.1 Upstream server unavailable")
    assert logs.of("upstream_error", reason="reply timeout")


async def test_greeting_timeout_is_451_4_4_1(nursery):
    port = await nursery.start(_serve, dict(session=Conn.stall))     # not even a greeting
    reply, logs = await _through(port)
    assert reply == (451, b"4.4.1 Upstream server unavailable")
    assert logs.of("upstream_error", reason="greeting timeout")


async def test_upstream_data_done_timeout_is_451_4_4_2(nursery):
    port = await nursery.start(_serve, _upstream(b"."))
    reply, logs = await _through(port)
    assert reply == (451, b"4.4.2 Upstream connection lost")
    assert logs.of("upstream_error", reason="data_done timeout")


async def test_upstream_connect_timeout_is_451_4_4_1():
    # a listening socket whose accept queue is full: further SYNs are dropped, so a connect
    # hangs (the kernel retries) until the gateway's upstream_connect gives up
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        reply, logs = await _through(port)
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert reply == (451, b"4.4.1 Upstream server unavailable")
    errors = logs.of("upstream_error")
    assert errors and errors[0]["reason"].startswith("connect")


async def test_tls_handshake_timeout_closes_a_silent_client(server_cert):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, tls="implicit",
                                          cert="main", timeouts={"tls_handshake": 1})],
                           server_cert=server_cert)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                start = trio.current_time()
                assert await stream.receive_some(100) == b""      # closed, no TLS
                waited = trio.current_time() - start
                await stream.aclose()
    assert 0.5 < waited < 5
    assert logs.of("tls_error")


async def test_dsn_parameters_towards_an_upstream_without_dsn_are_logged():
    async with running_sink() as sink:          # the sink offers no DSN
        data = config_dict([listener_dict(upstream_port=sink.port, dsn=True)])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def session():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    return s.sendmail("alice@client.test", ["bob@example.test"],
                                      b"Subject: dsn\r\n\r\nhello\r\n",
                                      mail_options=["RET=HDRS", "ENVID=abc"],
                                      rcpt_options=["NOTIFY=NEVER"])
            with trio.fail_after(30):
                refused = await in_thread(session)
    assert refused == {}
    assert "RET" not in sink.messages[0].mail_params
    events = logs.of("dsn_dropped")
    assert events and set(events[0]["params"].split(",")) == {"RET", "ENVID", "NOTIFY"}


async def test_refusal_at_mail_from_is_tracked(tmp_path, server_cert):
    tracking = tmp_path / "tracking.jsonl"
    async with running_sink() as sink:
        data = config_dict([listener_dict(
            upstream_port=sink.port, cert="main",
            client_rules=[dict(match="secure.example", client_tls="required")])],
            server_cert=server_cert, tracking_log=str(tracking))
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                reply = await in_thread(lambda: smtp_send(
                    port, mail_from="alice@secure.example"))
    assert reply == (530, b"5.7.0 Must use TLS")
    records = [json.loads(line) for line in tracking.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["result"] == "rejected" and records[0]["reply"] == "530 5.7.0 Must use TLS"
    assert records[0]["mail_from"] == "alice@secure.example" and records[0]["recipients"] == []
    assert records[0]["upstream_leg"] is None
    assert sink.messages == []


async def test_pregreet_holds_the_greeting_and_refuses_early_talkers(tmp_path):
    """On a real gateway: the bot gets 554 and is counted as
    `gateway_connections_rejected_total{reason="pregreet"}` (at 0 before, SPEC §11)."""
    from harness import to_toml
    from peers import free_port
    from supervised import GatewayProcess, samples_of, scrape

    port, metrics_port = free_port(), free_port()
    async with running_sink() as sink:
        listener = listener_dict("mx", upstream_port=sink.port, pregreet_wait=1)
        listener["bind"] = f"127.0.0.1:{port}"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict([listener], workers=1, shutdown_grace=5,
                                           metrics=f"127.0.0.1:{metrics_port}")))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                before = await in_thread(scrape, metrics_port)
                # a bot that talks at once: 220- ... then 554, closed
                bot = await trio.open_tcp_stream("127.0.0.1", port)
                await bot.send_all(b"EHLO bot\r\n")
                got = b""
                while chunk := await bot.receive_some(4096):
                    got += chunk
                await bot.aclose()
                # a client that waits for the final line is served
                start = trio.current_time()
                reply = await in_thread(lambda: smtp_send(port))
                waited = trio.current_time() - start
                await in_thread(lambda: gw.wait_for(r"event=conn_close ", count=2))
                after = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    assert got == b"220-mx.test ESMTP\r\n554 5.5.0 SMTP protocol synchronization error\r\n"
    assert reply[0] == 250 and waited >= 1
    assert len([ln for ln in gw.lines if " event=reject " in ln and "reason=pregreet" in ln]) == 1
    assert len(sink.messages) == 1

    def pregreet(samples):
        return samples_of(samples, "gateway_connections_rejected_total", listener="mx",
                          type="public", reason="pregreet")
    assert pregreet(before) == [0] and pregreet(after) == [1]
    assert samples_of(after, "gateway_messages_total", listener="mx", type="public",
                      result="accepted") == [1]


def test_pregreet_wait_on_an_implicit_listener_is_a_configuration_error():
    from gateway.config import parse_config
    from gateway.errors import ConfigError
    import pytest
    with pytest.raises(ConfigError) as err:
        parse_config(config_dict([listener_dict(upstream_port=25, tls="implicit",
                                                pregreet_wait=3)]))
    assert err.value.path == "listeners[0].pregreet_wait"


async def _read_until_closed(stream) -> bytes:
    """What the gateway sent before closing (a reset, when our unread trickle was still in
    its receive buffer, ends the read too)."""
    got = b""
    try:
        while chunk := await stream.receive_some(4096):
            got += chunk
    except trio.BrokenResourceError:
        pass
    return got


async def test_a_trickled_command_line_gets_command_seconds_from_its_first_byte():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port,
                                          timeouts={"command": 1.5})])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                assert (await stream.receive_some(4096)).startswith(b"220 ")
                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    async def trickle():
                        # one byte every 0.4 s: each read is well inside `command`, the line
                        # as a whole is not
                        for byte in b"EHLO a-very-slow-client.example":
                            try:
                                await stream.send_all(bytes([byte]))
                            except trio.BrokenResourceError:
                                return
                            await trio.sleep(0.4)
                    nursery.start_soon(trickle)
                    got = await _read_until_closed(stream)
                    nursery.cancel_scope.cancel()
                took = trio.current_time() - start
    # the 421 is sent; a reset for our unread bytes may beat it to the reader
    assert got in (b"421 4.4.2 Timeout exceeded\r\n", b"")
    assert logs.of("reject", code=421, reason="timeout")
    assert 1.4 < took < 4


async def test_a_data_trickle_below_the_floor_rate_is_cut_before_the_dot():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port,
                                          timeouts={"data": 1, "data_min_rate": 1000})])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.receive_some(4096)
                for line in (b"EHLO c\r\n", b"MAIL FROM:<a@b.test>\r\n",
                             b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"):
                    await stream.send_all(line)
                    assert (await stream.receive_some(4096))[:1] in (b"2", b"3")
                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    async def trickle():
                        # 20 bytes every 0.2 s = 100 bytes/s, each read well inside `data`
                        for _ in range(100):
                            try:
                                await stream.send_all(b"x" * 18 + b"\r\n")
                            except trio.BrokenResourceError:
                                return
                            await trio.sleep(0.2)
                    nursery.start_soon(trickle)
                    got = await _read_until_closed(stream)
                    nursery.cancel_scope.cancel()
                took = trio.current_time() - start
    assert got in (b"421 4.4.2 Timeout exceeded\r\n", b"")
    assert logs.of("reject", code=421, reason="timeout")
    assert 0.9 < took < 4
    assert sink.messages == []
