"""A private submission server for AUTH tests: Postfix with Dovecot SASL, and a remote MX.

    from submission import SubmissionUpstream, submission_upstream   # the fixture, see below

    with SubmissionUpstream(instance_dir(pubdir, "sub"), upstream_cert) as sub:   # or async with
        sub.port            # Postfix smtpd on 127.0.0.1: STARTTLS, then AUTH PLAIN / LOGIN
        sub.user, sub.password          # "alice", "s3cret pass+/=" (a space and + / =)
        sub.ca_file, sub.server_name    # the test CA's file; "upstream.test" (cert SANs:
                                        # upstream.test, localhost, 127.0.0.1)
        sub.local_domain    # "example.test": delivered by Postfix itself to a Maildir
        sub.remote_domain   # "remote.example": relayed only for authenticated sessions, to a
                            # second Postfix (the "remote MX"), which stores it in a Maildir

Three private peers (tests/peers.py, tests/dovecot.py), in one 0755 directory:
- `dovecot`: `dovecot.DovecotAuth`, Dovecot's auth service alone on a loopback TCP port, a
  passwd-file with `users` (default one user, alice, whose password needs care in every
  encoding: a space, `+`, `/`, `=`), mechanisms PLAIN and LOGIN, no auth penalty.
- `postfix`: `PostfixInstance.submission`: `smtpd_sasl_type = dovecot`, `smtpd_sasl_path =
  inet:127.0.0.1:<auth port>`, `smtpd_tls_auth_only = yes` (EHLO offers `AUTH PLAIN LOGIN`
  only after STARTTLS), `smtpd_relay_restrictions = permit_sasl_authenticated,
  reject_unauth_destination`, certificate from the tests' trustme CA (`cert`, e.g. the
  `upstream_cert` fixture). Its answers: AUTH before STARTTLS `503 5.5.1 Error:
  authentication not enabled`, `235 2.7.0 Authentication successful`, a wrong
  password `535 5.7.8 Error: authentication failed: ...`, an unauthenticated RCPT to the
  remote domain `554 5.7.1 <rcpt>: Relay access denied`. The Received header of an
  authenticated message carries `(Authenticated sender: alice)`.
- `remote`: `PostfixInstance.upstream` for `remote.example` only (no TLS), the submission
  Postfix's relayhost.

Observation (all bounded; the `_async` twins for trio tests whose gateway runs in the same
loop):
- `local_messages()` / `remote_messages()`: delivered messages (bytes, LF line ends, Postfix's
  trace headers on top), oldest first; `wait_local(n, timeout=30)` / `wait_remote(n, ...)`
  and `wait_local_async` / `wait_remote_async` wait for at least n and return them all.
- `sasl_logins()`: `(method, username)` for every message Postfix accepted from an
  authenticated session, from its log (`sasl_method=PLAIN, sasl_username=alice`);
  `auth_failures()`: the number of failed AUTHs Postfix logged (`SASL LOGIN authentication
  failed`); `relay_denials()`: the number of RCPTs Postfix refused with `554 5.7.1 ... Relay
  access denied`; `sessions()`: one dict per ended SMTP connection, from Postfix's
  `disconnect from` line, e.g. `{"client": "unknown[127.0.0.1]", "ehlo": "2", "starttls":
  "1", "auth": "1", "mail": "2", "rcpt": "2", "data": "2", "quit": "1", "commands": "10"}`
  (a count, or `ok/total` when some failed: `"auth": "0/2"`), oldest first: how many
  transactions went over one authenticated connection; `log_text()`: the three logs, one
  after the other.
- XCLIENT is allowed from 127.0.0.0/8 (`smtpd_authorized_xclient_hosts`, for
  `forward_client`): after `XCLIENT ADDR=...` Postfix greets again, wants a new EHLO, keeps the
  TLS of the connection, and logs the forwarded address as the client
  (`client=unknown[192.0.2.7], sasl_method=PLAIN, ...`).
- `smtp()`: an `smtplib.SMTP` connected to `port`, after EHLO and STARTTLS verified against
  the CA (for direct checks; use it in a `with`).
Timing: a wrong password is answered after about 0.5 s (Dovecot's failure queue), and
smtplib's `login()` tries PLAIN and then LOGIN, so it fails twice (two 535s, two failures in
Postfix's count); `s.auth("PLAIN", s.auth_plain)` (after setting `s.user`, `s.password`)
makes one attempt.

The `submission_upstream` fixture (module scope; import it into a test module to use it)
starts one set for the module. Tests sharing it must not count on message totals from
before them: take `len(sub.remote_messages())` first and wait for that plus one.
The three start side by side, in 1-3 s (`postfix check` takes most of it); `stop()` stops
all three. Needs root and postfix + dovecot
(a missing binary fails the test, as in peers.py).
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import smtplib
import ssl
from pathlib import Path

import pytest

from dovecot import DovecotAuth
from peers import PeerProcess, PostfixInstance, free_port, instance_dir, require

__all__ = ["SubmissionUpstream", "submission_upstream", "SASL_LOGIN_RE"]

#: Postfix's log of a message from an authenticated session; group 1 method, 2 username.
SASL_LOGIN_RE = re.compile(r"client=\S+, sasl_method=(\S+?), sasl_username=(\S+)")
_AUTH_FAILED_RE = re.compile(r"SASL \S+ authentication failed")
_RELAY_DENIED_RE = re.compile(r"NOQUEUE: reject: RCPT from \S+: 554 5\.7\.1 .*Relay access denied")
_DISCONNECT_RE = re.compile(r"disconnect from (\S+) (.*)$", re.M)


class SubmissionUpstream(PeerProcess):
    local_domain = "example.test"
    remote_domain = "remote.example"
    server_name = "upstream.test"
    host = "127.0.0.1"

    def __init__(self, directory: os.PathLike | str, cert, *, users: dict | None = None,
                 postfix_extra: dict | None = None):
        """``directory`` must be reachable by the postfix and dovecot users (0755, e.g.
        ``peers.instance_dir(pubdir, "sub")``); ``cert`` a conftest ``CertFiles`` (``.cert``,
        ``.key``, ``.ca``) whose names include 127.0.0.1 (``upstream_cert``)."""
        self.dir = Path(directory).resolve()
        self.cert = cert
        self.ca_file = Path(cert.ca)
        self.port = free_port()
        self.remote_port = free_port()
        self.dovecot = DovecotAuth(self.dir / "dovecot", users=users)
        self.user, self.password = self.dovecot.user, self.dovecot.password
        self.users = dict(self.dovecot.users)
        self.remote = PostfixInstance.upstream(
            self.dir / "remote", self.remote_port, domains=(self.remote_domain,),
            hostname="mx.remote.example")
        self.postfix = PostfixInstance.submission(
            self.dir / "postfix", self.port, cert=cert.cert, key=cert.key,
            sasl_path=self.dovecot.sasl_path, relay_host="127.0.0.1",
            relay_port=self.remote_port, domains=(self.local_domain,),
            hostname=self.server_name,
            extra={"smtpd_authorized_xclient_hosts": "127.0.0.0/8", **(postfix_extra or {})})
        self.log_path = self.postfix.log_path
        self.console_path = self.postfix.console_path

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "SubmissionUpstream":
        require("postfix")
        require("dovecot")
        for sub in ("dovecot", "remote", "postfix"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir / sub, 0o755)
        # the three are independent until mail flows (Postfix asks Dovecot at AUTH time and
        # retries a relay it could not deliver yet): start them side by side
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                for f in [pool.submit(p.start) for p in (self.dovecot, self.remote,
                                                          self.postfix)]:
                    f.result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for peer in (self.postfix, self.remote, self.dovecot):
            peer.stop()

    # ------------------------------------------------------------------ observation

    def log_text(self) -> str:
        return "".join(f"==== {name} ====\n{peer.log_text()}\n" for name, peer in (
            ("submission postfix", self.postfix), ("remote postfix", self.remote),
            ("dovecot auth", self.dovecot)))

    def local_messages(self) -> list[bytes]:
        return self.postfix.messages()

    def remote_messages(self) -> list[bytes]:
        return self.remote.messages()

    def wait_local(self, n: int, timeout: float = 30) -> list[bytes]:
        return self.postfix.wait_for_messages(n, timeout)

    def wait_remote(self, n: int, timeout: float = 30) -> list[bytes]:
        return self.remote.wait_for_messages(n, timeout)

    async def wait_local_async(self, n: int, timeout: float = 30) -> list[bytes]:
        return await self.postfix.wait_for_messages_async(n, timeout)

    async def wait_remote_async(self, n: int, timeout: float = 30) -> list[bytes]:
        return await self.remote.wait_for_messages_async(n, timeout)

    def sasl_logins(self) -> list[tuple[str, str]]:
        return SASL_LOGIN_RE.findall(self.postfix.log_text())

    def auth_failures(self) -> int:
        return len(_AUTH_FAILED_RE.findall(self.postfix.log_text()))

    def relay_denials(self) -> int:
        return len(_RELAY_DENIED_RE.findall(self.postfix.log_text()))

    def sessions(self) -> list[dict[str, str]]:
        out = []
        for client, counts in _DISCONNECT_RE.findall(self.postfix.log_text()):
            d = {"client": client}
            d.update(kv.split("=", 1) for kv in counts.split() if "=" in kv)
            out.append(d)
        return out

    def client_context(self) -> ssl.SSLContext:
        """Verifies the submission server's certificate (name 127.0.0.1 or upstream.test)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def smtp(self, timeout: float = 20) -> smtplib.SMTP:
        s = smtplib.SMTP(self.host, self.port, timeout=timeout)
        try:
            s.ehlo("client.test")
            s.starttls(context=self.client_context())
            s.ehlo("client.test")
        except BaseException:
            s.close()
            raise
        return s


@pytest.fixture(scope="module")
def submission_upstream(pubdir, upstream_cert):
    """One ``SubmissionUpstream`` per test module (see the module docstring)."""
    with SubmissionUpstream(instance_dir(pubdir, "submission"), upstream_cert) as sub:
        yield sub
