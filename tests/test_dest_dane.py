"""gateway.dest.dane: TLSA records against real certificate chains (RFC 7672 §3, SPEC §4.8).

The chains are made here with `cryptography` (a private root, an intermediate, leaves with and
without names, expired, wildcard, Ed25519 and RSA); one test ends with a real TLS handshake of
the gateway's own client stream against `openssl s_server` on loopback.
"""
from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from gateway.dest.dane import (DANE_EE, DANE_ENCRYPT, DANE_MISMATCH, DANE_NO_TLSA, DANE_TA,
                               TLSA, HostAnswer, check, rrset_digest, spki_der, tlsa_bases,
                               tlsa_qname, usable)
from gateway.tls.context import client_context
from gateway.tls.profiles import PREDEFINED
from gateway.tls.stream import TLSStream

NOW = datetime.now(timezone.utc)
DER = serialization.Encoding.DER


# --- certificates ----------------------------------------------------------------------------

def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(cn, key, issuer=None, *, sans=("mx.example.net",), ca=False, days=(-1, 30),
              key_usage=None, issuer_name=None):
    """A certificate for *key* named CN=*cn* (DNS SANs *sans*, none if empty), signed by
    *issuer* = (cert, key) or self-signed; *days* the validity window around NOW."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key = issuer[1] if issuer else key
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer_name or (issuer[0].subject if issuer else name))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW + timedelta(days=days[0]))
               .not_valid_after(NOW + timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    algorithm = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer_key, algorithm)


def spki(cert) -> bytes:
    return cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def tlsa(usage, selector, mtype, cert) -> TLSA:
    raw = cert.public_bytes(DER) if selector == 0 else spki(cert)
    data = {0: raw, 1: hashlib.sha256(raw).digest(), 2: hashlib.sha512(raw).digest()}[mtype]
    return TLSA(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki():
    """root → intermediate → leaf (mx.example.net), plus the keys, made once."""
    root_key, inter_key, leaf_key = ec_key(), ec_key(), ec_key()
    root = make_cert("Test Root", root_key, ca=True, sans=())
    inter = make_cert("Test Intermediate", inter_key, (root, root_key), ca=True, sans=())
    leaf = make_cert("mx.example.net", leaf_key, (inter, inter_key))
    return SimpleNamespace(root=root, root_key=root_key, inter=inter, inter_key=inter_key,
                           leaf=leaf, leaf_key=leaf_key)


def leaf_under(pki, **kw):
    """Another leaf signed by the intermediate."""
    return make_cert(kw.pop("cn", "mx.example.net"), ec_key(), (pki.inter, pki.inter_key), **kw)


def ta_check(records, chain, base="mx.example.net", mx=None, **kw):
    return check(records, chain, base_domain=base, mx_name=mx, now=NOW, **kw)


# --- which records are usable ----------------------------------------------------------------

@pytest.mark.parametrize("record, is_usable", [
    (TLSA(3, 1, 1, bytes(32)), True),
    (TLSA(3, 0, 1, bytes(32)), True),
    (TLSA(2, 1, 2, bytes(64)), True),
    (TLSA(2, 0, 0, b"\x30\x03\x02\x01\x00"), True),
    (TLSA(0, 1, 1, bytes(32)), False),          # PKIX-TA
    (TLSA(1, 1, 1, bytes(32)), False),          # PKIX-EE
    (TLSA(4, 1, 1, bytes(32)), False),          # unknown usage
    (TLSA(3, 2, 1, bytes(32)), False),          # unknown selector
    (TLSA(3, 1, 3, bytes(32)), False),          # unknown matching type
    (TLSA(3, 1, 1, bytes(31)), False),          # SHA-256 digest one octet short
    (TLSA(3, 1, 1, bytes(33)), False),          # ... one too long
    (TLSA(3, 1, 2, bytes(32)), False),          # SHA-512 with a SHA-256-sized digest
    (TLSA(3, 1, 0, b""), False),                # Full with no data
])
def test_usable_records_are_dane_ta_and_ee_with_known_fields_and_digest_sizes(record, is_usable):
    assert record.usable is is_usable
    assert usable([record]) == ([record] if is_usable else [])


# --- DANE-EE ---------------------------------------------------------------------------------

@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_in_every_selector_and_matching_type(pki, selector, mtype):
    chain = [pki.leaf, pki.inter]
    result = ta_check([tlsa(3, selector, mtype, pki.leaf)], chain)
    assert (result.result, result.depth) == (DANE_EE, 0)
    assert result.authenticated and result.ok
    # one bit off: no match
    record = tlsa(3, selector, mtype, pki.leaf)
    wrong = TLSA(3, selector, mtype, record.data[:-1] + bytes([record.data[-1] ^ 1]))
    assert ta_check([wrong], chain).result == DANE_MISMATCH


def test_dane_ee_checks_neither_names_nor_dates(pki):
    expired = make_cert("other.example.org", ec_key(), sans=("other.example.org",),
                        days=(-30, -1))                         # self-signed, expired, wrong name
    result = ta_check([tlsa(3, 1, 1, expired)], [expired])
    assert result.result == DANE_EE, result.detail


def test_dane_ee_matches_the_leaf_only(pki):
    # a DANE-EE record of the intermediate the server sent does not authenticate the leaf
    result = ta_check([tlsa(3, 1, 1, pki.inter), tlsa(3, 0, 1, pki.inter)], [pki.leaf, pki.inter])
    assert result.result == DANE_MISMATCH
    assert not result.ok


def test_sha512_and_full_records_match_as_well_as_sha256(pki):
    for record in (tlsa(3, 1, 2, pki.leaf), tlsa(3, 0, 0, pki.leaf), tlsa(3, 1, 0, pki.leaf)):
        assert ta_check([record], [pki.leaf]).result == DANE_EE


# --- DANE-TA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ta_matches_an_issuer_the_server_sent(pki, selector, mtype):
    result = ta_check([tlsa(2, selector, mtype, pki.inter)], [pki.leaf, pki.inter])
    assert (result.result, result.depth) == (DANE_TA, 1), result.detail
    # the root sent as well, and named by the record: the path is walked two steps
    result = ta_check([tlsa(2, selector, mtype, pki.root)], [pki.leaf, pki.inter, pki.root])
    assert (result.result, result.depth) == (DANE_TA, 2), result.detail


def test_dane_ta_chain_out_of_order_is_walked_by_issuer(pki):
    result = ta_check([tlsa(2, 1, 1, pki.root)], [pki.leaf, pki.root, pki.inter])
    assert (result.result, result.depth) == (DANE_TA, 2), result.detail


def test_dane_ta_key_need_not_be_sent_when_the_record_carries_it(pki):
    chain = [pki.leaf, pki.inter]              # the root is not sent
    for record in (tlsa(2, 1, 0, pki.root), tlsa(2, 0, 0, pki.root)):
        result = ta_check([record], chain)
        assert (result.result, result.depth) == (DANE_TA, 2), result.detail
    # the issuer of the leaf itself, not sent: the key signs the leaf (depth 1)
    result = ta_check([tlsa(2, 1, 0, pki.inter)], [pki.leaf])
    assert (result.result, result.depth) == (DANE_TA, 1), result.detail
    # a digest can't be checked against a key nobody sent
    for record in (tlsa(2, 1, 1, pki.root), tlsa(2, 1, 2, pki.root), tlsa(2, 0, 1, pki.root)):
        assert ta_check([record], chain).result == DANE_MISMATCH
    # a full key that signs nothing in the chain
    stranger = make_cert("Other Root", ec_key(), ca=True, sans=())
    assert ta_check([tlsa(2, 1, 0, stranger)], chain).result == DANE_MISMATCH


def test_dane_ta_does_not_match_the_leaf(pki):
    # a DANE-TA record is about an issuer: one naming the leaf itself does not authenticate it
    result = ta_check([tlsa(2, 0, 1, pki.leaf), tlsa(2, 1, 1, pki.leaf)], [pki.leaf, pki.inter])
    assert result.result == DANE_MISMATCH


def test_dane_ta_needs_the_dates_of_the_path_to_hold(pki):
    record = tlsa(2, 1, 1, pki.inter)
    expired = leaf_under(pki, days=(-30, -1))
    future = leaf_under(pki, days=(1, 30))
    for leaf in (expired, future):
        result = ta_check([record], [leaf, pki.inter])
        assert result.result == DANE_MISMATCH
        assert "validity" in result.detail
    # an expired intermediate under a root TA
    old_key = ec_key()
    old_inter = make_cert("Old Intermediate", old_key, (pki.root, pki.root_key), ca=True,
                          sans=(), days=(-30, -1))
    leaf = make_cert("mx.example.net", ec_key(), (old_inter, old_key))
    result = ta_check([tlsa(2, 1, 1, pki.root)], [leaf, old_inter, pki.root])
    assert result.result == DANE_MISMATCH and "validity" in result.detail
    # and the TA certificate itself (2 0 0, not sent)
    old_root_key = ec_key()
    old_root = make_cert("Old Root", old_root_key, ca=True, sans=(), days=(-30, -1))
    leaf = make_cert("mx.example.net", ec_key(), (old_root, old_root_key), days=(-30, 30))
    assert ta_check([tlsa(2, 0, 0, old_root)], [leaf]).result == DANE_MISMATCH
    # the same at a time when all of them were valid
    assert check([tlsa(2, 0, 0, old_root)], [leaf], base_domain="mx.example.net",
                 now=NOW - timedelta(days=2)).result == DANE_TA


def test_dane_ta_needs_signatures_and_issuer_names_that_link(pki):
    # an impostor intermediate with the real one's name but another key
    fake_key = ec_key()
    fake_inter = make_cert("Test Intermediate", fake_key, (pki.root, pki.root_key), ca=True,
                           sans=())
    forged = make_cert("mx.example.net", ec_key(), (fake_inter, fake_key))
    # the leaf signed by the impostor, the real intermediate (the TA) sent after it
    result = ta_check([tlsa(2, 1, 1, pki.inter)], [forged, pki.inter])
    assert result.result == DANE_MISMATCH
    # a leaf whose issuer name is not the TA's subject, though the TA key signed it
    renamed = make_cert("mx.example.net", ec_key(), (pki.inter, pki.inter_key),
                        issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "X")]))
    assert ta_check([tlsa(2, 1, 1, pki.inter)], [renamed, pki.inter]).result == DANE_MISMATCH
    # not sent: a 2 0 0 certificate must also be the issuer by name; a 2 1 0 key is a bare key
    assert ta_check([tlsa(2, 0, 0, pki.inter)], [renamed]).result == DANE_MISMATCH
    assert ta_check([tlsa(2, 1, 0, pki.inter)], [renamed]).result == DANE_TA
    # nothing above the leaf sent and no full key in the record
    assert ta_check([tlsa(2, 1, 1, pki.inter)], [pki.leaf]).result == DANE_MISMATCH


def test_dane_ta_needs_intermediates_that_are_cas(pki):
    not_ca_key = ec_key()
    not_ca = make_cert("Not A CA", not_ca_key, (pki.root, pki.root_key), ca=False, sans=())
    leaf = make_cert("mx.example.net", ec_key(), (not_ca, not_ca_key))
    result = ta_check([tlsa(2, 1, 1, pki.root)], [leaf, not_ca, pki.root])
    assert result.result == DANE_MISMATCH and "not a CA" in result.detail
    no_sign_key = ec_key()
    no_sign = make_cert("No certSign", no_sign_key, (pki.root, pki.root_key), ca=True, sans=(),
                        key_usage=x509.KeyUsage(True, False, False, False, False, False, False,
                                                False, False))
    leaf = make_cert("mx.example.net", ec_key(), (no_sign, no_sign_key))
    assert ta_check([tlsa(2, 1, 1, pki.root)], [leaf, no_sign, pki.root]).result == DANE_MISMATCH
    # the intermediate itself as the TA: trusted as named, the walk stops there
    assert ta_check([tlsa(2, 1, 1, not_ca)], [make_cert(
        "mx.example.net", ec_key(), (not_ca, not_ca_key)), not_ca]).result == DANE_TA


def test_dane_ta_leaf_names_match_the_base_domain_or_the_mx_name(pki):
    record = tlsa(2, 1, 1, pki.inter)
    chain = [pki.leaf, pki.inter]             # the leaf names mx.example.net
    assert ta_check([record], chain, base="mx.example.net").result == DANE_TA
    assert ta_check([record], chain, base="MX.Example.NET.").result == DANE_TA
    # a CNAME'd MX: base is the expanded name, the original MX name is on the certificate
    assert ta_check([record], chain, base="host.provider.example",
                    mx="mx.example.net").result == DANE_TA
    result = ta_check([record], chain, base="host.provider.example", mx="mail.example.net")
    assert result.result == DANE_MISMATCH and "mx.example.net" in result.detail


@pytest.mark.parametrize("reference, matches", [
    ("mx.example.net", True),
    ("MX.EXAMPLE.NET", True),
    ("example.net", False),              # the wildcard stands for one label, not none
    ("a.mx.example.net", False),         # ... nor two
])
def test_dane_ta_wildcard_matches_one_leftmost_label(pki, reference, matches):
    leaf = leaf_under(pki, cn="wildcard", sans=("*.example.net",))
    result = ta_check([tlsa(2, 0, 1, pki.inter)], [leaf, pki.inter], base=reference)
    assert result.result == (DANE_TA if matches else DANE_MISMATCH)


def test_dane_ta_wildcards_only_as_a_whole_label_under_two(pki):
    for pattern in ("m*.example.net", "*.net", "mx.*.net"):
        leaf = leaf_under(pki, cn="x", sans=(pattern,))
        result = ta_check([tlsa(2, 1, 1, pki.inter)], [leaf, pki.inter], base="mx.example.net")
        assert result.result == DANE_MISMATCH, pattern


def test_dane_ta_reads_the_cn_only_without_dns_names(pki):
    record = tlsa(2, 1, 1, pki.inter)
    cn_only = leaf_under(pki, cn="mx.example.net", sans=())
    assert ta_check([record], [cn_only, pki.inter]).result == DANE_TA
    cn_and_other_san = leaf_under(pki, cn="mx.example.net", sans=("other.example.net",))
    assert ta_check([record], [cn_and_other_san, pki.inter]).result == DANE_MISMATCH


def test_dane_ta_with_ed25519_and_rsa_chains():
    for make_key in (ed25519.Ed25519PrivateKey.generate,
                     lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)):
        ca_key = make_key()
        ca = make_cert("Key Test CA", ca_key, ca=True, sans=())
        leaf = make_cert("mx.example.net", ec_key(), (ca, ca_key))
        assert ta_check([tlsa(2, 1, 1, ca)], [leaf, ca]).result == DANE_TA
        assert ta_check([tlsa(2, 1, 0, ca)], [leaf]).result == DANE_TA


# --- no usable records -----------------------------------------------------------------------

def test_pkix_usages_are_ignored_and_leave_tls_mandatory_unauthenticated(pki):
    chain = [pki.leaf, pki.inter]
    pkix = [tlsa(0, 1, 1, pki.inter), tlsa(1, 1, 1, pki.leaf)]     # they would match
    result = ta_check(pkix, chain)
    assert result.result == DANE_ENCRYPT and result.ok and not result.authenticated
    assert ta_check(pkix, chain, require_usable=True).result == DANE_NO_TLSA
    # with a usable record that does not match, the matching PKIX ones don't help
    result = ta_check(pkix + [tlsa(3, 1, 1, pki.inter)], chain)
    assert result.result == DANE_MISMATCH


def test_malformed_digests_are_unusable(pki):
    chain = [pki.leaf, pki.inter]
    good = tlsa(3, 1, 1, pki.leaf)
    truncated = TLSA(3, 1, 1, good.data[:31])
    sha512_short = TLSA(3, 1, 2, hashlib.sha256(spki(pki.leaf)).digest())   # a 256-bit value
    assert ta_check([truncated, sha512_short], chain).result == DANE_ENCRYPT
    assert ta_check([truncated, good], chain).result == DANE_EE


def test_no_records_is_no_tlsa(pki):
    result = ta_check([], [pki.leaf])
    assert result.result == DANE_NO_TLSA and not result.ok


# --- inputs ----------------------------------------------------------------------------------

def test_chains_as_der_cryptography_or_pyopenssl(pki):
    record = tlsa(2, 1, 1, pki.inter)
    certs = [pki.leaf, pki.inter]
    for chain in (certs,
                  [c.public_bytes(DER) for c in certs],
                  [crypto.X509.from_cryptography(c) for c in certs]):
        assert ta_check([record], chain).result == DANE_TA
        assert ta_check([tlsa(3, 0, 1, pki.leaf)], chain).result == DANE_EE


def test_unreadable_chains_are_a_mismatch_not_an_exception(pki):
    record = tlsa(3, 1, 1, pki.leaf)
    for chain in ([], None, [b"not a certificate"], [b"\x30\x03\x02\x01\x00"], ["text"]):
        result = ta_check([record], chain)
        assert result.result == DANE_MISMATCH, chain
        assert result.detail
    # an unreadable certificate after the leaf: the leaf is still judged
    assert ta_check([record], [pki.leaf, b"junk"]).result == DANE_EE
    # a 2 x 0 record whose data is no key or certificate is skipped
    junk_key = TLSA(2, 1, 0, b"\x30\x03\x02\x01\x00")
    assert ta_check([junk_key], [pki.leaf, pki.inter]).result == DANE_MISMATCH


def test_spki_is_taken_from_the_certificate_as_encoded(pki):
    for cert in (pki.leaf, pki.root):
        assert spki_der(cert.tbs_certificate_bytes) == spki(cert)
    with pytest.raises(ValueError):
        spki_der(b"\x30\x03\x02\x01\x00")


def test_tlsa_records_from_text_wire_and_dns_objects():
    record = TLSA.from_text("3 1 1 0A0B 0c0d")
    assert record == TLSA(3, 1, 1, bytes.fromhex("0a0b0c0d"))
    assert TLSA.from_wire(b"\x02\x00\x01" + bytes(32)) == TLSA(2, 0, 1, bytes(32))
    dnspython_like = SimpleNamespace(usage=3, selector=1, mtype=2, cert=bytes(64))
    assert TLSA.of(dnspython_like) == TLSA(3, 1, 2, bytes(64))
    for bad in ("3 1 1", "3 1 x 00", "3 1 1 0g", "a b c d"):
        with pytest.raises(ValueError):
            TLSA.from_text(bad)
    with pytest.raises(ValueError):
        TLSA.from_wire(b"\x03\x01")
    assert str(TLSA(3, 1, 1, bytes(32))).startswith("3 1 1 0000")


def test_rrset_digest_ignores_order_duplicates_and_unusable_records(pki):
    a, b = tlsa(3, 1, 1, pki.leaf), tlsa(2, 0, 2, pki.inter)
    pkix = tlsa(1, 1, 1, pki.leaf)
    assert rrset_digest([a, b]) == rrset_digest([b, pkix, a, a])
    assert rrset_digest([a]) != rrset_digest([a, b])


# --- the TLSA base ---------------------------------------------------------------------------

def test_tlsa_base_is_the_secure_expanded_name_then_the_original():
    assert tlsa_bases(HostAnswer("MX.Example.NET.", True, True)) == ("mx.example.net",)
    cname = HostAnswer("mx.example.net", True, True, expanded="host.provider.example.")
    assert tlsa_bases(cname) == ("host.provider.example", "mx.example.net")
    same = HostAnswer("mx.example.net", True, True, expanded="mx.example.net")
    assert tlsa_bases(same) == ("mx.example.net",)
    # implicit MX: the host is the domain itself
    assert tlsa_bases(HostAnswer("example.org", True, True)) == ("example.org",)
    # no DANE unless the MX and the address answers were validated
    assert tlsa_bases(HostAnswer("mx.example.net", False, True)) == ()
    assert tlsa_bases(HostAnswer("mx.example.net", True, False,
                                 expanded="host.provider.example")) == ()
    assert tlsa_bases(HostAnswer(".", True, True)) == ()
    assert tlsa_qname("MX.example.net.") == "_25._tcp.mx.example.net"
    assert tlsa_qname("mx.example.net", 2525) == "_2525._tcp.mx.example.net"


# --- end to end: a real handshake ------------------------------------------------------------

@pytest.mark.peers
async def test_the_chain_a_real_handshake_presents_is_matched(pki, tmp_path):
    """`openssl s_server` serves leaf + intermediate; the gateway's own client stream
    handshakes with it; the chain it got matches a 3 1 1 record computed from the certificate
    file (with openssl, not with our code) and a 2 1 1 of the intermediate, and not wrong ones."""
    leaf_pem, key_pem, chain_pem = (tmp_path / n for n in ("leaf.pem", "key.pem", "chain.pem"))
    leaf_pem.write_bytes(pki.leaf.public_bytes(serialization.Encoding.PEM))
    chain_pem.write_bytes(pki.inter.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(pki.leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    # the 3 1 1 data as an operator computes it for the zone
    spki_out = subprocess.run(
        f"openssl x509 -in {leaf_pem} -noout -pubkey | openssl pkey -pubin -outform DER "
        "| openssl dgst -sha256 -binary", shell=True, check=True, capture_output=True,
        timeout=10).stdout
    assert len(spki_out) == 32

    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        for listener in listeners:
            await listener.aclose()
        proc = await trio.lowlevel.open_process(
            ["openssl", "s_server", "-naccept", "1", "-accept", f"127.0.0.1:{port}",
             "-cert", str(leaf_pem), "-key", str(key_pem), "-cert_chain", str(chain_pem)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            seen = b""
            while b"ACCEPT" not in seen:        # s_server says so once it listens
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"s_server exited: {seen!r}"
                seen += chunk
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            tls = TLSStream(transport, client_context(PREDEFINED["default"]), server_side=False,
                            server_hostname="mx.example.net")
            await tls.do_handshake()
            chain = tls.peer_chain()
            await tls.aclose()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.stdout.aclose()
            await proc.stdin.aclose()

    assert [c.subject for c in chain] == [pki.leaf.subject, pki.inter.subject]
    assert check([TLSA(3, 1, 1, spki_out)], chain,
                 base_domain="mx.example.net").result == DANE_EE
    assert check([TLSA(3, 1, 1, hashlib.sha256(b"another key").digest())], chain,
                 base_domain="mx.example.net").result == DANE_MISMATCH
    assert check([tlsa(2, 1, 1, pki.inter)], chain,
                 base_domain="mx.example.net").result == DANE_TA
    assert check([tlsa(2, 1, 1, pki.inter)], chain,
                 base_domain="mail.example.org").result == DANE_MISMATCH
