"""The TLS contexts of every listener, built once by the supervisor before it forks.

The composition root of the TLS side: configuration, certificates and profiles in, OpenSSL
contexts out. It must not import gateway/relay/ or gateway/proto/ (the supervisor imports it;
tests/test_layering.py checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .config import GatewayConfig, Listener
from .tls import context as tls_context
from .tls.certs import demo_certificate
from .tls.profiles import clone as clone_profile


def _needs_server_tls(listener: Listener) -> bool:
    if listener.tls == "implicit":
        return True
    return listener.tls == "starttls" and (listener.client_tls != "none" or any(
        r.client_tls not in (None, "none") for r in listener.client_rules))


@dataclass
class ListenerTLS:
    """A listener's TLS contexts: the client leg's (and its cipher-strength variants) and
    the upstream leg's."""
    server_ctx: object | None
    strength_ctx: dict
    client_ctx: object
    certificates: tuple = ()      # LoadedCertificate of each pair loaded for this listener


@dataclass(frozen=True)
class LoadedCertificate:
    """A certificate/key pair in use, for `gateway_certificate_expiry_timestamp_seconds` and
    `/status` (SPEC §11): its name (`[certificates.X]`, or `demo`), key type, notAfter."""
    name: str
    key_type: str                 # rsa | ecdsa | ed25519 | ed448
    not_after: float              # seconds since the epoch


_KEY_TYPES = ((rsa.RSAPublicKey, "rsa"), (ec.EllipticCurvePublicKey, "ecdsa"),
              (ed25519.Ed25519PublicKey, "ed25519"), (ed448.Ed448PublicKey, "ed448"))


def loaded_certificate(name: str, pem: bytes) -> LoadedCertificate:
    """The leaf of a chain PEM as a LoadedCertificate."""
    leaf = x509.load_pem_x509_certificates(pem)[0]
    key = leaf.public_key()
    key_type = next((word for cls, word in _KEY_TYPES if isinstance(key, cls)), "other")
    return LoadedCertificate(name, key_type, leaf.not_valid_after_utc.timestamp())


def _loaded_file(name: str, path: str) -> LoadedCertificate:
    with open(path, "rb") as f:
        return loaded_certificate(name, f.read())


def build_tls(config: GatewayConfig, log) -> tuple[list[ListenerTLS], bool]:
    """Every listener's TLS contexts, and whether the demo certificate is used.

    The supervisor builds them once, before it forks, so that every worker inherits the same
    contexts: the same certificate (a demo certificate too) and the same TLS session-ticket
    keys, so a client's ticket from one worker resumes on any other. Raises on a certificate
    or key that cannot be loaded."""
    demo_pems = None
    out = []
    for listener in config.listeners:
        profile = config.profiles[listener.profile]
        server_ctx = None
        strength_ctx = {}
        loaded = []
        if _needs_server_tls(listener):
            verify_clients = listener.client_tls == "verify" or any(
                r.client_tls == "verify" for r in listener.client_rules)
            if listener.certificate is None:
                if demo_pems is None:
                    demo_pems = demo_certificate(config.hostname)
                    log.event("demo_certificate", level="warning",
                              message="using a generated self-signed demonstration "
                                      "certificate: insecure, configure a certificate")
                make = partial(tls_context.server_context, cert_pem=demo_pems[0],
                               key_pem=demo_pems[1], request_client_cert=verify_clients)
                pair = partial(loaded_certificate, "demo", demo_pems[0])
            else:
                cert = config.certificates[listener.certificate]
                make = partial(tls_context.server_context, cert_path=cert.cert,
                               key_path=cert.key, request_client_cert=verify_clients)
                pair = partial(_loaded_file, cert.name, cert.cert)
            server_ctx = make(profile)
            loaded.append(pair())           # read once OpenSSL took the pair
            for strength in {r.cipher_strength for r in listener.client_rules
                             if r.is_network and r.cipher_strength}:
                strength_ctx[strength] = make(clone_profile(
                    profile, f"{profile.name}+{strength}", cipher_strength=strength))
        up = listener.upstream
        up_cert = config.certificates.get(up.certificate) if up.certificate else None
        verify_upstream = up.tls == "verify" or any(
            r.recipient_encryption == "verify" for r in listener.rules)
        client_ctx = tls_context.client_context(
            config.profiles[up.profile], verify=verify_upstream,
            cert_path=up_cert.cert if up_cert else None,
            key_path=up_cert.key if up_cert else None)
        if up_cert is not None:           # the upstream leg's client certificate
            loaded.append(_loaded_file(up_cert.name, up_cert.cert))
        out.append(ListenerTLS(server_ctx, strength_ctx, client_ctx, tuple(loaded)))
    return out, demo_pems is not None
