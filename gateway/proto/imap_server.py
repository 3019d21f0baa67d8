"""Sans-IO IMAP server core: the pre-login dialogue the gateway serves itself (SPEC §5).

Bytes go in with `receive_data()` (``b""`` is EOF), events come out of `next_event()`,
responses go out through `data_to_send()`. No sockets, no trio, no TLS here.

Before login the core answers CAPABILITY, NOOP, LOGOUT, ID and every error by itself, and
gates LOGIN/AUTHENTICATE (TLS required, client certificate at `verify`). Two events need the
session: `StartTLS` (call `starttls_ok()`, then `start_tls()` — it discards pipelined
plaintext — the handshake, then `tls_established()`), and `Login` (the session logs in
upstream and calls `login_result()` with the bytes for the client; on success the core is
done and `take_trailing()` hands over what the client pipelined after its LOGIN, for the
relay). Commands, literals included, are read by `imap_wire.LineReader` with the 64 KiB cap.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from . import imap_wire as W
from .imap_wire import NEED_DATA

__all__ = ["IMAPServer", "NEED_DATA", "StartTLS", "Login", "Logout", "ConnectionClosed"]


@dataclass(frozen=True)
class StartTLS:
    tag: str


@dataclass(frozen=True)
class Login:
    """LOGIN or AUTHENTICATE PLAIN with its credentials (never log `password`)."""
    tag: str
    user: bytes
    password: bytes = b""
    authzid: bytes = b""
    mechanism: str = "LOGIN"           # LOGIN | PLAIN

    def __repr__(self) -> str:         # keeps the password out of tracebacks and logs
        return f"Login(tag={self.tag!r}, user={self.user!r}, mechanism={self.mechanism!r})"


@dataclass(frozen=True)
class Logout:
    """LOGOUT was answered; flush and close."""


@dataclass(frozen=True)
class ConnectionClosed:
    """EOF from the client, or the core closed the session (BYE sent)."""


PRIVACY_TLS = "NO [PRIVACYREQUIRED] TLS is required"
PRIVACY_CERT = "NO [PRIVACYREQUIRED] Client certificate required"
BYE_TIMEOUT = b"* BYE Autologout; idle for too long\r\n"
BYE_SHUTDOWN = b"* BYE Server shutting down\r\n"
BYE_TOO_MANY = b"* BYE Too many connections\r\n"


class IMAPServer:
    def __init__(self, *, hostname: str, offer_starttls: bool = True, require_tls: bool = False,
                 require_client_cert: bool = False, tls_active: bool = False,
                 client_verified: bool = False, max_command: int = W.MAX_COMMAND,
                 max_errors: int = 20):
        self.hostname = hostname
        self.offer_starttls = offer_starttls
        self.require_tls = require_tls
        self.require_client_cert = require_client_cert
        self.tls_active = tls_active
        self.client_verified = client_verified
        self.max_errors = max_errors
        self.errors = 0
        self.closed = False           # BYE sent (or LOGOUT): flush and close
        self.logged_in = False
        self._reader = W.LineReader(max_command, server=True)
        self._out: list[bytes] = []
        self._awaiting = None
        self._auth_tag: str | None = None   # AUTHENTICATE PLAIN waiting for its response
        self._rejections: list[tuple[str, str | None]] = []
        # the LOGIN/AUTHENTICATE gate the session set from its policy (gate_login); until it
        # does, the core's own from require_tls / require_client_cert
        self._gate: tuple[str, str | None] | None = None
        self._gate_set = False

    # --- I/O side ---------------------------------------------------------------------------

    def greeting(self) -> None:
        self._send(f"* OK [CAPABILITY {self.capabilities()}] {self.hostname} ready")

    def receive_data(self, data: bytes) -> None:
        self._reader.receive_data(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "IDLE"]
        if self.offer_starttls and not self.tls_active:
            caps.append("STARTTLS")
        if self.require_tls and not self.tls_active:
            caps.append("LOGINDISABLED")
        else:
            caps.append("AUTH=PLAIN")
        return " ".join(caps)

    def take_rejections(self) -> list[tuple[str, str | None]]:
        """Refusals the core sent by itself since the last call, each with its metric label
        (the login gate's, from the policy) or None (for the session's logs)."""
        out, self._rejections = self._rejections, []
        return out

    def bye(self, line: bytes) -> None:
        """An unsolicited BYE (timeout, shutdown); the session then closes."""
        self._out.append(line)
        self.closed = True

    # --- session side -----------------------------------------------------------------------

    def starttls_ok(self) -> None:
        event, self._awaiting = self._awaiting, None
        assert isinstance(event, StartTLS)
        self._send(f"{event.tag} OK Begin TLS negotiation now")

    def start_tls(self) -> int:
        """After `starttls_ok()` is flushed: discard plaintext already received (§4.2, §5).
        Returns the number of bytes discarded (non-zero: a command-injection attempt)."""
        return len(self._reader.take_buffer())

    def gate_login(self, refusal: tuple[str, str | None] | None) -> None:
        """The policy's answer to LOGIN/AUTHENTICATE for the session as it stands (§5): None
        lets them through, else (the response after the tag, its label) refuses each one.
        The session sets it at connect and again after the TLS handshake."""
        self._gate = refusal
        self._gate_set = True

    def tls_established(self, verified: bool = False) -> None:
        self.tls_active = True
        self.client_verified = verified

    def login_result(self, ok: bool, data: bytes) -> None:
        """Answer the pending `Login` with *data* (the upstream's answer, client's tag)."""
        event, self._awaiting = self._awaiting, None
        assert isinstance(event, Login)
        self._out.append(data)
        if ok:
            self.logged_in = True

    def take_trailing(self) -> bytes:
        """After a successful login: what the client sent after its login command."""
        return self._reader.take_buffer()

    def next_event(self):
        if self._awaiting is not None:
            raise RuntimeError(f"answer {self._awaiting!r} first")
        while True:
            if self.closed or self.logged_in:
                return ConnectionClosed() if self.closed else NEED_DATA
            item = self._reader.next()
            if item is NEED_DATA:
                return NEED_DATA
            if isinstance(item, W.Closed):
                self.closed = True
                return ConnectionClosed()
            if isinstance(item, W.Continue):
                self._out.append(b"+ Ready for literal data\r\n")
                continue
            if isinstance(item, W.Fatal):
                self.bye(b"* BYE " + item.reason.encode() + b"\r\n")
                return ConnectionClosed()
            if isinstance(item, W.TooBig):
                if self._auth_tag is not None:          # an over-long SASL response
                    tag, self._auth_tag = self._auth_tag, None
                    self._reader.literals = True
                else:
                    tag = _tag_of(item.head)
                self._reject(f"{tag} BAD [TOOBIG] Command too long")
                continue
            if self._auth_tag is not None:
                event = self._auth_response(item)
            else:
                event = self._command(item)
            if event is not None:
                if isinstance(event, (StartTLS, Login)):
                    self._awaiting = event
                return event

    # --- internals --------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def _reject(self, line: str, *, bad: bool = True, label: str | None = None) -> None:
        self._send(line)
        self._rejections.append((line, label))
        if bad:
            self.errors += 1
            if self.errors >= self.max_errors:
                self.bye(b"* BYE Too many invalid commands\r\n")

    def _command(self, line: W.Line):
        tag_b, name_b, _ = W.split_tag(line.first)
        if not W.valid_tag(tag_b):
            self._reject("* BAD Invalid tag")
            return None
        tag = tag_b.decode("ascii")
        name = name_b.upper().decode("ascii", "replace")
        if name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"):
            if line.first != tag_b + b" " + name_b or len(line.parts) > 1:
                self._reject(f"{tag} BAD Unexpected arguments")
                return None
        if name == "CAPABILITY":
            self._send(f"* CAPABILITY {self.capabilities()}")
            self._send(f"{tag} OK Capability completed")
        elif name == "NOOP":
            self._send(f"{tag} OK NOOP completed")
        elif name == "LOGOUT":
            self._send("* BYE Logging out")
            self._send(f"{tag} OK Logout completed")
            self.closed = True
            return Logout()
        elif name == "ID":
            self._send("* ID NIL")
            self._send(f"{tag} OK ID completed")
        elif name == "STARTTLS":
            if self.tls_active:
                self._reject(f"{tag} BAD TLS is already active")
            elif not self.offer_starttls:
                self._reject(f"{tag} BAD STARTTLS not available")
            else:
                return StartTLS(tag)
        elif name == "LOGIN":
            return self._login(tag, line)
        elif name == "AUTHENTICATE":
            return self._authenticate(tag, line)
        else:
            self._reject(f"{tag} BAD Command not permitted before login")
        return None

    def _privacy(self, tag: str) -> bool:
        """The TLS/certificate gate of LOGIN and AUTHENTICATE; True if it refused."""
        gate = self._gate if self._gate_set else self._own_gate()
        if gate is None:
            return False
        text, label = gate
        self._reject(f"{tag} {text}", bad=False, label=label)
        return True

    def _own_gate(self) -> tuple[str, None] | None:
        """The gate without a session's policy (the core alone)."""
        if self.require_tls and not self.tls_active:
            return PRIVACY_TLS, None
        if self.require_client_cert and not self.client_verified:
            return PRIVACY_CERT, None
        return None

    def _login(self, tag: str, line: W.Line):
        try:
            args = W.tokens(line.parts, skip=2)
        except ValueError:
            args = None
        if args is None or len(args) != 2 or not args[0]:
            self._reject(f"{tag} BAD Invalid arguments")
            return None
        if self._privacy(tag):
            return None
        return Login(tag, args[0], args[1], b"", "LOGIN")

    def _authenticate(self, tag: str, line: W.Line):
        try:
            args = W.tokens(line.parts, skip=2)
        except ValueError:
            args = None
        if not args or len(args) > 2:
            self._reject(f"{tag} BAD Invalid arguments")
            return None
        if args[0].upper() != b"PLAIN":
            self._reject(f"{tag} NO Unsupported authentication mechanism", bad=False)
            return None
        if self._privacy(tag):
            return None
        if len(args) == 2:                              # SASL-IR (RFC 4959)
            return self._plain(tag, args[1])
        self._auth_tag = tag
        self._reader.literals = False                  # the response line is base64 text
        self._out.append(b"+ \r\n")
        return None

    def _auth_response(self, line: W.Line):
        tag, self._auth_tag = self._auth_tag, None
        self._reader.literals = True
        text = line.first.strip()
        if text == b"*":
            self._reject(f"{tag} BAD Authentication cancelled")
            return None
        return self._plain(tag, text)

    def _plain(self, tag: str, b64: bytes):
        try:
            raw = b"" if b64 == b"=" else base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            self._reject(f"{tag} BAD Invalid base64")
            return None
        fields = raw.split(b"\0")
        if len(fields) != 3 or not fields[1]:
            self._reject(f"{tag} NO [AUTHENTICATIONFAILED] Invalid PLAIN message", bad=False)
            return None
        authzid, user, password = fields
        return Login(tag, user, password, authzid, "PLAIN")


def _tag_of(head: bytes) -> str:
    tag = head.split(b" ", 1)[0]
    return tag.decode("ascii") if W.valid_tag(tag) else "*"
