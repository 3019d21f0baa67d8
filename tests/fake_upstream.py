"""One scriptable fake SMTP upstream for the tests that need an upstream misbehaving in a way
the sink (tests/harness.py) won't: stalling, hanging up, writing unasked, refusing, running a
SASL exchange, and recording every line it read with the state it read it in.

    async with scripted_upstream(ehlo=["PIPELINING"], on={b"MAIL": hang_up()}) as up:
        ... up.port ...
    up.connections[0].verbs() == [b"EHLO", b"MAIL"]

By default it answers like a plain MTA: a 220 greeting, EHLO with `ehlo` extensions, 250 to
MAIL/RCPT/RSET/NOOP, 354 to DATA then the message up to its final dot and 250, 221 to QUIT
(then hangs up), 502 to anything else. `on` maps a verb (b"." for a message's final dot) to
a reply (bytes, one or more whole lines) or to a handler ``async def h(conn, line)`` that does
what it likes with the `Conn` (send, `answer` as by default, `close`, `stall`, read more).
With `users`, AUTH PLAIN and LOGIN are run as Postfix does; with `starttls` (a server
`ssl.SSLContext`), STARTTLS is offered and the connection goes on over TLS. `session`
replaces the whole dialogue: ``async def s(conn)``. `ImapUpstream` is the IMAP one; `serving`
listens for either.

Each line read is kept in `Conn.lines` as (state, line): "command", "sasl" (read as a SASL
response), "data" (a message line) or "end" (a message's final dot)."""
from __future__ import annotations

import base64
import binascii
import ssl
from contextlib import asynccontextmanager
from functools import partial
from typing import Awaitable, Callable, Union

import trio

from gateway.native import scanner_py

Handler = Union[bytes, Callable[["Conn", bytes], Awaitable[None]]]

MAX_LINE = 1 << 20          # a fake still bounds what it buffers

SIMPLE = {b"MAIL": b"250 2.1.0 ok\r\n", b"RCPT": b"250 2.1.5 ok\r\n",
          b"RSET": b"250 2.0.0 ok\r\n", b"NOOP": b"250 2.0.0 ok\r\n",
          b".": b"250 2.0.0 queued\r\n", b"QUIT": b"221 2.0.0 bye\r\n"}


class Hangup(Exception):
    """Raised inside a connection's dialogue to end it (the stream is closed)."""


def verb_of(line: bytes) -> bytes:
    return line.split(b" ", 1)[0].split(b":", 1)[0].upper()


