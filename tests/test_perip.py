"""Connections per client address (SPEC §2 `max_connections_per_ip`): the shared-memory
tables of gateway/native/perip.py, the native core (_native/perip.c) against its pure-Python twin
(gateway/native/perip_py.py) and a naive model, the address keys (IPv4 mapped, IPv6 per prefix), and
the configuration keys."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway
from gateway.native import backend, perip, perip_py
from gateway.config import ConfigError, parse_config
from gateway.serve.conncount import ConnectionCounts
from gateway.native.perip import FULL, MISSING, SLOT, PerIPTable, address_key

REQUIRE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"
NATIVE = perip.native_backend
needs_native = pytest.mark.skipif(NATIVE is None and not REQUIRE, reason="native core not built")

BACKENDS = [pytest.param(perip_py, id="python"),
            pytest.param(NATIVE, id="native", marks=needs_native)]

SEED = 0x0123456789ABCDEF


def test_backend_env():
    assert perip.BACKEND == backend.PERIP
    if os.environ.get("GATEWAY_PURE_PYTHON") == "1":
        assert perip.BACKEND == "python" and NATIVE is None
    elif REQUIRE:
        assert perip.BACKEND == "native" and NATIVE is not None
    if perip.BACKEND == "native":
        assert perip._lib is backend._lib            # the one compiled module


_OLD_BUILD_PROBE = """
import json, sys, types
sys.path.insert(0, {root!r})
import gateway._native as real

class OldLib:                          # a build from before the per-address counts
    def __getattr__(self, name):
        if name.startswith("gw_pip_"):
            raise AttributeError(name)
        return getattr(real.lib, name)

sys.modules["gateway._native"] = types.SimpleNamespace(ffi=real.ffi, lib=OldLib())
import gateway.native.backend as b
out = {{"loader": b.PERIP}}
try:
    import gateway.native.perip as p
except ImportError as exc:
    out["perip"] = "ImportError: " + str(exc)
else:
    out["perip"] = p.BACKEND
print(json.dumps(out))
"""


@needs_native
@pytest.mark.parametrize("require,expect", [
    ("", "python"),
    ("1", "ImportError: GATEWAY_REQUIRE_NATIVE=1 but the native per-address counts in "
          "gateway._native cannot be imported: gateway._native was built without the "
          "per-address counts (rebuild it)"),
])
def test_an_older_build_without_the_counts_falls_back_or_fails_as_required(require, expect):
    root = str(Path(gateway.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GATEWAY_PURE_PYTHON", "GATEWAY_REQUIRE_NATIVE")}
    if require:
        env["GATEWAY_REQUIRE_NATIVE"] = "1"
    res = subprocess.run([sys.executable, "-c", _OLD_BUILD_PROBE.format(root=root)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"loader": "python", "perip": expect}


def v4(n: int) -> bytes:
    return address_key(f"10.0.{n // 256}.{n % 256}")


def keys_with_home(home: int, slots: int, count: int, listener: int = 0, seed: int = SEED,
                   skip: int = 0) -> list[bytes]:
    """*count* IPv4 keys whose probe starts at entry *home* of a table of *slots*."""
    out, n = [], skip
    while len(out) < count:
        k = v4(n)
        if perip_py.slot_hash(k, listener, seed) & (slots - 1) == home:
            out.append(k)
        n += 1
    return out


class Table:
    """One backend's update() over a bytearray of rows x slots entries."""

    def __init__(self, impl, rows: int, slots: int, seed: int = SEED):
        self.impl, self.rows, self.slots, self.seed = impl, rows, slots, seed
        self.mem = bytearray(rows * slots * SLOT)

    def add(self, row, key, listener=0):
        return self.impl.update(self.mem, self.rows, self.slots, row, key, listener, 1,
                                self.seed)

    def remove(self, row, key, listener=0):
        return self.impl.update(self.mem, self.rows, self.slots, row, key, listener, -1,
                                self.seed)

    def total(self, key, listener=0):
        return self.impl.update(self.mem, self.rows, self.slots, 0, key, listener, 0,
                                self.seed)

    def entry(self, row: int, i: int) -> tuple[bytes, int, int]:
        """(key, listener, count) of entry *i* of *row*."""
        off = (row * self.slots + i) * SLOT
        lst, count = perip_py._LC.unpack_from(self.mem, off + 16)
        return bytes(self.mem[off:off + 16]), lst, count


