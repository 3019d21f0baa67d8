"""``gateway sink``: a small, fast trio SMTP server that accepts everything and records it.

It is the demo upstream and the upstream used by the gateway's tests and benchmarks.  It is
deliberately lenient, like the receivers SMTP smuggling (CVE-2023-51764 class) exploits: it ends
DATA on a line that is exactly "." whether that line ends in CRLF or a bare LF, so smuggling
that reaches it shows up as an extra message (a strict sink would hide it).  For a correct
client this is exactly `<CRLF>.<CRLF>`.  Dot-stuffing is undone at every line start.

Bounds per connection: command lines up to 64 KiB, messages up to `max_size` octets (SIZE,
advertised; a larger message is read to its end, dropped and answered `552 5.3.4`), and an idle
timeout (300 s) on every read.
"""
from __future__ import annotations

import base64

import itertools
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 300.0
READ_SIZE = 256 * 1024
MAX_SIZE = 104857600

# End of DATA: a line that is exactly "." (CRLF or bare LF), preceded by a line end.
_DATA_END = re.compile(rb"\n\.\r?\n")
_ADDR = re.compile(rb"^\s*<([^>]*)>(.*)$", re.S)
_SIZE = re.compile(rb"(?i)>.*\sSIZE=(\d{1,20})(?:\s|$)")

_ids = itertools.count(1)


@dataclass
class SinkMessage:
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool
    tls_version: str | None
    xclient: dict = field(default_factory=dict)
    helo: str | None = None
    auth_user: str | None = None       # the identity its session authenticated as (AUTH)
    mail_params: str = ""               # MAIL FROM's parameters as received


class _Closed(Exception):
    """The connection is over (peer gone, QUIT, timeout, protocol error)."""


