"""Idle SMTP upstream connections kept for the next client session (SPEC §4.4).

Like Postfix's connection cache: when a client session ends with its upstream leg between
transactions, the leg waits here instead of being closed, and a later session of the same
worker whose route the leg satisfies takes it instead of connecting, reading a greeting,
saying EHLO and doing a TLS handshake again. A leg is keyed by what it is (SPEC §4.8,
`policy.route.leg_key`): its destination's address, mode, SNI, profile and client certificate,
the level it achieved and the names it verified; a route takes one under any of its
`pool_keys` (a `required` route takes a TLS leg or a verified one, a `preferred` one a TLS leg
or a plaintext leg whose upstream offered no TLS, ...).

- A leg is kept only when it is clean: open, in its idle command state (no transaction, no
  reply awaited, nothing buffered either way), not tied to one client (XCLIENT), used fewer
  than `pool_max_reuse` times, and no SASL exchange ever begun on it (SPEC §4.6): a leg that
  carried an AUTH, a 334 or a response is refused whatever the exchange ended in (abandoned
  after a 334, the client gone, an error, a success). That is the leg's own property
  (`UpstreamLeg.reusable()`, from the client core's `SMTPClient.reusable`), not a flag a
  session must remember to set.
- At most `pool_size` idle legs per destination address (SPEC §4.8), whatever their keys (a
  TLS leg and a plaintext one, another SNI or profile to the same address share it); one more
  is closed with QUIT.
- A leg idle longer than `pool_idle` seconds is closed with QUIT (by `reap()`, or when met).
- A leg is handed out only if nothing was heard since its last reply, neither in its parser
  nor on its socket (`leg.idle_and_alive()`): an upstream that closed it or said something (a
  421 before timing out, a stray line) answers nothing (SPEC §6), and the leg is dropped
  without a word, never reused. Whatever a check
  cannot see is caught by the session, which retries once on a new connection when the first
  commands on a reused leg fail (see SMTPSession._start_transaction).
- Newest first: the most recently used leg is the least likely to have been timed out.

Everything here runs in one trio thread; `nursery` (the worker's session nursery) closes
dropped legs in the background so that a session never waits for someone else's QUIT.
"""
from __future__ import annotations

import collections

import trio

from ..policy.route import leg_key


class UpstreamPool:
    def __init__(self) -> None:
        self._idle: dict[tuple, collections.deque] = {}
        self._held: dict[tuple, int] = {}    # idle legs per destination address (host, port)
        self.nursery = None            # set by serve(): QUITs run there
        self.closed = False

    @staticmethod
    def poolable(settings) -> bool:
        return settings.pool_size > 0 and not settings.forward_client

    def idle_count(self) -> int:
        return sum(len(q) for q in self._idle.values())

    # --- taking and giving back -------------------------------------------------------------

    def take(self, route, settings):
        """A live idle leg that satisfies *route* (`route.pool_keys`), or None; it serves
        the taking session with *settings* (its listener's timeouts and pool bounds). A
        session that forwards its client (XCLIENT) takes none: its leg must carry its own
        client's address, and legs are shared across listeners with the same destination."""
        if not self.poolable(settings):
            return None
        for key in route.pool_keys:
            queue = self._idle.get(key)
            if queue:
                leg = self._take(queue, settings)
                if leg is not None:
                    return leg
        return None

    def _take(self, queue: collections.deque, settings):
        now = trio.current_time()
        while queue:
            leg, since = queue.pop()               # newest first
            self._left(leg)
            if now - since > leg.settings.pool_idle:
                self._dispose(leg, polite=True)
                self._expire(queue, now, leg.settings.pool_idle)
                continue
            if not leg.idle_and_alive():
                self._dispose(leg, polite=False)
                continue
            leg.uses += 1
            leg.settings = settings
            return leg
        return None

    def give(self, leg) -> bool:
        """Keep *leg* for a later session; False (and the caller closes it) when it can't be:
        never a leg that is not `reusable()` (a SASL exchange ever begun on it included)."""
        s = leg.settings
        if (self.closed or not self.poolable(s) or not leg.reusable()
                or leg.uses >= s.pool_max_reuse):
            return False
        key = leg_key(leg)
        address = key[:2]                            # (host, port): policy.route's key
        held = self._held.get(address, 0)
        if held >= s.pool_size:
            return False
        self._held[address] = held + 1
        self._idle.setdefault(key, collections.deque()).append((leg, trio.current_time()))
        return True

    def _left(self, leg) -> None:
        """*leg* left the pool (taken, dropped, expired): its address' place is free."""
        address = leg.dest_key[:2]
        held = self._held[address] - 1
        if held:
            self._held[address] = held
        else:
            del self._held[address]

    # --- expiry -----------------------------------------------------------------------------

    def _expire(self, queue: collections.deque, now: float, limit: float) -> None:
        while queue and now - queue[0][1] > limit:      # oldest are on the left
            leg = queue.popleft()[0]
            self._left(leg)
            self._dispose(leg, polite=True)

    def expire(self) -> None:
        """Close every leg idle for longer than its pool_idle."""
        now = trio.current_time()
        for queue in list(self._idle.values()):
            if queue:
                self._expire(queue, now, queue[0][0].settings.pool_idle)

    async def reap(self, interval: float = 1.0) -> None:
        """Run for the worker's life: expire idle legs every *interval* seconds."""
        while True:
            await trio.sleep(interval)
            self.expire()

    async def close_all(self) -> None:
        """The worker drains: QUIT every idle leg (bounded) and keep no more."""
        self.closed = True
        legs = [leg for q in self._idle.values() for leg, _ in q]
        self._idle.clear()
        self._held.clear()
        if not legs:
            return
        with trio.move_on_after(3):
            async with trio.open_nursery() as nursery:
                for leg in legs:
                    nursery.start_soon(leg.quit)

    def _dispose(self, leg, *, polite: bool) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(leg.quit if polite else leg.close)
        else:
            leg.abandon()