# --- table semantics, each backend ---------------------------------------------------------

@pytest.mark.parametrize("impl", BACKENDS)
def test_counts_are_summed_over_rows_per_listener_and_address(impl):
    t = Table(impl, rows=3, slots=16)
    a, b = v4(1), v4(2)
    assert t.add(0, a) == 1
    assert t.add(2, a) == 2
    assert t.add(2, a) == 3
    assert t.add(1, b) == 1                       # another address
    assert t.add(1, a, listener=1) == 1           # the same address on another listener
    assert t.total(a) == 3 and t.total(b) == 1 and t.total(a, listener=1) == 1
    assert t.remove(2, a) == 2
    assert t.remove(2, a) == 1
    assert t.remove(2, a) == MISSING              # row 2 holds no more of a; nothing changes
    assert t.total(a) == 1
    assert t.remove(0, a) == 0
    assert t.total(a) == 0 and t.total(b) == 1
    assert t.total(v4(3)) == 0


@pytest.mark.parametrize("impl", BACKENDS)
def test_deletion_shifts_a_probing_chain_back_across_the_wrap(impl):
    """A and B start at entry 6, C at 7, D at 0: they lie at 6, 7, 0, 1. Removing A moves
    each of the others back by one (no entry is left behind an empty one, where a probe
    would stop); an entry already at its home stays."""
    slots = 8
    a, b = keys_with_home(6, slots, 2)
    (c,) = keys_with_home(7, slots, 1)
    (d,) = keys_with_home(0, slots, 1)
    (e,) = keys_with_home(2, slots, 1)
    t = Table(impl, rows=1, slots=slots)
    for k in (a, b, c, d, e):
        assert t.add(0, k) == 1
    assert [t.entry(0, i)[0] for i in (6, 7, 0, 1, 2)] == [a, b, c, d, e]
    assert t.remove(0, a) == 0
    assert [t.entry(0, i)[0] for i in (6, 7, 0, 2)] == [b, c, d, e]
    assert t.entry(0, 1)[2] == 0                  # the hole moved to the end of the chain
    for k in (b, c, d, e):
        assert t.total(k) == 1
    assert t.total(a) == 0
    assert t.remove(0, c) == 0                    # D is at its home now: nothing moves
    assert t.entry(0, 6)[0] == b and t.entry(0, 7)[2] == 0 and t.entry(0, 0)[0] == d
    assert t.total(b) == 1 and t.total(d) == 1 and t.total(e) == 1


@pytest.mark.parametrize("impl", BACKENDS)
def test_an_entry_at_its_home_stays_when_the_one_before_goes(impl):
    slots = 8
    (a,) = keys_with_home(3, slots, 1)
    (b,) = keys_with_home(4, slots, 1)
    t = Table(impl, rows=1, slots=slots)
    t.add(0, a)
    t.add(0, b)
    assert t.remove(0, a) == 0
    assert t.entry(0, 4)[0] == b and t.entry(0, 3)[2] == 0


@pytest.mark.parametrize("impl", BACKENDS)
def test_a_count_above_one_keeps_its_entry(impl):
    t = Table(impl, rows=1, slots=4)
    k = v4(9)
    t.add(0, k)
    t.add(0, k)
    assert t.remove(0, k) == 1
    assert sum(t.entry(0, i)[2] for i in range(4)) == 1


@pytest.mark.parametrize("impl", BACKENDS)
def test_a_full_table_refuses_a_new_address_only(impl):
    t = Table(impl, rows=2, slots=4)
    keys = [v4(n) for n in range(5)]
    for k in keys[:4]:
        assert t.add(0, k) == 1
    assert t.add(0, keys[4]) == FULL              # no free entry: not counted
    assert t.total(keys[4]) == 0
    assert t.add(0, keys[2]) == 2                 # an address it holds still counts
    assert t.add(1, keys[4]) == 1                 # another row has room
    assert t.remove(0, keys[0]) == 0              # deleting in a full table ends
    assert t.add(0, keys[4]) == 2
    for k in keys[1:4]:
        assert t.total(k) == (2 if k == keys[2] else 1)


@pytest.mark.parametrize("impl", BACKENDS)
def test_removal_from_a_full_table_of_one_entry(impl):
    t = Table(impl, rows=1, slots=1)
    assert t.add(0, v4(1)) == 1
    assert t.add(0, v4(2)) == FULL
    assert t.remove(0, v4(1)) == 0
    assert t.add(0, v4(2)) == 1


