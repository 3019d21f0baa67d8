"""net.accept.accept_loop's errno handling (as trio's SocketListener and serve_listeners do it):
a connection gone before accept() is skipped, running out of descriptors pauses and logs,
anything else ends the loop; the listening socket is closed when the loop ends; an accepted
socket goes to the handler. The normal path (a real accepted connection, served by
server._handle) is what every end-to-end test goes through."""
from __future__ import annotations

import errno

import trio

from gateway.observe.logs import EventLog
from gateway.net.accept import accept_loop
from harness import LogCapture


class _Accepted:
    """An accepted socket; the handler closes it."""

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class _FakeListener:
    def __init__(self, script):
        self.script = list(script)
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True

    async def accept(self):
        await trio.lowlevel.checkpoint()
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item, ("127.0.0.1", 4000)


async def test_accept_errors_are_skipped_paused_or_raised(autojump_clock):
    logs = LogCapture()
    log = EventLog("json", stream=logs)
    conn = _Accepted()
    handled = []

    async def handle(sock):
        handled.append(sock)
        sock.close()
    listener = _FakeListener([
        OSError(errno.ECONNABORTED, "aborted"),     # skipped
        OSError(errno.EMFILE, "too many open files"),   # logged, 0.1 s pause
        conn,
        OSError(errno.EBADF, "bad file descriptor"),    # ends the loop
    ])
    start = trio.current_time()
    caught = ()
    try:
        async with trio.open_nursery() as handlers:
            await accept_loop(listener, handle, handlers, log)
    except* OSError as group:
        caught = group.exceptions
    assert [exc.errno for exc in caught] == [errno.EBADF]
    assert trio.current_time() - start >= 0.1
    assert [e["reason"] for e in logs.of("accept_error")] == ["[Errno 24] too many open files"]
    assert handled == [conn] and conn.closed and listener.closed and not listener.script
