"""The one place that touches pyOpenSSL's private API.

pyOpenSSL has no public call for a few things the gateway needs: a key-exchange group list,
the text of an X509_V_ERR_* code, a connection's verify result and "resumed?" flag, the
release-buffers mode, a verify callback that is a C function rather than a Python one (SPEC
§3.3: no `ffi.callback`, so W^X holds), and a look at its memory BIOs without the exception
pyOpenSSL raises when one is empty (per TLS record, on the hot path). Those go through
`OpenSSL._util`'s `lib`/`ffi` and the objects' `_context` / `_ssl` / `_into_ssl` / `_from_ssl`
attributes, which pyOpenSSL may rename in any release. Everything else in gateway/ uses the
functions below.

Supported: pyOpenSSL SUPPORTED (the same range as pyproject.toml's dependency). At import,
`self_test()` checks every private name used here and raises an ImportError that names the
pyOpenSSL version found and this range, rather than an AttributeError in the middle of a
handshake later.

Hot path: `ssl_pending`, `verify_result` and `session_reused` are the C functions themselves,
bound once at import; `mem_bio_pending` is one Python call (as the stream had before); the
stream takes a connection's pointers once, when it is made (`connection_handles`).
"""
from __future__ import annotations

from OpenSSL import SSL

# pyOpenSSL versions this module is written against; keep in step with pyproject.toml.
SUPPORTED = ">=25.0,<27"

# Names of OpenSSL._util.lib this module calls (all must exist) ...
_LIB_FUNCTIONS = (
    "BIO_get_mem_data",
    "ERR_clear_error",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set_verify",
    "SSL_get_verify_result",
    "SSL_pending",
    "SSL_session_reused",
    "X509_verify_cert_error_string",
)
# ... and of OpenSSL._util.ffi.
_FFI_FUNCTIONS = ("cast", "new", "string", "typeof")
# The C type of OpenSSL's verify callback, as pyOpenSSL's ffi declares it (set_verify_native).
VERIFY_CALLBACK_TYPE = "int (*)(int, X509_STORE_CTX *)"


def _pyopenssl_version() -> str:
    try:
        from OpenSSL.version import __version__
    except Exception:  # pragma: no cover - every release has it
        return "unknown"
    return str(__version__)


def _unsupported(what: str) -> ImportError:
    return ImportError(
        f"gateway needs pyOpenSSL {SUPPORTED}, found pyOpenSSL {_pyopenssl_version()}: "
        f"{what} (the gateway uses these pyOpenSSL internals in gateway/tls/_ossl.py); "
        f"install a supported version: pip install 'pyOpenSSL{SUPPORTED}'")


def self_test(lib=None, ffi=None, ssl_module=SSL) -> None:
    """Check every private attribute this module relies on; ImportError naming the pyOpenSSL
    version and the supported range when one is missing. (The arguments are for tests.)"""
    if lib is None or ffi is None:
        try:
            from OpenSSL._util import ffi as real_ffi, lib as real_lib
        except Exception as exc:
            raise _unsupported(f"OpenSSL._util.ffi/lib cannot be imported ({exc})") from None
        lib = real_lib if lib is None else lib
        ffi = real_ffi if ffi is None else ffi
    missing = [f"OpenSSL._util.lib.{name}" for name in _LIB_FUNCTIONS if not hasattr(lib, name)]
    missing += [f"OpenSSL._util.ffi.{name}" for name in _FFI_FUNCTIONS if not hasattr(ffi, name)]
    if hasattr(ffi, "typeof"):
        try:
            ffi.typeof(VERIFY_CALLBACK_TYPE)
        except Exception:
            missing.append(f'OpenSSL._util.ffi type "{VERIFY_CALLBACK_TYPE}"')
    try:
        ctx = ssl_module.Context(ssl_module.TLS_METHOD)
        conn = ssl_module.Connection(ctx, None)
    except Exception as exc:
        raise _unsupported(f"cannot build a Context and a memory-BIO Connection "
                           f"({type(exc).__name__}: {exc})") from None
    if not hasattr(ctx, "_context"):
        missing.append("Context._context")
    missing += [f"Connection.{name}" for name in ("_ssl", "_into_ssl", "_from_ssl")
                if getattr(conn, name, None) is None]
    if missing:
        raise _unsupported("missing " + ", ".join(missing))


