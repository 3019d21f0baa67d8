"""The servers a benchmark run starts: the gateway, its peers (nginx mail proxy, Postfix as a
relay), the sinks (Postfix's smtp-sink; `gateway sink` for a TLS upstream), and /proc
accounting (CPU time and memory of a process tree).

Every server is a private instance on an ephemeral 127.0.0.1 port with its own directory
under the run's work directory; nothing here touches a system service. Every wait is
bounded. (Ideas from tests/peers.py, which benchmarks do not import.)
"""
from __future__ import annotations

import contextlib
import datetime
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")


class ServerError(RuntimeError):
    pass


# How to start the gateway: the working tree's editable install by default; use_source()
# points it at another source tree (e.g. a `git archive HEAD` snapshot) via PYTHONPATH.
GATEWAY_CMD = [str(VENV_BIN / "gateway")]
GATEWAY_ENV: dict[str, str] = {}
GATEWAY_SRC = "working tree (editable install)"
GATEWAY_CWD: str | None = None      # `python -m` puts the cwd first on sys.path




def use_source(src: Path, label: str) -> None:
    global GATEWAY_CMD, GATEWAY_ENV, GATEWAY_SRC, GATEWAY_CWD
    GATEWAY_CMD = [sys.executable, "-m", "gateway"]
    GATEWAY_CWD = str(src)
    GATEWAY_ENV = {"PYTHONPATH": str(src)}
    GATEWAY_SRC = label


def gateway_env() -> dict[str, str]:
    return {**os.environ, **GATEWAY_ENV}


