"""gateway.tls._ossl: the one module on pyOpenSSL's private API, its import-time self-test and
each of its functions, over pairs of memory-BIO pyOpenSSL connections."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL.version import __version__ as PYOPENSSL_VERSION

import gateway
from gateway.tls import _ossl

ROOT = Path(__file__).resolve().parent.parent


# --- the self-test ---------------------------------------------------------------------------

def _real_lib():
    from OpenSSL._util import lib
    return lib


class _LibWithout:
    """OpenSSL._util.lib without one name."""

    def __init__(self, missing: str):
        self._missing = missing

    def __getattr__(self, name):
        if name == self._missing:
            raise AttributeError(name)
        return getattr(_real_lib(), name)


def test_self_test_passes_on_the_installed_pyopenssl():
    _ossl.self_test()


@pytest.mark.parametrize("name", _ossl._LIB_FUNCTIONS)
def test_self_test_names_a_missing_lib_function_the_version_and_the_range(name):
    with pytest.raises(ImportError) as info:
        _ossl.self_test(lib=_LibWithout(name))
    message = str(info.value)
    assert f"OpenSSL._util.lib.{name}" in message
    assert f"found pyOpenSSL {PYOPENSSL_VERSION}" in message
    assert "pyOpenSSL>=25.0,<27" in message


def test_self_test_names_a_missing_ffi_function():
    with pytest.raises(ImportError, match=r"missing OpenSSL\._util\.ffi\.string"):
        _ossl.self_test(ffi=types.SimpleNamespace(new=object, cast=object, typeof=str))


def test_self_test_names_a_verify_callback_type_the_ffi_lacks():
    def typeof(name):
        raise Exception(f"unknown type {name}")       # cffi's FFIError is an Exception

    with pytest.raises(ImportError,
                       match=r'missing OpenSSL\._util\.ffi type "int \(\*\)\(int, '
                             r'X509_STORE_CTX \*\)"'):
        _ossl.self_test(ffi=types.SimpleNamespace(new=object, cast=object, string=str,
                                                  typeof=typeof))


def _ssl_module(context_attrs=(), connection_attrs=()):
    """A stand-in for OpenSSL.SSL whose objects lack the given private attributes."""

    class Context:
        def __init__(self, method):
            for name in ("_context",):
                if name not in context_attrs:
                    setattr(self, name, object())

    class Connection:
        def __init__(self, ctx, sock):
            for name in ("_ssl", "_into_ssl", "_from_ssl"):
                if name not in connection_attrs:
                    setattr(self, name, object())

    return types.SimpleNamespace(Context=Context, Connection=Connection, TLS_METHOD=6)


def test_the_stand_in_module_passes_when_nothing_is_missing():
    _ossl.self_test(ssl_module=_ssl_module())


def test_self_test_names_a_context_without_its_pointer():
    with pytest.raises(ImportError, match=r"missing Context\._context"):
        _ossl.self_test(ssl_module=_ssl_module(context_attrs=("_context",)))


@pytest.mark.parametrize("name", ["_ssl", "_into_ssl", "_from_ssl"])
def test_self_test_names_a_connection_without_its_pointers(name):
    with pytest.raises(ImportError, match=rf"missing Connection\.{name}\b"):
        _ossl.self_test(ssl_module=_ssl_module(connection_attrs=(name,)))


def test_self_test_reports_every_missing_name_at_once():
    with pytest.raises(ImportError) as info:
        _ossl.self_test(lib=_LibWithout("SSL_pending"),
                        ssl_module=_ssl_module(connection_attrs=("_from_ssl",)))
    assert "OpenSSL._util.lib.SSL_pending, Connection._from_ssl" in str(info.value)


_IMPORT_PROBE = """
import sys
sys.path.insert(0, {root!r})
import OpenSSL._util
from OpenSSL._util import lib

class Lib:
    def __getattr__(self, name):
        if name == "SSL_CTX_set1_curves_list":
            raise AttributeError(name)
        return getattr(lib, name)

