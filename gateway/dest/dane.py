"""DANE for SMTP (RFC 7672, RFC 7671): TLSA records against the chain a server presented.

Groundwork for SPEC §4.8, not wired into the configuration or the sessions yet. Sans-IO: no
sockets, no trio, no OpenSSL. The bundled OpenSSL exposes no DANE API to Python, so the check
is made after the handshake and before any envelope is sent (§4.8), from the chain the server
presented (``TLSStream.peer_chain()``: leaf first, as sent) and the TLSA RRset the DNS layer
validated:

    result = check(records, chain, base_domain="mx.example.net", mx_name="mx.example.net")
    result.result      # "dane-ee", "dane-ta", "dane-encrypt", "dane_mismatch", "dane_no_tlsa"
    result.detail      # a sentence for the logs

The rules (RFC 7672 §3.1, §3.2; SPEC §4.8):

- usable records are DANE-TA(2) and DANE-EE(3) with selector Cert(0) or SPKI(1) and matching
  type Full(0), SHA2-256(1) or SHA2-512(2) whose digest has the right length; PKIX-TA(0),
  PKIX-EE(1), unknown values and malformed records are unusable. A validated RRset with no
  usable record still makes TLS mandatory, unauthenticated: ``dane-encrypt``
  (``dane_no_tlsa`` instead when the caller requires usable records, the ``dane-only`` level);
- DANE-EE(3) matches the leaf only (its certificate or its public key) and checks neither
  names nor dates: ``dane-ee``;
- DANE-TA(2) matches an issuer above the leaf: a certificate the server sent, or — for
  ``2 1 0`` and ``2 0 0``, whose data is the key or the certificate itself — a key that need
  not have been sent, the one whose signature the top certificate bears. The path from the
  leaf up to it is walked here (each certificate's issuer name is the next one's subject, its
  signature verifies with the next one's key, every certificate is within its validity dates
  at *now*, the TA included when it is a certificate, and the ones between leaf and TA are
  CAs allowed to sign certificates), not with cryptography's Web-PKI verifier, whose rules
  (a trusted root, EKU, SAN requirements) do not fit. Then the leaf's names — its DNS
  subjectAltNames, or its subject CN only when it has none — must match the TLSA base domain
  or the original MX host name, a ``*.`` wildcard standing for exactly one leftmost label:
  ``dane-ta``;
- anything else: ``dane_mismatch``.

The TLSA base of an MX host (RFC 7672 §2.2.2, SPEC §4.8) is ``tlsa_bases()`` of what the DNS
layer found (``HostAnswer``): no DANE unless the MX answer and the address answers were
validated; the secure CNAME-expanded name first, then the original name; with no MX
(implicit MX) the host is the domain itself. SNI is the base whose TLSA RRset is used.
"""
from __future__ import annotations

import binascii
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "DANE_EE", "DANE_TA", "DANE_ENCRYPT", "DANE_MISMATCH", "DANE_NO_TLSA",
    "TLSA", "DaneResult", "HostAnswer", "check", "usable", "rrset_digest",
    "tlsa_bases", "tlsa_qname", "spki_der",
]

# result words (SPEC §4.8: success results and failure labels)
DANE_EE = "dane-ee"
DANE_TA = "dane-ta"
DANE_ENCRYPT = "dane-encrypt"
DANE_MISMATCH = "dane_mismatch"
DANE_NO_TLSA = "dane_no_tlsa"

# TLSA fields (RFC 6698 §2.1, RFC 7218 acronyms)
PKIX_TA, PKIX_EE, DANE_TA_USAGE, DANE_EE_USAGE = 0, 1, 2, 3
SEL_CERT, SEL_SPKI = 0, 1
MT_FULL, MT_SHA256, MT_SHA512 = 0, 1, 2
_DIGEST_SIZE = {MT_SHA256: 32, MT_SHA512: 64}
_USAGE_NAME = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}

# Bounds: certificates of a presented chain looked at, records of an RRset looked at, bytes of
# one record's data (a full certificate is a few KiB; a TLSA RR's rdata is at most 65535).
MAX_CHAIN = 16
MAX_RECORDS = 64
MAX_DATA = 65535


