"""Client text in the headers the gateway writes (SPEC §4.4): an EHLO/HELO argument with a
CR, LF, NUL or other control character gets `501 5.5.2 Invalid EHLO argument` and the session
goes on, over a real socket through the gateway to the test sink, with the native line
scanner and with its pure-Python twin; the relayed message carries no injected header."""
from __future__ import annotations

import re
import socket

import pytest
import trio

from gateway.native import scanner as facade, scanner_py
from harness import config_dict, in_thread, listener_dict, running_gateway, running_sink

INVALID = (501, b"5.5.2 Invalid EHLO argument")


@pytest.fixture(params=["native", "python"])
def scanner(request, monkeypatch):
    """The line scanner the server core uses: the compiled one or the pure-Python twin."""
    if request.param == "native":
        if facade.native_backend is None:
            pytest.skip("no compiled core")
        monkeypatch.setattr(facade, "scan_line", facade.native_backend.scan_line)
    else:
        monkeypatch.setattr(facade, "scan_line", scanner_py.scan_line)
    return request.param


class PlainClient:
    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("connection closed by the gateway")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines[0][4:]

    def send(self, data: bytes) -> tuple[int, bytes]:
        self.sock.sendall(data)
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


BAD_HELLOS = [
    b"EHLO evil\rX-Injected: yes\r\n",
    b"HELO evil\rX-Injected: yes\r\n",
    b"EHLO evil\0X-Injected: yes\r\n",
    b"HELO evil\0\r\n",
    b"EHLO evil\x01name\r\n",
    b"EHLO evil\tX-Injected: yes\r\n",
    b"EHLO evil\x7f\r\n",
    b"EHLO evil name\x1b[0m\r\n",       # anywhere in the argument, not only its first word
]


def _session(port: int):
    c = PlainClient(port)
    try:
        refused = [c.send(line) for line in BAD_HELLOS]
        ok = c.send(b"EHLO good.client.test\r\n")
        mail = c.send(b"MAIL FROM:<alice@client.test>\r\n")
        rcpt = c.send(b"RCPT TO:<bob@example.test>\r\n")
        data = c.send(b"DATA\r\n")
        end = c.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n")
        c.send(b"QUIT\r\n")
        return refused, ok, mail, rcpt, data, end
    finally:
        c.close()


async def test_control_characters_in_the_ehlo_argument_get_501(scanner):
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                refused, ok, mail, rcpt, data, end = await in_thread(_session, port)
                await sink.wait_for_messages(1)
    assert refused == [INVALID] * len(BAD_HELLOS)
    assert ok[0] == 250 and (mail[0], rcpt[0], data[0], end[0]) == (250, 250, 354, 250)
    msg = sink.messages[0].data
    lines = re.split(rb"\r\n|\r|\n", msg)
    assert not any(line.lower().startswith(b"x-injected") for line in lines)
    assert b"\r" not in msg.replace(b"\r\n", b"") and b"\n" not in msg.replace(b"\r\n", b"")
    assert msg.startswith(b"Received: from good.client.test (unknown [127.0.0.1])\r\n")
    assert [e["code"] for e in logs.of("reject")] == [501] * len(BAD_HELLOS)


def _injected(port: int):
    c = PlainClient(port)
    try:
        got = [c.send(b"EHLO evil\rX-Injected: yes\r\n"),
               c.send(b"MAIL FROM:<alice@client.test>\r\n")]
        if got[-1][0] == 250:
            got += [c.send(b"RCPT TO:<bob@example.test>\r\n"), c.send(b"DATA\r\n"),
                    c.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n")]
        got.append(c.send(b"QUIT\r\n"))
        return got
    finally:
        c.close()


async def test_an_injected_ehlo_never_reaches_the_upstream_headers(scanner):
    """The trial's fault: `EHLO evil\\rX-Injected:` became a header line of the relayed
    message. Now the EHLO is refused, so the session has no EHLO and MAIL is refused too."""
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                got = await in_thread(_injected, port)
    injected = [m for m in sink.messages
                if any(line.startswith(b"X-Injected")
                       for line in re.split(rb"\r\n|\r|\n", m.data))]
    assert injected == []
    assert got[0] == INVALID
    assert got[1] == (503, b"5.5.1 Error: send HELO/EHLO first")
    assert got[-1][0] == 221
