"""A private Dovecot IMAP instance for end-to-end tests (the system service is never used).

    from dovecot import DovecotInstance
    async with DovecotInstance(instance_dir(pubdir, "dovecot"), cert=upstream_cert) as dc:
        dc.port        # plaintext IMAP with STARTTLS on 127.0.0.1
        dc.tls_port    # implicit TLS (IMAPS) on 127.0.0.1
        dc.user, dc.password

`DovecotInstance(dir, *, cert, users={"alice": "secret"}, extra={})` writes its own
dovecot.conf (no system conf.d), with base_dir/state_dir/logs under *dir* (a 0755 directory,
e.g. `peers.instance_dir(pubdir, ...)`), a passwd-file with plaintext passwords, every user
mapped to uid/gid `nobody` (first_valid_uid lowered for it) with a Maildir under
`dir/home/<user>`, login processes unchrooted, the test CA's certificate for TLS, 127.0.0.0/8
in login_trusted_networks (so ID x-originating-ip is honoured), and no auth failure delay or
per-IP auth penalty (tests fail logins on purpose).
`start()` runs `dovecot -c FILE -F` in its own process group and waits (bounded) until both
ports accept connections; `stop()` sends SIGTERM to that process group, then SIGKILL if it
lingers. `log_text()` returns Dovecot's log. Needs root (Dovecot's master starts as root).

`DovecotAuth(dir, *, users={"alice": "s3cret pass+/="}, extra={})` is Dovecot as a SASL
server only (for Postfix's `smtpd_sasl_type = dovecot`): no mail protocols (`protocols =
none`), its auth service on a loopback TCP port, `auth_port`, `sasl_path` =
`inet:127.0.0.1:<auth_port>` (Postfix's `smtpd_sasl_path`); mechanisms PLAIN and LOGIN; the
same passwd-file (plaintext passwords; a password must not contain `:` or a line end), no
failure delay or penalty; still, Dovecot answers a failed login only at its next 500 ms check
of failures (`auth_failure_delay = 0` cannot go below that), so each wrong password costs a
test about 0.5 s. `start()` waits until the auth port accepts connections.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import signal
import subprocess
import time
import weakref
from pathlib import Path

import pytest

from peers import PeerProcess, free_port, require, wait_for_port

__all__ = ["DovecotAuth", "DovecotInstance"]

_LIVE: "weakref.WeakSet[DovecotInstance]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for dc in list(_LIVE):
        with contextlib.suppress(Exception):
            dc.stop()


_CONF = """\
# private test instance; written by tests/dovecot.py
instance_name = {name}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0 secs
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir
mail_max_userip_connections = 100
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/home/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0          # no auth penalty: tests fail a login on purpose
  }}
}}
{extra}
"""


class DovecotError(RuntimeError):
    pass


class DovecotInstance(PeerProcess):
    def __init__(self, directory, *, cert, users=None, extra: dict | None = None):
        self.dir = Path(directory)
        self.cert = cert
        self.users = dict(users or {"alice": "secret"})
        self.user, self.password = next(iter(self.users.items()))
        self.extra = dict(extra or {})
        self.port = free_port()
        self.tls_port = free_port()
        self.conf = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        self.console_path = self.dir / "console.log"
        self._proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("private Dovecot instances need root")
        nobody = pwd.getpwnam("nobody")
        for sub in ("run", "state", "home"):
            p = self.dir / sub
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, 0o755)
        for user in self.users:
            home = self.dir / "home" / user
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{p}::::::\n" for u, p in self.users.items()))
        os.chmod(passwd, 0o644)
        extra = "\n".join(f"{k} = {v}" for k, v in self.extra.items())
        self.conf.write_text(_CONF.format(
            name=f"gwtest-{self.port}", dir=self.dir, cert=self.cert.cert, key=self.cert.key,
            uid=nobody.pw_uid, gid=nobody.pw_gid, port=self.port, tls_port=self.tls_port,
            extra=extra))

    def _ready_ports(self) -> tuple[int, ...]:
        """The ports `start()` waits for."""
        return (self.port, self.tls_port)

    def start(self, timeout: float = 20) -> "DovecotInstance":
        dovecot = require("dovecot")
        self.write_config()
        self._console = open(self.console_path, "ab")
        self._proc = subprocess.Popen([dovecot, "-c", str(self.conf), "-F"],
                                      stdin=subprocess.DEVNULL, stdout=self._console,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        try:
            deadline = time.monotonic() + timeout
            alive = lambda: self._proc is not None and self._proc.poll() is None  # noqa: E731
            for port in self._ready_ports():
                wait_for_port("127.0.0.1", port, max(1.0, deadline - time.monotonic()),
                              alive=alive)
        except BaseException as exc:
            text = self.console_text() + self.log_text()
            self.stop()
            if isinstance(exc, Exception):
                raise DovecotError(f"dovecot did not start: {exc}\n{text}") from exc
            raise
        return self

    def stop(self, timeout: float = 10) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        finally:
            _LIVE.discard(self)
            console = getattr(self, "_console", None)
            if console is not None:
                console.close()
                self._console = None



_AUTH_CONF = """\
# private test instance (SASL for Postfix only); written by tests/dovecot.py
instance_name = {name}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0 secs
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/home/%u
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {auth_port}
  }}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0          # no auth penalty: tests fail a login on purpose
  }}
}}
{extra}
"""


class DovecotAuth(DovecotInstance):
    """Dovecot's auth service alone, on a loopback TCP port (see the module docstring)."""

    def __init__(self, directory, *, users=None, extra: dict | None = None):
        users = dict(users or {"alice": "s3cret pass+/="})
        for u, p in users.items():
            if any(c in u + p for c in ":\r\n") or not u:
                raise ValueError(f"passwd-file cannot hold user {u!r} with that password")
        super().__init__(directory, cert=None, users=users, extra=extra)
        self.auth_port = self.port
        self.tls_port = None

    @property
    def sasl_path(self) -> str:
        """Postfix's ``smtpd_sasl_path`` for this instance."""
        return f"inet:127.0.0.1:{self.auth_port}"

    def _ready_ports(self) -> tuple[int, ...]:
        return (self.auth_port,)

    def write_config(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("private Dovecot instances need root")
        nobody = pwd.getpwnam("nobody")
        for sub in ("run", "state", "home"):
            p = self.dir / sub
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, 0o755)
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{p}::::::\n" for u, p in self.users.items()))
        os.chmod(passwd, 0o644)
        extra = "\n".join(f"{k} = {v}" for k, v in self.extra.items())
        self.conf.write_text(_AUTH_CONF.format(
            name=f"gwtest-auth-{self.auth_port}", dir=self.dir, uid=nobody.pw_uid,
            gid=nobody.pw_gid, auth_port=self.auth_port, extra=extra))
