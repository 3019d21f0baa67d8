"""Real third-party peers for end-to-end tests: private Postfix instances, swaks, openssl s_client.

How to import this module
-------------------------
pytest runs with ``--import-mode=importlib``, which does NOT put ``tests/`` on ``sys.path``,
and ``tests/`` has no ``__init__.py``.  Start a test module with::

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from peers import PostfixInstance, free_port, require, run_swaks, openssl_s_client_starttls

(the insert is idempotent in effect; ``peers`` is then cached in ``sys.modules`` and shared by
all test modules).

API summary
-----------
``free_port()``
    An unused TCP port on 127.0.0.1 (bind to port 0, read it, close).
``require(tool)``
    Return the absolute path of a binary (``postfix``, ``swaks``, ``openssl``, ``haproxy``,
    ``dovecot`` ...; /usr/sbin and /usr/lib/postfix/sbin are searched too).  Missing: the test
    FAILS, wherever the suite runs, with a message naming ``bash .ci/install-peers.sh`` (a
    skipped peer test proves nothing and is easy to miss).
``instance_dir(pubdir, name)``
    A fresh, unique 0755 directory under ``pubdir`` (the conftest fixture) for one peer.
``PostfixInstance.upstream(dir, port, *, cert=None, key=None, starttls=True,
domains=("example.test",), ...)``
    A receiving Postfix: smtpd on 127.0.0.1:port, STARTTLS offered (level ``may``) when
    cert/key are given, accepts mail for ``domains`` only (others: 554 relay access denied)
    and delivers every recipient to the Maildir ``<dir>/mail/<domain>/`` (one file per
    recipient).  ``wait_for_messages(n, timeout=30)`` returns the raw bytes of the delivered
    files (LF line endings, Postfix prepends Return-Path, Delivered-To and Received
    headers; with TLS the Received header says ``using TLSv1.3``).
``PostfixInstance.sender(dir, port, relay_host, relay_port, *, tls_level="encrypt", ca=None,
...)``
    A relaying Postfix: smtpd on 127.0.0.1:port accepts mail from 127.0.0.0/8 for any domain
    and relays all of it to ``[relay_host]:relay_port`` with ``smtp_tls_security_level =
    tls_level``.  Inject with ``smtplib.SMTP("127.0.0.1", port)``; check the outcome with
    ``wait_for_log(r"status=sent")`` and ``wait_for_log(PostfixInstance.TLS_CLIENT_RE)``.
    The log line is ``Trusted`` (encrypt + CAfile), ``Verified`` (verify/secure) or
    ``Anonymous``/``Untrusted``.  For ``tls_level="secure"`` use ``relay_host="localhost"``:
    the secure level matches the nexthop name and does not accept the 127.0.0.1 IP SAN
    (mail stays deferred); ``verify`` works with 127.0.0.1.
``PostfixInstance.submission(dir, port, *, cert, key, sasl_path, relay_host, relay_port,
domains=("example.test",), ...)``
    ``upstream()`` plus SASL: ``smtpd_sasl_type = dovecot`` at ``sasl_path`` (a
    ``dovecot.DovecotAuth``'s ``sasl_path``), AUTH offered only after STARTTLS
    (``smtpd_tls_auth_only``), ``permit_sasl_authenticated, reject_unauth_destination``, an
    ``(Authenticated sender: USER)`` comment in the Received header, and mail for other
    domains relayed to ``[relay_host]:relay_port``.  ``tests/submission.py`` puts the pieces
    together (``SubmissionUpstream``).
All constructors take ``hostname=`` (myhostname) and ``extra={param: value}`` for any other
main.cf settings (e.g. ``smtp_tls_mandatory_protocols``, ``smtp_tls_wrappermode``).
Use an instance as a context manager: ``__enter__`` writes the configuration, runs
``postfix check``, starts ``postfix -c DIR start-fg`` in its own process group and waits
(bounded) until master logged "daemon started" and the smtpd port accepts connections (a
port already in use raises ``PostfixError`` with master's "fatal: bind" line); ``__exit__``
runs ``postfix -c DIR stop`` and makes sure that no process of the instance remains
(``instance_pids()``, found by MAIL_CONFIG in /proc/*/environ; master does not reap its
children, so exited ones may show as zombies until init reaps them).  Instances retry
deferred mail every 1-2 s (queue_run_delay, *_backoff_time), so a sender started before its
relay target is listening still delivers promptly.  Start-up takes ~0.2 s: the config files
are backdated (Postfix otherwise waits ~2 s for a "fresh" main.cf to settle).  ``log_text()`` returns the instance's maillog
(``<dir>/maillog``, written by postlogd, no syslog needed).
``run_swaks(*args, timeout=60)``
    ``subprocess.CompletedProcess`` (text; stdout and stderr) of ``swaks *args``.
``openssl_s_client_starttls(host, port, proto="smtp", *, cafile=None, input_bytes=None,
timeout=30, servername=None)``
    Output text (stdout + stderr) of ``openssl s_client -brief -starttls proto``;
    ``proto=None`` means implicit TLS.  ``parse_tls_version(text)`` extracts ``TLSv1.x``.

Async (trio) tests whose gateway runs in the same event loop must not call the blocking
waits: use ``async with PostfixInstance...``, ``await pf.wait_for_messages_async(n)``,
``await pf.wait_for_log_async(regex)``, ``await run_swaks_async(...)``,
``await openssl_s_client_starttls_async(...)`` (or ``trio.to_thread.run_sync``), and send
with smtplib inside ``trio.to_thread.run_sync``.

Layout of an instance directory: ``etc/`` (config_directory: main.cf, master.cf),
``queue/`` (queue_directory, root-owned, subdirectories made by ``post-install
create-missing`` during ``postfix check``), ``data/`` (data_directory, owned by postfix),
``mail/`` (virtual_mailbox_base, owned by postfix), ``maillog``, ``console.log`` (stdout and
stderr of ``postfix start-fg``, i.e. messages from before postlogd runs).

Everything here must run as root (Postfix's master daemon requires it); the system's own
Postfix/dovecot/haproxy services are never touched.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

__all__ = [
    "free_port",
    "require",
    "instance_dir",
    "PostfixInstance",
    "PostfixError",
    "run_swaks",
    "openssl_s_client_starttls",
    "parse_tls_version",
    "wait_for_port",
    "run_swaks_async",
    "openssl_s_client_starttls_async",
]

_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin", "/usr/local/sbin")


# --------------------------------------------------------------------------- generic helpers


def free_port() -> int:
    """An (at this moment) unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(tool: str) -> str | None:
    if os.path.isabs(tool):
        return tool if os.access(tool, os.X_OK) else None
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_PATH)
    return shutil.which(tool, path=path)


