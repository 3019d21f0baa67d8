"""Upstream connection reuse (SPEC §4.4): a worker keeps idle upstream legs for later client
sessions, like Postfix's connection cache. End to end with smtplib through the gateway to the
test sink (and to fake upstreams that give up on idle connections), plus the pool's own
bookkeeping with stand-in legs."""
from __future__ import annotations

import smtplib
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
import trio

from gateway.config import parse_config
from gateway.observe.logs import EventLog
from gateway.levels import UpstreamLevel
from gateway.policy.route import Route, destination_key, leg_key
from gateway.relay.pool import UpstreamPool
from gateway.relay.upstream import UpstreamSettings
from gateway.serve.server import serve
from fake_upstream import hang_up, scripted_upstream
from harness import (LogCapture, config_dict, in_thread, listener_dict,
                     running_gateway, running_sink, server_ssl_context, smtp_send)


def _verbs(lines: list[bytes]) -> list[bytes]:
    return [line.split(b" ", 1)[0].split(b":", 1)[0].upper() for line in lines]


async def _send_n(port: int, n: int, **kw) -> list:
    replies = []
    for i in range(n):
        replies.append(await in_thread(lambda: smtp_send(
            port, body=f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode(), **kw)))
    return replies


async def test_later_sessions_reuse_the_idle_upstream_connection():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                replies = await _send_n(port, 3)
                await sink.wait_for_messages(3)
    assert [r[0] for r in replies] == [250, 250, 250]
    assert sink.connections == 1
    verbs = _verbs(sink.sessions[0])
    assert verbs.count(b"MAIL") == 3 and verbs.count(b"EHLO") == 1
    assert b"QUIT" not in verbs[:-1]           # no QUIT between the sessions
    for i, msg in enumerate(sink.messages):
        assert msg.data.endswith(f"\r\nmessage {i}\r\n".encode())
    ups = logs.of("upstream")
    assert len(ups) == 3 and "reused" not in ups[0]
    assert ups[1]["reused"] is True and ups[2]["reused"] is True
    assert len({e["conn"] for e in ups}) == 3    # logged in each client session


async def test_a_tls_upstream_leg_is_reused_without_a_new_handshake(server_cert, upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          upstream_tls="required", profile="testca")],
                           ca_file=upstream_cert.ca)
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                replies = await _send_n(port, 2)
                await sink.wait_for_messages(2)
    assert [r[0] for r in replies] == [250, 250]
    assert sink.connections == 1
    assert all(m.tls for m in sink.messages)
    legs = logs.of("tls", side="upstream")
    assert len(legs) == 2 and legs[1]["reused"] is True
    assert legs[0]["version"] == legs[1]["version"] == "TLSv1.3"


async def test_pool_size_zero_opens_a_connection_per_session():
    async with running_sink() as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          upstream={"pool_size": 0})])
        async with running_gateway(data) as (gw, logs):
            port = gw.addresses["smtp"][1]
            with trio.fail_after(30):
                await _send_n(port, 2)
                await sink.wait_for_messages(2)
    assert sink.connections == 2
    assert all(_verbs(s)[-1] == b"QUIT" for s in sink.sessions)


async def test_max_reuse_and_forward_client_limit_reuse():
    async with running_sink(xclient=True) as sink:
        data = config_dict([
            listener_dict("reuse2", upstream_port=sink.port, client_tls="none",
                          upstream={"pool_max_reuse": 2}),
            listener_dict("xclient", upstream_port=sink.port, client_tls="none",
                          forward_client=True)])
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                await _send_n(gw.addresses["reuse2"][1], 3)
                await sink.wait_for_messages(3)
                assert sink.connections == 2       # 2 sessions on the first, then a new one
                await _send_n(gw.addresses["xclient"][1], 2)
                await sink.wait_for_messages(5)
    assert sink.connections == 4               # XCLIENT ties a connection to its client
    assert all(m.xclient.get("ADDR") == "127.0.0.1" for m in sink.messages[3:])


