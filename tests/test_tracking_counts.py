"""Every transaction's end is counted once and tracked once (SPEC §7, §11), over real sockets
to a real `gateway run`: a message relayed, recipients all refused (then RSET, or QUIT), a
refusal at MAIL FROM, a client that vanishes mid-DATA and one the data timeout cuts. Each gives
exactly one tracking record, one `event=message` line and one `gateway_messages_total`
increment, with the same result; the listener's `type` labels its counters and `conn_open`."""
from __future__ import annotations

import json
import re
import socket

import trio

from harness import config_dict, in_thread, listener_dict, running_sink, smtp_send, to_toml
from peers import free_port
from supervised import GatewayProcess, samples_of, scrape

RESULTS = ("accepted", "rejected", "tempfail", "discarded")          # SPEC §11, as written
REJECT_REASONS = ("max_connections", "per_ip", "pregreet", "proxy_untrusted",
                  "proxy_malformed")


class Client:
    """A plain SMTP client on a socket: one command, its final reply line."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def reply(self) -> bytes:
        while True:
            line = self.file.readline()
            if len(line) < 4 or line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def into_data(self, sender: str) -> None:
        assert self.cmd(b"EHLO client.test").startswith(b"250 ")
        assert self.cmd(f"MAIL FROM:<{sender}>".encode()).startswith(b"250 ")
        assert self.cmd(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
        assert self.cmd(b"DATA").startswith(b"354 ")
        self.sock.sendall(b"Subject: cut\r\n\r\nthe first line of a message that never ends\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def refused_recipients(port: int, sender: str, then: bytes) -> list[bytes]:
    c = Client(port)
    try:
        return [c.cmd(b"EHLO client.test"), c.cmd(f"MAIL FROM:<{sender}>".encode()),
                c.cmd(b"RCPT TO:<nobody@example.test>"), c.cmd(then)]
    finally:
        c.close()


def vanish_mid_data(port: int) -> None:
    c = Client(port)
    c.into_data("vanish@client.test")
    c.close()                                    # no final dot, no QUIT: gone


def timed_out_mid_data(port: int) -> bytes:
    c = Client(port)
    try:
        c.into_data("slow@client.test")
        return c.reply()                         # then nothing more: the data timeout
    finally:
        c.close()


async def test_every_transaction_end_is_counted_logged_and_tracked_once(tmp_path, server_cert):
    port, metrics_port = free_port(), free_port()
    tracking = tmp_path / "tracking.jsonl"
    async with running_sink(reject_rcpt={"nobody@example.test"}) as sink:
        listener = listener_dict(
            "mx", upstream_port=sink.port, cert="main", type="private",
            timeouts={"data": 1, "data_min_rate": 0},
            client_rules=[{"match": "secure.example", "client_tls": "required"}])
        listener["bind"] = f"127.0.0.1:{port}"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict(
            [listener], server_cert=server_cert, workers=1, shutdown_grace=5,
            metrics=f"127.0.0.1:{metrics_port}", tracking_log=str(tracking))))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                before = await in_thread(scrape, metrics_port)

                async def step(fn, n):
                    got = await in_thread(fn)
                    await in_thread(lambda: gw.wait_for(r"event=message ", count=n))
                    return got
                sent = await step(lambda: smtp_send(port, mail_from="ok@client.test"), 1)
                rset = await step(lambda: refused_recipients(port, "rset@client.test",
                                                             b"RSET"), 2)
                quit_ = await step(lambda: refused_recipients(port, "quit@client.test",
                                                              b"QUIT"), 3)
                mail = await step(lambda: smtp_send(port, mail_from="alice@secure.example"), 4)
                await step(lambda: vanish_mid_data(port), 5)
                timeout = await step(lambda: timed_out_mid_data(port), 6)
                await in_thread(lambda: gw.wait_for(r"event=conn_close ", count=6))
                after = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    assert sent[0] == 250 and mail == (530, b"5.7.0 Must use TLS")
    assert rset[2:] == [b"550 5.1.1 No such user", b"250 2.0.0 Ok"]
    assert quit_[2:] == [b"550 5.1.1 No such user", b"221 2.0.0 Bye"]
    assert timeout == b"421 4.4.2 Timeout exceeded"
    assert [m.mail_from for m in sink.messages] == ["ok@client.test"]

    # one record per transaction, each written whole
    lines = tracking.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = {r["mail_from"]: r for r in map(json.loads, lines[:-1])}
    assert len(records) == len(lines) - 1 == 6
    assert len({r["id"] for r in records.values()}) == 6
    expect = {"ok@client.test": ("accepted", ["bob@example.test"]),
              "rset@client.test": ("rejected", ["nobody@example.test"]),
              "quit@client.test": ("rejected", ["nobody@example.test"]),
              "alice@secure.example": ("rejected", []),
              "vanish@client.test": ("tempfail", ["bob@example.test"]),
              "slow@client.test": ("tempfail", ["bob@example.test"])}
    assert {k: (r["result"], r["recipients"]) for k, r in records.items()} == expect
    assert records["rset@client.test"]["reply"] == "550 5.1.1 No such user"
    assert records["alice@secure.example"]["reply"] == "530 5.7.0 Must use TLS"
    assert records["slow@client.test"]["reply"] == "421 4.4.2 Timeout exceeded"
    assert records["vanish@client.test"]["reply"] == ""          # the client got no reply
    assert records["vanish@client.test"]["upstream_leg"] == "plain"

    # one event=message per record, with the same result
    events = [ln for ln in gw.lines if " event=message " in ln]
    assert len(events) == 6, events
    for sender, (result, _) in expect.items():
        [line] = [ln for ln in events if f" mail_from={sender} " in ln]
        assert f" result={result} " in line, line

    # the counters: at 0 for every result and reason before any traffic, then one increment
    # per transaction end; the listener's type on each
    for result in RESULTS:
        assert samples_of(before, "gateway_messages_total", listener="mx", type="private",
                          result=result) == [0], result
    for reason in REJECT_REASONS:
        assert samples_of(before, "gateway_connections_rejected_total", listener="mx",
                          type="private", reason=reason) == [0], reason
    counted = {result: samples_of(after, "gateway_messages_total", listener="mx",
                                  type="private", result=result) for result in RESULTS}
    assert counted == {"accepted": [1], "rejected": [3], "tempfail": [2], "discarded": [0]}
    [size] = samples_of(after, "gateway_message_bytes_total", listener="mx", type="private")
    assert size == records["ok@client.test"]["size"] > 0
    assert samples_of(after, "gateway_connections_total", listener="mx", type="private",
                      protocol="smtp") == [6]
    opened = [ln for ln in gw.lines if " event=conn_open " in ln]
    assert len(opened) == 6 and all(re.search(r" type=private\b", ln) for ln in opened)



async def _milter(peer) -> None:
    """A milter that continues, except: DATA of refuse@ is rejected, the message of
    drop@ discarded at its end."""
    from milters import CONTINUE, DISCARD, REJECT
    await peer.negotiate(actions=0x1FF, protocol=0)
    sender = ""
    while (packet := await peer.recv()) is not None:
        cmd, data = packet
        if cmd in (b"D", b"A", b"Q", b"K"):
            continue
        if cmd == b"M":
            sender = data.split(b"\0")[0].decode().strip("<>")
        if cmd == b"T" and sender == "refuse@client.test":
            await peer.send(REJECT)
        elif cmd == b"E" and sender == "drop@client.test":
            await peer.send(DISCARD)
        else:
            await peer.send(CONTINUE)


async def test_with_milters_every_transaction_end_is_counted_logged_and_tracked_once(tmp_path):
    """The milter path of DATA (SPEC §4.7): discarded at its end, DATA refused (then QUIT),
    the client vanishing mid-DATA, the data timeout."""
    from milters import scripted_milter
    port, metrics_port = free_port(), free_port()
    tracking = tmp_path / "tracking.jsonl"
    async with running_sink() as sink, scripted_milter(_milter) as address:
        listener = listener_dict(
            "mx", upstream_port=sink.port, tls="off", client_tls="none",
            timeouts={"data": 1, "data_min_rate": 0},
            milters=[{"name": "m", "address": address, "command_timeout": 5,
                      "content_timeout": 5, "connect_timeout": 5}])
        listener["bind"] = f"127.0.0.1:{port}"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict(
            [listener], workers=1, shutdown_grace=5, spool_dir=str(tmp_path / "spool"),
            metrics=f"127.0.0.1:{metrics_port}", tracking_log=str(tracking))))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening"))

                async def step(fn, n):
                    got = await in_thread(fn)
                    await in_thread(lambda: gw.wait_for(r"event=message ", count=n))
                    return got

                def refused_data():
                    c = Client(port)
                    try:
                        return [c.cmd(b"EHLO client.test"),
                                c.cmd(b"MAIL FROM:<refuse@client.test>"),
                                c.cmd(b"RCPT TO:<bob@example.test>"), c.cmd(b"DATA"),
                                c.cmd(b"QUIT")]
                    finally:
                        c.close()
                dropped = await step(lambda: smtp_send(port, mail_from="drop@client.test"), 1)
                refused = await step(refused_data, 2)
                await step(lambda: vanish_mid_data(port), 3)
                timeout = await step(lambda: timed_out_mid_data(port), 4)
                await in_thread(lambda: gw.wait_for(r"event=conn_close ", count=4))
                after = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    assert dropped == (250, b"2.7.0 Message discarded")
    assert refused[3].startswith(b"5") and refused[4] == b"221 2.0.0 Bye"
    assert timeout == b"421 4.4.2 Timeout exceeded"
    assert sink.messages == []
    lines = tracking.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = {r["mail_from"]: r for r in map(json.loads, lines[:-1])}
    assert len(records) == len(lines) - 1 == 4
    assert {k: r["result"] for k, r in records.items()} == {
        "drop@client.test": "discarded", "refuse@client.test": "rejected",
        "vanish@client.test": "tempfail", "slow@client.test": "tempfail"}
    assert records["refuse@client.test"]["reply"] == refused[3].decode()
    assert records["refuse@client.test"]["recipients"] == ["bob@example.test"]
    assert records["slow@client.test"]["reply"] == "421 4.4.2 Timeout exceeded"
    events = [ln for ln in gw.lines if " event=message " in ln]
    assert len(events) == 4, events
    counted = {result: samples_of(after, "gateway_messages_total", listener="mx",
                                  type="public", result=result) for result in RESULTS}
    assert counted == {"accepted": [0], "rejected": [1], "tempfail": [2], "discarded": [1]}
