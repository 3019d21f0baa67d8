"""gateway.dest.dns over real DNSSEC: the test zones of tests/dnszones.py served by a private
nsd and resolved by a private validating unbound (SPEC §4.8 "DNS", "Tested as it runs").

The AD bit is read, not assumed: the same records signed (sec.test), unsigned (plain.test) and
straight from the authoritative server (nsd, which never sets AD) give the same data and a
different `validated`.
"""
from __future__ import annotations

import random
import socket
import time

import pytest
import trio

from gateway.dest.dns import (AnswerCache, ClientName, MXKind, MXRecord, Resolver, Status,
                              TLSARecord, parse_nameserver)
from dnszones import BADSIG, CNAME_TLSA, DANE_EE, DANE_TA

pytestmark = pytest.mark.peers


def _resolver(bed, **kw) -> Resolver:
    kw.setdefault("timeout", 5.0)
    return Resolver([bed.resolver], **kw)


@pytest.fixture
def blackhole():
    """A UDP port that receives and never answers (and no TCP listener)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


async def test_mx_by_preference_with_equal_preferences_shuffled(dns_testbed):
    res = _resolver(dns_testbed, rng=random.Random(7))
    seen_orders = set()
    with trio.fail_after(10):
        for _ in range(40):
            got = await res.mx("multi.sec.test")
            assert got.kind is MXKind.HOSTS and not got.implicit and got.validated
            names = [h.name for h in got.hosts]
            assert names[0] == "a.multi.sec.test" and names[-1] == "c.multi.sec.test"
            assert sorted(names[1:4]) == ["b1.multi.sec.test", "b2.multi.sec.test",
                                          "b3.multi.sec.test"]
            assert [h.preference for h in got.hosts] == [10, 20, 20, 20, 30]
            seen_orders.add(tuple(names[1:4]))
    # 40 draws of 6 equally likely orders: every one of them shows up (seeded, deterministic)
    assert len(seen_orders) == 6
    first = got.hosts[0]
    assert first.addresses == ("2001:db8::1", "192.0.2.1")      # AAAA, then A
    assert first.validated and first.status is Status.ANSWER
    assert [a for _, a in got.targets(3)] == ["2001:db8::1", "192.0.2.1", got.hosts[1].addresses[0]]


async def test_implicit_mx_null_mx_and_nxdomain(dns_testbed):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        implicit = await res.mx("implicit.sec.test")
        null = await res.mx("nullmx.sec.test")
        missing = await res.mx("nosuch.sec.test")
        missing_plain = await res.mx("nosuch.plain.test")
    assert implicit.kind is MXKind.HOSTS and implicit.implicit and implicit.validated
    (host,) = implicit.hosts
    assert host.implicit and host.name == "implicit.sec.test"
    assert host.addresses == ("2001:db8::5", "192.0.2.5") and host.validated
    assert host.tlsa_bases == ("implicit.sec.test",)
    assert null.kind is MXKind.NULL_MX and null.validated and null.hosts == ()
    assert missing.kind is MXKind.NXDOMAIN and missing.validated
    assert missing_plain.kind is MXKind.NXDOMAIN and not missing_plain.validated


async def test_own_preference_dropped_and_best_mx_is_a_loop(dns_testbed):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        everyone = await res.mx("own.sec.test")
        by_name = await res.mx("own.sec.test", own_names=["GW.own.sec.test."])
        loop = await res.mx("loop.sec.test", own_names=["gw.own.sec.test"])
        loop_by_address = await res.mx("loop.sec.test", own_addresses=["192.0.2.12"])
        nat = await res.mx("ownaddr.sec.test", own_addresses=["192.0.2.99"])
        implicit_loop = await res.mx("implicit.sec.test", own_addresses=["2001:db8::5"])
    assert [h.name for h in everyone.hosts] == ["mx1.own.sec.test", "gw.own.sec.test",
                                                "mx3.own.sec.test"]
    assert by_name.kind is MXKind.HOSTS
    assert [h.name for h in by_name.hosts] == ["mx1.own.sec.test"]
    assert by_name.dropped == ("gw.own.sec.test", "mx3.own.sec.test")
    assert loop.kind is MXKind.LOOP and loop.hosts == ()
    assert loop_by_address.kind is MXKind.LOOP
    assert [h.name for h in nat.hosts] == ["mx1.own.sec.test"]
    assert nat.dropped == ("nat.ownaddr.sec.test",)
    assert implicit_loop.kind is MXKind.LOOP and implicit_loop.implicit


async def test_cnamed_mx_host_gives_the_expanded_name_then_the_original(dns_testbed):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        signed = await res.mx("cname.sec.test")
        plain = await res.mx("cname.plain.test")
        (host,) = signed.hosts
        tlsa = await res.tlsa(host.tlsa_bases[0], 25)
    assert host.name == "alias.cname.sec.test" and host.canonical == "real.cname.sec.test"
    assert host.addresses == ("192.0.2.7",) and host.validated
    assert host.tlsa_bases == ("real.cname.sec.test", "alias.cname.sec.test")
    assert tlsa.status is Status.ANSWER and tlsa.validated
    assert tlsa.records == (TLSARecord(3, 1, 1, bytes.fromhex(CNAME_TLSA)),)
    (phost,) = plain.hosts
    assert phost.canonical == "real.cname.plain.test" and not phost.validated
    assert phost.tlsa_bases == ("alias.cname.plain.test",)      # insecure expansion: original only


async def test_ad_is_read_the_same_zone_unsigned_is_not_validated(dns_testbed):
    res = _resolver(dns_testbed)
    authoritative = Resolver([dns_testbed.nsd], timeout=5.0)    # nsd: same data, never AD
    with trio.fail_after(10):
        signed = await res.mx("dane.sec.test")
        unsigned = await res.mx("dane.plain.test")
        direct = await authoritative.query("dane.sec.test", "MX")
        tlsa_signed = await res.tlsa("mx.dane.sec.test")
        tlsa_unsigned = await res.tlsa("mx.dane.plain.test")
        tlsa_direct = await authoritative.tlsa("mx.dane.sec.test")
        mixed = await res.mx("mixed.sec.test")
    assert signed.validated and all(h.validated for h in signed.hosts)
    assert not unsigned.validated and not any(h.validated for h in unsigned.hosts)
    assert [h.addresses for h in signed.hosts] == [h.addresses for h in unsigned.hosts] \
        == [("2001:db8::8", "192.0.2.8")]
    assert direct.records == (MXRecord(10, "mx.dane.sec.test"),) and not direct.validated
    expected = {TLSARecord(3, 1, 1, bytes.fromhex(DANE_EE)), TLSARecord(2, 1, 1, bytes.fromhex(DANE_TA))}
    for answer in (tlsa_signed, tlsa_unsigned, tlsa_direct):
        assert answer.status is Status.ANSWER and set(answer.records) == expected
        assert answer.name == answer.canonical
    assert tlsa_signed.name == "_25._tcp.mx.dane.sec.test" and tlsa_signed.validated
    assert not tlsa_unsigned.validated and not tlsa_direct.validated
    # a validated MX answer naming a host in an unsigned zone: the host is not validated
    assert mixed.validated and [h.name for h in mixed.hosts] == ["mx.dane.plain.test"]
    assert not mixed.hosts[0].validated


async def test_tlsa_absent_is_validated_nodata_and_a_bogus_signature_a_temporary_failure(dns_testbed):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        absent = await res.tlsa("mx.nodane.sec.test")
        nodata = await res.query("mx.nodane.sec.test", "TLSA")
        absent_plain = await res.tlsa("mx.nodane.plain.test")
        bad = await res.tlsa("mx.badsig.sec.test")
        bad_host = await res.mx("badsig.sec.test")
        bad_plain = await res.tlsa("mx.badsig.plain.test")
        other_port = await res.tlsa("mx.dane.sec.test", 465)
    assert absent.status is Status.NXDOMAIN and absent.validated and absent.records == ()
    assert nodata.status is Status.NODATA and nodata.validated
    assert 0 < nodata.ttl <= 60                                  # the SOA's negative TTL
    assert absent_plain.status is Status.NXDOMAIN and not absent_plain.validated
    # the TLSA RRSIG is broken: SERVFAIL, while the host's own records still validate
    assert bad.status is Status.TEMPFAIL and bad.error == "servfail" and bad.records == ()
    assert bad_host.kind is MXKind.HOSTS and bad_host.hosts[0].validated
    assert bad_plain.status is Status.ANSWER and not bad_plain.validated
    assert bad_plain.records == (TLSARecord(3, 1, 1, bytes.fromhex(BADSIG)),)
    assert other_port.status is Status.NXDOMAIN and other_port.name == "_465._tcp.mx.dane.sec.test"


async def test_a_bogus_zone_is_a_temporary_failure(dns_testbed):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        mx = await res.mx("bogus.test")
        address = await res.query("mx.bogus.test", "A")
    assert mx.kind is MXKind.TEMPFAIL and mx.error == "servfail" and mx.hosts == ()
    assert address.status is Status.TEMPFAIL and address.error == "servfail"
    assert "validation failure <bogus.test. MX IN>: signature expired" in dns_testbed.unbound_log()


async def test_a_cache_hit_asks_no_server(dns_testbed, blackhole):
    now = [1000.0]
    cache = AnswerCache(clock=lambda: now[0])
    live = _resolver(dns_testbed, cache=cache)
    dead = Resolver([blackhole], timeout=0.5, cache=cache)      # answers nothing, ever
    with trio.fail_after(10):
        first = await live.mx("dane.sec.test")
        nx = await live.query("nosuch.sec.test", "A")
        hits = cache.hits
        t0 = trio.current_time()
        again = await dead.mx("dane.sec.test")
        nx_again = await dead.query("nosuch.sec.test", "A")
        assert trio.current_time() - t0 < 0.3
        assert again == first and nx_again.status is Status.NXDOMAIN and nx_again.validated
        assert cache.hits == hits + 4                            # MX, AAAA, A and the NXDOMAIN
        now[0] += 301                                            # past the records' TTL (300)
        expired = await dead.query("dane.sec.test", "MX")
    assert expired.status is Status.TEMPFAIL and expired.error == "timeout"
    assert first.validated and nx.ttl <= 60


def test_the_cache_is_bounded_and_keeps_no_failures():
    from gateway.dest.dns import Answer
    cache = AnswerCache(max_entries=2, clock=lambda: 0.0)
    for i in range(3):
        cache.put((f"n{i}", 1), Answer(f"n{i}", "A", Status.ANSWER, ("192.0.2.1",), True, 60, f"n{i}"))
    assert len(cache) == 2 and cache.get(("n0", 1)) is None and cache.get(("n2", 1)) is not None
    cache.put(("t", 1), Answer("t", "A", Status.TEMPFAIL, error="servfail"))
    cache.put(("z", 1), Answer("z", "A", Status.NODATA, ttl=0))
    assert cache.get(("t", 1)) is None and cache.get(("z", 1)) is None


async def test_timeouts_refusals_and_dead_servers_are_temporary_failures(dns_testbed, blackhole):
    silent = Resolver([blackhole], timeout=0.5)
    dead_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead_port.bind(("127.0.0.1", 0))
    dead = Resolver([f"127.0.0.1:{dead_port.getsockname()[1]}"], timeout=0.5)
    dead_port.close()                                            # nothing listens there now
    refusing = Resolver([dns_testbed.nsd], timeout=2.0)          # not authoritative for it
    with trio.fail_after(10):
        t0 = time.monotonic()
        timed_out = await silent.mx("dane.sec.test")
        took = time.monotonic() - t0
        unreachable = await dead.query("dane.sec.test", "MX")
        refused = await refusing.query("example.com", "MX")
    assert timed_out.kind is MXKind.TEMPFAIL and timed_out.error == "timeout"
    assert 0.4 <= took <= 1.5
    assert unreachable.status is Status.TEMPFAIL and unreachable.error in ("network", "timeout")
    assert refused.status is Status.TEMPFAIL and refused.error == "refused"


async def test_client_names_are_confirmed_forward(dns_testbed, blackhole):
    res = _resolver(dns_testbed)
    with trio.fail_after(10):
        v4 = await res.client_name("192.0.2.7")
        v6 = await res.client_name("2001:db8::7")
        mapped = await res.client_name("::ffff:192.0.2.7")
        no_such_name = await res.client_name("192.0.2.50")
        other_address = await res.client_name("192.0.2.51")
        no_ptr = await res.client_name("192.0.2.60")
        failing = await Resolver([blackhole], timeout=0.3).client_name("192.0.2.7")
    assert v4 == ClientName("192.0.2.7", "fcrdns.sec.test", "fcrdns.sec.test")
    assert v6.confirmed and v6.name == "fcrdns.sec.test"
    assert mapped.address == "192.0.2.7" and mapped.confirmed
    assert no_such_name == ClientName("192.0.2.50", "unknown", "liar.sec.test")
    assert other_address == ClientName("192.0.2.51", "unknown", "fcrdns.sec.test")
    assert no_ptr == ClientName("192.0.2.60") and not no_ptr.tempfail
    assert failing.name == "unknown" and failing.tempfail


def test_nameserver_syntax():
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ("localhost:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        Resolver([])
