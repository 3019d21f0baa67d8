"""The TLS levels of both legs, a rule's sender encryption and the cipher grades (SPEC §3, §4.3).

The vocabulary sits below `config/`, `tls/` and `policy/`, which all read it, and imports none
of them. A decision reads a level through its members and properties, never by its word: the
words belong to this module and to the configuration parser. Each is an `enum.StrEnum`: a member equals its configuration word (``ClientLevel.VERIFY ==
"verify"``) and formats as it, so logs, metrics and `gateway check` print the same words.
Order comparisons (`<`) on members are string comparisons: rank with `stricter_than`.
"""
from __future__ import annotations

import enum
from typing import Any


class ClientLevel(enum.StrEnum):
    """The client leg, the gateway as TLS server (§3.1), from the loosest to the strictest."""

    NONE = "none"              # no STARTTLS offered, plaintext accepted
    OPTIONAL = "optional"      # STARTTLS offered, plaintext accepted
    REQUIRED = "required"      # mail only over TLS
    VERIFY = "verify"          # mail only over TLS with a verified client certificate

    @property
    def offers_tls(self) -> bool:
        """Does the listener offer TLS (STARTTLS) to a client at this level?"""
        return self is not ClientLevel.NONE

    @property
    def requires_tls(self) -> bool:
        """Must the client leg be encrypted before mail is accepted?"""
        return self in (ClientLevel.REQUIRED, ClientLevel.VERIFY)

    @property
    def verifies(self) -> bool:
        """Must the client present a certificate that verifies?"""
        return self is ClientLevel.VERIFY

    def stricter_than(self, other: ClientLevel | str) -> bool:
        """Is this level stricter than *other* (a member or its word)?"""
        return _rank(self) > _rank(ClientLevel(other))


class UpstreamLevel(enum.StrEnum):
    """The upstream leg, the gateway as TLS client (§3.2); also a rule's recipient
    encryption (§4.3)."""

    NONE = "none"              # never STARTTLS
    PREFERRED = "preferred"    # STARTTLS if offered, else plaintext
    ALLOWED = "allowed"        # mirror the client leg (see `resolve`)
    REQUIRED = "required"      # TLS, certificate not checked
    VERIFY = "verify"          # TLS with the chain and name verified

    @property
    def requires_tls(self) -> bool:
        """Must the upstream leg be encrypted? (`allowed` must be resolved first.)"""
        return self in (UpstreamLevel.REQUIRED, UpstreamLevel.VERIFY)

    @property
    def verifies(self) -> bool:
        """Must the upstream's certificate chain and name verify?"""
        return self is UpstreamLevel.VERIFY

    @property
    def asks_tls(self) -> bool:
        """Does a leg at this level send STARTTLS when it is offered? (all but `none`)"""
        return self is not UpstreamLevel.NONE

    @property
    def falls_back(self) -> bool:
        """May a leg at this level go on in plaintext when TLS fails? (`preferred`)"""
        return self is UpstreamLevel.PREFERRED

    def resolve(self, client_tls: bool) -> UpstreamLevel:
        """`allowed` mirrors the client leg: `required` when it is TLS (*client_tls*), else
        `none`; every other level stands."""
        if self is UpstreamLevel.ALLOWED:
            return UpstreamLevel.REQUIRED if client_tls else UpstreamLevel.NONE
        return self

    def satisfied_by(self, leg: Any) -> bool:
        """Can a recipient at this (resolved) level travel on *leg*? (§4.3)

        *leg* is anything with ``closed``, ``tls`` (None, or an object with ``verified``),
        ``tls_offered`` and ``tls_failed`` (STARTTLS offered, then refused or failed). A
        closed leg satisfies nothing; `preferred` takes a TLS leg, or a plaintext one whose
        upstream offered no TLS or failed it. An unresolved `allowed` is judged as `none`.
        """
        if leg.closed:
            return False
        if self is UpstreamLevel.VERIFY:
            return leg.tls is not None and bool(leg.tls.verified)
        if self is UpstreamLevel.REQUIRED:
            return leg.tls is not None
        if self is UpstreamLevel.PREFERRED:
            return leg.tls is not None or not leg.tls_offered or leg.tls_failed
        return leg.tls is None


class SenderEncryption(enum.StrEnum):
    """A rule's demand on the client leg for its (sender, recipient) pair (§4.3)."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    NONE = "none"

    @property
    def requires_tls(self) -> bool:
        """Must the client leg be encrypted for the recipient to be accepted?"""
        return self is SenderEncryption.REQUIRED


class CipherGrade(enum.StrEnum):
    """`cipher_strength`: the grade of TLS ≤ 1.2 suites, as Postfix grades them (§3.3)."""

    MEDIUM = "medium"
    HIGH = "high"

    @property
    def openssl(self) -> str:
        """The OpenSSL cipher string of the grade; never anonymous or null suites."""
        return _OPENSSL_GRADE[self]

    def stricter_than(self, other: CipherGrade | str | None) -> bool:
        """Is this grade stricter than *other* (a member, its word, or None: no grade)?"""
        return _rank(self) > (-1 if other is None else _rank(CipherGrade(other)))


_OPENSSL_GRADE = {
    CipherGrade.MEDIUM: "HIGH:MEDIUM:!aNULL:!eNULL",
    CipherGrade.HIGH: "HIGH:!aNULL:!eNULL",
}


def _rank(member: enum.Enum) -> int:
    """The position of *member* in its enum, loosest first."""
    return list(type(member)).index(member)
