"""Client-read timeouts for all the SMTP sessions of a worker, checked by one task.

A session waits for its client under one cancel scope for its whole life (SMTPSession.run);
giving that scope a deadline before every read and taking it back after costs two trio
deadline changes (a generator context manager and a heap operation each) per read. Instead
the session registers the scope with the time its wait must end (`watch`) and withdraws it
when the read returns (`unwatch`), two dict operations; `run()` wakes every `tick` seconds and
cancels the scopes whose time has passed. A timeout therefore fires up to one tick late;
serve() picks the tick from the shortest configured timeout (a quarter of it, 50-500 ms).
"""
from __future__ import annotations

import trio


class ReceiveWatchdog:
    def __init__(self) -> None:
        self._waiting: dict[trio.CancelScope, float] = {}
        self.running = False            # sessions fall back to scope deadlines without it
        self.tick = 0.25

    def watch(self, scope: trio.CancelScope, deadline: float) -> None:
        self._waiting[scope] = deadline

    def unwatch(self, scope: trio.CancelScope) -> None:
        self._waiting.pop(scope, None)

    def check(self, now: float) -> int:
        """Cancel every watched scope whose deadline has passed; returns how many."""
        expired = [scope for scope, deadline in self._waiting.items() if deadline <= now]
        for scope in expired:
            del self._waiting[scope]
            scope.cancel()
        return len(expired)

    def start(self, nursery: trio.Nursery, tick: float, scope: trio.CancelScope) -> None:
        """Run in *nursery* under *scope* (cancel it to stop); in use from now on."""
        self.tick = tick
        self.running = True

        async def watch():
            with scope:
                await self.run()
        nursery.start_soon(watch)

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                await trio.sleep(self.tick)
                self.check(trio.current_time())
        finally:
            self.running = False


def tick_for(timeouts: list[float]) -> float:
    """A quarter of the shortest timeout, within 50-500 ms."""
    shortest = min(timeouts, default=2.0)
    return min(0.5, max(0.05, shortest / 4))
