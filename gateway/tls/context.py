"""Profiles → OpenSSL contexts (SPEC §3).

Every context is built once at start-up (or reload) and shared by all connections of a
listener / upstream; building one validates the profile, so a bad cipher string or group list
fails the start with a ValueError that names it.

Certificate verification never fails a handshake here. The verify callback accepts every
chain; the TLS stream turns what OpenSSL found into `TLSInfo.verified` / `verify_error`, so the
SMTP layer can answer with a reply (`421 4.7.1`, `451 4.7.5`) instead of the peer seeing a bare
TLS alert. A context built with verification therefore must only be used through
gateway.tls.stream.TLSStream, which reads the outcome.

No Python callbacks inside OpenSSL (SPEC §3.3): with the native core the callback is the C
function `gw_verify_accept` (_native/verify.c), and the outcome is OpenSSL's own verify result
(`SSL_get_verify_result`: the last error the chain check found, as `openssl s_client` reports
it). A Python callback is a cffi `ffi.callback`, which needs write+execute memory and fails
under systemd's MemoryDenyWriteExecute=yes / PR_SET_MDWE. Only the pure-Python fallback uses
one (`_record_verify`); pyOpenSSL then resets OpenSSL's result, so the callback records the last
error in the connection's `VerifyState` instead, giving the same text. NATIVE_VERIFY says which
is in use (`gateway check` warns that W^X will not hold when it is False).
"""
from __future__ import annotations

import os

from OpenSSL import SSL

from . import _ossl
from ..native.scanner import VERIFY_ACCEPT_ADDRESS
from ._ossl import verify_error_string
from .certs import load_pem_bytes, load_pem_files
from .profiles import Profile, validate_profile

PROTOCOL_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

# The session-id context: OpenSSL refuses to resume a session on a server that verifies peers
# unless one is set.
_SESSION_ID_CONTEXT = b"mail-tls-gateway"


