"""Operator metrics from a real `gateway run` (SPEC §11): certificate expiry per loaded
pair, the alert rules' counters at 0 from the start, the upstream's last result."""
from __future__ import annotations

import json
import smtplib
import time

import trio
from cryptography import x509

from harness import in_thread, running_sink
from peers import free_port
from supervised import GatewayProcess, poll, samples_of, scrape

EXPIRY = "gateway_certificate_expiry_timestamp_seconds"


def write_config(path, *, port, imap_port, sink_port, metrics_port, server_cert, workers=2):
    path.write_text(f"""
[gateway]
hostname = "mx.test"
workers = {workers}
metrics = "127.0.0.1:{metrics_port}"
shutdown_grace = 5

[certificates.main]
cert = "{server_cert.cert}"
key = "{server_cert.key}"

[[listeners]]
name = "mx"
protocol = "smtp"
bind = "127.0.0.1:{port}"
certificate = "main"

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "required"

[[listeners]]
name = "imaps"
protocol = "imap"
bind = "127.0.0.1:{imap_port}"
tls = "implicit"

[listeners.upstream]
address = "127.0.0.1:{free_port()}"
tls = "none"
""")


def not_after(path) -> float:
    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return leaf.not_valid_after_utc.timestamp()


async def test_expiry_zero_counters_and_upstream_result_from_the_endpoint(tmp_path,
                                                                        server_cert):
    port, imap_port, metrics_port = free_port(), free_port(), free_port()
    async with running_sink() as sink:             # no STARTTLS: `required` cannot be had
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, imap_port=imap_port, sink_port=sink.port,
                     metrics_port=metrics_port, server_cert=server_cert)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=4))
                started = await in_thread(scrape, metrics_port)

                def refused():
                    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                        s.ehlo("client.test")
                        s.mail("alice@client.test")
                        return s.rcpt("bob@example.test")
                before = time.time()
                reply = await in_thread(refused)
                after = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    # one series per loaded pair: the configured certificate and the generated demo one
    assert samples_of(started, EXPIRY, certificate="main", key_type="ecdsa") == \
        [not_after(server_cert.cert)]
    [demo] = samples_of(started, EXPIRY, certificate="demo", key_type="ecdsa")
    assert abs(demo - (time.time() + 365 * 86400)) < 3 * 3600
    assert len(samples_of(started, EXPIRY)) == 2
    # every listener x reason the alert rule reads, at 0 before anything happened
    for listener in ("mx", "imaps"):
        for reason in ("tls_not_offered", "tls_failed", "not_trusted"):
            assert samples_of(started, "gateway_tls_alerts_total", listener=listener,
                              reason=reason) == [0], (listener, reason)
        for reason in ("unavailable", "lost"):          # read by the upstream-errors rule
            assert samples_of(started, "gateway_upstream_errors_total", listener=listener,
                              reason=reason) == [0], (listener, reason)
    assert samples_of(started, "gateway_worker_restarts_total") == [0]
    assert not samples_of(started, "gateway_upstream_last_result_timestamp_seconds")
    # the first failure is an increase from 0 (what `increase()` sees), and the upstream's
    # last result says when
    assert reply == (451, b"4.7.5 TLS is required, but was not offered by host")
    assert samples_of(after, "gateway_tls_alerts_total", listener="mx",
                      reason="tls_not_offered") == [1]
    [when] = samples_of(after, "gateway_upstream_last_result_timestamp_seconds",
                        listener="mx", result="tls_failure")
    assert before - 1 <= when <= time.time() + 1
    assert not samples_of(after, "gateway_upstream_last_result_timestamp_seconds",
                          result="ok")


