"""TLS as a trio stream: a memory-BIO pyOpenSSL connection over any trio.abc.Stream.

The shape follows trio's own SSLStream: OpenSSL never touches a socket. Each operation calls
the TLS object in a loop; ciphertext OpenSSL wants to send is taken from its outgoing BIO and
sent (in order, under a FIFO lock), and when OpenSSL wants more input the loop flushes what is
pending first and then does exactly one transport receive, feeding the bytes to the incoming
BIO. Because the TLS object is only touched between awaits, one task may send while another
receives (the proxy relays both directions at once); two tasks sending, or two receiving, at
the same time is a bug and raises trio.BusyResourceError.

Two tasks can both find that OpenSSL needs input (say a receive and a handshake); only one of
them reads from the transport, the other waits for that read and retries (`_recv_count`).

Verification never fails the handshake (see gateway.tls.context): after do_handshake(),
`info.verified` tells whether the peer's chain (and, on the client side with
`verify_hostname`, its name) checked out; `info.verify_error` is OpenSSL's verify result text
(SSL_get_verify_result, read after the handshake: no Python runs inside OpenSSL, §3.3).

A server with several certificates (SPEC §3.4) passes `sni`, a callable from the client's
server name (or None) to a context: the handshake then first reads the ClientHello as far as
its server name (gateway.native.scanner.server_name, the native scanner) and builds the connection
with the chosen context, so OpenSSL runs no servername callback (§3.3). Without `sni` nothing
is read ahead.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

import trio
from OpenSSL import SSL

from ..errors import TLSError
from ..native.scanner import SNI_MORE
from ..native.scanner import server_name as _scan_server_name
from ._ossl import connection_handles, session_reused, verify_error_string, verify_result
from ._ossl import mem_bio_pending as _bio_pending
from ._ossl import ssl_pending as _ssl_pending
from .context import NATIVE_VERIFY, VerifyState

# Plaintext read per SSL_read when the caller gives no max_bytes (one TLS record holds 16 KiB).
DEFAULT_RECEIVE_SIZE = 65536
# Plaintext handed to one SSL_write: bounds the ciphertext buffered before it is sent.
_SEND_CHUNK = 65536
_BIO_READ_SIZE = 262144
# Ciphertext read from the transport at once: 64 KiB, or up to 16 full records when the
# caller asks for more than 64 KiB of plaintext (a message body, not commands).
_TRANSPORT_READ = 65536
_TRANSPORT_READ_BULK = 16 * 16413
# ClientHello bytes read ahead for SNI at most (the scanner gives up on a longer ClientHello)
_SNI_PEEK_LIMIT = 1 << 17


@dataclass(frozen=True)
class TLSInfo:
    """What was negotiated; `verified` per SPEC §3 (see TLSStream)."""

    version: str
    cipher: str
    bits: int
    peer_subject: str | None
    peer_cert_present: bool
    verified: bool
    verify_error: str | None
    resumed: bool
    # the peer's subject CN and its issuer's CN (or O), as Postfix reads them for the
    # {cert_subject} / {cert_issuer} milter macros; "" when absent or not printable
    peer_cn: str | None = None
    issuer_cn: str | None = None


def _name_text(name, attribute: str) -> str:
    """The first *attribute* (``CN``, ``O``) of an X.509 name, or "" when it has none or
    it holds a control character (Postfix's tls_text_name)."""
    from cryptography.x509.oid import NameOID
    oid = NameOID.COMMON_NAME if attribute == "CN" else NameOID.ORGANIZATION_NAME
    values = name.get_attributes_for_oid(oid)
    if not values:
        return ""
    value = values[0].value
    if not isinstance(value, str) or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return ""
    return value


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _Exclusive:
    """Raise BusyResourceError when two tasks run the same operation at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str):
        self._held = False
        self._message = message

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info) -> None:
        self._held = False


class _PeerEOF(Exception):
    """The transport ended without a close_notify (internal)."""


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _sni_bytes(name: str) -> bytes:
    name = name.rstrip(".")
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def _reason_of(exc: BaseException) -> str:
    """OpenSSL's reason text ("wrong version number"), or None-ish fallbacks."""
    args = getattr(exc, "args", ())
    if isinstance(exc, SSL.SysCallError):
        if len(args) >= 2 and args[1]:
            return str(args[1])
        return "system call error"
    if args and isinstance(args[0], list) and args[0]:
        reasons = [str(e[-1]) for e in args[0] if isinstance(e, tuple) and e and e[-1]]
        if reasons:
            return reasons[0]
    return str(exc) or type(exc).__name__


def _is_eof_error(exc: BaseException) -> bool:
    """Called once EOF was fed to OpenSSL: does *exc* just say the input ended?"""
    if isinstance(exc, SSL.SysCallError):
        return True
    return "unexpected eof" in _reason_of(exc).lower()


class TLSStream(trio.abc.Stream):
    """A TLS connection over *transport_stream* using the pyOpenSSL *context*.

    ``server_hostname`` (client side) sets SNI unless it is an IP literal, and is the name
    checked with *verify_hostname*. *sni* (server side): the client's server name → the
    context to use (*context* is then a placeholder, replaced before the handshake). The
    handshake runs on the first send/receive or on do_handshake(); `info` is available after
    it.
    """

    # A peer that does not read must not hold aclose() forever.
    close_notify_timeout: float = 5.0

    def __init__(self, transport_stream: trio.abc.Stream, context: SSL.Context, *,
                 server_side: bool, server_hostname: str | None = None,
                 verify_hostname: bool = False, sni=None):
        if verify_hostname and not server_hostname:
            raise ValueError("verify_hostname needs a server_hostname")
        if verify_hostname and server_side:
            raise ValueError("verify_hostname is for the client side")
        if sni is not None and not server_side:
            raise ValueError("sni is for the server side")
        self.transport_stream = transport_stream
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.verify_hostname = verify_hostname
        self.unclean_eof = False
        self.client_server_name: str | None = None     # server side with sni: what it sent
        self._sni = sni
        self._connect(context)

        self._state = _State.OK
        self._info: TLSInfo | None = None
        self._handshake_started = False
        self._handshake_done = trio.Event()
        self._handshake_failure: str | None = None
        self._peer_closed = False          # close_notify or EOF seen on receive
        self._transport_eof = False
        self._close_notify_sent = False
        # TLS 1.3 session tickets the server writes as its handshake ends: held back and sent
        # with the next outgoing bytes, so a peer that only sends cannot deadlock against us.
        self._delayed_outgoing = b""

        self._send_lock = trio.StrictFIFOLock()     # keeps ciphertext in order on the wire
        self._recv_lock = trio.Lock()
        self._recv_count = 0
        self._transport_read = _TRANSPORT_READ
        self._send_guard = _Exclusive("another task is already sending on this TLS stream")
        self._recv_guard = _Exclusive("another task is already receiving on this TLS stream")

    def _connect(self, context: SSL.Context) -> None:
        """Make the OpenSSL connection (again, for another context, before the handshake)."""
        self.context = context
        self._conn = SSL.Connection(context, None)
        # the raw SSL* and memory BIOs, for the per-record checks (see gateway.tls._ossl)
        self._ssl, self._into_bio, self._from_bio = connection_handles(self._conn)
        # the Python verify callback's record (pure-Python fallback only; see _build_info)
        self._verify_state = None if NATIVE_VERIFY else VerifyState()
        if self._verify_state is not None:
            self._conn.set_app_data(self._verify_state)
        if self.server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if self.server_hostname and not _is_ip_literal(self.server_hostname):
                self._conn.set_tlsext_host_name(_sni_bytes(self.server_hostname))

    async def _choose_context(self) -> None:
        """Read the ClientHello as far as its server name, pick the context for it, and hand
        what was read to the connection built with that context."""
        received = bytearray()
        status, name = SNI_MORE, b""
        async with self._recv_lock:
            while status == SNI_MORE and len(received) <= _SNI_PEEK_LIMIT:
                data = await self.transport_stream.receive_some(_TRANSPORT_READ)
                if not data:
                    self._transport_eof = True
                    break
                received += data
                status, name = _scan_server_name(received)
            self._recv_count += 1
        server_name = None
        if status > 0:
            try:
                server_name = name.decode("ascii")
            except UnicodeDecodeError:
                server_name = None           # not a DNS name: no certificate matches it
        self.client_server_name = server_name
        context = self._sni(server_name)
        if context is not self.context:
            self._connect(context)
        if received:
            self._conn.bio_write(bytes(received))
        if self._transport_eof:
            self._conn.bio_shutdown()

    # --- public ---------------------------------------------------------------------------

    @property
    def info(self) -> TLSInfo:
        if self._info is None:
            raise RuntimeError("the TLS handshake has not completed")
        return self._info

    def offer_session(self, session) -> None:
        """Client side, before the handshake: ask to resume *session* (from session())."""
        self._conn.set_session(session)

    def session(self):
        """The TLS session to resume later (TLS 1.3: complete once the server's tickets were
        read, i.e. after the first receive)."""
        return self._conn.get_session()

    def peer_chain(self) -> list:
        """After the handshake, the certificates the peer presented as cryptography objects:
        on the client side leaf first, as the server sent them (what DANE matches, SPEC
        §4.8); [] when none. Computed on each call, not kept in TLSInfo."""
        return self._conn.get_peer_cert_chain(as_cryptography=True) or []

    def quiet(self) -> bool:
        """Usable, no plaintext held in OpenSSL and nothing waiting on the transport (an idle
        pooled leg's check, see LeanSocketStream.quiet)."""
        if self._state is not _State.OK or self._peer_closed or self._info is None:
            return False
        if self._conn.pending() or self._delayed_outgoing:
            return False
        quiet = getattr(self.transport_stream, "quiet", None)
        return quiet is not None and quiet()

    def abandon(self) -> None:
        """Close the transport now, without close_notify and without awaiting."""
        self._state = _State.CLOSED
        abandon = getattr(self.transport_stream, "abandon", None)
        if abandon is not None:
            abandon()

    async def do_handshake(self) -> None:
        """Run the handshake (once; concurrent callers wait for the first)."""
        if self._info is not None:
            self._check_open()
            await trio.lowlevel.checkpoint()
            return
        self._check_usable()
        if self._handshake_started:
            await self._handshake_done.wait()
            if self._info is None:
                raise TLSError(self._handshake_failure or "handshake failed")
            return
        self._handshake_started = True
        try:
            try:
                if self._sni is not None:
                    await self._choose_context()
                await self._retry(self._conn.do_handshake, is_handshake=True)
            except _PeerEOF:
                raise TLSError("connection closed during handshake") from None
            except trio.BrokenResourceError as exc:
                raise TLSError("connection lost during handshake") from exc
            self._info = self._build_info()
        except BaseException as exc:
            self._mark_broken()
            self._handshake_failure = (exc.reason if isinstance(exc, TLSError)
                                       else "handshake interrupted")
            raise
        finally:
            self._handshake_done.set()

    async def send_all(self, data) -> None:
        with self._send_guard:
            self._check_usable()
            if self._info is None:
                await self.do_handshake()
            if self._close_notify_sent:
                raise trio.ClosedResourceError("the TLS stream was closed")
            view = memoryview(data).cast("B") if data else memoryview(b"")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            while view:
                chunk = view[:_SEND_CHUNK]
                written = await self._retry(self._conn.send, chunk)
                view = view[written:]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._recv_guard:
            self._check_open()
            if self._peer_closed:             # clean or not, the end stays the end
                await trio.lowlevel.checkpoint()
                return b""
            self._check_usable()
            if self._info is None:
                await self.do_handshake()
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            else:
                max_bytes = int(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._transport_read = (_TRANSPORT_READ_BULK if max_bytes > _TRANSPORT_READ
                                    else _TRANSPORT_READ)
            try:
                data = await self._retry(self._conn.recv, max_bytes, is_recv=True)
                if len(data) < max_bytes:
                    data = self._more_records(data, max_bytes)
                return data
            except SSL.ZeroReturnError:
                self._peer_closed = True
                return b""
            except _PeerEOF:
                self._peer_closed = True
                self.unclean_eof = True
                return b""

    async def aclose(self) -> None:
        """Send close_notify (once; the peer's is not awaited), then close the transport."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        was_ok = self._state is _State.OK and self._info is not None
        self._state = _State.CLOSED
        try:
            if was_ok and not self._close_notify_sent:
                self._close_notify_sent = True
                try:
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                to_send = self._take_outgoing()
                if to_send:
                    with trio.move_on_after(self.close_notify_timeout):
                        try:
                            async with self._send_lock:
                                await self.transport_stream.send_all(to_send)
                        except (trio.BrokenResourceError, trio.ClosedResourceError,
                                trio.BusyResourceError):
                            pass
        finally:
            await self.transport_stream.aclose()

    async def aclose_after(self, data: bytes) -> None:
        """A session's last words: *data*, then close_notify, in one transport write, then
        close (aclose() after send_all() would take two)."""
        if (self._state is not _State.OK or self._info is None or self._close_notify_sent
                or not data):
            if data:
                await self.send_all(data)
            await self.aclose()
            return
        with self._send_guard:
            try:
                view = memoryview(data).cast("B")
                while view:             # a memory BIO takes everything at once
                    view = view[self._conn.send(view[:_SEND_CHUNK]):]
            except SSL.Error:           # not expected after the handshake
                self._mark_broken()
                await self.aclose()
                raise trio.BrokenResourceError("TLS write failed") from None
        # the encrypted data is still in the outgoing BIO: aclose() sends it with close_notify
        await self.aclose()

    async def wait_send_all_might_not_block(self) -> None:
        async with self._send_lock:
            pass
        await self.transport_stream.wait_send_all_might_not_block()

    # --- internals ------------------------------------------------------------------------

    def _mark_broken(self) -> None:
        if self._state is _State.OK:          # a closed stream stays closed
            self._state = _State.BROKEN

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream was closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken after an earlier error")

    def _more_records(self, data: bytes, max_bytes: int) -> bytes:
        """Records already in the incoming BIO, decrypted now (one receive instead of one per
        16 KiB record). Stops at the first record not complete yet and at any condition
        (close_notify, error): the next receive_some() meets it again. Anything OpenSSL wants
        to send in answer stays in the outgoing BIO and leaves with the next write."""
        parts = [data]
        total = len(data)
        conn = self._conn
        while total < max_bytes:
            if not _ssl_pending(self._ssl) and _bio_pending(self._into_bio) <= 0:
                break                  # nothing more read in yet
            try:
                more = conn.recv(max_bytes - total)
            except SSL.Error:          # WantRead (the usual end), ZeroReturn, alerts
                break
            if not more:
                break
            parts.append(more)
            total += len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _take_outgoing(self) -> bytes:
        """What OpenSSL wrote to its outgoing BIO; held-back bytes ride along, never alone."""
        parts = []
        conn = self._conn
        while True:
            pending = _bio_pending(self._from_bio)
            if pending <= 0:
                break
            try:
                parts.append(conn.bio_read(min(pending, _BIO_READ_SIZE)))
            except SSL.WantReadError:
                break
        if parts and self._delayed_outgoing:
            parts.insert(0, self._delayed_outgoing)
            self._delayed_outgoing = b""
        return b"".join(parts)

    async def _send_alert(self) -> None:
        """Best effort: deliver the alert OpenSSL wrote on a failure before we give up."""
        data = self._take_outgoing()
        if not data or self._state is _State.CLOSED:
            return
        with trio.move_on_after(1):
            try:
                async with self._send_lock:
                    await self.transport_stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                    OSError):
                pass

    async def _send_locked(self, data: bytes) -> None:
        """Send ciphertext in order: under the send lock, taken without `async with`'s two
        checkpoints when it is free (the transport call is a checkpoint itself)."""
        lock = self._send_lock
        if lock.locked():
            async with lock:
                await self.transport_stream.send_all(data)
            return
        lock.acquire_nowait()
        try:
            await self.transport_stream.send_all(data)
        finally:
            lock.release()

    async def _read_transport(self) -> None:
        """One transport read into OpenSSL's incoming BIO (EOF: bio_shutdown)."""
        data = await self.transport_stream.receive_some(self._transport_read)
        if data:
            self._conn.bio_write(data)
        else:
            self._transport_eof = True
            self._conn.bio_shutdown()
        self._recv_count += 1

    async def _retry(self, fn, *args, is_handshake: bool = False, is_recv: bool = False):
        """Call *fn* on the TLS object until it completes, moving ciphertext as it asks.

        *is_recv*: fn is SSL_read; when OpenSSL holds no plaintext and no ciphertext has been
        read in, it can only want more input, so the transport is read without asking."""
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        conn = self._conn
        while True:
            want_read = False
            finished = False
            result = None
            try:
                if (is_recv and not self._transport_eof and not _ssl_pending(self._ssl)
                        and _bio_pending(self._into_bio) <= 0):
                    want_read = True       # what SSL_read would say, without asking it
                else:
                    result = fn(*args)
                    finished = True
            except SSL.WantReadError:
                want_read = True
            except SSL.ZeroReturnError:
                raise
            except SSL.Error as exc:
                eof = self._transport_eof and _is_eof_error(exc)
                self._mark_broken()
                if not eof:
                    await self._send_alert()
                if eof:
                    raise _PeerEOF() from exc
                raise TLSError(_reason_of(exc)) from exc
            except TLSError:
                self._mark_broken()
                raise

            to_send = self._take_outgoing()
            if (is_handshake and finished and self.server_side
                    and self._conn.get_protocol_version_name() == "TLSv1.3"):
                # Only session tickets are left; hold them (see _delayed_outgoing).
                self._delayed_outgoing = to_send
                to_send = b""

            if to_send:
                try:
                    yielded = True
                    await self._send_locked(to_send)
                except BaseException:
                    # Ciphertext was taken from OpenSSL and not (fully) sent: no way back.
                    self._mark_broken()
                    raise
            elif want_read:
                if self._transport_eof:
                    # OpenSSL wants input after EOF was fed: should not happen; treat as EOF.
                    self._mark_broken()
                    raise _PeerEOF()
                yielded = True
                lock = self._recv_lock
                if not lock.locked():
                    # the usual case: nobody else is reading; the lock is taken without the
                    # two checkpoints of `async with` (the transport call is one)
                    lock.acquire_nowait()
                    try:
                        await self._read_transport()
                    finally:
                        lock.release()
                else:
                    seen = self._recv_count
                    async with lock:
                        if seen == self._recv_count:
                            # Nobody else read while we waited for the lock: read once.
                            await self._read_transport()
            if finished:
                break
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _build_info(self) -> TLSInfo:
        conn = self._conn
        cert = conn.get_peer_certificate(as_cryptography=True)
        subject = cert.subject.rfc4514_string() if cert is not None else None
        requested = bool(conn.get_verify_mode() & SSL.VERIFY_PEER)
        verified = False
        error: str | None = None
        if requested:
            if cert is None:
                error = "no client certificate" if self.server_side else "no server certificate"
            else:
                # OpenSSL's verify result (the C callback leaves it as the chain check set
                # it: its last error); the Python callback's record where pyOpenSSL reset it
                state = self._verify_state
                error = state.error if state is not None else None
                if error is None:
                    code = verify_result(self._ssl)
                    if code != 0:
                        error = verify_error_string(code)
                if error is None and self.verify_hostname:
                    error = self._check_name()
                verified = error is None
        elif self.verify_hostname:
            error = "certificate verification is not enabled in the TLS context"
        return TLSInfo(
            version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name() or "",
            bits=conn.get_cipher_bits() or 0,
            peer_subject=subject,
            peer_cert_present=cert is not None,
            verified=verified,
            verify_error=error,
            resumed=bool(session_reused(self._ssl)),
            peer_cn=_name_text(cert.subject, "CN") if cert is not None else None,
            issuer_cn=(_name_text(cert.issuer, "CN") or _name_text(cert.issuer, "O")
                       if cert is not None else None),
        )

    def _check_name(self) -> str | None:
        from service_identity import CertificateError, VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        name = self.server_hostname or ""
        try:
            if _is_ip_literal(name):
                verify_ip_address(self._conn, name.strip("[]"))
            else:
                verify_hostname(self._conn, name.rstrip("."))
        except (VerificationError, CertificateError) as exc:
            detail = str(exc)
            return (f"hostname mismatch: the certificate does not match {name}"
                    + (f" ({detail})" if detail else ""))
        return None
