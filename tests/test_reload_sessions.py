"""Relayed IMAP sessions across reloads (SPEC §9, issue #21 item 11), with a real supervised
gateway relaying to a private Dovecot: a generation retired by SIGHUP keeps its IMAP sessions
past `shutdown_grace` until they end or `reload_grace` passes (then `* BYE [UNAVAILABLE]`); at
most 4 retired generations keep IMAP sessions (the oldest one's beyond that get the BYE, logged
and counted in gateway_reload_sessions_cut_total); SIGTERM still cuts at once. Idle SMTP
sessions on a retired generation get 421 4.3.2 at once (test_process_model has the SMTP
transactions in flight)."""
from __future__ import annotations

import signal
import socket
import ssl
import time

import pytest

import trio

from harness import client_context, config_dict, in_thread, running_sink, to_toml
from peers import free_port
from supervised import GatewayProcess, poll, scrape, total
from supervised import write_config as write_smtp_config
from test_imap_gateway import dovecot, imap_listener  # noqa: F401

BYE = b"* BYE [UNAVAILABLE] Server shutting down\r\n"
T = 20              # seconds: the bound of each blocking read or wait of these tests
CUT = "gateway_reload_sessions_cut_total"


class IMAPClient:
    """A raw IMAP client (STARTTLS, LOGIN, SELECT) whose reads are bounded and may time out
    without losing the stream (imaplib's buffered file cannot be read after a timeout)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, user: str, password: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        self.buf = b""
        self.n = 0
        assert self.readline().startswith(b"* OK")
        self.command(b"STARTTLS")
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.command(b"LOGIN " + user.encode() + b" " + password.encode())
        self.command(b"SELECT INBOX")

    def readline(self, timeout: float = T) -> bytes:
        """One line; TimeoutError when none is complete within *timeout*; b"" at EOF."""
        end = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no line") from None
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                line, self.buf = self.buf, b""
                return line
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def quiet(self, seconds: float) -> bool:
        """Nothing arrives (not even EOF) for *seconds*."""
        try:
            line = self.readline(seconds)
        except TimeoutError:
            return True
        self.buf = line + self.buf
        return False

    def send(self, line: bytes) -> bytes:
        self.n += 1
        tag = b"t%d" % self.n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        return tag

    def command(self, line: bytes) -> bytes:
        """Send, read up to the tagged reply; returns it (asserting OK)."""
        tag = self.send(line)
        while True:
            reply = self.readline()
            assert reply, f"connection closed waiting for {line!r}"
            if reply.startswith(tag + b" "):
                assert reply.split()[1] == b"OK", reply
                return reply

    def close(self) -> None:
        self.sock.close()


def write_config(path, *, dovecot, server_cert, port, metrics_port, **gateway):
    listener = imap_listener("imap", dovecot.port)
    listener["bind"] = f"127.0.0.1:{port}"
    data = config_dict([listener], server_cert=server_cert, ca_file=server_cert.ca,
                       workers=1, metrics=f"127.0.0.1:{metrics_port}", **gateway)
    path.write_text(to_toml(data))


@pytest.fixture
def gateway(tmp_path, dovecot, server_cert):  # noqa: F811
    """start(**gateway keys) -> (GatewayProcess, IMAP port, metrics port); stopped after."""
    started = []

    def start(**keys):
        port, metrics_port = free_port(), free_port()
        cfg = tmp_path / "gw.toml"
        write_config(cfg, dovecot=dovecot, server_cert=server_cert, port=port,
                     metrics_port=metrics_port, **keys)
        gw = GatewayProcess(cfg)
        started.append(gw)
        gw.wait_for(r"event=listening", timeout=T)
        return gw, port, metrics_port
    yield start
    for gw in started:
        gw.stop()


def reload(gw: GatewayProcess, n: int) -> None:
    """SIGHUP; wait until the n-th reload is applied and its worker listens."""
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(r"event=reloaded", count=n, timeout=T)
    gw.wait_for(r"event=listening", count=n + 1, timeout=T)


def test_an_idle_imap_session_outlives_shutdown_grace_until_reload_grace(
        gateway, dovecot, server_cert):  # noqa: F811
    """(a) A session in IDLE on a retired generation is not cut at shutdown_grace (1 s): it
    is still relayed after it (DONE, NOOP answered by Dovecot); (b) when reload_grace passes
    it gets `* BYE [UNAVAILABLE]`, and the retired worker, empty, exits."""
    gw, port, _ = gateway(shutdown_grace=1, reload_grace=8)
    ctx = client_context(server_cert.ca)
    c = IMAPClient(port, ctx, dovecot.user, dovecot.password)
    try:
        idle = c.send(b"IDLE")
        assert c.readline().startswith(b"+")
        old = gw.worker_pids()
        start = time.monotonic()                  # the retirement comes after this
        reload(gw, 1)
        kept = c.quiet(2.5)                       # well past shutdown_grace (a loaded
        #                                           machine may take seconds to reload)
        c.sock.sendall(b"DONE\r\n")
        done = c.readline()
        noop = c.command(b"NOOP")
        still_old = old[0] in gw.worker_pids()
        bye = c.readline()                         # when reload_grace has passed
        waited = time.monotonic() - start
        gw.wait_for(rf"event=worker_exit .*worker_pid={old[0]}", timeout=T)
        after = c.readline()
    finally:
        c.close()
    assert kept, c.buf
    assert done.startswith(idle + b" OK"), done
    assert noop.split()[1] == b"OK"
    assert still_old
    assert bye == BYE
    assert 7.5 < waited < 8 + T
    assert after == b""
    assert gw.count(r"event=reload_sessions_cut .*reason=reload_grace") == 1


def test_a_fifth_retired_generation_cuts_the_oldest_ones_sessions_then_sigterm_cuts_all(
        gateway, dovecot, server_cert):  # noqa: F811
    """(c) An IMAP session on each of 5 generations retired one after the other: only 4 may
    keep theirs, so the oldest one's session gets the BYE, logged and counted
    (reason="generation_cap"), and the others are still relayed; (d) SIGTERM then cuts every
    session at once (not after reload_grace), and the gateway exits 0."""
    gw, port, metrics_port = gateway(shutdown_grace=1, reload_grace=600)
    ctx = client_context(server_cert.ca)
    clients = []
    try:
        for n in range(1, 6):
            clients.append(IMAPClient(port, ctx, dovecot.user, dovecot.password))
            reload(gw, n)
        first = clients[0].readline()
        gw.wait_for(r"event=generation_cut .*generation=0", timeout=T)
        rest = [c.command(b"NOOP") for c in clients[1:]]
        cut = poll(lambda: total(scrape(metrics_port), CUT, listener="imap",
                                 reason="generation_cap"), T, what="cut counted")
        ready = scrape(metrics_port)
        start = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        byes = [c.readline() for c in clients[1:]]
        code = gw.proc.wait(T)
        stopped = time.monotonic() - start
    finally:
        for c in clients:
            c.close()
    assert first == BYE
    assert [r.split()[1] for r in rest] == [b"OK"] * 4
    assert cut == 1
    assert total(ready, CUT, listener="imap", reason="reload_grace") == 0
    assert gw.count(r"event=generation_cut") == 1
    assert byes == [BYE] * 4
    assert code == 0 and stopped < 10


def smtp_client(port: int, *, data: bool) -> tuple[socket.socket, object]:
    """A plaintext SMTP client after EHLO; with *data*, inside DATA with part of a body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    while (line := f.readline())[3:4] == b"-":
        pass
    assert line.startswith(b"250 "), line
    if data:
        for cmd, code in ((b"MAIL FROM:<alice@client.test>", b"250"),
                          (b"RCPT TO:<bob@example.test>", b"250"), (b"DATA", b"354")):
            sock.sendall(cmd + b"\r\n")
            assert f.readline().startswith(code), cmd
        sock.sendall(b"Subject: across a reload\r\n\r\nfirst part\r\n")
    return sock, f


