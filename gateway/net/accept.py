"""The accept loop of one listening socket."""
from __future__ import annotations

import errno

import trio

# accept() errors (as trio's SocketListener and serve_listeners treat them): the connection
# went away before it was accepted -- try the next; out of descriptors or memory -- pause.
ACCEPT_SKIP = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET") if hasattr(errno, name)}
ACCEPT_PAUSE = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def accept_loop(listen_sock, handle, handlers: trio.Nursery, log) -> None:
    """Accept connections on *listen_sock* (a trio socket) and start handle(sock) in
    *handlers* for each (trio.serve_listeners without its SocketStream per connection and
    the forced close after the handler: *handle* closes the socket itself). Ends by raising
    an accept() error that is neither skipped nor paused on; the listening socket is closed
    when the loop ends (as trio does)."""
    with listen_sock:
        while True:
            try:
                sock, _ = await listen_sock.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP:
                    continue
                if exc.errno in ACCEPT_PAUSE:
                    log.event("accept_error", level="error", reason=str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            handlers.start_soon(handle, sock)