OpenSSL._util.lib = Lib()
try:
    import gateway.tls
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("imported")
"""


def test_importing_gateway_tls_fails_with_the_message_not_an_attribute_error():
    root = str(Path(gateway.__file__).resolve().parent.parent)
    res = subprocess.run([sys.executable, "-c", _IMPORT_PROBE.format(root=root)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ImportError: gateway needs pyOpenSSL >=25.0,<27, found "
                                 f"pyOpenSSL {PYOPENSSL_VERSION}: missing "
                                 "OpenSSL._util.lib.SSL_CTX_set1_curves_list"), res.stdout


def test_the_supported_range_is_the_one_pyproject_declares():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = [d for d in deps if d.lower().startswith("pyopenssl")]
    assert declared == [f"pyOpenSSL{_ossl.SUPPORTED}"]


def test_the_installed_pyopenssl_is_in_the_supported_range():
    low, high = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)", _ossl.SUPPORTED).group(1, 3)
    major = int(PYOPENSSL_VERSION.split(".")[0])
    assert int(low) <= major < int(high)


# --- contexts --------------------------------------------------------------------------------

def _errors_queued() -> int:
    return _real_lib().ERR_peek_error()


def test_set_groups_list():
    ctx = SSL.Context(SSL.TLS_METHOD)
    assert _ossl.set_groups_list(ctx, b"X25519:P-256") is True
    assert _ossl.set_groups_list(ctx, b"X25519:bogus") is False
    assert _errors_queued() == 0            # the refusal leaves no stale error behind


def test_groups_list_ok_is_openssls_answer():
    assert _ossl.groups_list_ok("X25519:P-256:P-384") is True
    assert _ossl.groups_list_ok("P-256") is True
    assert _ossl.groups_list_ok("X25519:bogus") is False
    assert _ossl.groups_list_ok("X25519:P-256é") is False
    assert _ossl.groups_list_ok("\udcff") is False          # cannot be encoded
    assert _errors_queued() == 0


def test_release_buffers_sets_the_mode():
    ctx = SSL.Context(SSL.TLS_METHOD)
    assert _ossl.RELEASE_BUFFERS_MODE == 0x10             # SSL_MODE_RELEASE_BUFFERS
    assert not ctx.set_mode(0) & 0x10
    assert _ossl.release_buffers(ctx) is True
    assert ctx.set_mode(0) & 0x10                           # set_mode returns the mode now set


def test_verify_error_string():
    assert _ossl.verify_error_string(0) == "ok"
    assert _ossl.verify_error_string(10) == "certificate has expired"
    assert _ossl.verify_error_string(20) == "unable to get local issuer certificate"
    assert _ossl.verify_error_string(2 ** 70) == f"certificate verify error {2 ** 70}"


# --- connections -----------------------------------------------------------------------------

def _server_ctx(cert, *, groups: bytes | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_chain_file(str(cert.cert))
    ctx.use_privatekey_file(str(cert.key))
    ctx.set_session_id(b"test-ossl")
    if groups is not None:
        assert _ossl.set_groups_list(ctx, groups)
    return ctx


def _client_ctx(*, ca=None, groups: bytes | None = None, max_version=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if ca is not None:
        ctx.load_verify_locations(str(ca))
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if groups is not None:
        assert _ossl.set_groups_list(ctx, groups)
    return ctx


def _connections(server_ctx, client_ctx, session=None):
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    return server, client


def _move(src: SSL.Connection, dst: SSL.Connection) -> int:
    """Ciphertext src wrote, fed to dst; how many bytes, measured with mem_bio_pending."""
    _, _, out_bio = _ossl.connection_handles(src)
    pending = _ossl.mem_bio_pending(out_bio)
    if pending:
        data = src.bio_read(pending)
        assert len(data) == pending
        assert _ossl.mem_bio_pending(out_bio) == 0
        dst.bio_write(data)
    return pending


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    done = set()
    for _ in range(20):
        for name, conn in (("client", client), ("server", server)):
            if name not in done:
                try:
                    conn.do_handshake()
                    done.add(name)
                except SSL.WantReadError:
                    pass
        moved = _move(client, server) + _move(server, client)
        if done == {"client", "server"} and not moved:
            return
    raise AssertionError("handshake did not finish")


def test_connection_handles_are_the_connections_pointers():
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    ssl_ptr, into_bio, from_bio = _ossl.connection_handles(conn)
    assert ssl_ptr is conn._ssl and into_bio is conn._into_ssl and from_bio is conn._from_ssl


def test_bio_and_ssl_pending_follow_the_data(server_cert):
    server, client = _connections(_server_ctx(server_cert), _client_ctx())
    ssl_ptr, into_bio, from_bio = _ossl.connection_handles(client)
    assert _ossl.mem_bio_pending(into_bio) == 0 and _ossl.mem_bio_pending(from_bio) == 0
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    assert _ossl.mem_bio_pending(from_bio) > 0                 # the ClientHello
    _handshake(server, client)

    server.send(b"hello")
    _, _, server_out = _ossl.connection_handles(server)
    n = _ossl.mem_bio_pending(server_out)
    assert n > len(b"hello")                                   # a record: header, tag
    before = _ossl.mem_bio_pending(into_bio)                 # TLS 1.3 tickets, not read yet
    client.bio_write(server.bio_read(n))
    assert _ossl.mem_bio_pending(into_bio) == before + n
    assert _ossl.ssl_pending(ssl_ptr) == 0                     # nothing decrypted yet
    assert client.recv(1) == b"h"
    assert _ossl.mem_bio_pending(into_bio) == 0
    assert _ossl.ssl_pending(ssl_ptr) == 4                     # "ello", held in OpenSSL
    assert client.recv(10) == b"ello"
    assert _ossl.ssl_pending(ssl_ptr) == 0


def test_verify_result(server_cert):
    server, client = _connections(_server_ctx(server_cert), _client_ctx(ca=server_cert.ca))
    _handshake(server, client)
    assert _ossl.verify_result(_ossl.connection_handles(client)[0]) == 0

    server, client = _connections(_server_ctx(server_cert), _client_ctx())   # no CA
    _handshake(server, client)
    code = _ossl.verify_result(_ossl.connection_handles(client)[0])
    assert code == 20
    assert _ossl.verify_error_string(code) == "unable to get local issuer certificate"


def test_set_verify_native_accepts_every_chain_and_keeps_openssls_result(server_cert):
    from gateway.native.scanner import VERIFY_ACCEPT_ADDRESS
    if VERIFY_ACCEPT_ADDRESS is None:
        pytest.skip("the native core is not loaded (pure-Python fallback)")
    cctx = _client_ctx()                                       # no CA: the chain is unknown
    _ossl.set_verify_native(cctx, SSL.VERIFY_PEER, VERIFY_ACCEPT_ADDRESS)
    assert cctx.get_verify_mode() == SSL.VERIFY_PEER
    server, client = _connections(_server_ctx(server_cert), cctx)
    _handshake(server, client)                                 # no alert: the callback says 1
    code = _ossl.verify_result(_ossl.connection_handles(client)[0])
    # the chain check went on past its first error (20) and kept the last one
    assert _ossl.verify_error_string(code) == "unable to verify the first certificate"

    cctx = _client_ctx(ca=server_cert.ca)
    _ossl.set_verify_native(cctx, SSL.VERIFY_PEER, VERIFY_ACCEPT_ADDRESS)
    server, client = _connections(_server_ctx(server_cert), cctx)
    _handshake(server, client)
    assert _ossl.verify_result(_ossl.connection_handles(client)[0]) == 0


@pytest.mark.parametrize("mode, address", [(SSL.VERIFY_PEER, 0), ("1", 1), (1, None)])
def test_set_verify_native_refuses_a_null_or_odd_argument(mode, address):
    with pytest.raises(TypeError):
        _ossl.set_verify_native(SSL.Context(SSL.TLS_METHOD), mode, address)


def test_session_reused(server_cert):
    sctx = _server_ctx(server_cert)
    cctx = _client_ctx(max_version=SSL.TLS1_2_VERSION)     # the session is there at once
    server, client = _connections(sctx, cctx)
    _handshake(server, client)
    assert _ossl.session_reused(_ossl.connection_handles(client)[0]) == 0
    server, again = _connections(sctx, cctx, session=client.get_session())
    _handshake(server, again)
    assert _ossl.session_reused(_ossl.connection_handles(again)[0]) == 1
    assert _ossl.session_reused(_ossl.connection_handles(server)[0]) == 1


def test_set_groups_list_restricts_the_handshake(server_cert):
    server, client = _connections(_server_ctx(server_cert, groups=b"P-384"),
                                  _client_ctx(groups=b"X25519"))
    with pytest.raises(SSL.Error):
        _handshake(server, client)
    server, client = _connections(_server_ctx(server_cert, groups=b"P-384"),
                                  _client_ctx(groups=b"X25519:P-384"))
    _handshake(server, client)
    assert client.get_protocol_version_name() == "TLSv1.3"
