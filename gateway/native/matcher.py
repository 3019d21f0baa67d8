"""The rule matcher facade: the compiled cffi core or its pure-Python twin (SPEC §4.3, §10).

Which one is gateway/native/backend.py's choice, by the same rules as the line scanner's
(GATEWAY_PURE_PYTHON=1 forces the twin, `gateway.native.matcher_py`; a compiled core that cannot be
loaded, or an older build without the matcher, is an ImportError here under
GATEWAY_REQUIRE_NATIVE=1, else the twin is used).

Exports BACKEND ("native" or "python") and DomainRuleMatcher, DomainPatternMatcher,
NetworkMatcher with the semantics documented in gateway/native/matcher_py.py:

    m = DomainRuleMatcher([(enabled, sender_pattern, recipient_pattern), ...])
    m.match(sender_domain, recipient_domain) -> int      # first enabled rule, -1
    m.match_many([(sender_domain, recipient_domain), ...]) -> list[int]   # one C call
    DomainPatternMatcher([pattern, ...]).match(domain) -> int
    NetworkMatcher(["192.0.2.0/24", "2001:db8::/32", ...]).match(ip_text) -> int

`native_backend` / `python_backend` hold the compiled and the twin implementations under those
same names (`native_backend` is None when the core is not loaded), so tests and benchmarks can
hold the two side by side. The compiled matchers free their C tables when collected (ffi.gc).
"""
from __future__ import annotations

from . import backend, matcher_py

__all__ = ["BACKEND", "DomainRuleMatcher", "DomainPatternMatcher", "NetworkMatcher",
           "native_backend", "python_backend"]

_ffi, _lib = backend.core("matcher")


def _enc(text) -> bytes:
    """UTF-8 bytes of a str (lone surrogates as surrogatepass, like the twin's str compare)."""
    if text.__class__ is not str and not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _pack_pairs(pairs):
    """(buffer, size_t offsets) of [(a, b), ...]: pair i is buf[o[2i]:o[2i+1]],
    buf[o[2i+1]:o[2i+2]]."""
    parts, offs, pos = [], [0], 0
    for a, b in pairs:
        a, b = _enc(a), _enc(b)
        parts.append(a)
        parts.append(b)
        pos += len(a)
        offs.append(pos)
        pos += len(b)
        offs.append(pos)
    return b"".join(parts), _ffi.new("size_t[]", offs)


def _new_rm(triples):
    """A gw_rm_t* (garbage-collected) from [(enabled, sender, recipient), ...]."""
    pairs, enabled = [], bytearray()
    for en, s, r in triples:
        enabled.append(1 if en else 0)
        pairs.append((s, r))
    buf, offs = _pack_pairs(pairs)
    m = _lib.gw_rm_new(len(enabled), buf, len(buf), offs, bytes(enabled) or b"\0")
    if m == _ffi.NULL:
        raise MemoryError("gw_rm_new: out of memory")
    return _ffi.gc(m, _lib.gw_rm_free, size=len(buf) * 4 + len(enabled) * 96)


class _NativeDomainRuleMatcher:
    """matcher_py.DomainRuleMatcher over the C tables (same API and results)."""

    __slots__ = ("_m", "size")

    def __init__(self, rules):
        rules = list(rules)
        self.size = len(rules)
        self._m = _new_rm(rules)

    def match(self, sender_domain: str, recipient_domain: str) -> int:
        try:
            s, r = sender_domain.encode(), recipient_domain.encode()
        except (UnicodeEncodeError, AttributeError):
            s, r = _enc(sender_domain), _enc(recipient_domain)
        i = _rm_match(self._m, s, len(s), r, len(r))
        if i < -1:
            raise MemoryError("gw_rm_match: out of memory")
        return i

    def match_many(self, pairs) -> list[int]:
        return self._match_packed(self._pack(pairs))

    # The two halves of match_many, for the benchmark's "inside C" figure.
    @staticmethod
    def _pack(pairs):
        pairs = list(pairs)
        buf, offs = _pack_pairs(pairs)
        return len(pairs), buf, offs, _ffi.new("int[]", max(1, len(pairs)))

    def _match_packed(self, packed) -> list[int]:
        n, buf, offs, out = packed
        if _lib.gw_rm_match_many(self._m, n, buf, offs, out) < 0:
            raise MemoryError("gw_rm_match_many: out of memory")
        return _ffi.unpack(out, n)


class _NativeDomainPatternMatcher:
    """matcher_py.DomainPatternMatcher over the C tables: the rules (True, pattern, "*") matched
    with the recipient "" (which only `*` matches)."""

    __slots__ = ("_m", "size")

    def __init__(self, patterns):
        patterns = list(patterns)
        self.size = len(patterns)
        self._m = _new_rm([(True, p, "*") for p in patterns])

    def match(self, domain: str) -> int:
        try:
            d = domain.encode()
        except (UnicodeEncodeError, AttributeError):
            d = _enc(domain)
        i = _rm_match(self._m, d, len(d), b"", 0)
        if i < -1:
            raise MemoryError("gw_rm_match: out of memory")
        return i


class _NativeNetworkMatcher:
    """matcher_py.NetworkMatcher over two C binary tries (same API and results)."""

    __slots__ = ("_m", "size")

    def __init__(self, networks):
        nets = matcher_py.parse_networks(networks)
        self.size = len(nets)
        fams = bytes(f for f, _, _ in nets)
        addrs = b"".join(a.to_bytes(4, "big") + bytes(12) if f == 4 else a.to_bytes(16, "big")
                         for f, a, _ in nets)
        plens = _ffi.new("int[]", [p for _, _, p in nets] or [0])
        m = _lib.gw_nm_new(len(nets), addrs or b"\0", plens, fams or b"\0")
        if m == _ffi.NULL:
            raise MemoryError("gw_nm_new: out of memory")
        self._m = _ffi.gc(m, _lib.gw_nm_free, size=len(nets) * 16 * 40)

    def match(self, ip: str) -> int:
        if ip.__class__ is not str:
            return -1
        try:
            b = ip.encode()
        except UnicodeEncodeError:
            return -1                      # a lone surrogate: not an address
        return _nm_match(self._m, b, len(b))


class _NativeBackend:
    """The compiled implementation under the twin's names (for tests and benchmarks)."""
    DomainRuleMatcher = _NativeDomainRuleMatcher
    DomainPatternMatcher = _NativeDomainPatternMatcher
    NetworkMatcher = _NativeNetworkMatcher


python_backend = matcher_py

if _lib is not None:
    _rm_match = _lib.gw_rm_match
    _nm_match = _lib.gw_nm_match
    native_backend = _NativeBackend
    BACKEND = "native"
    DomainRuleMatcher = _NativeDomainRuleMatcher
    DomainPatternMatcher = _NativeDomainPatternMatcher
    NetworkMatcher = _NativeNetworkMatcher
else:
    native_backend = None
    BACKEND = "python"
    DomainRuleMatcher = matcher_py.DomainRuleMatcher
    DomainPatternMatcher = matcher_py.DomainPatternMatcher
    NetworkMatcher = matcher_py.NetworkMatcher