def require(tool: str) -> str:
    """Absolute path of ``tool``; a missing one fails the test, wherever the suite runs."""
    found = _which(tool)
    if found:
        return found
    pytest.fail(f"required peer binary {tool!r} not found: install the test peers with "
                f"`bash .ci/install-peers.sh` (as root, Debian 12)", pytrace=False)
    raise AssertionError("unreachable")  # pragma: no cover


def instance_dir(pubdir: os.PathLike | str, name: str = "peer") -> Path:
    """A fresh unique 0755 directory under ``pubdir`` (reachable by the postfix user)."""
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=str(pubdir)))
    os.chmod(d, 0o755)
    return d


def wait_for_port(host: str, port: int, timeout: float = 30.0, *, alive=None) -> None:
    """Bounded wait until ``host:port`` accepts a TCP connection.

    ``alive`` is an optional callable returning False when the server process has died, which
    aborts the wait early.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if alive is not None and not alive():
            raise PostfixError(f"server for {host}:{port} exited before it accepted connections")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)


_TLS_VERSION_RE = re.compile(r"\b(TLSv1(?:\.[0-3])?|SSLv3)\b")


def parse_tls_version(text: str) -> str | None:
    """First ``TLSv1.x`` (or SSLv3) token found in ``text``, or None."""
    m = _TLS_VERSION_RE.search(text)
    return m.group(1) if m else None


def run_swaks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``swaks *args`` (no stdin) and return the completed process (text output).

    Does not raise on a non-zero exit status: check ``.returncode`` (swaks exits 0 on success).
    Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    swaks = require("swaks")
    return subprocess.run(
        [swaks, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_DEFAULT_QUIT = {"smtp": b"QUIT\r\n", "lmtp": b"QUIT\r\n", "pop3": b"QUIT\r\n",
                 "imap": b"a1 LOGOUT\r\n"}


def openssl_s_client_starttls(
    host: str,
    port: int,
    proto: str | None = "smtp",
    *,
    cafile: os.PathLike | str | None = None,
    input_bytes: bytes | None = None,
    timeout: float = 30,
    servername: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """Connect with ``openssl s_client -brief`` (STARTTLS for ``proto``; None = implicit TLS).

    Returns stdout + stderr as text; with ``-brief`` it contains e.g. ``Protocol version:
    TLSv1.3``, ``Ciphersuite: ...`` and, when ``cafile`` is given, ``Verification: OK`` (the
    handshake is aborted on a verification error in that case).  ``input_bytes`` is sent after
    the handshake (default: the protocol's QUIT/LOGOUT command).
    """
    openssl = require("openssl")
    cmd = [openssl, "s_client", "-connect", f"{host}:{port}", "-brief", "-nocommands"]
    if proto:
        cmd += ["-starttls", proto]
    if servername:
        cmd += ["-servername", servername]
    if cafile is not None:
        cmd += ["-CAfile", str(cafile), "-verify_return_error"]
    cmd += list(extra_args)
    if input_bytes is None:
        input_bytes = _DEFAULT_QUIT.get(proto or "", b"")
    proc = subprocess.run(cmd, input=input_bytes, capture_output=True, timeout=timeout)
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")


# --------------------------------------------------------------------------- Postfix


class PostfixError(RuntimeError):
    pass


def _postfix_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postfix")
    return pw.pw_uid, pw.pw_gid


def _chown_postfix(path: Path) -> None:
    uid, gid = _postfix_ids()
    os.chown(path, uid, gid)


_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


_LIVE: "weakref.WeakSet[PostfixInstance]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_instances() -> None:
    """Safety net for an interrupted run: stop every instance still running at exit."""
    for pf in list(_LIVE):
        with contextlib.suppress(Exception):
            pf.stop()


class PeerProcess:
    """What the private peer instances share: their log files read as text (empty before
    they exist) and use as a context manager, sync or async (start in a thread).
    A subclass has `log_path`, `console_path`, `start()` returning itself, and `stop()`."""

    log_path: Path
    console_path: Path

    def log_text(self) -> str:
        return _read_text(self.log_path)

    def console_text(self) -> str:
        return _read_text(self.console_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def __aenter__(self):
        import trio
        return await trio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info) -> None:
        import trio
        await trio.to_thread.run_sync(self.stop)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class PostfixInstance(PeerProcess):
    """A private Postfix instance (see the module docstring).  Use as a context manager."""

    #: sender log line for an outgoing TLS session; group 1 = Trusted/Untrusted/Anonymous/...,
    #: group 2 = the peer, group 3 = protocol version.
    TLS_CLIENT_RE = re.compile(
        r"(\w+) TLS connection established to (\S+): (TLSv1(?:\.\d)?) with cipher (\S+)")
    #: upstream (smtpd) log line for an incoming TLS session.
    TLS_SERVER_RE = re.compile(
        r"(\w+) TLS connection established from (\S+): (TLSv1(?:\.\d)?) with cipher (\S+)")

    def __init__(self, directory: os.PathLike | str, port: int, *, role: str,
                 settings: Mapping[str, str], domains: Iterable[str] = ()):
        self.dir = Path(directory).resolve()
        self.port = int(port)
        self.host = "127.0.0.1"
        self.role = role
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.mail_dir = self.dir / "mail"
        self.log_path = self.dir / "maillog"
        self.console_path = self.dir / "console.log"
        self.settings: dict[str, str] = dict(settings)
        self.domains: tuple[str, ...] = tuple(domains)
        self._proc: subprocess.Popen | None = None
        self._console = None
        self.master_pid: int | None = None

    # ------------------------------------------------------------------ constructors

    @staticmethod
    def _base_settings(d: Path, hostname: str) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "config_directory": str(d / "etc"),
            "queue_directory": str(d / "queue"),
            "data_directory": str(d / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": hostname,
            "mydomain": hostname.partition(".")[2] or "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": str(d / "maillog"),
            "maillog_file_prefixes": str(d),
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "biff": "no",
            "in_flow_delay": "0",
            "delay_warning_time": "0",
            # retry quickly: a deferred message is retried within seconds, not minutes
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "10s",
            "multi_instance_directories": "",
        }

    @classmethod
    def upstream(cls, directory: os.PathLike | str, port: int, *,
                 cert: os.PathLike | str | None = None,
                 key: os.PathLike | str | None = None,
                 starttls: bool = True,
                 domains: Iterable[str] = ("example.test",),
                 hostname: str = "upstream.test",
                 extra: Mapping[str, str] | None = None) -> "PostfixInstance":
        """A Postfix that receives mail for ``domains`` and stores it in Maildirs."""
        d = Path(directory).resolve()
        domains = tuple(domains)
        uid, gid = _postfix_ids()
        s = cls._base_settings(d, hostname)
        s.update({
            "virtual_mailbox_domains": ", ".join(domains),
            "virtual_mailbox_base": str(d / "mail"),
            "virtual_mailbox_maps": f"regexp:{d / 'etc' / 'vmailbox'}",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": str(min(uid, 100)),
            # accept only ``domains`` (no relaying, even for mynetworks): a misaddressed
            # recipient fails at RCPT time instead of sitting in the queue.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        })
        if cert is not None and starttls:
            if key is None:
                raise ValueError("upstream TLS needs both cert and key")
            s.update({
                "smtpd_tls_security_level": "may",
                "smtpd_tls_chain_files": f"{Path(key).resolve()}, {Path(cert).resolve()}",
            })
        else:
            s["smtpd_tls_security_level"] = "none"
        s.update(extra or {})
        return cls(d, port, role="upstream", settings=s, domains=domains)

    @classmethod
    def sender(cls, directory: os.PathLike | str, port: int, relay_host: str, relay_port: int,
               *, tls_level: str = "encrypt",
               ca: os.PathLike | str | None = None,
               client_cert: os.PathLike | str | None = None,
               client_key: os.PathLike | str | None = None,
               servername: str | None = None,
               hostname: str = "sender.test",
               extra: Mapping[str, str] | None = None) -> "PostfixInstance":
        """A Postfix that relays all mail it receives to ``[relay_host]:relay_port``.

        ``client_cert``/``client_key`` present a client certificate; ``servername`` sets SNI
        (``smtp_tls_servername``).
        """
        d = Path(directory).resolve()
        s = cls._base_settings(d, hostname)
        s.update({
            "relayhost": f"[{relay_host}]:{int(relay_port)}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_tls_security_level": tls_level,
            "smtp_tls_loglevel": "1",
        })
        if ca is not None:
            s["smtp_tls_CAfile"] = str(Path(ca).resolve())
        if client_cert is not None:
            if client_key is None:
                raise ValueError("client certificate needs a key")
            s["smtp_tls_chain_files"] = (
                f"{Path(client_key).resolve()}, {Path(client_cert).resolve()}")
        if servername is not None:
            s["smtp_tls_servername"] = servername
        s.update(extra or {})
        return cls(d, port, role="sender", settings=s)

    @classmethod
    def submission(cls, directory: os.PathLike | str, port: int, *,
                   cert: os.PathLike | str, key: os.PathLike | str,
                   sasl_path: str, relay_host: str, relay_port: int,
                   domains: Iterable[str] = ("example.test",),
                   hostname: str = "submission.test",
                   extra: Mapping[str, str] | None = None) -> "PostfixInstance":
        """A submission server: ``upstream()`` (Maildirs for ``domains``, STARTTLS) plus SASL
        AUTH through Dovecot at ``sasl_path`` (``inet:127.0.0.1:PORT``, see
        ``dovecot.DovecotAuth``), offered only after STARTTLS; authenticated clients may
        relay anywhere, and mail for other domains goes to ``[relay_host]:relay_port``."""
        pf = cls.upstream(directory, port, cert=cert, key=key, domains=domains,
                          hostname=hostname)
        pf.role = "submission"
        pf.settings.update({
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": sasl_path,
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_authenticated_header": "yes",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "relayhost": f"[{relay_host}]:{int(relay_port)}",
            "smtp_tls_security_level": "none",
        })
        pf.settings.update(extra or {})
        return pf

    # ------------------------------------------------------------------ configuration

    def _postfix(self) -> str:
        return require("postfix")

    def _run(self, *args: str, timeout: float = 60, check: bool = True
             ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self._postfix(), "-c", str(self.config_dir), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise PostfixError(
                f"postfix {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n{self.log_text()}")
        return proc

    def write_config(self) -> None:
        """Create the instance directories and write main.cf / master.cf."""
        if os.geteuid() != 0:
            pytest.skip("private Postfix instances need root")
        for p in (self.dir, self.config_dir, self.queue_dir):
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, 0, 0)
            os.chmod(p, 0o755)
        for p in (self.data_dir, self.mail_dir):
            p.mkdir(parents=True, exist_ok=True)
            _chown_postfix(p)
            os.chmod(p, 0o700 if p == self.data_dir else 0o755)
        main_cf = "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        (self.config_dir / "main.cf").write_text(main_cf)
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.host}:{self.port}"))
        # one Maildir per domain: mail/<domain>/ (virtual(8) forbids $1 substitutions)
        (self.config_dir / "vmailbox").write_text("".join(
            f"/@{re.escape(dom)}$/\t{dom}/\n" for dom in self.domains))
        # Postfix waits (up to ~2 s) while main.cf's mtime is "just now", in case it is still
        # being edited: backdate the files we wrote.
        past = time.time() - 60
        for f in ("main.cf", "master.cf", "vmailbox"):
            os.chmod(self.config_dir / f, 0o644)
            os.utime(self.config_dir / f, (past, past))

    def check(self) -> str:
        """``postfix -c DIR check`` (also creates the missing queue directories)."""
        proc = self._run("check", timeout=60)
        return proc.stdout + proc.stderr

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30) -> "PostfixInstance":
        self.write_config()
        self.check()
        # `postfix check` just passed: let start-fg skip its (slow) second integrity check.
        (self.queue_dir / "quick-start").touch()
        log_offset = self._log_size()
        self._console = open(self.console_path, "ab")
        self._proc = subprocess.Popen(
            [self._postfix(), "-c", str(self.config_dir), "start-fg"],
            stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)
        try:
            # Ready = master logged "daemon started" (it binds its listeners before that; a
            # port someone else listens on makes it log "fatal: bind ...") and the port answers.
            deadline = time.monotonic() + timeout
            while True:
                new_log = self._log_bytes(log_offset)
                if re.search(rb"postfix/master\[\d+\]: daemon started", new_log):
                    break
                fatal = re.search(rb"postfix/\S+\[\d+\]: fatal: .*", new_log)
                if fatal:
                    raise PostfixError(fatal.group(0).decode(errors="replace"))
                if self._proc.poll() is not None:
                    raise PostfixError(f"postfix start-fg exited ({self._proc.returncode})")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no 'daemon started' in the log after {timeout}s")
                time.sleep(0.05)
            wait_for_port(self.host, self.port, max(1.0, deadline - time.monotonic()),
                          alive=lambda: self._proc is not None and self._proc.poll() is None)
            self.master_pid = self._read_master_pid()
        except BaseException as exc:
            text = self.console_text() + self.log_text()
            self.stop()
            if isinstance(exc, Exception):
                raise PostfixError(f"postfix {self.role} did not start: {exc}\n{text}") from exc
            raise
        return self

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def instance_pids(self) -> list[int]:
        """PIDs of all live processes belonging to this instance (MAIL_CONFIG = our etc/)."""
        needle = f"MAIL_CONFIG={self.config_dir}".encode()
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in env and state != b"Z":
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 20) -> None:
        """Stop the instance and every process it started (idempotent)."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired, PostfixError, OSError):
                    self._run("stop", timeout=timeout, check=False)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # leftovers in our process group
            # Anything still around (children detached into another group): wait a little
            # for them to exit after master's SIGTERM, then kill them.
            deadline = time.monotonic() + 5
            while self.instance_pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in self.instance_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            _LIVE.discard(self)
            if self._console is not None:
                self._console.close()
                self._console = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ observation

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_bytes(self, offset: int = 0) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def wait_for_log(self, regex: str | re.Pattern, timeout: float = 30) -> re.Match:
        """Bounded poll of the maillog until ``regex`` matches; returns the match."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.log_text())
            if m:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{pattern.pattern!r} not in {self.role} log after {timeout}s:\n"
                    f"{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def maildir_files(self) -> list[Path]:
        """Delivered message files (``mail/<domain>/new/*``), oldest first."""
        files = [p for p in self.mail_dir.glob("*/new/*") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in self.maildir_files()]

    def wait_for_messages(self, n: int, timeout: float = 30) -> list[bytes]:
        """Bounded poll until at least ``n`` messages were delivered; returns their bytes."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.maildir_files()
            if len(files) >= n:
                return [p.read_bytes() for p in files]
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(files)}/{n} messages delivered after {timeout}s; log:\n"
                    f"{self.log_text()[-4000:]}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ trio variants
    # Use these from async tests when the code under test runs in the same trio loop:
    # the blocking versions would stall it (and the gateway) until they time out.

    async def wait_for_log_async(self, regex: str | re.Pattern, timeout: float = 30
                                 ) -> re.Match:
        import trio
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        with trio.move_on_after(timeout):
            while not (m := pattern.search(self.log_text())):
                await trio.sleep(0.05)
            return m
        raise TimeoutError(f"{pattern.pattern!r} not in {self.role} log after {timeout}s:\n"
                           f"{self.log_text()[-4000:]}")

    async def wait_for_messages_async(self, n: int, timeout: float = 30) -> list[bytes]:
        import trio
        with trio.move_on_after(timeout):
            while len(files := self.maildir_files()) < n:
                await trio.sleep(0.05)
            return [p.read_bytes() for p in files]
        raise TimeoutError(f"{len(self.maildir_files())}/{n} messages delivered after "
                           f"{timeout}s; log:\n{self.log_text()[-4000:]}")


async def run_swaks_async(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``run_swaks`` in a worker thread (for trio tests)."""
    import trio
    return await trio.to_thread.run_sync(functools.partial(run_swaks, *args, timeout=timeout))


async def openssl_s_client_starttls_async(*args, **kwargs) -> str:
    """``openssl_s_client_starttls`` in a worker thread (for trio tests)."""
    import trio
    return await trio.to_thread.run_sync(
        functools.partial(openssl_s_client_starttls, *args, **kwargs))
