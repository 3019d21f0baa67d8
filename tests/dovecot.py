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

__all__ = ["DovecotInstance"]

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
            for port in (self.port, self.tls_port):
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