async def _through_fake_upstream(*, close_after_message: bool, refuse_second_mail: bool
                                 ) -> tuple[list, list, LogCapture]:
    """Through a PIPELINING upstream that optionally closes after each message, or answers
    a connection's second MAIL with 421 and closes (it gave up on the idle connection).
    Returns the replies, each connection's message count and the logs."""
    async def mail(conn, line):
        if refuse_second_mail and conn.messages:
            await hang_up(b"421 4.4.2 fake.test idle too long\r\n")(conn, line)
        await conn.answer(line)

    async def dot(conn, line):
        await conn.answer(line)
        if close_after_message:
            await conn.close()

    async with scripted_upstream(on={b"MAIL": mail, b".": dot}) as up:
        data = config_dict([listener_dict(upstream_port=up.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                replies = await _send_n(gw.addresses["smtp"][1], 2)
    return replies, [len(c.messages) for c in up.connections], logs


async def test_an_idle_connection_the_upstream_closed_is_not_reused():
    replies, conns, logs = await _through_fake_upstream(close_after_message=True,
                                                        refuse_second_mail=False)
    assert [r[0] for r in replies] == [250, 250]
    assert conns == [1, 1]
    assert not any(e.get("reused") for e in logs.of("upstream"))


async def test_an_upstream_that_gives_up_on_a_reused_connection_gets_a_new_one():
    replies, conns, logs = await _through_fake_upstream(close_after_message=False,
                                                        refuse_second_mail=True)
    assert [r[0] for r in replies] == [250, 250]      # the client never sees the 421
    assert conns == [1, 1]
    ups = logs.of("upstream")
    assert [e.get("reused") for e in ups] == [None, True, None]


async def test_draining_worker_quits_its_idle_upstream_connections():
    async with running_sink() as sink:
        config = parse_config(config_dict([listener_dict(upstream_port=sink.port,
                                                         client_tls="none")]))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(serve, config, EventLog(fmt="json",
                                                                  stream=LogCapture()))
                await in_thread(lambda: smtp_send(gw.addresses["smtp"][1]))
                await sink.wait_for_messages(1)
                assert _verbs(sink.sessions[0])[-1] != b"QUIT"    # idle in the pool
                gw.stop_accepting()                 # serve() returns once drained
    assert sink.connections == 1
    assert _verbs(sink.sessions[0])[-1] == b"QUIT"


# --- unsolicited bytes from the upstream (SPEC §6) --------------------------------------------

STALE = b"250 2.0.0 stale\r\n"
IDLE_421 = b"421 4.4.2 fake.test Error: timeout exceeded\r\n"
LOST = (451, b"4.4.2 Upstream connection lost")
MSG = b"Subject: hostile\r\n\r\nx\r\n"


class _Script:
    """A scripted hostile upstream (PIPELINING, answers everything); `up.verbs(conn)` holds
    each connection's command verbs as they arrive (b"." for a message's final dot). On
    connection `conn` after its reply to `verb`, it writes `extra` unasked: in the same write
    as that reply, or (`later`) in a write of its own once `poke` is set, then sets `sent`."""

    def __init__(self, conn: int, verb: bytes, extra: bytes, *, later: bool = False):
        self.conn, self.verb, self.extra, self.later = conn, verb, extra, later
        self.poke = trio.Event()
        self.sent = trio.Event()
        self.up = None

    async def hostile(self, conn, line) -> None:
        if conn.index != self.conn:
            await conn.answer(line)
        elif not self.later:
            await conn.send(conn.reply_for(line) + self.extra)
        else:
            await conn.answer(line)
            await self.poke.wait()
            await conn.send(self.extra)
            self.sent.set()

    def seen(self, conn: int) -> list[bytes]:
        return self.up.verbs(conn)

    def messages(self, conn: int) -> int:
        return self.seen(conn).count(b".")


@asynccontextmanager
async def _scripted(script: _Script):
    async with scripted_upstream(on={script.verb: script.hostile}) as up:
        script.up = up
        data = config_dict([listener_dict(upstream_port=up.port, client_tls="none")])
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                yield gw.addresses["smtp"][1], logs


def _wait(event: trio.Event) -> None:
    """From the client's thread: wait for a trio event of the test."""
    trio.from_thread.run(event.wait)


@pytest.mark.parametrize("later", [False, True], ids=["same_write", "own_write"])
async def test_a_stray_line_after_rcpt_never_answers_data(later):
    """(a) The upstream adds a `250` nobody asked for after RCPT's reply: the client's DATA
    gets 451 4.4.2 (not that stale 250 taken for DATA's answer), the leg is dropped without
    DATA or a final dot, and the next transaction goes over a new connection."""
    script = _Script(0, b"RCPT", STALE, later=later)
    script.poke.set()                         # written at once, in a write of its own

    def client(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("client.test")
            s.mail("alice@client.test")
            rcpt = s.rcpt("bob@example.test")
            if later:
                _wait(script.sent)            # the stray line is on its way before DATA
            data = s.docmd("DATA")
            s.rset()
            again = s.sendmail("alice@client.test", ["bob@example.test"], MSG)
            return rcpt, data, again
    async with _scripted(script) as (port, logs):
        rcpt, data, again = await in_thread(client, port)
    assert rcpt[0] == 250
    assert data == LOST
    assert again == {}
    assert b"DATA" not in script.seen(0) and b"." not in script.seen(0)
    assert script.messages(1) == 1
    [error] = logs.of("upstream_error")
    assert "unsolicited" in error["reason"] and error["code"] == 451


async def test_an_idle_pooled_leg_that_got_a_421_is_retired_not_reused():
    """(b) The upstream times out the pooled connection with a 421 (and keeps it open): the
    next session never sees that 421; it gets a new connection and delivers."""
    script = _Script(0, b".", IDLE_421, later=True)
    async with _scripted(script) as (port, logs):
        first = await in_thread(lambda: smtp_send(port))
        script.poke.set()
        await script.sent.wait()
        second = await in_thread(lambda: smtp_send(port))
    assert first[0] == 250 and second[0] == 250
    assert script.seen(0).count(b"MAIL") == 1 and script.messages(1) == 1
    assert [e.get("reused") for e in logs.of("upstream")] == [None, None]


@pytest.mark.parametrize("extra", [IDLE_421, STALE], ids=["421", "stray_250"])
async def test_bytes_between_transactions_retire_the_sessions_own_leg(extra):
    """(c) Between two transactions of one client session the upstream says something
    unasked on the session's leg: the leg is retired and the second transaction goes over a
    new one (never answered by that line)."""
    script = _Script(0, b".", extra, later=True)

    def client(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            first = s.sendmail("alice@client.test", ["bob@example.test"], MSG)
            trio.from_thread.run_sync(script.poke.set)
            _wait(script.sent)
            second = s.sendmail("alice@client.test", ["carol@example.test"], MSG)
            return first, second
    async with _scripted(script) as (port, logs):
        first, second = await in_thread(client, port)
    assert first == {} and second == {}
    assert script.seen(0).count(b"MAIL") == 1 and script.messages(0) == 1
    assert script.messages(1) == 1
    assert logs.of("upstream_reuse_failed", reason="unsolicited")


# --- the pool's bookkeeping, with stand-in legs ----------------------------------------------


class _Leg:
    """A plaintext leg whose upstream offered STARTTLS (as opened at `none`), or with *tls*."""

    def __init__(self, settings, level="none", alive=True, tls=None, offered=True):
        self.settings, self.level, self.alive = settings, level, alive
        self.uses, self.closed, self.quitted = 1, False, False
        self.tls, self.tls_offered, self.tls_failed = tls, offered, False
        self.dest_key = destination_key(settings)

    def reusable(self):
        return not self.closed

    def idle_and_alive(self):
        return self.alive

    async def quit(self):
        self.quitted = self.closed = True

    async def close(self):
        self.closed = True

    def abandon(self):
        self.closed = True


def _route(settings, level) -> Route:
    return Route(settings, UpstreamLevel(level))


def _settings(**kw) -> UpstreamSettings:
    base = dict(host="127.0.0.1", port=25, mode="starttls", server_name=None, helo_name="gw",
                tls_context=None, connect_timeout=5, reply_timeout=5, data_done_timeout=5,
                pool_size=2, pool_idle=5.0, pool_max_reuse=3)
    base.update(kw)
    return UpstreamSettings(**base)


async def test_pool_hands_out_newest_first_by_level_and_bounds_its_size():
    pool, s = UpstreamPool(), _settings()
    a, b, c = _Leg(s), _Leg(s), _Leg(s)
    assert pool.give(a) and pool.give(b)
    assert not pool.give(c)                       # pool_size 2
    assert pool.take(_route(s, "required"), s) is None    # another level
    assert pool.take(_route(s, "preferred"), s) is None   # STARTTLS was offered on them
    other = _settings(port=2525)
    assert pool.take(_route(other, "none"), other) is None   # another destination
    assert pool.take(_route(s, "none"), s) is b and b.uses == 2
    assert pool.take(_route(s, "none"), s) is a
    assert pool.take(_route(s, "none"), s) is None


async def test_pool_keys_a_leg_by_what_it_is_and_a_route_takes_what_satisfies_it():
    """SPEC §4.8: the key is the leg's destination (address, mode, SNI, profile, client
    certificate), the level it achieved and the names it verified — not who opened it; a
    route takes any leg that satisfies it."""
    tls = SimpleNamespace(verified=False)
    verified = SimpleNamespace(verified=True)
    pool, s = UpstreamPool(), _settings(pool_size=4)
    other_listener = _settings(pool_size=4, reply_timeout=9)   # same destination
    tls_leg = _Leg(s, "preferred", tls=tls)
    assert pool.give(tls_leg)
    assert pool.take(_route(s, "verify"), s) is None          # not verified
    assert pool.take(_route(s, "none"), s) is None            # TLS does not carry `none`
    assert pool.take(_route(s, "required"), other_listener) is tls_leg
    assert tls_leg.settings is other_listener                 # serves the taker's listener
    plain = _Leg(s, "preferred", offered=False)               # no STARTTLS upstream
    assert pool.give(plain)
    assert pool.take(_route(s, "required"), s) is None
    assert pool.take(_route(s, "none"), s) is plain           # plaintext, nothing offered
    # verified, but its name was never checked (opened at `required`): no `verify` route
    unnamed = _Leg(s, "required", tls=verified)
    named = _Leg(s, "verify", tls=verified)
    assert pool.give(unnamed) and pool.give(named)
    assert pool.take(_route(s, "verify"), s) is named
    assert pool.take(_route(s, "verify"), s) is None
    assert pool.take(_route(s, "required"), s) is unnamed
    for changed in (dict(server_name="mx.other.test"), dict(profile="strict"),
                    dict(certificate="client"), dict(mode="implicit"), dict(host="127.0.0.2")):
        leg = _Leg(_settings(pool_size=4, **changed), "preferred", tls=tls)
        assert pool.give(leg)
        assert pool.take(_route(s, "required"), s) is None, changed
    assert pool.idle_count() == 5


async def test_pool_size_bounds_the_idle_legs_per_destination_address():
    """SPEC §4.8: `pool_size` bounds the idle legs per worker per destination address, not
    per key: legs of two keys on one address (a TLS leg, a plaintext one; another SNI) share
    the bound; a leg taken or expired frees its place; another address has its own."""
    tls = SimpleNamespace(verified=False)
    pool, s = UpstreamPool(), _settings(pool_size=2)
    sni = _settings(pool_size=2, server_name="mx.other.test")     # same address, other key
    plain, secure = _Leg(s), _Leg(s, "preferred", tls=tls)
    assert leg_key(plain) != leg_key(secure)
    assert pool.give(plain) and pool.give(secure)
    assert not pool.give(_Leg(s, "preferred", tls=tls))           # a third on 127.0.0.1:25
    assert not pool.give(_Leg(sni, "preferred", tls=tls))
    other = _settings(pool_size=2, host="127.0.0.2")
    assert pool.give(_Leg(other)) and pool.give(_Leg(other, "preferred", tls=tls))
    assert pool.take(_route(s, "required"), s) is secure          # frees a place
    again = _Leg(sni, "preferred", tls=tls)
    assert pool.give(again)
    assert not pool.give(_Leg(s))
    async with trio.open_nursery() as nursery:
        pool.nursery = nursery
        pool._idle[leg_key(plain)][0] = (plain, trio.current_time() - 6)   # idle 6 s
        pool.expire()                                              # frees another
    assert plain.quitted
    assert pool.give(_Leg(s)) and not pool.give(_Leg(s))
    assert pool.idle_count() == 4


async def test_pool_drops_dead_expired_and_worn_out_legs():
    pool, s = UpstreamPool(), _settings()
    dead = _Leg(s, alive=False)
    pool.give(dead)
    assert pool.take(_route(s, "none"), s) is None and dead.closed and not dead.quitted
    worn = _Leg(s)
    worn.uses = 3                                 # pool_max_reuse 3
    assert not pool.give(worn)
    async with trio.open_nursery() as nursery:
        pool.nursery = nursery
        old = _Leg(s)
        pool.give(old)
        pool._idle[leg_key(old)][0] = (old, trio.current_time() - 6)   # idle 6 s
        pool.expire()
    assert old.quitted                            # an idle leg is closed politely
    assert pool.idle_count() == 0
    assert not pool.give(_Leg(_settings(pool_size=0)))
    assert not pool.give(_Leg(_settings(forward_client=True)))


async def test_pool_close_all_quits_and_refuses_more():
    pool, s = UpstreamPool(), _settings()
    legs = [_Leg(s), _Leg(s)]
    for leg in legs:
        pool.give(leg)
    with trio.fail_after(5):
        await pool.close_all()
    assert all(leg.quitted for leg in legs)
    assert not pool.give(_Leg(s))


async def test_a_new_upstream_tls_connection_resumes_the_last_session(upstream_cert):
    """With reuse off, each session connects anew; from the second on the TLS handshake
    resumes the worker's last session to that upstream (SPEC §4.4)."""
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          upstream_tls="required",
                                          upstream={"pool_size": 0})])
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                replies = await _send_n(gw.addresses["smtp"][1], 3)
                await sink.wait_for_messages(3)
    assert [r[0] for r in replies] == [250, 250, 250]
    assert sink.connections == 3 and all(m.tls for m in sink.messages)
    legs = logs.of("tls", side="upstream")
    assert [leg.get("resumed") for leg in legs] == [None, True, True]


async def test_upstream_resumption_off_in_the_profile_means_full_handshakes(upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          upstream_tls="required",
                                          upstream={"pool_size": 0, "profile": "noresume"})])
        data["tls_profiles"] = {"noresume": {"clone": "default", "session_resumption": False}}
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                await _send_n(gw.addresses["smtp"][1], 2)
                await sink.wait_for_messages(2)
    assert [leg.get("resumed") for leg in logs.of("tls", side="upstream")] == [None, None]


