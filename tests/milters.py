"""Milters for the tests: filter-side packet builders, a scriptable test milter, and private
rspamd / OpenDKIM instances.

Filter side (written here on purpose, not with the code under test's state machine; only its
packet framing is shared)::

    async with scripted_milter(handler) as address:      # "inet:127.0.0.1:PORT"
        ...                                               # handler(peer) runs per connection

    async def handler(peer: FilterPeer):
        await peer.negotiate(actions=0x1FF, protocol=P_NR_CONN)
        data = await peer.expect(b"C")                    # skips MACRO packets, keeps them
        await peer.send(CONTINUE)

Reply builders: ``optneg(...)``, ``CONTINUE``, ``ACCEPT``, ``REJECT``, ``TEMPFAIL``,
``DISCARD``, ``PROGRESS``, ``SKIP``, ``replycode(text)``, ``quarantine(reason)``,
``addheader(name, value)``, ``insheader(i, name, value)``, ``chgheader(i, name, value)``,
``chgfrom(addr, args)``, ``addrcpt(addr)``, ``addrcpt_par(addr, args)``, ``delrcpt(addr)``,
``replbody(data)``.
"""
from __future__ import annotations

import contextlib
import functools
import socket
import struct

import trio

from gateway.proto.milter import PacketDecoder, encode_packet

__all__ = [
    "optneg", "CONTINUE", "ACCEPT", "REJECT", "TEMPFAIL", "DISCARD", "PROGRESS", "SKIP",
    "replycode", "quarantine", "addheader", "insheader", "chgheader", "chgfrom", "addrcpt",
    "addrcpt_par", "delrcpt", "replbody", "cstrings", "FilterPeer", "scripted_milter",
]


def cstrings(*parts) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0,
           symlists: dict[int, str] | None = None) -> bytes:
    data = struct.pack("!III", version, actions, protocol)
    for stage, names in (symlists or {}).items():
        data += struct.pack("!I", stage) + cstrings(names)
    return encode_packet(b"O", data)


CONTINUE = encode_packet(b"c")
ACCEPT = encode_packet(b"a")
REJECT = encode_packet(b"r")
TEMPFAIL = encode_packet(b"t")
DISCARD = encode_packet(b"d")
PROGRESS = encode_packet(b"p")
SKIP = encode_packet(b"s")


def replycode(text: str | bytes) -> bytes:
    return encode_packet(b"y", cstrings(text))


def quarantine(reason: str) -> bytes:
    return encode_packet(b"q", cstrings(reason))


def addheader(name: str, value: str) -> bytes:
    return encode_packet(b"h", cstrings(name, value))


def insheader(index: int, name: str, value: str) -> bytes:
    return encode_packet(b"i", struct.pack("!I", index) + cstrings(name, value))


def chgheader(index: int, name: str, value: str) -> bytes:
    return encode_packet(b"m", struct.pack("!I", index) + cstrings(name, value))


def chgfrom(addr: str, args: str | None = None) -> bytes:
    return encode_packet(b"e", cstrings(addr) if args is None else cstrings(addr, args))


def addrcpt(addr: str) -> bytes:
    return encode_packet(b"+", cstrings(addr))


def addrcpt_par(addr: str, args: str | None = None) -> bytes:
    return encode_packet(b"2", cstrings(addr) if args is None else cstrings(addr, args))


def delrcpt(addr: str) -> bytes:
    return encode_packet(b"-", cstrings(addr))


def replbody(data: bytes) -> bytes:
    return encode_packet(b"b", data)


class FilterPeer:
    """The milter's end of one connection, driven by a test's handler."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.decoder = PacketDecoder()
        self.macros: list[tuple[bytes, bytes]] = []     # (command letter, raw pairs)
        self.received: list[tuple[bytes, bytes]] = []   # every packet, MACROs included

    async def recv(self) -> tuple[bytes, bytes] | None:
        """The next packet, or None at EOF."""
        while True:
            packet = self.decoder.next_packet()
            if packet is not None:
                self.received.append(packet)
                return packet
            if self.decoder.eof:
                return None
            self.decoder.receive_data(await self.stream.receive_some(65536))

    async def expect(self, command: bytes) -> bytes:
        """Data of the next non-MACRO packet, which must be `command`."""
        while True:
            packet = await self.recv()
            assert packet is not None, f"EOF while waiting for {command!r}"
            if packet[0] == b"D":
                self.macros.append((packet[1][:1], packet[1][1:]))
                continue
            assert packet[0] == command, f"got {packet[0]!r}, expected {command!r}"
            return packet[1]

    async def send(self, *packets: bytes) -> None:
        await self.stream.send_all(b"".join(packets))

    async def negotiate(self, **kwargs) -> bytes:
        data = await self.expect(b"O")
        await self.send(optneg(**kwargs))
        return data


@contextlib.asynccontextmanager
async def scripted_milter(handler, *, unix_path=None):
    """Serve `handler(peer)` on 127.0.0.1:<ephemeral> (or the unix socket `unix_path`) until
    the block ends; yields the milter address (``inet:...`` / ``unix:...``). Handler
    exceptions fail the test (they surface from the nursery)."""
    async with trio.open_nursery() as nursery:
        async def serve(stream):
            async with stream:
                await handler(FilterPeer(stream))

        if unix_path is None:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            address = f"inet:127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        else:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(str(unix_path))
            sock.listen()
            await nursery.start(trio.serve_listeners, serve, [trio.SocketListener(sock)])
            address = f"unix:{unix_path}"
        try:
            yield address
        finally:
            nursery.cancel_scope.cancel()


