"""The TLS contexts of every listener, built once by the supervisor before it forks.

The composition root of the TLS side: configuration, certificates and profiles in, OpenSSL
contexts out. It must not import gateway/relay/ or gateway/proto/ (the supervisor imports it;
tests/test_layering.py checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ..config import Certificate, GatewayConfig, Listener
from ..tls import context as tls_context
from ..tls.certs import demo_certificate, dns_names, load_pairs
from ..tls.profiles import clone as clone_profile
from ..tls.sni import SNISelector


def _needs_server_tls(listener: Listener) -> bool:
    if listener.tls == "implicit":
        return True
    return listener.tls == "starttls" and listener.offers_client_tls


@dataclass
class ListenerTLS:
    """A listener's TLS contexts: the client leg's (and its cipher-strength variants) and
    the upstream leg's. With several certificates (SPEC §3.4) the client leg's contexts are
    those of the first entry, and `sni` holds the selector for each (None: no cipher-strength
    variant; else the strength); empty with one certificate."""
    server_ctx: object | None
    strength_ctx: dict
    client_ctx: object
    sni: dict = field(default_factory=dict)
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


def _loaded_pairs(cert: Certificate) -> list[LoadedCertificate]:
    """Every pair of a `[certificates.X]` entry (ECDSA and its RSA pair) as loaded."""
    out = []
    for chain_path, _key_path in cert.pairs():
        with open(chain_path, "rb") as f:
            out.append(loaded_certificate(cert.name, f.read()))
    return out


def certificate_entry(cert: Certificate) -> tuple[list[tuple[str, str]], list[str]]:
    """A `[certificates.X]` entry read and checked (SPEC §3.4): its (cert path, key path)
    pairs and the DNS names it answers to (the union of its pairs' subjectAltNames).
    ValueError naming the entry when a file cannot be used or a key has the wrong type."""
    label = f"certificates.{cert.name}"
    try:
        loaded = load_pairs(label, cert.cert, cert.key, cert.rsa_cert, cert.rsa_key)
    except ValueError as exc:
        text = str(exc)
        raise ValueError(text if text.startswith(label) else f"{label}: {text}") from None
    names: list[str] = []
    for chain, _key in loaded:
        names += [n for n in dns_names(chain[0]) if n not in names]
    return cert.pairs(), names


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
        sni = {}
        loaded = []
        if _needs_server_tls(listener):
            verify_clients = listener.verifies_clients
            entries = [certificate_entry(config.certificates[name])
                       for name in listener.certificate_names]
            if not entries:
                if demo_pems is None:
                    demo_pems = demo_certificate(config.hostname)
                    log.event("demo_certificate", level="warning",
                              message="using a generated self-signed demonstration "
                                      "certificate: insecure, configure a certificate")
                make = partial(tls_context.server_context, cert_pem=demo_pems[0],
                               key_pem=demo_pems[1], request_client_cert=verify_clients)
                server_ctx = make(profile)
                loaded.append(loaded_certificate("demo", demo_pems[0]))
            else:
                make = partial(_server_contexts, entries, request_client_cert=verify_clients)
                server_ctx, sni[None] = make(profile)
                for name in listener.certificate_names:    # read once OpenSSL took them
                    loaded += _loaded_pairs(config.certificates[name])
            for strength in {r.cipher_strength for r in listener.client_rules
                             if r.is_network and r.cipher_strength}:
                narrowed = clone_profile(profile, f"{profile.name}+{strength}",
                                         cipher_strength=strength)
                if entries:
                    strength_ctx[strength], sni[strength] = make(narrowed)
                else:
                    strength_ctx[strength] = make(narrowed)
        up = listener.upstream
        up_cert = config.certificates.get(up.certificate) if up.certificate else None
        client_ctx = tls_context.client_context(
            config.profiles[up.profile], verify=listener.verifies_upstream,
            pairs=certificate_entry(up_cert)[0] if up_cert else None)
        if up_cert is not None:           # the upstream leg's client certificate
            loaded += _loaded_pairs(up_cert)
        out.append(ListenerTLS(server_ctx, strength_ctx, client_ctx,
                               {k: v for k, v in sni.items() if v is not None},
                               tuple(loaded)))
    return out, demo_pems is not None


def _server_contexts(entries, profile, *, request_client_cert: bool):
    """The server context of each certificate entry for *profile*: (the first one's, an
    SNISelector over all of them, or None when there is only one)."""
    contexts = [(tls_context.server_context(profile, pairs=pairs,
                                            request_client_cert=request_client_cert), names)
                for pairs, names in entries]
    if len(contexts) == 1:
        return contexts[0][0], None
    return contexts[0][0], SNISelector(contexts)
