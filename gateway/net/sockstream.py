"""A lean trio stream over a connected TCP socket, for the per-session hot path.

trio's `SocketStream` goes through the scheduler on every socket call, even one that
completes at once (`send` on a socket with room, `recv` with data waiting): a session makes
dozens of such calls, and that round trip was the largest single cost in the profile
(benchmarks/README.md). `LeanSocketStream` tries the non-blocking call first and only waits
(`wait_readable`/`wait_writable`) when the kernel says it would block. It still checks for
cancellation on every call, and yields to the scheduler at least every `YIELD_EVERY` calls,
so a peer that always has data ready cannot starve the other sessions or outrun a timeout.

`open_tcp()` connects to an upstream: an IP literal directly, a host name through trio's
happy-eyeballs `open_tcp_stream`; both come back as a `LeanSocketStream`.
"""
from __future__ import annotations

import ipaddress
import socket as _socket

import trio

YIELD_EVERY = 16


class LeanSocketStream(trio.abc.Stream):
    __slots__ = ("socket", "_sock", "_calls", "_closed")

    def __init__(self, tsock) -> None:
        """The stream takes the connection over from the trio socket *tsock*, which is left
        detached (closing it does nothing): close the stream, or its `socket`."""
        sock = _socket.socket(tsock.family, tsock.type, tsock.proto, tsock.detach())
        self.socket = trio.socket.from_stdlib_socket(sock)  # close, shutdown, options
        self._sock = sock                    # the calls, non-blocking (trio set it so)
        self._calls = 0
        self._closed = False

    async def _enter(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the socket stream was closed")
        self._calls += 1
        if self._calls >= YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def send_all(self, data) -> None:
        await self._enter()
        sock = self._sock
        with memoryview(data) as view:
            total = len(view)
            sent = 0
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    self._calls = 0
                    await self._wait(trio.lowlevel.wait_writable)
                except OSError as exc:
                    raise self._error(exc) from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = 65536
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await self._enter()
        sock = self._sock
        while True:
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                self._calls = 0
                await self._wait(trio.lowlevel.wait_readable)
            except OSError as exc:
                raise self._error(exc) from exc

    async def _wait(self, wait) -> None:
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:
            self._closed = True
            raise
        except OSError as exc:               # the descriptor went away under us
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> Exception:
        if self._closed or self._sock.fileno() == -1:
            return trio.ClosedResourceError("the socket stream was closed")
        return trio.BrokenResourceError(f"socket error: {exc}")

    def quiet(self) -> bool:
        """Open, and nothing waiting to be read: a non-blocking peek (an idle pooled leg's
        check; EOF or unread bytes from the peer both say False)."""
        if self._closed:
            return False
        try:
            self._sock.recv(1, _socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def abandon(self) -> None:
        """Close now, without awaiting (no task may be using the stream)."""
        self._closed = True
        self.socket.close()

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(trio.lowlevel.wait_writable)

    def setsockopt(self, level: int, option: int, value) -> None:
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0):
        if buffersize:
            return self.socket.getsockopt(level, option, buffersize)
        return self.socket.getsockopt(level, option)

    async def aclose(self) -> None:
        self._closed = True
        self.socket.close()                  # wakes any task waiting on it
        await trio.lowlevel.checkpoint()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def open_tcp(host: str, port: int) -> LeanSocketStream:
    """A connected LeanSocketStream to host:port (OSError when it cannot be had)."""
    if not _is_ip(host):
        stream = await trio.open_tcp_stream(host, port)
        return LeanSocketStream(stream.socket)
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = trio.socket.socket(family, _socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return LeanSocketStream(sock)
