"""Reading the PROXY protocol header off a new connection from a trusted load balancer
(SPEC §9); the bytes after it stay readable through `PrefixedStream`."""
from __future__ import annotations

from typing import Callable

import trio

from .proxy_protocol import ProxyHeaderError, is_trusted, parse_proxy_header


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read (after a PROXY protocol header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes):
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes=None):
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data):
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self):
        await self.stream.aclose()


async def read_proxy_header(stream, peer, log, *, trusted_proxies, timeout: float,
                            rejected: Callable[[str], None]):
    """SPEC §9: ((host, port) of the real client, the stream from the first byte after the
    header), or None when *peer* is not one of *trusted_proxies* or the header is bad or
    incomplete within *timeout* seconds: then the reason is logged and rejected(reason label:
    `proxy_untrusted` or `proxy_malformed`, SPEC §11) is called; the caller closes the
    connection."""
    if not is_trusted(peer[0], trusted_proxies):
        log.event("reject", level="warning", code=0, reason="PROXY header from untrusted peer")
        rejected("proxy_untrusted")
        return None
    buf = b""
    try:
        with trio.fail_after(timeout):
            while True:
                parsed = parse_proxy_header(buf)
                if parsed is not None:
                    break
                data = await stream.receive_some(4096)
                if not data:
                    raise ProxyHeaderError("connection closed before the PROXY header")
                buf += data
    except (ProxyHeaderError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        why = "timeout" if isinstance(exc, trio.TooSlowError) else (str(exc) or "closed")
        log.event("reject", level="warning", code=0, reason=f"bad PROXY header: {why}")
        rejected("proxy_malformed")
        return None
    info, used = parsed
    source = info.source or peer
    return (source[0], source[1]), PrefixedStream(stream, buf[used:])