class VerifyState:
    """What the Python verify callback saw on one connection (its app data; pure-Python
    fallback only: with the native core nothing is recorded and OpenSSL's result is read)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        # the text of the last error the chain check reported: what SSL_get_verify_result gives
        # when the callback does not reset it (pyOpenSSL's wrapper does)
        self.error: str | None = None


def _record_verify(conn: SSL.Connection, cert, errno: int, depth: int, ok: int) -> bool:
    """Python verify callback (pure-Python fallback): never fails the handshake, records the
    outcome instead."""
    if not ok:
        state = conn.get_app_data()
        if isinstance(state, VerifyState):
            state.error = verify_error_string(errno)
    return True


# The C verify callback's address, or None without the native core (then _record_verify).
_VERIFY_ACCEPT_ADDRESS = VERIFY_ACCEPT_ADDRESS
NATIVE_VERIFY = _VERIFY_ACCEPT_ADDRESS is not None


def _set_verify_accepting(ctx: SSL.Context, mode: int) -> None:
    """Verify peers with *mode*, accepting every chain (see the module docstring)."""
    if _VERIFY_ACCEPT_ADDRESS is not None:
        _ossl.set_verify_native(ctx, mode, _VERIFY_ACCEPT_ADDRESS)
    else:
        try:
            ctx.set_verify(mode, _record_verify)
        except MemoryError:        # cffi: "Cannot allocate write+execute memory for ..."
            raise ValueError(
                "certificate verification without the native core needs a Python callback "
                "inside OpenSSL, and its write+execute memory was refused (W^X: systemd "
                "MemoryDenyWriteExecute=yes or PR_SET_MDWE); install the native core "
                "(gateway --version says which core is in use)") from None


def _openssl_reason(exc: Exception) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        parts = [str(err[-1]) for err in args[0] if isinstance(err, tuple) and err]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__


def _base_context(profile: Profile, *, server: bool) -> SSL.Context:
    validate_profile(profile)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(PROTOCOL_VERSIONS[profile.min_version])
    ctx.set_max_proto_version(PROTOCOL_VERSIONS[profile.max_version])
    options = (SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION
               | SSL.OP_NO_RENEGOTIATION)
    if server:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    if not profile.session_resumption:
        options |= SSL.OP_NO_TICKET
    ctx.set_options(options)
    _ossl.release_buffers(ctx)                      # idle connections hold less memory

    try:
        ctx.set_cipher_list(profile.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as exc:
        raise ValueError(f'profile {profile.name}: OpenSSL cannot apply ciphers = '
                         f'"{profile.ciphers}" ({_openssl_reason(exc)})') from None
    if hasattr(ctx, "set_tls13_ciphersuites"):
        try:
            ctx.set_tls13_ciphersuites(profile.ciphersuites.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError) as exc:
            raise ValueError(f'profile {profile.name}: OpenSSL cannot apply ciphersuites = '
                             f'"{profile.ciphersuites}" ({_openssl_reason(exc)})') from None
    apply_groups(ctx, profile.groups, profile_name=profile.name)
    ctx.set_verify_depth(profile.verify_depth)

    if server:
        ctx.set_session_id(_SESSION_ID_CONTEXT)
        if profile.session_resumption:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        else:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def apply_groups(ctx: SSL.Context, groups: str, *, profile_name: str = "?") -> None:
    """Restrict the key-exchange groups of *ctx* (pyOpenSSL has no public call for a list)."""
    try:
        encoded = groups.encode("ascii")
    except UnicodeEncodeError:
        encoded = None
    if not encoded or b"\0" in encoded:
        raise ValueError(f'profile {profile_name}: OpenSSL cannot apply groups = "{groups}"')
    if not _ossl.set_groups_list(ctx, encoded):
        raise ValueError(f'profile {profile_name}: OpenSSL cannot apply groups = "{groups}" '
                         f"(unknown or unsupported group name in the list)")


def _use_certificate(ctx: SSL.Context, chain, key) -> None:
    """A certificate from memory (the demonstration one): its chain, if any, is context-wide."""
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    ctx.check_privatekey()


def _use_pairs(ctx: SSL.Context, pairs, what: str) -> None:
    """Certificate/key pairs from files, each with its own chain (SPEC §3.4): OpenSSL keeps one
    certificate per key type and `use_certificate_chain_file` attaches the file's chain to the
    certificate just set, so an ECDSA and an RSA pair each carry theirs (no context-wide extra
    chain). OpenSSL then serves the ECDSA pair to clients that support it, RSA to the rest."""
    for cert_path, key_path in pairs:
        _chain, key = load_pem_files(cert_path, key_path)      # readable messages first
        try:
            ctx.use_certificate_chain_file(os.fsencode(cert_path))
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise ValueError(f"OpenSSL cannot use the {what} {os.fspath(cert_path)} and key "
                             f"{os.fspath(key_path)} ({_openssl_reason(exc)})") from None


def _load_verify_locations(ctx: SSL.Context, profile: Profile) -> None:
    try:
        ctx.load_verify_locations(profile.ca_file, profile.ca_path)
    except SSL.Error as exc:
        where = " and ".join(
            f"{k} {v}" for k, v in (("ca_file", profile.ca_file), ("ca_path", profile.ca_path))
            if v)
        raise ValueError(f"profile {profile.name}: cannot load CA certificates from {where} "
                         f"({_openssl_reason(exc)})") from None


def server_context(profile: Profile, cert_path=None, key_path=None, *, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None, pairs=None,
                   request_client_cert: bool = False) -> SSL.Context:
    """A context for the client leg, where the gateway is the TLS server.

    The certificate comes from files (*cert_path* chain PEM, *key_path*; or *pairs*, a list of
    (chain PEM path, key PEM path) of different key types, e.g. ECDSA and RSA) or from memory
    (*cert_pem*, *key_pem*, e.g. the demo certificate). With *request_client_cert* (client
    level `verify`) a certificate is requested but not required, and checked against the
    profile's ``ca_file``/``ca_path`` (one of them is mandatory).
    """
    ctx = _base_context(profile, server=True)
    if cert_path is not None or key_path is not None:
        if cert_path is None or key_path is None:
            raise ValueError("a server certificate needs both a certificate and a key file")
        if cert_pem is not None or key_pem is not None or pairs is not None:
            raise ValueError("give the server certificate as files or as PEM data, not both")
        pairs = [(cert_path, key_path)]
    if pairs is not None:
        if not pairs:
            raise ValueError("a server context needs a certificate and its key")
        _use_pairs(ctx, pairs, "server certificate")
    elif cert_pem is not None and key_pem is not None:
        chain, key = load_pem_bytes(cert_pem, key_pem)
        try:
            _use_certificate(ctx, chain, key)
        except SSL.Error as exc:
            raise ValueError(f"OpenSSL cannot use the server certificate and key "
                             f"({_openssl_reason(exc)})") from None
    else:
        raise ValueError("a server context needs a certificate and its key")

    if request_client_cert:
        if not profile.ca_file and not profile.ca_path:
            raise ValueError(f"profile {profile.name}: verifying client certificates needs "
                             f"ca_file or ca_path (the system CA store would accept any "
                             f"public certificate)")
        _load_verify_locations(ctx, profile)
        if profile.ca_file:
            try:                          # the CA names sent in the CertificateRequest
                ctx.load_client_ca(os.fsencode(profile.ca_file))
            except SSL.Error:
                pass
        _set_verify_accepting(ctx, SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def client_context(profile: Profile, *, verify: bool = False, cert_path=None,
                   key_path=None, pairs=None) -> SSL.Context:
    """A context for the upstream leg, where the gateway is the TLS client.

    With *verify* the server's chain is checked against the profile's ``ca_file``/``ca_path``
    or, when it names neither, the system's default CA store; the name check is the stream's
    (``verify_hostname``). An optional client certificate (*cert_path*, *key_path*) is
    presented when the server asks for one (*pairs*: several of different key types, OpenSSL
    presents the one the server's signature algorithms allow).
    """
    ctx = _base_context(profile, server=False)
    if cert_path is not None or key_path is not None:
        if cert_path is None or key_path is None:
            raise ValueError("a client certificate needs both a certificate and a key file")
        pairs = [(cert_path, key_path)]
    if pairs:
        _use_pairs(ctx, pairs, "client certificate")
    if verify:
        if profile.ca_file or profile.ca_path:
            _load_verify_locations(ctx, profile)
        else:
            try:
                ctx.set_default_verify_paths()
            except SSL.Error as exc:
                raise ValueError(f"cannot load the system CA certificates "
                                 f"({_openssl_reason(exc)})") from None
        _set_verify_accepting(ctx, SSL.VERIFY_PEER)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx
