"""The SMTP encryption policy of one listener, compiled once (SPEC §4.3).

`EncryptionPolicy` answers, per recipient at RCPT TO, which rule applies to the (sender,
recipient) pair: whether the client leg must be encrypted and the recipient's upstream level.
`ClientPolicy` holds the client rules: by client address (the connection's level and cipher
strength at connect time) and by sender domain (checked at MAIL FROM, can only tighten).
The lookups are done by `gateway.native.matcher` (native, or its pure-Python twin); this module
only turns addresses into the normalised domains the matcher takes and rules into decisions.

`shadowed_rules()` finds rules that can never match because an earlier enabled rule covers
both of their patterns (`gateway check` flags them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import ClientRule, Listener, Rule
from .levels import CipherGrade, ClientLevel, SenderEncryption, UpstreamLevel
from .native.matcher import DomainPatternMatcher, DomainRuleMatcher, NetworkMatcher
from .tls.grades import grade_suites


@lru_cache(maxsize=4096)
def _normalise(domain: str) -> str:
    domain = domain.strip().lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if domain and not domain.isascii():
        try:
            import idna
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except Exception:            # not a valid IDN: compare it as it is (matches only *)
            pass
    return domain


def domain_of(address: str) -> str:
    """The domain after the address's last `@`, normalised as patterns are (§4.3).

    The null sender `<>` and an address without a domain (`postmaster`) give "", which
    matches only the pattern `*`."""
    at = address.rfind("@")
    if at < 0:
        return ""
    return _normalise(address[at + 1:])


@dataclass(frozen=True)
class Decision:
    rule: int | None                  # index in listener.rules, None for the default rule
    sender_encryption: SenderEncryption
    recipient_encryption: UpstreamLevel   # before `allowed` is resolved


class EncryptionPolicy:
    """First enabled matching rule, else the default rule (`* → *`: optional, upstream.tls)."""

    def __init__(self, listener: Listener):
        self.rules: tuple[Rule, ...] = listener.rules
        self.default = Decision(None, SenderEncryption.OPTIONAL, listener.upstream.tls)
        self._matcher = DomainRuleMatcher(
            [(r.enabled, r.sender, r.recipient) for r in self.rules]) if self.rules else None

    def decide(self, sender: str, recipient: str) -> Decision:
        if self._matcher is None:
            return self.default
        i = self._matcher.match(domain_of(sender), domain_of(recipient))
        if i < 0:
            return self.default
        rule = self.rules[i]
        return Decision(i, rule.sender_encryption, rule.recipient_encryption)


class ClientPolicy:
    """Client rules, first match within each kind: by network, and by sender domain."""

    def __init__(self, listener: Listener):
        self.network_rules = [r for r in listener.client_rules if r.is_network]
        self.sender_rules = [r for r in listener.client_rules if not r.is_network]
        self._nets = NetworkMatcher([r.match for r in self.network_rules]) \
            if self.network_rules else None
        self._senders = DomainPatternMatcher([r.match for r in self.sender_rules]) \
            if self.sender_rules else None

    def for_client(self, ip: str) -> ClientRule | None:
        if self._nets is None:
            return None
        i = self._nets.match(ip)
        return self.network_rules[i] if i >= 0 else None

    def at_connect(self, level: ClientLevel, ip: str,
                   log=None) -> tuple[ClientLevel, CipherGrade | None]:
        """The connection's (client level, cipher strength): the listener's *level* unless a
        rule by client network sets them (logged as `client_rule`)."""
        rule = self.for_client(ip)
        if rule is None:
            return level, None
        if rule.client_tls is not None:
            level = rule.client_tls
        if log is not None:
            log.event("client_rule", match=rule.match, client_tls=level,
                      cipher_strength=rule.cipher_strength or "")
        return level, rule.cipher_strength

    def for_sender(self, sender: str) -> ClientRule | None:
        if self._senders is None:
            return None
        i = self._senders.match(domain_of(sender))
        return self.sender_rules[i] if i >= 0 else None


def pattern_covers(a: str, b: str) -> bool:
    """Does every domain matched by pattern *b* also match pattern *a*?"""
    if a == "*":
        return True
    if b == "*":
        return False
    if a.startswith("*."):
        suffix = a[1:]                          # ".example.com"
        return b.endswith(suffix) and b != a[2:] and (
            not b.startswith("*.") or b == a or b[1:].endswith(suffix))
    return a == b


def shadowed_rules(rules) -> list[tuple[int, int]]:
    """(shadowed, by) index pairs: an enabled rule that no domain pair can ever reach."""
    out = []
    for j, later in enumerate(rules):
        if not later.enabled:
            continue
        for i in range(j):
            earlier = rules[i]
            if earlier.enabled and pattern_covers(earlier.sender, later.sender) \
                    and pattern_covers(earlier.recipient, later.recipient):
                out.append((j, i))
                break
    return out


def cipher_meets(tls_info, strength: str | None) -> bool:
    """Is the negotiated cipher of *tls_info* at least *strength*? TLS 1.3 suites are all
    of the high grade."""
    if strength is None:
        return True
    if tls_info.version == "TLSv1.3":
        return True
    return tls_info.cipher in grade_suites(strength)