class Conn:
    """One connection to the fake upstream, as handlers see it."""

    def __init__(self, upstream: "ScriptedUpstream", stream, index: int):
        self.upstream, self.stream, self.index = upstream, stream, index
        self.lines: list[tuple[str, bytes]] = []
        self.messages: list[bytes] = []     # each message's lines as received, CRLF-ended
        self.tls = False
        self._buf = bytearray()

    # --- reading and writing ---------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Raw bytes: what is buffered first, else one read from the stream."""
        if self._buf:
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
            return data
        return await self.stream.receive_some(max_bytes)

    async def line(self, state: str = "command") -> bytes:
        """The next CRLF-ended line (without it), recorded with *state*; Hangup at EOF."""
        while b"\r\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise Hangup("line too long")
            data = await self.stream.receive_some(65536)
            if not data:
                raise Hangup("eof")
            self._buf += data
        end = self._buf.index(b"\r\n")
        got = bytes(self._buf[:end])
        del self._buf[:end + 2]
        self.lines.append((state, got))
        return got

    async def close(self) -> None:
        """Hang up now (the dialogue ends)."""
        await self.stream.aclose()
        raise Hangup("closed by the script")

    async def stall(self) -> None:
        """Say nothing more, keep the connection open."""
        await trio.sleep_forever()

    # --- what was read -----------------------------------------------------------------------
    def verbs(self) -> list[bytes]:
        """Command verbs as read, with b"." for each message's final dot."""
        return [b"." if state == "end" else verb_of(line)
                for state, line in self.lines if state in ("command", "end")]

    def commands(self) -> list[bytes]:
        return [line for state, line in self.lines if state == "command"]

    # --- the default dialogue ----------------------------------------------------------------
    def reply_for(self, line: bytes) -> bytes:
        """The default reply to a command that needs no more reading (not DATA, AUTH)."""
        verb = verb_of(line)
        if verb in (b"EHLO", b"HELO"):
            ext = list(self.upstream.ehlo)
            if self.upstream.users:
                ext.append("AUTH PLAIN LOGIN")
            if self.upstream.starttls is not None and not self.tls:
                ext.append("STARTTLS")
            names = [self.upstream.name] + ext
            return b"".join(f"250{'-' if i < len(names) - 1 else ' '}{n}\r\n".encode()
                            for i, n in enumerate(names))
        return SIMPLE.get(verb, b"502 5.5.2 what\r\n")

    async def answer(self, line: bytes) -> None:
        """Do what the default upstream does with *line* (a command, or b"." after DATA)."""
        verb = b"." if line == b"." else verb_of(line)
        if verb == b"DATA":
            await self.send(b"354 go ahead\r\n")
            await self.read_message()
            await self.upstream.dispatch(self, b".")
        elif verb == b"AUTH" and self.upstream.users:
            await self.send(await self._auth(line.partition(b" ")[2]))
        elif verb == b"STARTTLS" and self.upstream.starttls is not None and not self.tls:
            await self.send(b"220 2.0.0 Ready to start TLS\r\n")
            self.stream = trio.SSLStream(self.stream, self.upstream.starttls, server_side=True)
            await self.stream.do_handshake()
            self.tls, self._buf = True, bytearray()
        else:
            await self.send(self.reply_for(line))
            if verb == b"QUIT":
                await self.stream.aclose()
                raise Hangup("quit")

    async def read_message(self) -> bytes:
        """The message after a 354, up to its final dot (recorded as "end")."""
        lines = []
        while (got := await self.line("data")) != b".":
            lines.append(got + b"\r\n")
        self.lines[-1] = ("end", got)
        message = b"".join(lines)
        self.messages.append(message)
        self.upstream.messages.append(message)
        return message

    async def _sasl_response(self, challenge: bytes) -> bytes | None:
        await self.send(b"334 " + challenge + b"\r\n")
        got = await self.line("sasl")
        return None if got == b"*" else got

    async def _auth(self, arg: bytes) -> bytes:
        """AUTH PLAIN/LOGIN as Postfix runs it: a response that is not base64 ends the
        exchange with 501; LOGIN's user name is taken as given until the password."""
        mech, _, initial = arg.partition(b" ")
        mech = mech.upper()
        aborted = b"501 5.7.0 Authentication aborted\r\n"
        try:
            if mech == b"PLAIN":
                raw = initial or await self._sasl_response(b"")
                if raw is None:
                    return aborted
                _, user, password = base64.b64decode(raw, validate=True).split(b"\0")
            elif mech == b"LOGIN":
                name = initial or await self._sasl_response(b"VXNlcm5hbWU6")
                if name is None:
                    return aborted
                raw = await self._sasl_response(b"UGFzc3dvcmQ6")
                if raw is None:
                    return aborted
                user = base64.b64decode(name, validate=True)
                password = base64.b64decode(raw, validate=True)
            else:
                return b"504 5.5.4 Unsupported mechanism\r\n"
        except (ValueError, binascii.Error):
            return b"501 5.5.2 Cannot decode response\r\n"
        if self.upstream.users.get(user.decode()) == password.decode():
            return b"235 2.7.0 Authentication successful\r\n"
        return b"535 5.7.8 Error: authentication failed\r\n"


