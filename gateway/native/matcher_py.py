"""The rule matcher's pure-Python twin (SPEC §4.3, §10); the C core is _native/match.c.

Semantics (both implementations, compared by tests/test_rulematch.py):

- A pattern is `*` (any domain, the empty string "" included), `*.X` (any domain that ends
  with "." + X: every subdomain at any depth, never the apex X itself) or anything else, an
  exact domain. Patterns and domains arrive normalised (lower-case, no trailing dot, A-labels);
  nothing is normalised here. A non-ASCII str is compared as its UTF-8 bytes (lone surrogates
  as surrogatepass), which for str comparison is the same thing.
- The domain "" is the null sender `<>`: it matches only `*` (an exact pattern "" does not).
- DomainRuleMatcher: the index of the first ENABLED rule whose sender and recipient patterns
  both match, else -1. DomainPatternMatcher: the index of the first pattern that matches, -1.
- NetworkMatcher: the lowest index of a network containing the address, -1 if none or if the
  text is not an address (`ipaddress.ip_address` rules: no leading zeros in IPv4 octets, IPv6
  scope ids `%eth0` allowed and ignored). An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the
  IPv4 address; an IPv6 network inside ::ffff:0:0/96 is the IPv4 network it maps. Otherwise
  IPv4 addresses match only IPv4 networks and IPv6 only IPv6 (::/0 does not contain 1.2.3.4).
  Networks are parsed with strict=False (host bits are masked); a bad network is ValueError.

Lookups never scan the rule list: patterns are compiled into dicts keyed on the exact domain
and on the parent suffix of `*.X`, and a (sender key, recipient key) -> first rule dict.
"""
from __future__ import annotations

import ipaddress

__all__ = ["DomainRuleMatcher", "DomainPatternMatcher", "NetworkMatcher", "parse_networks"]

_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


def _split(pattern: str) -> tuple[int, str]:
    """(kind, key): 0 any, 1 exact, 2 subdomain of key."""
    if pattern == "*":
        return 0, ""
    if pattern.startswith("*."):
        return 2, pattern[2:]
    return 1, pattern


class _Side:
    """Pattern keys of one side -> key id, and each key's first rule (for pruning)."""

    __slots__ = ("any_id", "exact", "sub", "first")

    def __init__(self):
        self.any_id = None
        self.exact: dict[str, int] = {}
        self.sub: dict[str, int] = {}
        self.first: list[int] = []

    def add(self, pattern: str, rule: int) -> int:
        kind, key = _split(pattern)
        if kind == 0:
            if self.any_id is None:
                self.any_id = len(self.first)
                self.first.append(rule)
            return self.any_id
        table = self.exact if kind == 1 else self.sub
        kid = table.get(key)
        if kid is None:
            kid = table[key] = len(self.first)
            self.first.append(rule)
        return kid

    def ids(self, domain: str) -> list[int]:
        """Key ids of every pattern of this side that matches *domain*."""
        out = [] if self.any_id is None else [self.any_id]
        if not domain:
            return out
        kid = self.exact.get(domain)
        if kid is not None:
            out.append(kid)
        sub = self.sub
        if sub:
            pos = domain.find(".")
            while pos >= 0:
                kid = sub.get(domain[pos + 1:])
                if kid is not None:
                    out.append(kid)
                pos = domain.find(".", pos + 1)
        return out


class DomainRuleMatcher:
    """[(enabled, sender_pattern, recipient_pattern), ...] -> first enabled matching rule."""

    def __init__(self, rules):
        self._s, self._r = _Side(), _Side()
        self._pairs: dict[tuple[int, int], int] = {}
        self.size = 0
        for i, (enabled, sender, recipient) in enumerate(rules):
            self.size += 1
            if not enabled:
                continue
            key = (self._s.add(sender, i), self._r.add(recipient, i))
            self._pairs.setdefault(key, i)           # in order: the first rule wins

    def match(self, sender_domain: str, recipient_domain: str) -> int:
        rids = self._r.ids(recipient_domain)
        if not rids:
            return -1
        sids = self._s.ids(sender_domain)
        pairs = self._pairs
        best = -1
        for sid in sids:
            for rid in rids:
                i = pairs.get((sid, rid))
                if i is not None and (best < 0 or i < best):
                    best = i
        return best

    def match_many(self, pairs) -> list[int]:
        m = self.match
        return [m(s, r) for s, r in pairs]


class DomainPatternMatcher:
    """[pattern, ...] -> the first pattern matching a domain (client rules by sender domain)."""

    def __init__(self, patterns):
        self._side = _Side()
        self.size = 0
        for i, p in enumerate(patterns):
            self.size += 1
            self._side.add(p, i)

    def match(self, domain: str) -> int:
        first = self._side.first
        ids = self._side.ids(domain)
        return min((first[k] for k in ids), default=-1)


def _address(ip: str):
    """The address as (4 or 6, int), IPv4-mapped IPv6 as IPv4; None if it is not one."""
    if ip.__class__ is not str:
        return None
    try:
        a = ipaddress.ip_address(ip)
    except (ValueError, TypeError):
        return None
    if a.version == 6:
        m = a.ipv4_mapped
        if m is not None:
            return 4, int(m)
        return 6, int(a)
    return 4, int(a)


def parse_networks(networks) -> list[tuple[int, int, int]]:
    """[(family 4|6, network address as int, prefix length)], mapped IPv6 networks as IPv4.
    The native facade compiles the same list, so both implementations agree on parsing."""
    out = []
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED_NET):
            out.append((4, int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        else:
            out.append((net.version, int(net.network_address), net.prefixlen))
    return out


class NetworkMatcher:
    """[CIDR, ...] -> the lowest index of a network containing an address (text)."""

    def __init__(self, networks):
        # per (family, prefix length): network int -> lowest index
        self._tables: dict[int, list[tuple[int, int, dict[int, int]]]] = {4: [], 6: []}
        tables: dict[tuple[int, int], dict[int, int]] = {}
        self.size = 0
        for i, (fam, addr, plen) in enumerate(parse_networks(networks)):
            self.size += 1
            tables.setdefault((fam, plen), {}).setdefault(addr, i)
        for (fam, plen), table in sorted(tables.items()):
            bits = 32 if fam == 4 else 128
            shift = bits - plen
            self._tables[fam].append((shift, min(table.values()), table))

    def match(self, ip: str) -> int:
        a = _address(ip)
        if a is None:
            return -1
        fam, value = a
        best = -1
        for shift, first, table in self._tables[fam]:
            if best >= 0 and first >= best:
                continue
            i = table.get((value >> shift) << shift)
            if i is not None and (best < 0 or i < best):
                best = i
        return best