# --- the twins and a naive model -------------------------------------------------------------

class Model:
    def __init__(self, rows: int, slots: int):
        self.slots = slots
        self.rows = [dict() for _ in range(rows)]

    def _sum(self, k) -> int:
        return sum(r.get(k, 0) for r in self.rows)

    def update(self, row, key, listener, delta) -> int:
        k = (listener, key)
        mine = self.rows[row]
        if delta > 0:
            if k not in mine and len(mine) == self.slots:
                return FULL
            mine[k] = mine.get(k, 0) + 1
        elif delta < 0:
            if k not in mine:
                return MISSING
            mine[k] -= 1
            if not mine[k]:
                del mine[k]
        return self._sum(k)


# adds twice as often as removals, so that tables fill up and chains form
OPS = st.lists(st.tuples(st.sampled_from((1, 1, -1, 0)), st.integers(0, 2), st.integers(0, 2),
                         st.integers(0, 11)), min_size=10, max_size=200)


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), slots=st.sampled_from((1, 2, 4, 8, 16)),
       rows=st.integers(1, 3), ops=OPS)
def test_twins_agree_with_each_other_and_a_model(seed, slots, rows, ops):
    keys = [v4(n) for n in range(6)] + [address_key(f"2001:db8:{n}::1") for n in range(6)]
    model = Model(rows, slots)
    py = Table(perip_py, rows, slots, seed)
    nat = Table(NATIVE, rows, slots, seed) if NATIVE is not None else None
    for delta, row, listener, ki in ops:
        row %= rows
        key = keys[ki]
        want = model.update(row, key, listener, delta)
        got = py.impl.update(py.mem, rows, slots, row, key, listener, delta, seed)
        assert got == want, (delta, row, listener, ki)
        if nat is not None:
            assert nat.impl.update(nat.mem, rows, slots, row, key, listener, delta,
                                   seed) == want
            assert nat.mem == py.mem                  # the same bytes, entry for entry
        if delta:                                     # every count still found by a probe
            for k in {k for r in model.rows for k in r}:
                assert py.total(k[1], k[0]) == model._sum(k)
    assert sum(py.entry(r, i)[2] for r in range(rows) for i in range(slots)) == \
        sum(sum(r.values()) for r in model.rows)


# --- the shared table ------------------------------------------------------------------------

def test_per_ip_table_checks_and_clears_rows():
    t = PerIPTable(3, slots=8)
    k = address_key("192.0.2.1")
    assert t.add(0, 0, k) == 1 and t.add(1, 0, k) == 2 and t.add(2, 0, k) == 3
    t.clear_row(1)                                # its worker died
    assert t.total(0, k) == 2
    assert t.remove(1, 0, k) == MISSING
    assert t.remove(2, 0, k) == 1
    with pytest.raises(ValueError, match="row 3 out of range"):
        t.add(3, 0, k)
    with pytest.raises(ValueError, match="16 bytes"):
        t.add(0, 0, b"\x01\x02")
    with pytest.raises(ValueError, match="power of two"):
        PerIPTable(1, slots=6)


def test_connection_counts_clear_the_per_ip_row_with_the_row():
    counts = ConnectionCounts(rows=2, listeners=1)
    k = address_key("192.0.2.1")
    counts.per_ip.add(0, 0, k)
    counts.per_ip.add(1, 0, k)
    counts.clear_row(0)
    assert counts.per_ip.total(0, k) == 1


def test_each_workers_table_holds_every_connection_the_listeners_allow():
    """SPEC §2: the count never stops applying. A worker may get every connection of every
    listener (SO_REUSEPORT does not split evenly), so its table has room for the sum of the
    listeners' max_connections with headroom (a power of two, at most half full): filling it
    from that many distinct addresses never meets a full table."""
    two = _config(max_connections=3000)
    two["listeners"].append({**two["listeners"][0], "name": "sub", "bind": "127.0.0.1:2587",
                             "max_connections": 1100})
    config = parse_config(two)
    counts = ConnectionCounts.for_config(config, rows=2)
    slots = counts.per_ip.slots
    assert slots & (slots - 1) == 0 and slots >= 2 * 4100
    for n in range(4100):                         # every connection on worker row 1
        listener = 0 if n < 3000 else 1
        assert counts.per_ip.add(1, listener, address_key(str(ipaddress.IPv4Address(
            0x0A000000 + n)))) == 1
    small = ConnectionCounts.for_config(parse_config(_config(max_connections=64)))
    assert small.per_ip.slots == 128              # 64 connections, half full at most
    assert perip.slots_for(64) == 128 and perip.slots_for(65) == 256
    assert perip.slots_for(10**9) == perip.MAX_SLOTS      # bounded memory