async def test_opening_a_leg_reports_ok_unreachable_and_tls_failure():
    from gateway.relay.upstream import UpstreamFailure, UpstreamLeg, UpstreamSettings
    from gateway.tls.context import client_context
    from gateway.tls.profiles import PREDEFINED

    results = []

    def settings(port):
        return UpstreamSettings(
            host="127.0.0.1", port=port, mode="starttls", server_name=None,
            helo_name="mx.test", tls_context=client_context(PREDEFINED["default"]),
            connect_timeout=5, reply_timeout=5, data_done_timeout=5,
            on_result=results.append)
    async with running_sink() as sink:                 # no STARTTLS
        with trio.fail_after(30):
            leg = await UpstreamLeg.open(settings(sink.port), "preferred")
            await leg.quit()
            for port, level in ((sink.port, "required"), (free_port(), "none")):
                try:
                    await UpstreamLeg.open(settings(port), level)
                except UpstreamFailure:
                    pass
                else:
                    raise AssertionError(f"{level} to {port} opened")
    assert results == ["ok", "tls_failure", "unreachable"]


def write_status_config(path, *, port, sink_port, metrics_port, server_cert):
    path.write_text(f"""
[gateway]
hostname = "mx.test"
workers = 2
metrics = "127.0.0.1:{metrics_port}"
shutdown_grace = 5

[certificates.main]
cert = "{server_cert.cert}"
key = "{server_cert.key}"

[[listeners]]
name = "mx"
protocol = "smtp"
bind = "127.0.0.1:{port}"
certificate = "main"

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "none"

[[listeners]]
name = "quiet"
protocol = "smtp"
bind = "127.0.0.1:{free_port()}"
client_tls = "none"

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "none"
""")


async def test_status_and_gateway_status_while_sessions_are_open(tmp_path, server_cert,
                                                                 capsys):
    from gateway.cli import main
    from supervised import status_json

    port, metrics_port = free_port(), free_port()
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_status_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                            server_cert=server_cert)
        gw = GatewayProcess(cfg)
        held = []
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=4))
                idle = await in_thread(status_json, metrics_port)

                def open_sessions():
                    for _ in range(2):
                        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
                        held.append(s)
                        s.ehlo("client.test")
                    return held[0].sendmail("alice@client.test", ["bob@example.test"],
                                            b"Subject: status\r\n\r\nhello\r\n")
                sent = time.time()
                assert await in_thread(open_sessions) == {}
                busy = await in_thread(status_json, metrics_port)
                url = f"http://127.0.0.1:{metrics_port}"
                capsys.readouterr()
                code_url = await in_thread(main, ["status", "--url", url])
                table = capsys.readouterr().out
                code_cfg = await in_thread(main, ["status", "-c", str(cfg), "--json"])
                as_json = capsys.readouterr().out
        finally:
            for s in held:
                s.close()
            assert gw.stop() == 0
    code_down = main(["status", "--url", url])
    assert "error: " in capsys.readouterr().err
    # before any session: every listener, nothing counted; certificates and no worker rows
    assert [lst["name"] for lst in idle["listeners"]] == ["mx", "quiet"]
    assert all(lst["active_connections"] == 0 and lst["sessions_last_minute"] == 0
               and lst["upstream_last_result"] is None for lst in idle["listeners"])
    # the supervisor's worker rows: two serving workers of the first generation, beating
    assert len(idle["workers"]) == 2
    for w in idle["workers"]:
        assert w["pid"] > 0 and w["generation"] == 0 and w["serving"] is True
        assert w["heartbeat_age_seconds"] is not None and w["heartbeat_age_seconds"] < 5
    [cert] = idle["certificates"]
    assert (cert["name"], cert["key_type"]) == ("main", "ecdsa")
    assert cert["not_after"] == not_after(server_cert.cert)
    assert idle["demo_certificate"] is False
    # two sessions open (on either worker), one message relayed: summed across workers
    mx, quiet = busy["listeners"]
    assert (mx["active_connections"], mx["sessions_last_minute"],
            mx["messages_last_minute"]) == (2, 2, 1)
    assert mx["upstream_last_result"]["result"] == "ok"
    assert sent - 1 <= mx["upstream_last_result"]["at"] <= time.time() + 1
    assert (quiet["active_connections"], quiet["sessions_last_minute"]) == (0, 0)
    # the command: the same, as a table and as JSON
    assert code_url == 0 and code_cfg == 0 and code_down == 1
    row = next(line for line in table.splitlines() if line.startswith("mx "))
    assert row.split()[:5] == ["mx", "2", "2", "1", "ok"]
    assert "WORKER PID" in table and "GENERATION" in table
    assert "main" in table and "ecdsa" in table and "days" in table
    assert json.loads(as_json)["listeners"][0]["name"] == "mx"