def gateway_importable() -> str | None:
    """None when the chosen gateway source imports cleanly, else the error."""
    p = subprocess.run([*GATEWAY_CMD, "--version"], capture_output=True, text=True,
                       timeout=60, env=gateway_env(), cwd=GATEWAY_CWD)
    if p.returncode != 0:
        return ((p.stderr or p.stdout).strip().splitlines() or [f"exit {p.returncode}"])[-1]
    c = subprocess.run([sys.executable, "-c",
                        "import gateway.cli, gateway.serve.server, gateway.config, gateway.rules"],
                       capture_output=True, text=True, timeout=60, env=gateway_env(), cwd=GATEWAY_CWD)
    if c.returncode != 0:
        return (c.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def which(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(EXTRA_PATH)
    return shutil.which(tool, path=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(n: int = 65536) -> int:
    """Raise RLIMIT_NOFILE of this process (and what it starts) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    for h in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, h), h))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_smtp(port: int, timeout: float = 30.0, alive=None, banner: bytes = b"220") -> None:
    """Bounded wait until 127.0.0.1:port greets with `banner`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ServerError(f"server on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                data = s.recv(512)
                if data.startswith(banner):
                    s.sendall(b"QUIT\r\n" if banner == b"220" else b"a LOGOUT\r\n")
                    return
                if data:            # a different protocol answers: no point waiting
                    raise ServerError(f"port {port} answered {data[:80]!r}, not {banner!r}")
                last = data
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise ServerError(f"port {port} not ready after {timeout}s ({last!r})")


# ------------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for e in os.scandir("/proc"):
        if not e.name.isdigit():
            continue
        try:
            with open(f"/proc/{e.name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(rest[1]), []).append(int(e.name))
    return kids


def tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime summed over the processes (exited, reaped children are in
    their parent's cutime/cstime, so a tree's total only grows)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in rest[11:15])     # fields 14-17: utime stime cutime cstime
    return total / CLK_TCK


def tree_cpu(root_pids: list[int]) -> float:
    pids: list[int] = []
    for r in root_pids:
        pids.extend(tree(r))
    return cpu_seconds(sorted(set(pids)))


def memory(pids: list[int]) -> dict:
    """RSS and PSS (KiB) summed over the processes (from /proc/PID/smaps_rollup)."""
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return {"rss_kib": rss, "pss_kib": pss}


# ------------------------------------------------------------------------------- certificate


def write_ecdsa_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost/127.0.0.1 (cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(cert_path, 0o644)
    os.chmod(key_path, 0o644)       # benchmark-only key: readable by the peers' users
    return cert_path, key_path


# ------------------------------------------------------------------------------- processes


class Proc:
    """A server process started by the run; `pids` are the roots of its process tree."""

    name = "server"

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = None

    def popen(self, cmd: list[str], log_path: Path, nofile: int | None = None, **kw):
        self.log = open(log_path, "ab")

        def pre():
            os.setsid()
            if nofile:
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=pre, **kw)

    def ready(self, *waits) -> None:
        """Run the readiness waits; on any failure stop the process, then re-raise."""
        try:
            for w in waits:
                w()
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def cpu(self) -> float:
        return tree_cpu(self.pids)

    def mem(self) -> dict:
        pids: list[int] = []
        for r in self.pids:
            pids.extend(tree(r))
        return memory(sorted(set(pids)))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SmtpSink(Proc):
    """Postfix's smtp-sink (C, event-driven, one process): plaintext upstream."""

    name = "smtp-sink"

    def start(self, workdir: Path) -> "SmtpSink":
        exe = which("smtp-sink")
        if exe is None:
            raise ServerError("smtp-sink not installed (package postfix)")
        self.port = free_port()
        # -a -C -F: no AUTH, XCLIENT, XFORWARD (so no proxy uses them); runs as postfix
        self.popen([exe, "-a", "-C", "-F", "-u", "postfix", "-m", "4096", "-h", "sink.bench",
                    f"127.0.0.1:{self.port}", "1024"], workdir / "smtp-sink.log", nofile=65536)
        self.ready(lambda: wait_smtp(self.port, alive=self.alive))
        return self


class TlsSink(Proc):
    """`gateway sink --starttls` (Python/trio): the upstream that offers STARTTLS."""

    name = "gateway sink --starttls"

    def start(self, workdir: Path, cert: Path, key: Path) -> "TlsSink":
        self.port = free_port()
        self.popen([*GATEWAY_CMD, "sink", "--listen", f"127.0.0.1:{self.port}",
                    "--starttls", "--cert", str(cert), "--key", str(key)],
                   workdir / "tls-sink.log", nofile=65536, env=gateway_env(), cwd=GATEWAY_CWD)
        self.ready(lambda: wait_smtp(self.port, alive=self.alive))
        return self


def gateway_toml(*, workers: int, cert: Path, key: Path, listeners: list[dict],
                 metrics_port: int | None, gateway: dict | None = None) -> str:
    """`gateway`: more [gateway] keys; a listener's "milters" (a list of tables) become its
    [[listeners.milters]]."""
    lines = ["[gateway]", 'hostname = "gw.bench"', f"workers = {workers}",
             f'metrics = "127.0.0.1:{metrics_port}"' if metrics_port else 'metrics = ""',
             'log_format = "logfmt"', "shutdown_grace = 2"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in (gateway or {}).items()]
    lines += ["", "[certificates.bench]", f'cert = "{cert}"', f'key = "{key}"', ""]
    for lst in listeners:
        lines += ["[[listeners]]"]
        for k, v in lst.items():
            if k not in ("upstream", "milters"):
                lines.append(f"{k} = {_toml_value(v)}")
        lines += ["", "[listeners.upstream]"]
        for k, v in lst["upstream"].items():
            lines.append(f"{k} = {_toml_value(v)}")
        for milter in lst.get("milters", ()):
            lines += ["", "[[listeners.milters]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in milter.items()]
        lines.append("")
    return "\n".join(lines).replace("'", '"')


def _toml_value(v) -> str:
    """A TOML value for the simple values the benchmark configs use (the caller turns the
    quotes of repr() into TOML's)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, (str, list)) else str(v)


class Gateway(Proc):
    """`gateway run -c FILE`: the supervisor and its workers (one process tree)."""

    name = "gateway"

    def start(self, workdir: Path, toml_text: str, ports: list[int], tag: str = "gateway",
              banner: bytes = b"220", timeout: float = 30) -> "Gateway":
        cfg = workdir / f"{tag}.toml"
        cfg.write_text(toml_text)
        chk = subprocess.run([*GATEWAY_CMD, "check", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60, env=gateway_env(), cwd=GATEWAY_CWD)
        if chk.returncode != 0:
            text = (chk.stderr or chk.stdout).strip().splitlines()
            raise ServerError(f"gateway check: {text[-1] if text else chk.returncode}")
        self.popen([*GATEWAY_CMD, "run", "-c", str(cfg)], workdir / f"{tag}.log",
                   nofile=65536, env=gateway_env(), cwd=GATEWAY_CWD)
        self.ready(*(lambda p=port: wait_smtp(p, alive=self.alive, banner=banner,
                                              timeout=timeout) for port in ports))
        self.port = ports[0]
        return self

    def workers(self) -> list[int]:
        return [p for p in tree(self.proc.pid) if p != self.proc.pid] if self.proc else []


NGINX_CONF = """\
load_module {module};
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}

http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {upstream_port};
            return 204;
        }}
    }}
}}

