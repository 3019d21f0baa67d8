"""A route: what the RCPT stage decides for a recipient (SPEC §4.3, §4.4, §4.8).

A `Route` is the recipient's destination (today the listener's upstream, the configuration's
`Upstream`: address, mode, `server_name`, profile, client certificate) and its TLS requirement
— the level (`allowed` resolved), the names a `verify` leg must match, and the policy that set
them (an encryption rule by index, the listener's `upstream.tls`, AUTH's submission leg, or a
hook that tightened it). The policy seam (`policy.stages`) produces routes: the rules first,
then the hooks, which may tighten one. "Can this leg carry this recipient" is
`route.satisfied_by(leg)`: the same destination, and the level met (§4.3).

Upstream legs are pooled by what they *are* (§4.8), not by who opened them: `leg_key(leg)` is
the destination's key (address, mode, SNI, profile, client certificate) with the level the leg
achieved and the names it verified; a route takes a pooled leg under any of
`route.pool_keys`, the keys of the legs that satisfy it, in the order it prefers them.

The policy builds each route once (per level and rule) and shares it: deciding a recipient
allocates no route.
"""
from __future__ import annotations

from ..levels import UpstreamLevel

# What a leg achieved (`achieved()`), by the route levels it satisfies (UpstreamLevel
# .satisfied_by): a verified TLS leg whose name was checked; a TLS leg; a plaintext leg on
# which TLS was not offered or failed; a plaintext leg that did not try offered TLS.
VERIFIED, TLS, PLAIN_NO_TLS, PLAIN = "verify", "required", "preferred", "none"

# the achieved kinds of legs a route at each level may take from the pool, preferred first
_TAKES = {
    UpstreamLevel.VERIFY: (VERIFIED,),
    UpstreamLevel.REQUIRED: (TLS, VERIFIED),
    UpstreamLevel.PREFERRED: (TLS, VERIFIED, PLAIN_NO_TLS),
    UpstreamLevel.NONE: (PLAIN, PLAIN_NO_TLS),
}
_RANK = {UpstreamLevel.NONE: 0, UpstreamLevel.PREFERRED: 1, UpstreamLevel.REQUIRED: 2,
         UpstreamLevel.VERIFY: 3}


def destination_key(destination) -> tuple:
    """What identifies a destination for a leg (§4.8): address, mode, SNI, profile, client
    certificate. *destination* is the configuration's `Upstream` or a leg's
    `UpstreamSettings` (both have these fields)."""
    return (destination.host, destination.port, destination.mode,
            destination.server_name or destination.host, destination.profile,
            destination.certificate)


def achieved(leg) -> str:
    """The level *leg* achieved: VERIFIED only where its name was checked (opened at
    `verify`), TLS, PLAIN_NO_TLS (TLS not offered, or failed) or PLAIN."""
    tls = leg.tls
    if tls is not None:
        return VERIFIED if tls.verified and leg.level == UpstreamLevel.VERIFY else TLS
    return PLAIN_NO_TLS if not leg.tls_offered or leg.tls_failed else PLAIN


def leg_key(leg) -> tuple:
    """The pool key of an open leg: its destination key, the level it achieved and the
    names it verified (§4.8)."""
    kind = achieved(leg)
    names = (leg.dest_key[3],) if kind == VERIFIED else ()
    return leg.dest_key + (kind, names)


class Route:
    """A recipient's destination and TLS requirement (see the module docstring)."""

    __slots__ = ("destination", "level", "names", "rule", "policy", "key", "pool_keys")

    def __init__(self, destination, level: UpstreamLevel, *, rule: int | None = None,
                 policy: str = "upstream.tls"):
        self.destination = destination
        self.level = level = UpstreamLevel(level)
        self.key = key = destination_key(destination)
        # the names a verify leg must match: the SNI (server_name or the host, §3.2)
        self.names = (key[3],) if level is UpstreamLevel.VERIFY else ()
        self.rule = rule                # index of the encryption rule that set it, or None
        self.policy = policy            # "rule", "upstream.tls", "auth" or a hook's name
        self.pool_keys = tuple(key + (kind, (key[3],) if kind == VERIFIED else ())
                               for kind in _TAKES[level])

    def satisfied_by(self, leg) -> bool:
        """Can *leg* carry a recipient of this route: the same destination, and a leg that
        meets the level (§4.3: a closed leg meets none)."""
        return leg.dest_key == self.key and self.level.satisfied_by(leg)

    def stricter_than(self, other: "Route") -> bool:
        """Does this route demand more TLS than *other*?"""
        return _RANK[self.level] > _RANK[other.level]

    def __repr__(self) -> str:
        return (f"Route({self.key[0]}:{self.key[1]}, {self.level}, rule={self.rule}, "
                f"policy={self.policy})")

