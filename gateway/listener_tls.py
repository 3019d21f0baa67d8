"""The TLS contexts of every listener, built once by the supervisor before it forks.

The composition root of the TLS side: configuration, certificates and profiles in, OpenSSL
contexts out. It must not import gateway/relay/ or gateway/proto/ (the supervisor imports it;
tests/test_layering.py checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

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
            else:
                cert = config.certificates[listener.certificate]
                make = partial(tls_context.server_context, cert_path=cert.cert,
                               key_path=cert.key, request_client_cert=verify_clients)
            server_ctx = make(profile)
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
        out.append(ListenerTLS(server_ctx, strength_ctx, client_ctx))
    return out, demo_pems is not None