self_test()

from OpenSSL._util import ffi as _ffi  # noqa: E402  (after the self-test: it names the problem)
from OpenSSL._util import lib as _lib  # noqa: E402

# --- connections (the stream's hot path) ----------------------------------------------------

ssl_pending = _lib.SSL_pending          # ssl_pending(ssl_ptr) -> plaintext bytes held (SSL*)
_BIO_get_mem_data = _lib.BIO_get_mem_data
_MEM_DATA = _ffi.new("char **")         # BIO_get_mem_data's out-parameter (its value is unused)


def connection_handles(conn: SSL.Connection):
    """(ssl_ptr, incoming_bio, outgoing_bio) of a memory-BIO *conn*: the raw pointers the
    functions here take. They live as long as *conn*; take them once per connection."""
    return conn._ssl, conn._into_ssl, conn._from_ssl


def mem_bio_pending(bio) -> int:
    """Bytes waiting in a memory BIO: asking first spares pyOpenSSL raising WantReadError
    (an exception object and an error-queue walk) every time a BIO turns out empty."""
    return _BIO_get_mem_data(bio, _MEM_DATA)


# The C functions themselves, like ssl_pending: they take the SSL* of connection_handles().
verify_result = _lib.SSL_get_verify_result     # verify_result(ssl_ptr) -> X509_V_* code (0: ok)
session_reused = _lib.SSL_session_reused       # session_reused(ssl_ptr) -> 1 when resumed


def verify_error_string(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code."""
    try:
        return _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:  # pragma: no cover - an odd code the binding refuses
        return f"certificate verify error {code}"


# --- contexts -------------------------------------------------------------------------------

# SSL_MODE_RELEASE_BUFFERS, or None where the binding lacks it (then nothing is set).
RELEASE_BUFFERS_MODE: int | None = getattr(_lib, "SSL_MODE_RELEASE_BUFFERS", None)


def set_verify_native(ctx: SSL.Context, mode: int, callback_address: int) -> None:
    """SSL_CTX_set_verify(ctx, mode, callback) with a C verify callback given by its address
    (gateway.native.scanner.VERIFY_ACCEPT_ADDRESS), cast to OpenSSL's callback type in
    pyOpenSSL's ffi.
    Unlike Context.set_verify with a Python callable, this allocates no `ffi.callback`
    (write+execute memory, refused under MemoryDenyWriteExecute) and runs no Python per
    certificate. The function must outlive the context (a loaded extension's does). Call it
    before the context makes a connection, as for Context.set_verify."""
    if not isinstance(mode, int) or not isinstance(callback_address, int) or not callback_address:
        raise TypeError("set_verify_native needs an integer mode and a non-zero address")
    _lib.SSL_CTX_set_verify(ctx._context, mode, _ffi.cast(VERIFY_CALLBACK_TYPE, callback_address))


def release_buffers(ctx: SSL.Context) -> bool:
    """Let idle connections of *ctx* free their read/write buffers; False if unavailable."""
    if RELEASE_BUFFERS_MODE is None:
        return False
    ctx.set_mode(RELEASE_BUFFERS_MODE)
    return True


def set_groups_list(ctx: SSL.Context, groups: bytes) -> bool:
    """SSL_CTX_set1_curves_list(ctx, groups): did OpenSSL accept the key-exchange group list
    (e.g. b"X25519:P-256")? On refusal the error queue is cleared, so no stale error reaches
    the next OpenSSL call. No checks of its own: the answer is OpenSSL's."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1:
        return True
    _lib.ERR_clear_error()
    return False


def groups_list_ok(text: str) -> bool:
    """Would OpenSSL accept the group list *text* (UTF-8 encoded)? Tried on a throwaway
    context, for configuration checks (OpenSSL's answer, e.g. it accepts "")."""
    try:
        encoded = text.encode()
    except (UnicodeEncodeError, AttributeError):
        return False
    return set_groups_list(SSL.Context(SSL.TLS_METHOD), encoded)