mail {{
    server_name gw.bench;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_pass_error_message on;
    smtp_capabilities "SIZE 52428800" 8BITMIME PIPELINING ENHANCEDSTATUSCODES;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    server {{
        listen 127.0.0.1:{port_tls};
        protocol smtp;
        smtp_auth none;
        xclient off;
        starttls on;
    }}
    server {{
        listen 127.0.0.1:{port_plain};
        protocol smtp;
        smtp_auth none;
        xclient off;
        starttls off;
    }}
}}
"""


class Nginx(Proc):
    """nginx mail proxy: SMTP, client STARTTLS (one port) and plaintext (another), plaintext
    upstream chosen by an auth_http endpoint that nginx itself serves."""

    name = "nginx"

    def start(self, workdir: Path, cert: Path, key: Path, upstream_port: int,
              workers: int = 1) -> "Nginx":
        exe, module = self._paths()
        d = workdir / "nginx"
        self.port_tls, self.port_plain, auth_port = free_port(), free_port(), free_port()
        self._launch(exe, d, NGINX_CONF.format(
            module=module, workers=workers, dir=d, auth_port=auth_port,
            upstream_port=upstream_port, cert=cert, key=key, port_tls=self.port_tls,
            port_plain=self.port_plain), [self.port_tls, self.port_plain])
        return self

    @staticmethod
    def _paths() -> tuple[str, str]:
        exe = which("nginx")
        module = "/usr/lib/nginx/modules/ngx_mail_module.so"
        if exe is None or not os.path.exists(module):
            raise ServerError("nginx with the mail module not installed "
                              "(apt-get install nginx libnginx-mod-mail)")
        return exe, module

    def _launch(self, exe: str, d: Path, conf_text: str, ports: list[int]) -> None:
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(conf_text)
        t = subprocess.run([exe, "-t", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                           capture_output=True, text=True, timeout=30)
        if t.returncode != 0:
            raise ServerError(f"nginx -t: {t.stderr.strip()}")
        self.popen([exe, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                   d / "console.log", nofile=65536)
        self.ready(*(lambda p=p: wait_smtp(p, alive=self.alive) for p in ports))
        self.port = ports[0]


NGINX_SUBMISSION_CONF = """\
load_module {module};
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}

http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {upstream_port};
            return 204;
        }}
    }}
}}