def test_recent_counts_sum_processes_within_the_minute(tmp_path):
    from gateway.observe.recent import SUBDIR, RecentCounts, read_recent

    (tmp_path / SUBDIR).mkdir()
    a = RecentCounts(str(tmp_path / SUBDIR / "1.bin"), ["in", "out"])
    b = RecentCounts(str(tmp_path / SUBDIR / "2.bin"), ["in", "out"])
    for _ in range(3):
        a.session(0)
    b.session(0)
    b.message(0)
    b.session(1)
    (tmp_path / SUBDIR / "3.bin").write_bytes(b"GW")       # a file being created: skipped
    now = time.time()
    assert read_recent(str(tmp_path), now) == {"in": {"sessions": 4, "messages": 1},
                                               "out": {"sessions": 1, "messages": 0}}
    assert read_recent(str(tmp_path), now + 61) == {"in": {"sessions": 0, "messages": 0},
                                                    "out": {"sessions": 0, "messages": 0}}


async def test_expiry_follows_the_certificate_a_reload_loads(tmp_path, ca):
    """After SIGHUP with a renewed certificate (an RSA one now) only the new pair is
    exported once the old workers are gone; a reload that fails keeps the running one."""
    import datetime
    import signal

    def issue(days, key_type):
        leaf = ca.issue_cert("localhost", key_type=key_type, not_after=(
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)))
        leaf.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "gw.crt"))
        return not_after(tmp_path / "gw.crt")

    import trustme
    port, imap_port, metrics_port = free_port(), free_port(), free_port()
    first = issue(10, trustme.KeyType.ECDSA)
    files = type("Files", (), {"cert": tmp_path / "gw.crt", "key": tmp_path / "gw.key"})
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, imap_port=imap_port, sink_port=sink.port,
                     metrics_port=metrics_port, server_cert=files)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=4))
                before = await in_thread(scrape, metrics_port)
                second = issue(90, trustme.KeyType.RSA)
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                # the new generation serves, the old one is gone
                await in_thread(lambda: gw.wait_for(r"event=listening", count=8))
                await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=2))
                after = await in_thread(scrape, metrics_port)
                (tmp_path / "gw.key").write_text("not a key\n")     # a broken reload
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reload_failed"))
                # the supervisor sets the gauge just after that line: wait for it
                def reload_failed_gauge():
                    s = scrape(metrics_port)
                    return s if samples_of(s, "gateway_config_last_reload_successful") == [0] \
                        else None
                broken = await in_thread(lambda: poll(reload_failed_gauge, 10,
                                                      what="the failed reload's gauge"))
        finally:
            assert gw.stop() == 0
    assert samples_of(before, EXPIRY, certificate="main") == [first]
    assert samples_of(before, EXPIRY, certificate="main", key_type="ecdsa") == [first]
    assert samples_of(after, EXPIRY, certificate="main", key_type="rsa") == [second]
    assert not samples_of(after, EXPIRY, certificate="main", key_type="ecdsa")
    assert samples_of(broken, EXPIRY, certificate="main") == [second]
    # the reload gauges (SPEC §11): 1 from the start, 1 after the good reload (a later
    # timestamp), 0 after the broken one (the timestamp stays at the last success)
    ok, at = "gateway_config_last_reload_successful", \
        "gateway_config_last_reload_success_timestamp_seconds"
    assert samples_of(before, ok) == [1] and samples_of(after, ok) == [1]
    assert samples_of(broken, ok) == [0]
    assert samples_of(after, at)[0] > samples_of(before, at)[0] > 0
    assert samples_of(broken, at) == samples_of(after, at)
    assert samples_of(before, "gateway_workers_configured") == [2]
