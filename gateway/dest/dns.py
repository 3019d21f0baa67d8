"""DNS for destinations and client names (SPEC §4.8 "DNS", "Peer names"; groundwork for §4.8,
not wired into the configuration or the sessions yet).

Every query goes through dnspython's asynchronous resolver on its trio backend, with EDNS0
and the DO bit set (and AD in the query, RFC 6840 §5.7), so a validating resolver answers
with the AD bit; `Answer.validated` is that bit as read from the response, never inferred.
DANE believes it, which is why the resolver must be one the gateway trusts (§4.8).

- `Resolver.query(name, rdtype)` — one lookup: `Answer` with `status` ANSWER (records, TTL,
  the CNAME-expanded `canonical` name), NODATA, NXDOMAIN (each with `validated`) or TEMPFAIL
  (SERVFAIL — a bogus zone included —, REFUSED, a timeout, a network error; `error` says
  which). Bounded by the resolver's `timeout`; positive and negative answers are cached per
  resolver (one per worker) within their TTL, temporary failures never.
- `Resolver.mx(domain, own_names=, own_addresses=)` — RFC 5321 §5.1 as §4.8 says: `MXResult`.
- `Resolver.tlsa(host, port)` — the TLSA RRset at `_PORT._tcp.HOST`: an `Answer`.
- `Resolver.client_name(address)` — PTR + forward confirmation: `ClientName`.

Results are plain frozen dataclasses; names are lowercase, without the final dot (the root
is "."), in their A-label form.
"""
from __future__ import annotations

import enum
import ipaddress
import math
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import trio

DEFAULT_TIMEOUT = 10.0          # [listeners.timeouts] dns (§4.8)
DEFAULT_CACHE_SIZE = 10000      # answers per resolver (per worker)
MAX_CACHE_TTL = 86400           # longer TTLs are cached this long
MAX_MX_RECORDS = 32             # MX records considered per domain (sorted by preference)
MAX_PTR_NAMES = 4               # PTR names forward-checked per client address
EDNS_PAYLOAD = 1232             # the DNS flag day 2020 size: no fragmentation
_PER_TRY = 2.0                  # one server's share of a lookup before the next is asked


class Status(enum.Enum):
    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class MXRecord:
    preference: int
    host: str                   # "." for a null MX


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True)
class Answer:
    """One lookup's outcome. `records` by type: A/AAAA → address strings, MX → MXRecord,
    TLSA → TLSARecord, PTR/CNAME/NS → names, TXT → bytes (the strings joined), others → text."""
    name: str
    rdtype: str
    status: Status
    records: tuple = ()
    validated: bool = False     # the response's AD bit
    ttl: int = 0                # seconds the answer may be reused (negative TTL for NODATA/NXDOMAIN)
    canonical: str = ""         # the name after the CNAME chain (== name without one)
    error: str = ""             # TEMPFAIL: servfail, refused, timeout, network, ...; or invalid name

    @property
    def tempfail(self) -> bool:
        return self.status is Status.TEMPFAIL


class MXKind(enum.Enum):
    HOSTS = "hosts"             # deliver to `hosts` (the domain itself when `implicit`)
    NULL_MX = "null_mx"         # RFC 7505 `0 .`: 556 5.1.10
    NXDOMAIN = "nxdomain"       # 550 5.1.2 Domain DOMAIN not found
    LOOP = "loop"               # the gateway is the best MX: 554 5.4.6
    TEMPFAIL = "tempfail"       # the MX lookup failed: 451 4.4.3


@dataclass(frozen=True)
class MXHost:
    """One MX host (or the domain itself, `implicit`), with its AAAA and A answers."""
    name: str                   # the exchange as the MX record names it
    preference: int
    status: Status              # ANSWER when it has addresses; else its lookups' outcome
    addresses: tuple[str, ...] = ()     # AAAA first, then A
    canonical: str = ""         # the name after its address records' CNAME chain
    validated: bool = False     # every address answer used was validated (AD)
    implicit: bool = False

    @property
    def tlsa_bases(self) -> tuple[str, ...]:
        """TLSA base domains in the order RFC 7672 §2.2.2 tries them: for a CNAME'd host
        whose expansion is secure the expanded name, then the original; else the name.
        (Whether DANE applies at all — validated MX and addresses — is the caller's.)"""
        if self.validated and self.canonical and self.canonical != self.name:
            return (self.canonical, self.name)
        return (self.name,)