class _Conn:
    """One SMTP session."""

    def __init__(self, sink: "Sink", stream: trio.abc.Stream):
        self.sink = sink
        self.stream = stream
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.lines: list[bytes] = []
        self.tls = False
        self.tls_version: str | None = None
        self.helo: str | None = None
        self.xclient: dict[str, str] = {}
        self.auth_user: str | None = None
        self.timeout = sink.idle_timeout
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params = ""
        self.rcpts: list[str] = []

    async def auth(self, arg: bytes) -> None:
        """AUTH PLAIN or LOGIN against the sink's `auth` table (user -> password)."""
        mech, _, initial = arg.strip().partition(b" ")
        mech = mech.upper()
        if self.auth_user is not None:
            self.reply(b"503 5.5.1 Error: already authenticated\r\n")
            return
        if mech not in (b"PLAIN", b"LOGIN"):
            self.reply(b"535 5.7.8 Error: authentication failed: mechanism\r\n")
            return

        async def response(challenge: bytes) -> bytes | None:
            self.reply(b"334 " + challenge + b"\r\n")
            while b"\n" not in self.buf:
                await self.read_more()
            nl = self.buf.find(b"\n")
            line = bytes(self.buf[:nl]).rstrip(b"\r")
            del self.buf[:nl + 1]
            return None if line == b"*" else line

        try:
            if mech == b"PLAIN":
                raw = initial if initial and initial != b"=" else await response(b"")
                if raw is None:
                    self.reply(b"501 5.7.0 Authentication aborted\r\n")
                    return
                parts = base64.b64decode(raw).split(b"\0")
                user, password = parts[1], parts[2]
            else:
                raw = initial or await response(base64.b64encode(b"Username:"))
                if raw is None:
                    self.reply(b"501 5.7.0 Authentication aborted\r\n")
                    return
                user = base64.b64decode(raw)
                raw = await response(base64.b64encode(b"Password:"))
                if raw is None:
                    self.reply(b"501 5.7.0 Authentication aborted\r\n")
                    return
                password = base64.b64decode(raw)
        except (ValueError, IndexError):
            self.reply(b"501 5.5.2 Cannot decode response\r\n")
            return
        name = user.decode("utf-8", "replace")
        if self.sink.auth.get(name) == password.decode("utf-8", "replace"):
            self.auth_user = name
            self.reply(b"235 2.7.0 Authentication successful\r\n")
        else:
            self.reply(b"535 5.7.8 Error: authentication failed\r\n")

    # -- I/O -----------------------------------------------------------------------------

    async def read_more(self) -> None:
        await self.flush()
        self.buf += await self.receive()

    async def receive(self) -> bytes:
        with trio.move_on_after(self.timeout) as scope:
            chunk = await self.stream.receive_some(READ_SIZE)
        if scope.cancelled_caught or not chunk:
            raise _Closed()
        return chunk

    def reply(self, data: bytes) -> None:
        self.out.append(data)

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            await self.stream.send_all(data)

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        host = self.sink.hostname.encode()
        self.reply(b"220 " + host + b" ESMTP sink\r\n")
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    self.reply(b"500 5.5.2 Error: line too long\r\n")
                    await self.flush()
                    raise _Closed()
                await self.read_more()
                continue
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self.sink.keep_messages:
                self.lines.append(line)
            if len(line) > MAX_LINE:
                self.reply(b"500 5.5.2 Error: line too long\r\n")
                continue
            await self.command(line)

    async def command(self, line: bytes) -> None:
        host = self.sink.hostname.encode()
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self.helo = arg.strip().decode("utf-8", "replace") or None
            self.reset()
            caps = [host, b"PIPELINING", b"SIZE %d" % self.sink.max_size, b"8BITMIME",
                    b"ENHANCEDSTATUSCODES"] + ([b"SMTPUTF8"] if self.sink.smtputf8 else [])
            if self.sink.ssl_context is not None and self.sink.offer_starttls and not self.tls:
                caps.append(b"STARTTLS")
            if self.sink.xclient:
                caps.append(b"XCLIENT ADDR PORT NAME HELO")
            if self.sink.auth and (self.tls or not self.sink.ssl_context):
                caps.append(b"AUTH PLAIN LOGIN")
            self.reply(b"".join(b"250" + (b" " if i == len(caps) - 1 else b"-") + c + b"\r\n"
                                for i, c in enumerate(caps)))
        elif verb == b"HELO":
            self.helo = arg.strip().decode("utf-8", "replace") or None
            self.reset()
            self.reply(b"250 " + host + b"\r\n")
        elif verb == b"MAIL":
            addr = self._address(arg, b"FROM:")
            if addr is None:
                self.reply(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
                return
            size = _SIZE.search(arg)
            if size is not None and int(size.group(1)) > self.sink.max_size:
                self.reply(b"552 5.3.4 Message size exceeds fixed limit\r\n")
                return
            self.reset()
            self.mail_from = addr
            self.mail_params = arg.partition(b">")[2].strip().decode("utf-8", "replace")
            self.reply(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            addr = self._address(arg, b"TO:")
            if addr is None:
                self.reply(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            elif self.mail_from is None:
                self.reply(b"503 5.5.1 Error: need MAIL command\r\n")
            elif addr in self.sink.reject_rcpt:
                self.reply(b"550 5.1.1 No such user\r\n")
            else:
                self.rcpts.append(addr)
                self.reply(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if self.mail_from is None or not self.rcpts:
                self.reply(b"554 5.5.1 Error: no valid recipients\r\n")
                return
            self.reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            data = await self.read_data()
            if data is None:
                self.reply(b"552 5.3.4 Message size exceeds fixed limit\r\n")
                self.reset()
                return
            self.sink.record(SinkMessage(
                mail_from=self.mail_from, rcpts=list(self.rcpts), data=data, tls=self.tls,
                tls_version=self.tls_version, xclient=dict(self.xclient), helo=self.helo,
                auth_user=self.auth_user, mail_params=self.mail_params))
            if self.sink.data_reply is not None:
                self.reply(self.sink.data_reply)
            else:
                self.reply(b"250 2.0.0 Ok: queued as %X\r\n" % next(_ids))
            self.reset()
        elif verb in (b"RSET", b"NOOP"):
            if verb == b"RSET":
                self.reset()
            self.reply(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self.reply(b"221 2.0.0 Bye\r\n")
            await self.flush()
            raise _Closed()
        elif verb == b"AUTH" and self.sink.auth:
            await self.auth(arg)
        elif verb == b"STARTTLS":
            await self.starttls()
        elif verb == b"XCLIENT" and self.sink.xclient:
            for item in arg.split():
                key, eq, value = item.partition(b"=")
                if eq:
                    self.xclient[key.decode("ascii", "replace").upper()] = \
                        value.decode("utf-8", "replace")
            self.helo = None
            self.reset()
            self.reply(b"220 " + host + b" ESMTP sink\r\n")
        else:
            self.reply(b"502 5.5.2 Error: command not recognized\r\n")

    @staticmethod
    def _address(arg: bytes, prefix: bytes) -> str | None:
        if arg[:len(prefix)].upper() != prefix:
            return None
        m = _ADDR.match(arg[len(prefix):])
        if m is None:
            return None
        return m.group(1).decode("utf-8", "replace")

    async def read_data(self) -> bytes | None:
        """Read up to the end-of-data line; return the un-dot-stuffed content, or None when
        the message was larger than max_size (its bytes are read and dropped)."""
        acc = bytearray(b"\n")      # sentinel line end: the first line starts after it
        acc += self.buf
        self.buf = bytearray()
        limit = self.sink.max_size
        too_big = False
        pos = 0
        while True:
            m = _DATA_END.search(acc, pos)
            if m is not None:
                break
            if len(acc) > limit + 5:       # the content alone is already over the limit
                too_big = True       # keep only what an end-of-data match could start in
                del acc[:len(acc) - 3]
            pos = max(0, len(acc) - 3)
            await self.flush()
            acc += await self.receive()
        self.buf = acc[m.end():]
        if too_big or m.start() > limit:    # the content is acc[1:m.start() + 1]
            return None
        body = bytes(acc[:m.start() + 1])
        if b"\n." in body:
            body = body.replace(b"\n.", b"\n")
        return body[1:]

    async def starttls(self) -> None:
        ctx = self.sink.ssl_context
        if self.tls:
            self.reply(b"503 5.5.1 Error: TLS already active\r\n")
            return
        if ctx is None:
            self.reply(b"454 4.7.0 TLS not available\r\n")
            return
        reply = self.sink.starttls_reply
        if reply is None:
            reply = b"220 2.0.0 Ready to start TLS\r\n"
        self.reply(reply)
        await self.flush()
        if not reply.startswith(b"220"):
            return
        self.buf.clear()            # never carry plaintext over into the TLS session
        tls_stream = trio.SSLStream(self.stream, ctx, server_side=True)
        self.stream = tls_stream
        with trio.move_on_after(self.timeout) as scope:
            await tls_stream.do_handshake()
        if scope.cancelled_caught:
            raise _Closed()
        self.tls = True
        self.tls_version = tls_stream.version()
        self.helo = None
        self.xclient = {}
        self.reset()


class Sink:
    """An SMTP server that accepts everything and records each message in ``messages``."""

    def __init__(self, *, hostname: str = "sink.test", ssl_context: ssl.SSLContext | None = None,
                 xclient: bool = False, maildir: str | os.PathLike | None = None,
                 offer_starttls: bool = True, starttls_reply: bytes | None = None,
                 reject_rcpt: set[str] | frozenset = frozenset(),
                 data_reply: bytes | None = None,
                 on_message: Callable[[SinkMessage], Any] | None = None,
                 keep_messages: bool = True, max_size: int = MAX_SIZE,
                 idle_timeout: float = IDLE_TIMEOUT, auth: dict[str, str] | None = None,
                 smtputf8: bool = True):
        """`starttls_reply`: raw bytes sent instead of the normal 220 to STARTTLS (the TLS
        handshake follows when they start with "220"); `reject_rcpt`: addresses answered
        `550 5.1.1 No such user`; `data_reply`: raw final reply to DATA (the message is still
        recorded); `on_message`: called with each message; `keep_messages=False` only counts
        messages (`message_count`), for long benchmark runs; `smtputf8=False`: SMTPUTF8 is
        not offered."""
        self.smtputf8 = smtputf8
        self.hostname = hostname
        self.auth = dict(auth or {})      # AUTH PLAIN/LOGIN users (offered after STARTTLS)
        self.ssl_context = ssl_context
        self.xclient = xclient
        self.maildir = os.fspath(maildir) if maildir is not None else None
        self.offer_starttls = offer_starttls
        self.starttls_reply = starttls_reply
        self.reject_rcpt = frozenset(reject_rcpt)
        self.data_reply = data_reply
        self.on_message = on_message
        self.keep_messages = keep_messages
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.messages: list[SinkMessage] = []
        self.message_count = 0
        self.connections = 0
        self.sessions: list[list[bytes]] = []
        self.port: int | None = None
        self._changed = trio.Event()
        self._seq = itertools.count(1)
        if self.maildir is not None:
            for sub in ("new", "tmp", "cur"):
                os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        actual = listeners[0].socket.getsockname()[1]
        self.port = actual
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(actual)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:     # EMFILE and friends: back off briefly, keep serving
                    await trio.sleep(0.05)
                    continue
                self.connections += 1
                nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = _Conn(self, stream)
        self.sessions.append(conn.lines)
        try:
            await conn.run()
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                OSError):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    if isinstance(conn.stream, trio.SSLStream):
                        await conn.stream.transport_stream.aclose()
                    else:
                        await conn.stream.aclose()
                except Exception:
                    pass

    def record(self, msg: SinkMessage) -> None:
        """A message a session accepted: counted, kept, written to the maildir, announced."""
        self.message_count += 1
        if self.keep_messages:
            self.messages.append(msg)
        if self.maildir is not None:
            self._write_maildir(msg)
        event, self._changed = self._changed, trio.Event()
        event.set()
        if self.on_message is not None:
            try:
                self.on_message(msg)
            except Exception:
                pass

    def _write_maildir(self, msg: SinkMessage) -> None:
        name = f"{time.time():.6f}.P{os.getpid()}Q{next(self._seq)}.{socket.gethostname()}"
        tmp = os.path.join(self.maildir, "tmp", name)
        try:
            with open(tmp, "wb") as f:
                f.write(msg.data)
            os.rename(tmp, os.path.join(self.maildir, "new", name))
        except OSError:
            pass

    async def wait_for_messages(self, n: int) -> None:
        """Return once at least *n* messages have arrived (bound it with trio.fail_after)."""
        while self.message_count < n:
            await self._changed.wait()


def main_sink(host: str, port: int, cert, key, maildir, log) -> int | None:
    """Blocking entry point for ``gateway sink``."""
    ctx = None
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))

    def on_message(msg: SinkMessage) -> None:
        if log is not None:
            log.event("message", mail_from=msg.mail_from, rcpts=",".join(msg.rcpts),
                      size=len(msg.data), tls=msg.tls, tls_version=msg.tls_version)

    # A long-running sink (demo, benchmarks) keeps nothing in memory: the log and the maildir
    # are its record.
    sink = Sink(ssl_context=ctx, maildir=maildir, on_message=on_message, keep_messages=False)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(sink.serve, host, port)
            if log is not None:
                log.event("listening", host=host, port=actual, starttls=ctx is not None,
                          maildir=maildir)

    trio.run(run)
    return None


async def run_demo_sink(config, log, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The sink `gateway run --demo` relays to, on the first listener's upstream address
    (*config*: the demo GatewayConfig)."""
    up = config.listeners[0].upstream
    sink = Sink(hostname="sink.demo")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve, up.host, up.port)
        log.event("demo_sink", bind=f"{up.host}:{up.port}")
        task_status.started()