def test_the_table_is_shared_with_a_forked_child():
    t = PerIPTable(2, slots=8)
    k = address_key("198.51.100.7")
    t.add(0, 0, k)
    pid = os.fork()
    if pid == 0:                                  # the "worker" of row 1
        code = 1
        try:
            code = 0 if t.add(1, 0, k) == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert t.total(0, k) == 2                     # the parent sees the child's count


# --- address keys ----------------------------------------------------------------------------

def test_ipv4_keys_are_ipv4_mapped_and_mapped_clients_count_as_ipv4():
    k = address_key("192.0.2.33")
    assert k == ipaddress.IPv6Address("::ffff:192.0.2.33").packed
    assert address_key("::ffff:192.0.2.33") == k
    assert address_key("::FFFF:c000:221", 48) == k       # the prefix applies to IPv6 only
    assert address_key("192.0.2.34") != k


@pytest.mark.parametrize("a,b,prefix,same", [
    ("2001:db8:1:2::5", "2001:db8:1:2:ffff:ffff:ffff:ffff", 64, True),
    ("2001:db8:1:2::5", "2001:db8:1:3::5", 64, False),
    ("2001:db8:1:2::5", "2001:db8:1:3::5", 48, True),
    ("2001:db8:1:2::5", "2001:db8:1:2::6", 128, False),
    ("2001:db8:1:2::5", "2001:db8:1:2::6", 127, False),
    ("2001:db8:1:2::4", "2001:db8:1:2::5", 127, True),
    ("2001:db8::1", "2002:db8::1", 16, False),
    ("2001:db8::1", "2001:ffff::1", 16, True),
    ("fe80::1%eth0", "fe80::2", 64, True),
])
def test_ipv6_keys_are_masked_to_the_prefix(a, b, prefix, same):
    assert (address_key(a, prefix) == address_key(b, prefix)) is same


def test_ipv6_key_is_the_network_address():
    assert address_key("2001:db8:1:2:3:4:5:6", 64) == \
        ipaddress.IPv6Address("2001:db8:1:2::").packed
    assert address_key("2001:db8:1:2:3:4:5:6", 128) == \
        ipaddress.IPv6Address("2001:db8:1:2:3:4:5:6").packed
    assert address_key("[2001:db8::1]", 64) == ipaddress.IPv6Address("2001:db8::").packed


@pytest.mark.parametrize("text", ["", "localhost", "10.0.0.256", "2001:db8::g", "/tmp/sock"])
def test_not_an_address_has_no_key(text):
    assert address_key(text) is None


# --- configuration ---------------------------------------------------------------------------

def _config(**listener):
    return {"gateway": {"hostname": "mx.test", "metrics": ""},
            "listeners": [{"name": "mx", "protocol": "smtp", "bind": "127.0.0.1:2525",
                           "upstream": {"address": "127.0.0.1:25"}, **listener}]}


def test_defaults_are_50_per_address_and_a_64_prefix():
    lst = parse_config(_config()).listeners[0]
    assert lst.max_connections_per_ip == 50 and lst.per_ip_ipv6_prefix == 64
    lst = parse_config(_config(max_connections_per_ip=0, per_ip_ipv6_prefix=128)).listeners[0]
    assert lst.max_connections_per_ip == 0 and lst.per_ip_ipv6_prefix == 128


@pytest.mark.parametrize("key,value,message", [
    ("max_connections_per_ip", -1, "must be at least 0"),
    ("max_connections_per_ip", "50", "expected an integer"),
    ("max_connections_per_ip", True, "expected an integer"),
    ("per_ip_ipv6_prefix", 15, "must be at least 16"),
    ("per_ip_ipv6_prefix", 129, "must be at most 128"),
    ("per_ip_ipv6_prefix", 64.0, "expected an integer"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(_config(**{key: value}))
    text = str(exc.value)
    assert f"listeners[0].{key}" in text and message in text