class ScriptedUpstream:
    def __init__(self, *, on: dict[bytes, Handler] | None = None, ehlo=("PIPELINING",),
                 name: str = "fake.test", greeting: bytes = b"220 fake.test ESMTP\r\n",
                 users: dict[str, str] | None = None, starttls: ssl.SSLContext | None = None,
                 session: Callable[[Conn], Awaitable[None]] | None = None):
        self.on = {k.upper(): v for k, v in (on or {}).items()}
        self.ehlo, self.name, self.greeting = list(ehlo), name, greeting
        self.users, self.starttls, self.session = users or {}, starttls, session
        self.connections: list[Conn] = []
        self.messages: list[bytes] = []     # every message, in the order they ended
        self.closed = 0                     # connections over (either side hung up)
        self.port = 0

    def verbs(self, conn: int) -> list[bytes]:
        return self.connections[conn].verbs() if conn < len(self.connections) else []

    def commands(self) -> list[bytes]:
        return [line for c in self.connections for line in c.commands()]

    def sasl_lines(self) -> list[bytes]:
        return [line for c in self.connections for state, line in c.lines if state == "sasl"]

    async def dispatch(self, conn: Conn, line: bytes) -> None:
        handler = self.on.get(b"." if line == b"." else verb_of(line))
        if handler is None:
            await conn.answer(line)
        elif isinstance(handler, bytes):
            await conn.send(handler)
        else:
            await handler(conn, line)

    async def handler(self, stream) -> None:
        conn = Conn(self, stream, len(self.connections))
        self.connections.append(conn)
        try:
            if self.session is not None:
                await self.session(conn)
                return
            await conn.send(self.greeting)
            while True:
                await self.dispatch(conn, await conn.line("command"))
        except (Hangup, trio.BrokenResourceError, trio.ClosedResourceError):
            pass                               # either side went away
        finally:
            self.closed += 1
            await conn.stream.aclose()


def hang_up(reply: bytes = b"") -> Handler:
    """A handler: send *reply* (if any), then close the connection."""
    async def handler(conn: Conn, line: bytes) -> None:
        if reply:
            await conn.send(reply)
        await conn.close()
    return handler


def stall(reply: bytes = b"") -> Handler:
    """A handler: send *reply* (if any), then say nothing more."""
    async def handler(conn: Conn, line: bytes) -> None:
        if reply:
            await conn.send(reply)
        await conn.stall()
    return handler


@asynccontextmanager
async def serving(fake):
    """*fake* (anything with an async `handler(stream)`) listening on 127.0.0.1 for the
    block; yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, fake.handler, 0,
                                                host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def scripted_upstream(**script):
    """A `ScriptedUpstream(**script)` listening on 127.0.0.1 (its `port`) for the block."""
    upstream = ScriptedUpstream(**script)
    async with serving(upstream) as upstream.port:
        yield upstream


# --- IMAP ----------------------------------------------------------------------------------

class ImapUpstream:
    """A scripted IMAP server: `greeting` bytes, then for each command the tagged OK (the
    capabilities to CAPABILITY, `starttls_answer` with TAG replaced to STARTTLS, BYE to
    LOGOUT); every byte it received is kept in `received` (literals are read as the gateway's
    reader does), and `connections` counts them. `session(upstream, stream)` replaces the
    dialogue; each connection lasts at most `bound` seconds."""

    def __init__(self, greeting: bytes, *, starttls_answer: bytes | None = None,
                 capabilities: bytes = b"IMAP4rev1 AUTH=PLAIN", session=None, bound=10):
        self.greeting = greeting
        self.starttls_answer = starttls_answer
        self.capabilities = capabilities
        self.received = bytearray()
        self.connections = 0
        self.session, self.bound = session, bound

    async def handler(self, stream):
        self.connections += 1
        if self.session is not None:
            await self.session(self, stream)
            return
        await stream.send_all(self.greeting)
        buf = bytearray()
        with trio.move_on_after(self.bound):
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    self.received += data
                    buf += data
                i = buf.index(b"\n")
                line, buf = bytes(buf[:i + 1]), buf[i + 1:]
                n, plus = scanner_py.find_literal(line.rstrip(b"\r\n"))
                while n >= 0:                       # read the literal and the rest
                    if not plus:
                        await stream.send_all(b"+ go\r\n")
                    while len(buf) < n or b"\n" not in buf[n:]:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        self.received += data
                        buf += data
                    j = buf.index(b"\n", n)
                    rest, buf = bytes(buf[n:j + 1]), buf[j + 1:]
                    n, plus = scanner_py.find_literal(rest.rstrip(b"\r\n"))
                tag, _, rest = line.partition(b" ")
                name = rest.split(b" ", 1)[0].strip().upper()
                if name == b"STARTTLS" and self.starttls_answer is not None:
                    await stream.send_all(self.starttls_answer.replace(b"TAG", tag))
                elif name == b"CAPABILITY":
                    await stream.send_all(b"* CAPABILITY " + self.capabilities + b"\r\n"
                                          + tag + b" OK done\r\n")
                elif name == b"LOGOUT":
                    await stream.send_all(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                    return
                else:
                    await stream.send_all(tag + b" OK done\r\n")
