"""Certificates (SPEC §3.4): the self-signed demonstration certificate and PEM loading.

Everything here uses `cryptography` objects (pyOpenSSL's X509/PKey classes are deprecated);
gateway.tls.context hands them to OpenSSL.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEMO_CERT_NAME = "cert.pem"
DEMO_KEY_NAME = "key.pem"
DEMO_VALIDITY_DAYS = 365

_SUPPORTED_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                   ed448.Ed448PrivateKey)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        name = name.encode("idna").decode("ascii")
    return x509.DNSName(name.lower())


def demo_certificate(hostname: str) -> tuple[bytes, bytes]:
    """A fresh self-signed ECDSA P-256 certificate for *hostname*: (cert PEM, key PEM).

    The subjectAltName holds *hostname*, ``localhost`` and ``127.0.0.1``. It is insecure by
    design (nobody vouches for it); the caller warns about it.
    """
    if not hostname:
        raise ValueError("demo certificate: a hostname is needed")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for candidate in (hostname, "localhost", "127.0.0.1"):
        gn = _general_name(candidate)
        if gn not in names:
            names.append(gn)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mail TLS gateway demonstration"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=DEMO_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def write_demo_certificate(directory, hostname: str) -> tuple[str, str]:
    """Write a demo certificate to *directory* (``cert.pem``, ``key.pem`` mode 0600).

    Returns the two paths (certificate, key) as strings.
    """
    directory = Path(directory)
    cert_pem, key_pem = demo_certificate(hostname)
    cert_path = directory / DEMO_CERT_NAME
    key_path = directory / DEMO_KEY_NAME
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # an existing file keeps its old mode otherwise
        os.write(fd, key_pem)
    finally:
        os.close(fd)
    cert_path.write_bytes(cert_pem)
    return str(cert_path), str(key_path)


def _same_public_key(cert: x509.Certificate, key) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def load_pem_bytes(cert_pem: bytes, key_pem: bytes, *, cert_source: str = "the certificate PEM",
                   key_source: str = "the private key PEM") -> tuple[list[x509.Certificate], object]:
    """Parse a chain PEM and a key PEM; (certificates leaf first, private key).

    Raises ValueError saying what is wrong (no certificate, unparsable or encrypted key, key
    that does not belong to the certificate).
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"{cert_source}: no PEM certificate found (not PEM, or damaged)") \
            from None
    if not chain:
        raise ValueError(f"{cert_source}: no PEM certificate found")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"{key_source}: the private key is encrypted; "
                         f"an unencrypted key is needed") from None
    except Exception as exc:  # ValueError, or UnsupportedAlgorithm for odd key types
        raise ValueError(f"{key_source}: not a usable PEM private key ({exc})") from None
    if not isinstance(key, _SUPPORTED_KEYS):
        raise ValueError(f"{key_source}: unsupported private key type "
                         f"{type(key).__name__}")
    if not _same_public_key(chain[0], key):
        raise ValueError(f"{key_source} does not match {cert_source} "
                         f"(the private key belongs to another certificate)")
    return chain, key


def load_pem_files(cert_path, key_path) -> tuple[list[x509.Certificate], object]:
    """Read and parse a chain PEM file and a key PEM file; see load_pem_bytes."""
    contents = []
    for what, path in (("certificate", cert_path), ("key", key_path)):
        try:
            with open(path, "rb") as f:
                contents.append(f.read())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ValueError(f"cannot read {what} file {os.fspath(path)}: {reason}") from None
    return load_pem_bytes(contents[0], contents[1],
                          cert_source=f"certificate file {os.fspath(cert_path)}",
                          key_source=f"key file {os.fspath(key_path)}")


def key_type(key) -> str:
    """"ECDSA", "RSA", "Ed25519" or "Ed448" for a private key of _SUPPORTED_KEYS."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    return "Ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "Ed448"


def load_pairs(label: str, cert_path, key_path, rsa_cert=None, rsa_key=None
               ) -> list[tuple[list[x509.Certificate], object]]:
    """A certificate entry's pairs (SPEC §3.4): the cert/key pair and, if given, the RSA pair
    beside it, each (chain leaf first, key), loaded and checked. *label* names the entry in
    the messages (``certificates.main``).

    ValueError when a file cannot be used (see load_pem_files), and when an RSA pair is given
    for a cert/key pair that is not ECDSA, or the rsa_ pair is not RSA."""
    pairs = [load_pem_files(cert_path, key_path)]
    if rsa_cert is None and rsa_key is None:
        return pairs
    main = key_type(pairs[0][1])
    if main != "ECDSA":
        raise ValueError(f"{label}.rsa_cert: an RSA pair goes beside an ECDSA cert/key pair, "
                         f"but key file {os.fspath(key_path)} is an {main} key (put the RSA "
                         f"pair under cert/key alone)")
    pairs.append(load_pem_files(rsa_cert, rsa_key))
    second = key_type(pairs[1][1])
    if second != "RSA":
        raise ValueError(f"{label}.rsa_key: key file {os.fspath(rsa_key)} is an {second} key; "
                         f"rsa_cert/rsa_key take an RSA pair")
    return pairs


def dns_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName DNS names of *cert*, lower-cased, without a trailing dot."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]