@dataclass(frozen=True, order=True)
class TLSA:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_text(cls, text: str) -> "TLSA":
        """``"3 1 1 0a1b…"`` (presentation format; the hex may be split by spaces).
        ValueError when it is not four fields of numbers and hex."""
        fields = text.split()
        if len(fields) < 4:
            raise ValueError(f"a TLSA record is 'usage selector mtype hex', not {text!r}")
        try:
            usage, selector, mtype = (int(f) for f in fields[:3])
            data = binascii.unhexlify("".join(fields[3:]))
        except (ValueError, binascii.Error):
            raise ValueError(f"a TLSA record is 'usage selector mtype hex', not {text!r}") from None
        return cls(usage, selector, mtype, data)

    @classmethod
    def from_wire(cls, rdata: bytes) -> "TLSA":
        """The record's RDATA (three octets, then the data). ValueError when shorter."""
        if len(rdata) < 3:
            raise ValueError("a TLSA RDATA has at least three octets")
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @classmethod
    def of(cls, rdata) -> "TLSA":
        """From a DNS library's record object with ``usage``, ``selector``, ``mtype`` and
        ``cert`` (dnspython's ``dns.rdtypes.ANY.TLSA.TLSA``)."""
        return cls(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1: DANE-TA or DANE-EE, a known selector, a known matching type, and
        data that can be what it says (a digest of its exact size, full data not empty)."""
        if self.usage not in (DANE_TA_USAGE, DANE_EE_USAGE):
            return False
        if self.selector not in (SEL_CERT, SEL_SPKI):
            return False
        if self.mtype == MT_FULL:
            return 0 < len(self.data) <= MAX_DATA
        return _DIGEST_SIZE.get(self.mtype) == len(self.data)

    def __str__(self) -> str:
        hexdata = self.data.hex()
        if len(hexdata) > 24:
            hexdata = hexdata[:16] + "…"
        return f"{self.usage} {self.selector} {self.mtype} {hexdata}"

    def describe(self) -> str:
        return f"{_USAGE_NAME.get(self.usage, self.usage)} {self}"


@dataclass(frozen=True)
class DaneResult:
    """The outcome: ``result`` (one of the five words), ``detail`` (for the logs), the record
    that matched (None unless authenticated), and the certificate depth it matched at (0 the
    leaf; for a TA key that was not sent, one past the top certificate)."""

    result: str
    detail: str
    record: TLSA | None = None
    depth: int | None = None

    @property
    def authenticated(self) -> bool:
        return self.result in (DANE_EE, DANE_TA)

    @property
    def ok(self) -> bool:
        """TLS may carry the mail: authenticated, or the unauthenticated ``dane-encrypt``."""
        return self.result in (DANE_EE, DANE_TA, DANE_ENCRYPT)


def usable(records: Iterable[TLSA]) -> list[TLSA]:
    """The usable records of an RRset (at most MAX_RECORDS looked at), duplicates dropped."""
    out: list[TLSA] = []
    for i, record in enumerate(records):
        if i >= MAX_RECORDS:
            break
        if record.usable and record not in out:
            out.append(record)
    return out


def rrset_digest(records: Iterable[TLSA]) -> bytes:
    """A digest of the usable records, order-independent: what a pooled or resumed leg that
    was DANE-verified must still match (SPEC §4.8, the pool key)."""
    h = hashlib.sha256()
    for r in sorted(usable(records)):
        h.update(bytes((r.usage, r.selector, r.mtype)) + len(r.data).to_bytes(4, "big") + r.data)
    return h.digest()


# --- the TLSA base of an MX host ----------------------------------------------------------


@dataclass(frozen=True)
class HostAnswer:
    """What the DNS layer learnt about one destination host.

    name: the MX exchange as the MX record gives it, or the recipient domain itself with no
    MX (implicit MX); mx_secure: the MX answer (or, for an implicit MX, the NODATA/no-MX
    answer) was DNSSEC-validated (AD); address_secure: the host's A/AAAA answers, with any
    CNAME chain they followed, were validated; expanded: the final name after CNAMEs when the
    address lookup followed any (None otherwise)."""

    name: str
    mx_secure: bool
    address_secure: bool
    expanded: str | None = None


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def tlsa_bases(host: HostAnswer) -> tuple[str, ...]:
    """The TLSA base domains to try in order (RFC 7672 §2.2.2): none when the MX or address
    answers were not validated (DANE does not apply); the CNAME-expanded name first, then the
    original name, when the expansion was secure; else the name itself. Lower case, no
    trailing dot. The first base with a validated TLSA RRset is the one used, and the SNI."""
    if not (host.mx_secure and host.address_secure):
        return ()
    name = _norm(host.name)
    if not name:
        return ()
    if host.expanded:
        expanded = _norm(host.expanded)
        if expanded and expanded != name:
            return (expanded, name)
    return (name,)


def tlsa_qname(base: str, port: int = 25) -> str:
    """The TLSA owner name of *base* for *port*: ``_25._tcp.mx.example.net``."""
    return f"_{int(port)}._tcp.{_norm(base)}"


# --- the chain ----------------------------------------------------------------------------


def _der_header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at *pos*. ValueError."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high-tag-number DER not expected here")
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf):
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, end


def spki_der(tbs: bytes) -> bytes:
    """The subjectPublicKeyInfo of a TBSCertificate, exactly as encoded in the certificate
    (RFC 5280 §4.1: [0] version, serial, signature, issuer, validity, subject, SPKI)."""
    tag, pos, end = _der_header(tbs, 0)
    if tag != 0x30:
        raise ValueError("a TBSCertificate is a SEQUENCE")
    index = 0
    while pos < end:
        tag, start, stop = _der_header(tbs, pos)
        if index == 0 and tag == 0xA0:          # the optional explicit version
            pos = stop
            continue
        if index == 5:
            if tag != 0x30:
                raise ValueError("subjectPublicKeyInfo is a SEQUENCE")
            return tbs[pos:stop]
        index += 1
        pos = stop
    raise ValueError("no subjectPublicKeyInfo")


class _Cert:
    """A presented certificate with what matching needs, computed once."""

    __slots__ = ("cert", "der", "_spki", "_digests")

    def __init__(self, cert: x509.Certificate, der: bytes):
        self.cert = cert
        self.der = der
        self._spki: bytes | None = None
        self._digests: dict[tuple[int, int], bytes] = {}

    @property
    def spki(self) -> bytes:
        if self._spki is None:
            self._spki = spki_der(self.cert.tbs_certificate_bytes)
        return self._spki

    def matches(self, record: TLSA) -> bool:
        key = (record.selector, record.mtype)
        value = self._digests.get(key)
        if value is None:
            raw = self.der if record.selector == SEL_CERT else self.spki
            if record.mtype == MT_FULL:
                value = raw
            elif record.mtype == MT_SHA256:
                value = hashlib.sha256(raw).digest()
            else:
                value = hashlib.sha512(raw).digest()
            self._digests[key] = value
        return value == record.data


def _load_chain(chain: Sequence) -> tuple[list[_Cert], str | None]:
    """Certificates from DER bytes, cryptography objects or pyOpenSSL X509 objects; stops at
    the first one that can't be read (the reason then) and at MAX_CHAIN."""
    out: list[_Cert] = []
    for item in list(chain)[:MAX_CHAIN]:
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                der = bytes(item)
                cert = x509.load_der_x509_certificate(der)
            else:
                if not isinstance(item, x509.Certificate) and hasattr(item, "to_cryptography"):
                    item = item.to_cryptography()
                if not isinstance(item, x509.Certificate):
                    return out, f"certificate {len(out)} is a {type(item).__name__}"
                cert = item
                der = cert.public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            return out, f"certificate {len(out)} can't be read ({exc})"
        out.append(_Cert(cert, der))
    return out, None


def _verify_signature(key, cert: x509.Certificate) -> bool:
    """Whether *cert*'s signature verifies with the public *key*."""
    try:
        params = cert.signature_algorithm_parameters
        algorithm = cert.signature_hash_algorithm
        signature, tbs = cert.signature, cert.tbs_certificate_bytes
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, tbs, params, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, tbs, params)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, tbs)
        elif isinstance(key, dsa.DSAPublicKey):
            key.verify(signature, tbs, algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    except Exception:
        # an unsupported algorithm (UnsupportedAlgorithm), a key that does not fit the
        # signature's parameters (TypeError, ValueError): not verified, never raised
        return False
    return True


def _dates_hold(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _may_sign_certificates(cert: x509.Certificate) -> bool:
    """A CA (basicConstraints cA) whose keyUsage, if present, allows keyCertSign."""
    try:
        ext = cert.extensions
        try:
            bc = ext.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            return False
        if not bc.ca:
            return False
        try:
            ku = ext.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return True
        return ku.key_cert_sign
    except ValueError:                  # duplicate or malformed extensions
        return False


def _leaf_names(cert: x509.Certificate) -> list[str]:
    """The leaf's DNS subjectAltNames; its subject CNs only when it has none (RFC 7672
    §3.2.3, RFC 6125 §6.4.4)."""
    try:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [n for n in san.get_values_for_type(x509.DNSName) if isinstance(n, str)]
        except x509.ExtensionNotFound:
            names = []
        if not names:
            names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                     if isinstance(a.value, str)]
    except ValueError:
        return []
    return [_norm(n) for n in names if n]


def _name_matches(pattern: str, reference: str) -> bool:
    """RFC 7672 §3.2.3: equal ignoring case, or ``*.rest`` where the reference is one more
    label in front of ``rest`` (the wildcard only as the whole leftmost label, and ``rest``
    at least two labels)."""
    if not pattern or not reference:
        return False
    if pattern == reference:
        return True
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        rest = pattern[2:]
        if "." not in rest:
            return False
        label, dot, tail = reference.partition(".")
        return bool(label) and bool(dot) and tail == rest and "*" not in label
    return False


def _ta_keys(records: list[TLSA]) -> list[tuple[TLSA, object, x509.Name | None]]:
    """Trust-anchor keys carried whole in ``2 1 0`` (a SPKI) and ``2 0 0`` (a certificate)
    records: (record, public key, the certificate's subject or None)."""
    out = []
    for r in records:
        if r.usage != DANE_TA_USAGE or r.mtype != MT_FULL:
            continue
        try:
            if r.selector == SEL_SPKI:
                out.append((r, serialization.load_der_public_key(r.data), None))
            else:
                cert = x509.load_der_x509_certificate(r.data)
                out.append((r, cert.public_key(), cert.subject))
        except Exception:       # unreadable, or a key type cryptography does not support
            continue
    return out


def _ta_certificates(records: list[TLSA]) -> dict[TLSA, x509.Certificate]:
    out = {}
    for r in records:
        if r.usage == DANE_TA_USAGE and r.selector == SEL_CERT and r.mtype == MT_FULL:
            try:
                out[r] = x509.load_der_x509_certificate(r.data)
            except ValueError:
                pass
    return out


def _check_ta(ta_records: list[TLSA], certs: list[_Cert], names: list[str],
              now: datetime) -> DaneResult:
    """DANE-TA(2): walk from the leaf up through the presented certificates (each next one
    the issuer of the last: subject = issuer name, signature verified) until one matches a TA
    record, or the top one is signed by a TA key carried in a record."""
    leaf = certs[0]
    if not _dates_hold(leaf.cert, now):
        return DaneResult(DANE_MISMATCH, "DANE-TA: the server certificate is outside its "
                          "validity dates")
    keys = _ta_keys(ta_records)
    ta_certs = _ta_certificates(ta_records)
    path = [leaf]
    used = {0}
    found: tuple[TLSA, int] | None = None
    reason = "DANE-TA: no certificate of the chain matched a DANE-TA record"
    while found is None and len(path) <= MAX_CHAIN:
        current = path[-1].cert
        # a TA key that was not sent: it signs the current certificate
        for record, key, subject in keys:
            if subject is not None and subject != current.issuer:
                continue
            if _verify_signature(key, current):
                cert = ta_certs.get(record)
                if cert is not None and not _dates_hold(cert, now):
                    reason = "DANE-TA: the trust anchor certificate is outside its validity dates"
                    continue
                found = (record, len(path))
                break
        if found is not None:
            break
        # the next certificate up, among those presented
        issuer = None
        for i, candidate in enumerate(certs):
            if i in used or candidate.cert.subject != current.issuer:
                continue
            if _verify_signature_of(candidate.cert, current):
                issuer = i
                break
        if issuer is None:
            break
        candidate = certs[issuer]
        used.add(issuer)
        path.append(candidate)
        if not _dates_hold(candidate.cert, now):
            reason = (f"DANE-TA: certificate {issuer} of the chain is outside its "
                      "validity dates")
            break
        matched = next((r for r in ta_records if candidate.matches(r)), None)
        if matched is not None:
            found = (matched, len(path) - 1)
            break
        if not _may_sign_certificates(candidate.cert):
            reason = f"DANE-TA: certificate {issuer} of the chain is not a CA"
            break
    if found is None:
        return DaneResult(DANE_MISMATCH, reason)
    record, depth = found
    leaf_names = _leaf_names(leaf.cert)
    if not any(_name_matches(p, r) for p in leaf_names for r in names):
        shown = ", ".join(leaf_names[:5]) or "none"
        return DaneResult(DANE_MISMATCH, f"DANE-TA: {record.describe()} matched at depth "
                          f"{depth}, but the certificate names ({shown}) match none of "
                          f"{', '.join(names)}")
    return DaneResult(DANE_TA, f"DANE-TA: {record.describe()} matched at depth {depth}",
                      record, depth)


def _verify_signature_of(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        key = issuer.public_key()
    except Exception:       # a key type cryptography does not support
        return False
    return _verify_signature(key, cert)


def check(records: Iterable[TLSA], chain: Sequence, *, base_domain: str,
          mx_name: str | None = None, now: datetime | None = None,
          require_usable: bool = False) -> DaneResult:
    """Decide DANE for one TLS connection (module docstring).

    records: the validated TLSA RRset of *base_domain* (TLSA objects); chain: what the server
    presented, leaf first — DER bytes, cryptography or pyOpenSSL certificates; base_domain:
    the TLSA base (also the SNI sent); mx_name: the MX host name before CNAME expansion, the
    other name a DANE-TA leaf may carry; now: the time dates are checked at (aware; default
    the current UTC time); require_usable: ``dane-only`` — an RRset with no usable record is
    ``dane_no_tlsa`` rather than ``dane-encrypt``. Never raises on bad input."""
    records = list(records)[:MAX_RECORDS]
    if not records:
        return DaneResult(DANE_NO_TLSA, f"no TLSA records for {_norm(base_domain)}")
    good = usable(records)
    if not good:
        if require_usable:
            return DaneResult(DANE_NO_TLSA, f"no usable TLSA records for {_norm(base_domain)} "
                              f"({len(records)} unusable)")
        return DaneResult(DANE_ENCRYPT, f"{len(records)} TLSA records for "
                          f"{_norm(base_domain)}, none usable: TLS without authentication")
    certs, unreadable = _load_chain(chain or ())
    if not certs:
        return DaneResult(DANE_MISMATCH, unreadable or "the server presented no certificate")
    try:
        return _check(good, certs, base_domain, mx_name, now)
    except ValueError as exc:           # a certificate cryptography parses only lazily
        return DaneResult(DANE_MISMATCH, f"the server certificate can't be read ({exc})")


def _check(good: list[TLSA], certs: list[_Cert], base_domain: str, mx_name: str | None,
           now: datetime | None) -> DaneResult:
    leaf = certs[0]
    for record in good:
        if record.usage == DANE_EE_USAGE and leaf.matches(record):
            return DaneResult(DANE_EE, f"DANE-EE: {record} matched the server certificate",
                              record, 0)
    ta_records = [r for r in good if r.usage == DANE_TA_USAGE]
    if not ta_records:
        return DaneResult(DANE_MISMATCH, f"no DANE-EE record matched the server certificate "
                          f"({len(good)} usable)")
    when = now if now is not None else datetime.now(timezone.utc)
    names = [n for n in dict.fromkeys(_norm(x) for x in (base_domain, mx_name or "")) if n]
    return _check_ta(ta_records, certs, names, when)