async def test_a_resumed_session_is_verified_only_if_the_original_was():
    from gateway.relay.tls_legs import resumed_info
    from gateway.tls.stream import TLSInfo
    info = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128, "CN=x", True, True, None, True)
    s = _settings()
    s.last_tls_session = (object(), False)
    assert resumed_info(info, s).verified is False
    assert "not verified" in resumed_info(info, s).verify_error
    s.last_tls_session = (object(), True)
    assert resumed_info(info, s).verified is True
    fresh = TLSInfo("TLSv1.3", "x", 128, "CN=x", True, True, None, False)
    s.last_tls_session = (object(), False)
    assert resumed_info(fresh, s) is fresh        # a full handshake stands on its own


async def test_a_resumed_verify_leg_is_still_verified(upstream_cert):
    async with running_sink(ssl_context=server_ssl_context(upstream_cert)) as sink:
        data = config_dict([listener_dict(upstream_port=sink.port, client_tls="none",
                                          upstream_tls="verify",
                                          upstream={"pool_size": 0, "profile": "testca",
                                                    "server_name": "upstream.test"})],
                           ca_file=upstream_cert.ca)
        async with running_gateway(data) as (gw, logs):
            with trio.fail_after(30):
                replies = await _send_n(gw.addresses["smtp"][1], 2)
                await sink.wait_for_messages(2)
    assert [r[0] for r in replies] == [250, 250]
    legs = logs.of("tls", side="upstream")
    assert [(leg.get("resumed"), leg["verified"]) for leg in legs] == [(None, True), (True, True)]


async def test_pool_refuses_a_real_leg_that_ever_began_a_sasl_exchange():
    """SPEC §4.6: whatever state the exchange ended in, the leg is never pooled; the check is
    the client core's (`SMTPClient.reusable`), not a flag of the session."""
    from gateway.relay.upstream import UpstreamLeg

    class _Stream:                     # an open connection with nothing readable
        def quiet(self):
            return True

    pool, s = UpstreamPool(), _settings()
    clean = UpstreamLeg(s, "none")
    clean.stream = _Stream()
    clean.client.receive_data(b"220 up\r\n")
    clean.client.next_reply()
    assert pool.give(clean)
    for final in (None, b"334 VXNlcm5hbWU6\r\n", b"535 5.7.8 failed\r\n",
                  b"501 5.7.0 aborted\r\n"):
        leg = UpstreamLeg(s, "none")
        leg.stream = _Stream()
        leg.client.receive_data(b"220 up\r\n")
        leg.client.next_reply()
        leg.client.auth("LOGIN")
        leg.client.data_to_send()
        if final is not None:
            leg.client.receive_data(final)
            leg.client.next_reply()
        assert not leg.reusable() and not pool.give(leg)
    assert pool.idle_count() == 1
