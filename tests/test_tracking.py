"""Message tracking (SPEC §7): records from a real run, queried with `gateway track`."""
from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import trio

from harness import (NEUTRAL_CWD, client_context, config_dict, gateway_subprocess_env, in_thread,
                     listener_dict, running_gateway, running_sink, smtp_send)


def track(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "track", *args], capture_output=True,
                          text=True, timeout=60, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)


async def test_tracking_records_and_track_filters(tmp_path, server_cert):
    log_path = tmp_path / "tracking.jsonl"
    async with running_sink(reject_rcpt={"nobody@example.test"}) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, cert="main")],
                           server_cert=server_cert, tracking_log=str(log_path))
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            ctx = client_context(server_cert.ca)
            with trio.fail_after(30):
                await in_thread(lambda: smtp_send(port, starttls=True, ctx=ctx,
                                                  mail_from="alice@tls.test"))
                await in_thread(lambda: smtp_send(port, mail_from="bob@plain.test",
                                                  rcpts=("carol@example.test",)))
                await in_thread(lambda: smtp_send(port, mail_from="eve@plain.test",
                                                  rcpts=("nobody@example.test",)))
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["result"] for r in records] == ["accepted", "accepted", "rejected"]
    assert records[0]["client_tls"].startswith("TLSv1.3 ") and records[1]["client_tls"] is None
    assert records[2]["reply"].startswith("550") and records[2]["recipients"] == [
        "nobody@example.test"]
    assert all(r["upstream_tls"] is None for r in records)

    table = track("-f", str(log_path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("ID ") and "TIME" in lines[0] and len(lines) == 4
    assert lines[1].split()[7:9] == ["TLSv1.3", "plain"]          # client, upstream legs (after ID)
    assert lines[2].split()[7:9] == ["plain", "plain"]
    assert lines[3].endswith(records[2]["reply"])                 # the whole reply

    def rows(*args):
        out = track("-f", str(log_path), "--json", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line)["mail_from"] for line in out.stdout.splitlines()]
    assert rows("--from", "alice@tls.test") == ["alice@tls.test"]
    assert rows("--from", "plain.test") == ["bob@plain.test", "eve@plain.test"]
    assert rows("--to", "carol@example.test") == ["bob@plain.test"]
    assert rows("--no-tls") == ["alice@tls.test", "bob@plain.test", "eve@plain.test"]
    assert rows("--tls") == []                       # the upstream leg was plaintext
    assert rows("--client-tls") == ["alice@tls.test"]
    assert rows("--result", "rejected") == ["eve@plain.test"]
    assert rows("--since", "2000-01-01T00:00Z", "--until", "2000-01-02T00:00Z") == []
    assert len(rows("--since", records[0]["time"])) == 3
    assert len(rows("--since", "1h")) == 3 and rows("--until", "1h") == []
    assert rows("--to", "@example.test", "--json") == [r["mail_from"] for r in records]


async def test_tls_required_upstream_refusal_is_tracked_as_tempfail(tmp_path):
    log_path = tmp_path / "tracking.jsonl"
    async with running_sink(offer_starttls=False) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, upstream_tls="required")],
                           tracking_log=str(log_path))
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]

            def attempt():
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                    s.ehlo("client.test")
                    s.mail("alice@client.test")
                    return s.rcpt("bob@partner.test")
            with trio.fail_after(30):
                reply = await in_thread(attempt)
    assert reply[0] == 451
    (record,) = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert record["result"] == "tempfail" and record["reply"].startswith("451 4.7.5")
    assert record["recipients"] == ["bob@partner.test"] and record["size"] == 0
    # it never reached the upstream: no upstream leg, so not "plain"
    assert record["upstream_tls"] is None and record.get("upstream_leg") is None
    out = track("-f", str(log_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[7:9] == ["plain", "-"]     # after the ID column

    def ids(*args):
        done = track("-f", str(log_path), "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["id"] for line in done.stdout.splitlines()]
    assert ids("--no-upstream-tls") == [] and ids("--upstream-tls") == []
    assert ids("--no-tls") == [record["id"]]                     # the client leg was plain