def silent_for(sock: socket.socket, seconds: float) -> bool:
    """Nothing arrives on *sock* (not even EOF) for *seconds*."""
    sock.settimeout(seconds)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except socket.timeout:
        return True
    finally:
        sock.settimeout(T)


async def test_a_retired_generation_finishes_smtp_transactions_and_ends_idle_sessions(
        tmp_path, server_cert):
    """On a generation retired by SIGHUP (shutdown_grace 0.5 s, upstream_data_done 8 s): an
    idle SMTP session is answered 421 4.3.2; a transaction in flight is still relayed 6 s
    later (SIGTERM's grace does not bound it) and accepted; one that goes on past
    upstream_data_done is cut, and the retired worker, empty, exits."""
    port, metrics_port = free_port(), free_port()
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_smtp_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                          server_cert=server_cert, workers=1, grace=0.5, client_tls="none",
                          extra="[listeners.timeouts]\nupstream_data_done = 8")
        gw = GatewayProcess(cfg)
        socks = []
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                old = gw.worker_pids()[0]
                busy, busy_f = await in_thread(lambda: smtp_client(port, data=True))
                stuck, stuck_f = await in_thread(lambda: smtp_client(port, data=True))
                idle, idle_f = await in_thread(lambda: smtp_client(port, data=False))
                socks += [busy, stuck, idle]
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                start = time.monotonic()
                told = await in_thread(idle_f.readline)
                kept = await in_thread(silent_for, busy, 6 - (time.monotonic() - start))
                busy.sendall(b"second part\r\n.\r\n")
                accepted = await in_thread(busy_f.readline)
                late = time.monotonic() - start
                cut = await in_thread(stuck_f.readline)
                cut_at = time.monotonic() - start
                await in_thread(lambda: gw.wait_for(rf"event=worker_exit .*worker_pid={old}"))
        finally:
            for sock in socks:
                sock.close()
            assert gw.stop() == 0
    assert told == b"421 4.3.2 Service shutting down\r\n"
    assert kept and late >= 5.5
    assert accepted.startswith(b"250 "), accepted
    assert cut == b"" and 7 < cut_at < 8 + 5
    assert len(sink.messages) == 1