mail {{
    server_name gw.bench;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_pass_error_message on;
    smtp_capabilities "SIZE 52428800" 8BITMIME PIPELINING ENHANCEDSTATUSCODES;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    server {{
        listen 127.0.0.1:{port};
        protocol smtp;
        smtp_auth plain login;
        starttls only;
        xclient off;
        proxy_smtp_auth on;
    }}
}}
"""


class NginxSubmission(Nginx):
    """nginx mail proxy as a submission front: STARTTLS required, `smtp_auth plain login`;
    the auth_http stub (an http server block of the same nginx) says OK to every login and
    names the backend; `proxy_smtp_auth on` (nginx >= 1.19.4) repeats the client's AUTH PLAIN
    to the backend, which decides (Postfix with Dovecot SASL: the password is checked there,
    as behind the gateway). nginx's mail module has no TLS to the backend, so the backend
    port is plaintext with AUTH allowed."""

    name = "nginx (submission)"

    def start(self, workdir: Path, cert: Path, key: Path, upstream_port: int,
              workers: int = 1) -> "NginxSubmission":
        exe, module = self._paths()
        d = workdir / "nginx-submission"
        port, auth_port = free_port(), free_port()
        self._launch(exe, d, NGINX_SUBMISSION_CONF.format(
            module=module, workers=workers, dir=d, auth_port=auth_port,
            upstream_port=upstream_port, cert=cert, key=key, port=port), [port])
        return self


POSTFIX_MASTER_CF = """\
{tls_listen} inet  n       -       n       -       -       smtpd
{plain_listen} inet  n       -       n       -       -       smtpd -o smtpd_tls_security_level=none{plain_opts}
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Proc):
    """A private Postfix relaying everything to [127.0.0.1]:relay_port at once (smtpd →
    cleanup → qmgr → smtp; no content filter, no delays, no DNS). STARTTLS offered on one
    port, no TLS on the other; `upstream_tls` sets smtp_tls_security_level; `extra` adds to
    (or overrides) main.cf, `plain_opts` to the plaintext port's master.cf line (`-o k=v ...`).
    """

    name = "postfix"

    def start(self, workdir: Path, cert: Path, key: Path, relay_port: int,
              upstream_tls: str = "none", tag: str = "postfix",
              extra: dict | None = None, plain_opts: str = "") -> "Postfix":
        exe = which("postfix")
        if exe is None or os.geteuid() != 0:
            raise ServerError("postfix missing or not root")
        d = (workdir / tag).resolve()
        etc, queue, data = d / "etc", d / "queue", d / "data"
        for p in (d, etc, queue):
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, 0o755)
        data.mkdir(exist_ok=True)
        import pwd
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        self.queue_dir = queue
        self.port_tls, self.port_plain = free_port(), free_port()
        settings = {
            "compatibility_level": "3.6", "config_directory": str(etc),
            "queue_directory": str(queue), "data_directory": str(data),
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": "relay.bench", "mydomain": "bench", "myorigin": "$myhostname",
            "mydestination": "", "alias_maps": "", "alias_database": "",
            "local_recipient_maps": "", "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4", "mynetworks": "127.0.0.0/8",
            "maillog_file": str(d / "maillog"), "maillog_file_prefixes": str(d),
            "smtpd_banner": "$myhostname ESMTP", "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native", "disable_dns_lookups": "yes", "biff": "no",
            "in_flow_delay": "0", "delay_warning_time": "0",
            "queue_run_delay": "1s", "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s", "multi_instance_directories": "",
            "relayhost": f"[127.0.0.1]:{relay_port}", "default_transport": "smtp",
            "relay_transport": "smtp", "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_chain_files": f"{key}, {cert}",
            "smtpd_tls_session_cache_database": "",
            "smtp_tls_security_level": upstream_tls,
            "smtp_tls_session_cache_database": "",
            "default_process_limit": "200",
            "smtpd_client_connection_count_limit": "0",
            "default_destination_concurrency_limit": "50",
            "message_size_limit": "52428800",
        }
        settings.update(extra or {})
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(
            tls_listen=f"127.0.0.1:{self.port_tls}", plain_listen=f"127.0.0.1:{self.port_plain}",
            plain_opts=f" {plain_opts}" if plain_opts else ""))
        past = time.time() - 60
        for f in ("main.cf", "master.cf"):
            os.utime(etc / f, (past, past))
        chk = subprocess.run([exe, "-c", str(etc), "check"], capture_output=True, text=True,
                             timeout=60)
        if chk.returncode != 0:
            raise ServerError(f"postfix check: {chk.stdout}{chk.stderr}")
        (queue / "quick-start").touch()
        self.popen([exe, "-c", str(etc), "start-fg"], d / "console.log", nofile=65536)
        self._exe, self._etc = exe, etc
        self.ready(lambda: wait_smtp(self.port_tls, alive=self.alive),
                   lambda: wait_smtp(self.port_plain, alive=self.alive))
        self.port = self.port_tls
        return self

    def queued(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue_dir / sub):
                n += len(files)
        return n

    def wait_drained(self, timeout: float = 60) -> bool:
        """Bounded wait until the queue is empty (every message relayed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([self._exe, "-c", str(self._etc), "stop"],
                               capture_output=True, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        # kill what remains of the instance (found by MAIL_CONFIG in the environment)
        needle = f"MAIL_CONFIG={getattr(self, '_etc', '')}".encode()
        for e in os.scandir("/proc") if hasattr(self, "_etc") else ():
            if e.name.isdigit():
                try:
                    with open(f"/proc/{e.name}/environ", "rb") as f:
                        if needle in f.read().split(b"\0"):
                            os.kill(int(e.name), signal.SIGKILL)
                except OSError:
                    pass
        super().stop()


def submission_settings(sasl_path: str) -> dict[str, str]:
    """main.cf for `Postfix` as a submission server: SASL through Dovecot at `sasl_path`,
    AUTH only after STARTTLS (the plaintext port overrides that for nginx's backend leg:
    `SUBMISSION_PLAIN_OPTS`), only authenticated clients may relay."""
    return {"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": sasl_path, "smtpd_tls_auth_only": "yes",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject"}


SUBMISSION_PLAIN_OPTS = "-o smtpd_tls_auth_only=no"


DOVECOT_AUTH_CONF = """\
# benchmark: Dovecot as Postfix's SASL server only
instance_name = gwbench-auth-{port}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home=/nonexistent
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