@dataclass(frozen=True)
class MXResult:
    domain: str
    kind: MXKind
    hosts: tuple[MXHost, ...] = ()      # delivery order (preference, equal ones shuffled)
    validated: bool = False     # the MX answer (the NODATA one for an implicit MX) had AD
    implicit: bool = False      # no MX records: the domain's own addresses
    dropped: tuple[str, ...] = ()       # hosts dropped at or after the gateway's own preference
    error: str = ""

    def targets(self, limit: int) -> list[tuple[MXHost, str]]:
        """(host, address) pairs in the order to try them, at most `limit` (mx_max_addresses)."""
        out: list[tuple[MXHost, str]] = []
        for host in self.hosts:
            for address in host.addresses:
                if len(out) >= limit:
                    return out
                out.append((host, address))
        return out


@dataclass(frozen=True)
class ClientName:
    """Postfix's client_name (`name`: confirmed, else "unknown") and reverse_client_name
    (`ptr`: the first PTR name, else "unknown")."""
    address: str
    name: str = "unknown"
    ptr: str = "unknown"
    tempfail: bool = False

    @property
    def confirmed(self) -> bool:
        return self.name != "unknown"


UNKNOWN = "unknown"


def parse_nameserver(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port', or a bare address (port 53) → (address, port); ValueError."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad nameserver {text!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"bad nameserver {text!r}: not an IP address") from None
    return address, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad nameserver {whole!r}: port must be 1-65535")
    return int(text)


def _name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _record(rd, rdtype: int):
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(ipaddress.ip_address(rd.address))
    if rdtype == dns.rdatatype.MX:
        return MXRecord(int(rd.preference), _name_text(rd.exchange))
    if rdtype == dns.rdatatype.TLSA:
        return TLSARecord(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return _name_text(rd.target)
    if rdtype == dns.rdatatype.TXT:
        return b"".join(rd.strings)
    return rd.to_text()


class AnswerCache:
    """Answers by (name, type) until their TTL runs out; least recently used evicted first."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int], tuple[float, Answer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int]) -> Answer | None:
        entry = self._entries.get(key)
        if entry is not None:
            expires, answer = entry
            left = expires - self.clock()
            if left > 0:
                self._entries.move_to_end(key)
                self.hits += 1
                return replace(answer, ttl=math.ceil(left))
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: tuple[str, int], answer: Answer) -> None:
        if answer.tempfail or answer.ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (self.clock() + min(answer.ttl, MAX_CACHE_TTL), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        seen = []
        for entry in exc.kwargs.get("errors") or ():
            err = entry[3]
            if isinstance(err, str):
                seen.append(err.lower())
            elif isinstance(err, dns.exception.Timeout):
                seen.append("timeout")
            elif isinstance(err, OSError):
                seen.append("network")
            else:
                seen.append(type(err).__name__.lower())
        for word in ("servfail", "refused", "timeout", "network"):
            if word in seen:
                return word
        return seen[0] if seen else "no nameservers"
    if isinstance(exc, dns.resolver.YXDOMAIN):
        return "yxdomain"
    if isinstance(exc, OSError):
        return "network"
    return type(exc).__name__.lower()


_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def _valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname: letters, digits, '-' and '_', no empty label, not numeric."""
    if not name or len(name) > 253 or name == ".":
        return False
    labels = name.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


class Resolver:
    """DNS through dnspython's trio backend, DNSSEC-aware, with a per-worker answer cache.

    `nameservers`: 'host:port' strings (default: /etc/resolv.conf's, port 53). `timeout`:
    the bound of each lookup (`query`, and each stage of `mx`). `cache`: an AnswerCache to
    share, else one of `cache_size` entries. `rng`: the shuffle of equal MX preferences.
    """

    def __init__(self, nameservers: Sequence[str] | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, cache: AnswerCache | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE, rng: random.Random | None = None):
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.cache = cache if cache is not None else AnswerCache(cache_size)
        self.rng = rng if rng is not None else random.Random()
        self._backend = dns.asyncbackend.get_backend("trio")
        if nameservers is None:
            try:
                res = dns.asyncresolver.Resolver(configure=True)
                servers = [dns.nameserver.Do53Nameserver(str(ns), 53) for ns in res.nameservers]
            except dns.resolver.NoResolverConfiguration:
                servers = []
            if not servers:
                servers = [dns.nameserver.Do53Nameserver("127.0.0.1", 53)]
        else:
            servers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
            if not servers:
                raise ValueError("no nameservers")
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = servers
        res.search = []
        res.use_search_by_default = False
        res.domain = dns.name.root
        res.cache = None                        # ours keeps AD and the negative answers
        res.retry_servfail = False              # SERVFAIL (bogus) is an answer, not a retry
        res.rotate = False
        res.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        res.set_flags(dns.flags.RD | dns.flags.AD)
        res.lifetime = timeout
        res.timeout = min(_PER_TRY, timeout)
        self._res = res
        self.nameservers = tuple(f"{ns.address}:{ns.port}" if ":" not in ns.address
                                 else f"[{ns.address}]:{ns.port}" for ns in servers)

    # one lookup --------------------------------------------------------------------------
    async def query(self, name: str, rdtype: str | int) -> Answer:
        rtype = dns.rdatatype.RdataType.make(rdtype)
        tname = dns.rdatatype.to_text(rtype)
        try:
            qname = dns.name.from_text(name, origin=dns.name.root) if isinstance(name, str) else name
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return Answer(str(name), tname, Status.NXDOMAIN, error="invalid name")
        text = _name_text(qname)
        key = (text, int(rtype))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        answer = await self._lookup(qname, text, rtype, tname)
        self.cache.put(key, answer)
        return answer

    async def _lookup(self, qname: dns.name.Name, text: str, rtype, tname: str) -> Answer:
        # dnspython's lifetime bounds the lookup; the cancel scope is the belt to its braces
        with trio.move_on_after(self.timeout + 0.5):
            try:
                got = await self._res.resolve(qname, rtype, raise_on_no_answer=False,
                                              search=False, lifetime=self.timeout,
                                              backend=self._backend)
            except dns.resolver.NXDOMAIN as exc:
                response = exc.responses().get(qname)
                if response is None:
                    responses = list(exc.responses().values())
                    response = responses[0] if responses else None
                if response is None:
                    return Answer(text, tname, Status.NXDOMAIN)
                return self._from_response(text, tname, Status.NXDOMAIN, response, ())
            except (dns.exception.DNSException, OSError) as exc:
                return Answer(text, tname, Status.TEMPFAIL, error=_failure_text(exc))
            records: tuple = ()
            if got.rrset is not None:
                records = tuple(_record(rd, rtype) for rd in got.rrset)
            status = Status.ANSWER if records else Status.NODATA
            return self._from_response(text, tname, status, got.response, records)
        return Answer(text, tname, Status.TEMPFAIL, error="timeout")

    @staticmethod
    def _from_response(text: str, tname: str, status: Status, response: dns.message.Message,
                       records: tuple) -> Answer:
        try:
            chain = response.resolve_chaining()
            ttl = int(chain.minimum_ttl)
            canonical = _name_text(chain.canonical_name)
        except dns.exception.DNSException:
            ttl, canonical = 0, text
        return Answer(text, tname, status, records, bool(response.flags & dns.flags.AD),
                      ttl, canonical)

    async def tlsa(self, host: str, port: int = 25) -> Answer:
        """The TLSA RRset of `_PORT._tcp.HOST` (RFC 7672 §2.2)."""
        return await self.query(f"_{int(port)}._tcp.{host.rstrip('.')}.", "TLSA")

    # a host's addresses --------------------------------------------------------------------
    async def host(self, name: str, preference: int = 0, *, implicit: bool = False) -> MXHost:
        """`name`'s AAAA and A records (looked up together) as an MXHost."""
        results: dict[str, Answer] = {}

        async def one(rtype: str) -> None:
            results[rtype] = await self.query(name if name.endswith(".") else name + ".", rtype)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "AAAA")
            nursery.start_soon(one, "A")
        six, four = results["AAAA"], results["A"]
        addresses = six.records + four.records
        used = [a for a in (six, four) if a.status is not Status.TEMPFAIL]
        if addresses:
            status = Status.ANSWER
            used = [a for a in (six, four) if a.status is Status.ANSWER]
        elif len(used) < 2:
            status = Status.TEMPFAIL
        elif all(a.status is Status.NXDOMAIN for a in used):
            status = Status.NXDOMAIN
        else:
            status = Status.NODATA
        canonical = next((a.canonical for a in (six, four) if a.status is Status.ANSWER),
                         next((a.canonical for a in used if a.canonical), ""))
        validated = bool(used) and all(a.validated for a in used)
        return MXHost(_name_text(dns.name.from_text(name)), preference, status, addresses,
                      canonical, validated, implicit)

    # MX, RFC 5321 §5.1 ---------------------------------------------------------------------
    async def mx(self, domain: str, *, own_names: Iterable[str] = (),
                 own_addresses: Iterable[str] = ()) -> MXResult:
        """The delivery route of `domain`: MX by preference (equal ones shuffled), each
        host's AAAA and A; no MX → the domain itself (implicit); `0 .` → NULL_MX; NXDOMAIN;
        hosts at or after the gateway's own preference dropped (own: a name in `own_names`
        or an address in `own_addresses`), LOOP when the gateway is the best MX."""
        domain = domain.rstrip(".").lower()
        answer = await self.query(domain + ".", "MX")
        if answer.status is Status.TEMPFAIL:
            return MXResult(domain, MXKind.TEMPFAIL, validated=False, error=answer.error)
        if answer.status is Status.NXDOMAIN:
            return MXResult(domain, MXKind.NXDOMAIN, validated=answer.validated, error=answer.error)
        records: list[MXRecord] = list(answer.records)
        if len(records) == 1 and records[0].host == ".":
            return MXResult(domain, MXKind.NULL_MX, validated=answer.validated)
        records = [r for r in records if r.host != "."]
        implicit = not records
        if implicit:
            hosts = [await self.host(domain, 0, implicit=True)]
        else:
            records = self._order(records)[:MAX_MX_RECORDS]
            found: dict[int, MXHost] = {}

            async def one(i: int, rec: MXRecord) -> None:
                found[i] = await self.host(rec.host, rec.preference)

            async with trio.open_nursery() as nursery:
                for i, rec in enumerate(records):
                    nursery.start_soon(one, i, rec)
            hosts = [found[i] for i in range(len(records))]
        names = {n.rstrip(".").lower() for n in own_names}
        addrs = {ipaddress.ip_address(a) for a in own_addresses}
        own_pref = min((h.preference for h in hosts if self._is_own(h, names, addrs)), default=None)
        dropped: tuple[str, ...] = ()
        if own_pref is not None:
            dropped = tuple(h.name for h in hosts if h.preference >= own_pref)
            hosts = [h for h in hosts if h.preference < own_pref]
            if not hosts:
                return MXResult(domain, MXKind.LOOP, validated=answer.validated,
                                implicit=implicit, dropped=dropped)
        return MXResult(domain, MXKind.HOSTS, tuple(hosts), answer.validated, implicit, dropped)

    def _order(self, records: list[MXRecord]) -> list[MXRecord]:
        shuffled = list(records)
        self.rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda r: r.preference)   # stable: equal ones stay shuffled

    @staticmethod
    def _is_own(host: MXHost, names: set[str], addrs: set) -> bool:
        if host.name in names or (host.canonical and host.canonical in names):
            return True
        return any(ipaddress.ip_address(a) in addrs for a in host.addresses)

    # client names ----------------------------------------------------------------------------
    async def client_name(self, address: str) -> ClientName:
        """PTR of `address`, then forward confirmation (FCrDNS): `name` is the first PTR name
        one of whose A/AAAA records is `address`; "unknown" otherwise (no PTR, no match, a
        name that is no valid hostname, or a temporary failure, which sets `tempfail`)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return ClientName(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        text = str(ip)
        ptr = await self.query(dns.reversename.from_address(text).to_text(), "PTR")
        if ptr.status is not Status.ANSWER:
            return ClientName(text, tempfail=ptr.tempfail)
        names = [n for n in ptr.records if _valid_hostname(n)][:MAX_PTR_NAMES]
        if not names:
            return ClientName(text)
        rtype = "AAAA" if ip.version == 6 else "A"
        tempfail = False
        for name in names:
            forward = await self.query(name + ".", rtype)
            tempfail = tempfail or forward.tempfail
            if any(ipaddress.ip_address(a) == ip for a in forward.records):
                return ClientName(text, name, names[0])
        return ClientName(text, UNKNOWN, names[0], tempfail)