class DovecotAuth(Proc):
    """Dovecot's auth service alone on a loopback port (Postfix's `smtpd_sasl_type =
    dovecot`, `smtpd_sasl_path = inet:127.0.0.1:PORT`), users from a passwd-file (plaintext
    passwords), no auth cache (Dovecot's default)."""

    name = "dovecot auth"

    def start(self, workdir: Path, users: dict[str, str]) -> "DovecotAuth":
        exe = which("dovecot")
        if exe is None or os.geteuid() != 0:
            raise ServerError("dovecot missing (apt-get install dovecot-core) or not root")
        import pwd
        nobody = pwd.getpwnam("nobody")
        d = (workdir / "dovecot-auth").resolve()
        for sub in ("", "run", "state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d / sub, 0o755)
        (d / "passwd").write_text("".join(f"{u}:{p}::::::\n" for u, p in users.items()))
        os.chmod(d / "passwd", 0o644)
        self.port = free_port()
        conf = d / "dovecot.conf"
        conf.write_text(DOVECOT_AUTH_CONF.format(port=self.port, dir=d, uid=nobody.pw_uid,
                                                 gid=nobody.pw_gid))
        self.popen([exe, "-c", str(conf), "-F"], d / "console.log")
        self.ready(lambda: _wait_port(self.port, alive=self.alive))
        return self

    @property
    def sasl_path(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


def _wait_port(port: int, timeout: float = 30.0, alive=None) -> None:
    """Bounded wait until 127.0.0.1:port accepts a connection."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise ServerError(f"server on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ServerError(f"port {port} not ready after {timeout}s ({exc!r})") from None
        time.sleep(0.05)


# ------------------------------------------------------------------------------- milters


class MilterStub(Proc):
    """benchmarks/milter_stub.py: an accept-all milter answering every stage."""

    name = "milter-stub"

    def start(self, workdir: Path) -> "MilterStub":
        self.port = free_port()
        self.address = f"inet:127.0.0.1:{self.port}"
        self.popen([sys.executable, str(Path(__file__).resolve().parent / "milter_stub.py"),
                    "--port", str(self.port)], workdir / "milter-stub.log", nofile=65536)
        self.ready(lambda: wait_port(self.port, alive=self.alive))
        return self


def wait_port(port: int, timeout: float = 30.0, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ServerError(f"server on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise ServerError(f"nothing listens on port {port} after {timeout:g} s")


GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class Rspamd(Proc):
    """A private rspamd (Debian's) in milter mode: its proxy worker with self_scan on a free
    port, one normal and one controller worker, no fuzzy storage, `milter_headers` adding
    X-Spamd-Result. Ready once a GTUBE message is refused through the milter port (it
    compiles its regexps first: 10-20 s)."""

    name = "rspamd"

    def start(self, workdir: Path, timeout: float = 120) -> "Rspamd":
        exe = which("rspamd")
        if exe is None or os.geteuid() != 0:
            raise ServerError("rspamd missing or not root")
        import pwd
        ids = pwd.getpwnam("_rspamd")
        d = (workdir / "rspamd").resolve()
        for sub in ("", "conf", "conf/override.d", "run", "db", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d / sub, 0o755)
            if sub in ("run", "db", "log"):
                os.chown(d / sub, ids.pw_uid, ids.pw_gid)
        self.port = free_port()
        self.address = f"inet:127.0.0.1:{self.port}"
        files = {
            "worker-proxy.inc": f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\n'
                                'timeout = 120s;\nupstream "local" {\n  default = yes;\n'
                                '  self_scan = yes;\n}\ncount = 1;\n',
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "worker-controller.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "worker-fuzzy.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = -1;\n',
            "milter_headers.conf": 'use = ["x-spamd-result"];\nskip_local = false;\n',
        }
        for name, text in files.items():
            (d / "conf" / "override.d" / name).write_text(text)
            os.chmod(d / "conf" / "override.d" / name, 0o644)
        self.popen([exe, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf",
                    "--var", f"LOCAL_CONFDIR={d}/conf", "--var", f"RUNDIR={d}/run",
                    "--var", f"DBDIR={d}/db", "--var", f"LOGDIR={d}/log"],
                   d / "console.log", cwd=d, nofile=65536)
        self.ready(lambda: wait_port(self.port, timeout, alive=self.alive),
                   lambda: self._wait_gtube(time.monotonic() + timeout))
        return self

    def _wait_gtube(self, deadline: float) -> None:
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError("rspamd exited")
            try:
                if milter_probe(self.port, b"Subject: t\r\n\r\n" + GTUBE + b"\r\n") \
                        == "replycode":
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.3)
        raise ServerError(f"rspamd did not refuse GTUBE in time ({last!r})")


def milter_probe(port: int, message: bytes, timeout: float = 10) -> str:
    """One conversation through every stage over a blocking socket (gateway's milter codec);
    the end-of-message action."""
    from gateway.proto.milter import NEED_DATA, MilterConnection, Progress
    conn = MilterConnection()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def run(out: bytes):
            sock.sendall(out)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif not isinstance(ev, Progress):
                    return ev
        run(conn.negotiate())
        run(conn.connect("localhost", "127.0.0.1", 40000))
        run(conn.helo("probe.bench"))
        run(conn.mail(["<a@bench>"]))
        run(conn.rcpt(["<b@bench>"]))
        run(conn.data())
        head, _, body = message.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            run(conn.header(name, value))
        run(conn.eoh())
        run(conn.body(body))
        verdict = run(conn.eom())
        sock.sendall(conn.quit())
    return verdict.action.value
