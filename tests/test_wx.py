"""W^X and the shipped systemd unit (SPEC §3.3 "No Python callbacks inside OpenSSL", §9).

The unit sets MemoryDenyWriteExecute=yes, under which a cffi `ffi.callback` cannot be made
("Cannot allocate write+execute memory for ffi.callback()"), and a capability bounding set.
Here every configuration of deploy/gateway.example.toml (rewritten to test certificates and
free loopback ports, every listener, profile and rule kept; no mail is relayed, so the
upstreams are an unused port) runs as `gateway run` in a subprocess

  - with `ffi.callback` made unusable (any kernel): pyOpenSSL's ffi refuses it as cffi does;
  - under the kernel's own W^X, PR_SET_MDWE (Linux 6.3+; systemd enforces the unit's setting
    with a seccomp filter of the same effect, or with this prctl where it uses it);
  - as root under the unit's capability bounding set (setpriv standing in for systemd, which
    is not PID 1 here; the settings are read from the unit files): the unit as shipped (the unprivileged user with CAP_NET_BIND_SERVICE) and
    with the run-as-root drop-in (workers drop to [gateway] user/group),

and serves: a TLS handshake on every listener, and on the `verify` listener a client
certificate request whose `verified` is right for a good, a missing and an untrusted
certificate. The pure-Python fallback is the control: it needs a Python callback, so it must
fail to start the same configuration under the same conditions, with a one-line reason.
In process, the C and the Python verify callback give the same `verified`/`verify_error`
for each outcome of a chain check, on both legs, with `ffi.callback` refused for the C one.
"""
from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import trio
import trustme

from harness import NEUTRAL_CWD, gateway_subprocess_env, in_thread, to_toml
from peers import free_port, instance_dir
from supervised import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "gateway.example.toml"
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "mail-tls-gateway.service"
ROOT_DROPIN = SYSTEMD / "run-as-root.conf"

TIMEOUT = 60
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

# Runs `gateway ARGS...` after making W^X hold (argv[1]: "mdwe") or `ffi.callback` unusable
# ("no-callback"), then the command line like `python -m gateway`.
WRAPPER = r'''
import sys
mode, args = sys.argv[1], sys.argv[2:]
if mode == "mdwe":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:            # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("wx-wrapper: PR_SET_MDWE failed, errno", ctypes.get_errno(), file=sys.stderr)
        sys.exit(97)
elif mode == "no-callback":
    import cffi
    import OpenSSL._util
    import OpenSSL.crypto
    import OpenSSL.SSL

    def refuse(*args, **kwargs):
        raise MemoryError("Cannot allocate write+execute memory for ffi.callback() "
                          "(refused by the test, as under W^X)")

    class NoCallbackFFI:
        """pyOpenSSL's compiled ffi (a C type: its callback cannot be patched), without it."""
        def __init__(self, real):
            self._real = real
        def __getattr__(self, name):
            return getattr(self._real, name)
        callback = staticmethod(refuse)
        def_extern = staticmethod(refuse)

    cffi.FFI.callback = refuse                     # any pure-Python-built FFI too
    real = OpenSSL._util.ffi
    fake = NoCallbackFFI(real)
    for module in (OpenSSL._util, OpenSSL.SSL, OpenSSL.crypto):
        for name in ("ffi", "_ffi"):
            if getattr(module, name, None) is real:
                setattr(module, name, fake)
elif mode != "plain":
    sys.exit("wx-wrapper: unknown mode " + mode)
import runpy
sys.argv = ["gateway", *args]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
'''


def mdwe_available() -> str | None:
    """None if PR_SET_MDWE works here (tried in a child), else why not."""
    probe = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
             f"r = libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0); "
             "sys.exit(0 if r == 0 else ctypes.get_errno())")
    res = subprocess.run([sys.executable, "-c", probe], timeout=30)
    if res.returncode == 0:
        return None
    return (f"PR_SET_MDWE refused (errno {res.returncode}: {os.strerror(res.returncode)}): "
            f"the kernel ({os.uname().release}) has no memory-deny-write-execute (Linux 6.3+)")


def _native_built() -> bool:
    """Is the compiled core there for `gateway run` subprocesses (whatever this process uses)?"""
    import importlib.util
    return importlib.util.find_spec("gateway._native") is not None


needs_native = pytest.mark.skipif(not _native_built(), reason="the native core is not built")


# --- the example, made runnable here -----------------------------------------------------------

class Example:
    """deploy/gateway.example.toml rewritten for this machine, written to *directory*."""

    def __init__(self, directory: Path, ca: trustme.CA, *, upstream_port: int,
                 user: str | None = None, group: str | None = None,
                 port_for=None):
        self.directory = directory
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.original = tomllib.loads(EXAMPLE.read_text())
        data = tomllib.loads(EXAMPLE.read_text())

        g = data["gateway"]
        g["workers"] = 1
        self.metrics_port = free_port()
        g["metrics"] = f"127.0.0.1:{self.metrics_port}"
        logs = directory / "log"
        logs.mkdir()
        os.chmod(logs, 0o777)                     # the unprivileged run writes there too
        g["tracking_log"] = str(logs / "tracking.jsonl")
        g["pid_file"] = str(logs / "gateway.pid")
        for key, value in (("user", user), ("group", group)):
            if value is None:
                g.pop(key, None)
            else:
                g[key] = value

        # every certificate entry: an ECDSA pair (and an RSA one where the entry has rsa_*)
        # from the test CA, naming localhost so the clients here can check it
        for name, entry in data["certificates"].items():
            for prefix, key_type in (("", trustme.KeyType.ECDSA), ("rsa_", trustme.KeyType.RSA)):
                if f"{prefix}cert" not in entry:
                    continue
                leaf = ca.issue_cert(f"{name}.test", "localhost", "127.0.0.1",
                                     key_type=key_type)
                cert = directory / f"{name}-{prefix or 'ecdsa_'}chain.pem"
                key = directory / f"{name}-{prefix or 'ecdsa_'}key.pem"
                cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
                key.write_bytes(leaf.private_key_pem.bytes())
                os.chmod(key, 0o600)                  # root's only, unless a test hands them on
                entry[f"{prefix}cert"], entry[f"{prefix}key"] = str(cert), str(key)
        self.key_files = sorted(directory.glob("*-key.pem"))

        # CA locations: the test CA as a file, and as a hashed directory (openssl rehash)
        for profile in data.get("tls_profiles", {}).values():
            if "ca_file" in profile:
                profile["ca_file"] = str(self.ca_file)
            if "ca_path" in profile:
                ca_dir = directory / "client-ca"
                if not ca_dir.exists():
                    ca_dir.mkdir()
                    shutil.copy(self.ca_file, ca_dir / "site-ca.pem")
                    subprocess.run(["openssl", "rehash", str(ca_dir)], check=True, timeout=30,
                                   capture_output=True)
                profile["ca_path"] = str(ca_dir)

        # listeners: loopback ports, the sink as every upstream; a client rule that asks a
        # network for `verify` is pointed at loopback, so the test's clients fall under it
        self.ports: dict[str, int] = {}
        self.verify_listeners: list[str] = []
        for lst in data["listeners"]:
            port = (port_for or {}).get(lst["name"]) or free_port()
            lst["bind"] = f"127.0.0.1:{port}"
            self.ports[lst["name"]] = port
            lst["upstream"]["address"] = f"localhost:{upstream_port}"   # a name: verify
            for rule in lst.get("client_rules", []):
                if rule.get("client_tls") == "verify" and "/" in rule["match"]:
                    rule["match"] = "127.0.0.0/8"
                    self.verify_listeners.append(lst["name"])
            if lst.get("client_tls") == "verify":
                self.verify_listeners.append(lst["name"])
            for milter in lst.get("milters", []):
                # no milter runs here: a closed port, and mail goes on without it
                milter["address"] = f"inet:127.0.0.1:{free_port()}"
                milter["default_action"] = "accept"
        data["gateway"]["spool_dir"] = str(directory / "tmp" / "spool")   # any user may create it
        data["gateway"]["state_dir"] = str(directory / "tmp" / "state")   # (alert limiter)
        self.data = data
        self.path = directory / "gateway.toml"
        self.path.write_text(to_toml(data))
        self.tmp = directory / "tmp"                  # TMPDIR: the metrics directory
        self.tmp.mkdir()
        os.chmod(self.tmp, 0o1777)
        for p in directory.rglob("*"):
            if p.is_file() and p not in self.key_files:
                os.chmod(p, 0o644)

    @property
    def listeners(self) -> list[dict]:
        return self.data["listeners"]


def test_the_variant_keeps_every_listener_profile_certificate_and_rule(tmp_path, ca):
    example = Example(tmp_path, ca, upstream_port=9)
    written = tomllib.loads(example.path.read_text())
    original = example.original
    assert written == example.data
    assert [lst["name"] for lst in written["listeners"]] == \
        [lst["name"] for lst in original["listeners"]]
    for new, old in zip(written["listeners"], original["listeners"]):
        assert set(new) == set(old)
        for key in ("rules", "client_rules"):
            assert len(new.get(key, [])) == len(old.get(key, []))
        moved = ("bind", "upstream", "client_rules", "milters")
        assert {k: v for k, v in new.items() if k not in moved} \
            == {k: v for k, v in old.items() if k not in moved}
        assert [m["name"] for m in new.get("milters", [])] == \
            [m["name"] for m in old.get("milters", [])]
    assert written["tls_profiles"].keys() == original["tls_profiles"].keys()
    assert {n: set(e) for n, e in written["certificates"].items()} == \
        {n: set(e) for n, e in original["certificates"].items()}
    assert example.verify_listeners            # the example has a verify listener to try
    res = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(example.path)],
                         capture_output=True, text=True, timeout=TIMEOUT,
                         env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert res.returncode == 0, res.stderr


# --- running it -------------------------------------------------------------------------------

class Gateway(GatewayProcess):
    """`gateway run -c FILE` through WRAPPER (*wx*: "mdwe", "no-callback" or "plain"), behind
    *prefix* (a setpriv command line), with its log lines collected by a thread."""

    def __init__(self, example: Example, wx: str, *, prefix=(), pure_python=False):
        self.own_tmp, self.tmpdir = False, str(example.tmp)     # the example's TMPDIR
        env = gateway_subprocess_env()
        env["TMPDIR"] = str(example.tmp)
        env.pop("GATEWAY_REQUIRE_NATIVE", None)
        if pure_python:
            env["GATEWAY_PURE_PYTHON"] = "1"
        else:
            env.pop("GATEWAY_PURE_PYTHON", None)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", WRAPPER, wx, "run", "-c", str(example.path)],
            stderr=subprocess.PIPE, text=True, env=env, cwd=NEUTRAL_CWD)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def worker_pids(self) -> list[int]:
        return [int(m.group(1)) for ln in self.lines
                if (m := re.search(r"event=worker_start .*worker_pid=(\d+)", ln))]

    def errors(self) -> list[str]:
        """stderr lines that are not log records (the command line's own messages)."""
        return [ln for ln in self.lines if not ln.startswith("ts=")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop(gw: Gateway) -> int:
    """SIGTERM, the exit code; every worker it started must be gone (those left are killed
    here, the test then fails)."""
    try:
        code = gw.stop()
    finally:
        left = [pid for pid in gw.worker_pids() if _alive(pid)]
        for pid in left:
            os.kill(pid, 9)
    assert not left, f"workers {left} outlived the supervisor"
    return code


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1))


# --- clients (blocking: run them in a thread) -----------------------------------------------

def _read_until(f, prefix: bytes) -> list[bytes]:
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError(f"closed before {prefix!r}: {lines!r}")
        lines.append(line)
        if line.startswith(prefix):
            return lines


def session(listener: dict, port: int, ctx: ssl.SSLContext) -> tuple[str, bytes]:
    """The listener's way into TLS (STARTTLS or implicit, SMTP or IMAP), then one command:
    (TLS version, the reply to it: MAIL FROM for SMTP, CAPABILITY's tagged reply for IMAP)."""
    smtp = listener["protocol"] == "smtp"
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        if listener["tls"] == "starttls":
            f = raw.makefile("rb", buffering=0)
            if smtp:
                _read_until(f, b"220 ")
                raw.sendall(b"EHLO client.test\r\n")
                _read_until(f, b"250 ")
                raw.sendall(b"STARTTLS\r\n")
                _read_until(f, b"220 ")
            else:
                _read_until(f, b"* OK")
                raw.sendall(b"a1 STARTTLS\r\n")
                _read_until(f, b"a1 OK")
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        with tls:
            f = tls.makefile("rb", buffering=0)
            if smtp:
                if listener["tls"] == "implicit":
                    _read_until(f, b"220 ")
                tls.sendall(b"EHLO client.test\r\n")
                _read_until(f, b"250 ")
                tls.sendall(b"MAIL FROM:<alice@client.test>\r\n")
                reply = f.readline()
                tls.sendall(b"QUIT\r\n")
            else:
                if listener["tls"] == "implicit":
                    _read_until(f, b"* OK")
                tls.sendall(b"a2 CAPABILITY\r\n")
                reply = _read_until(f, b"a2 ")[-1]
                tls.sendall(b"a3 LOGOUT\r\n")
            return tls.version(), reply.rstrip(b"\r\n")
    finally:
        raw.close()


def client_contexts(example: Example, ca: trustme.CA, directory: Path) -> dict:
    """stdlib client contexts trusting the test CA: without a certificate, with one from the
    test CA, with one from a stranger's CA."""
    out = {}
    for name, issuer in (("none", None), ("good", ca), ("untrusted", trustme.CA())):
        ctx = ssl.create_default_context(cafile=str(example.ca_file))
        if issuer is not None:
            pem = directory / f"client-{name}.pem"
            issuer.issue_cert("client.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
            ctx.load_cert_chain(str(pem))
        out[name] = ctx
    return out


async def serves_every_listener(gw: Gateway, example: Example, ca: trustme.CA,
                                directory: Path) -> None:
    """Every listener of the example completes a TLS handshake and answers over it; on each
    `verify` listener the client certificate request completes for a good, a missing and an
    untrusted certificate, `verified` true only for the good one."""
    n = len(example.listeners)
    with trio.fail_after(TIMEOUT):
        await in_thread(lambda: gw.wait_for(r"event=listening ", count=n))
        ctxs = client_contexts(example, ca, directory)
        for lst in example.listeners:
            version, reply = await in_thread(session, lst, example.ports[lst["name"]],
                                             ctxs["none"])
            assert version in ("TLSv1.2", "TLSv1.3"), lst["name"]
            if lst["name"] not in example.verify_listeners:
                assert reply.startswith((b"250", b"530", b"a2 OK")), (lst["name"], reply)
        for name in example.verify_listeners:
            lst = next(x for x in example.listeners if x["name"] == name)
            replies = {}
            for which in ("good", "none", "untrusted"):
                replies[which] = (await in_thread(session, lst, example.ports[name],
                                                  ctxs[which]))[1]
            lines = await in_thread(lambda: gw.wait_for(
                rf"event=tls .*listener={name} .*side=client", count=4))
    verified = [re.search(r" verified=(\w+)", ln).group(1) for ln in lines]
    # the first session had no certificate; then good, none, untrusted
    assert verified == ["false", "true", "false", "false"], lines
    assert "peer=" in lines[1] and "peer=" in lines[3] and "peer=" not in lines[2]
    assert replies["none"] == replies["untrusted"] == b"421 4.7.1 Unverified client certificate"
    assert not replies["good"].startswith(b"421"), replies


def wx_modes() -> list:
    reason = mdwe_available()
    return ["no-callback",
            pytest.param("mdwe", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


@needs_native
@pytest.mark.parametrize("wx", wx_modes())
async def test_every_example_listener_serves_without_python_callbacks(tmp_path, ca, wx):
    """The native core hands OpenSSL a C verify callback: under W^X (or with ffi.callback
    refused) every listener of the example starts and serves, verify included."""
    example = Example(tmp_path, ca, upstream_port=free_port())
    gw = Gateway(example, wx)
    try:
        await serves_every_listener(gw, example, ca, tmp_path)
    finally:
        code = stop(gw)
    assert code == 0, "".join(gw.lines[-20:])
    assert gw.errors() == []


@pytest.mark.parametrize("wx", wx_modes())
async def test_the_pure_python_fallback_cannot_start_under_wx_and_says_why(tmp_path, ca, wx):
    """The control: the fallback's verify callback is a Python one, so under the same
    conditions the start fails, with one line naming the cause, and `gateway check` warns."""
    example = Example(tmp_path, ca, upstream_port=free_port())
    gw = Gateway(example, wx, pure_python=True)
    with trio.fail_after(TIMEOUT):
        code = await in_thread(lambda: gw.proc.wait(TIMEOUT))
        await in_thread(lambda: gw.wait_for(r"event=fatal "))
    assert code != 0
    assert gw.worker_pids() == []
    fatal = [ln for ln in gw.lines if "event=fatal" in ln]
    assert len(fatal) == 1 and "write+execute memory was refused" in fatal[0], gw.lines
    assert "Traceback" not in "".join(gw.lines)


def _check(example: Example, *, pure_python: bool) -> subprocess.CompletedProcess:
    env = gateway_subprocess_env()
    env.pop("GATEWAY_REQUIRE_NATIVE", None)
    env.pop("GATEWAY_PURE_PYTHON", None)
    if pure_python:
        env["GATEWAY_PURE_PYTHON"] = "1"
    return subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(example.path)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=NEUTRAL_CWD)


def test_check_warns_that_wx_will_not_hold_only_without_the_native_core(tmp_path, ca):
    from gateway.native.scanner import VERIFY_ACCEPT_ADDRESS
    example = Example(tmp_path, ca, upstream_port=9)
    pure = _check(example, pure_python=True)
    assert pure.returncode == 0, pure.stderr
    warning = [ln for ln in pure.stderr.splitlines() if "W^X" in ln]
    assert warning == [
        "warning: the native core is not in use, so certificate verification (listeners "
        "inbound, submission, smtps) runs a Python callback inside OpenSSL: W^X "
        "(MemoryDenyWriteExecute=yes in the systemd unit) will not hold and the gateway "
        "cannot start under it; install the native core or remove that setting"]
    if VERIFY_ACCEPT_ADDRESS is None:
        pytest.skip("the native core is not in use (not built, or GATEWAY_PURE_PYTHON=1)")
    native = _check(example, pure_python=False)
    assert native.returncode == 0, native.stderr
    assert "W^X" not in native.stderr


def test_check_does_not_warn_when_nothing_verifies(tmp_path, ca):
    example = Example(tmp_path, ca, upstream_port=9)
    data = tomllib.loads(example.path.read_text())
    for lst in data["listeners"]:
        lst["client_rules"] = [r for r in lst.get("client_rules", [])
                               if r.get("client_tls") != "verify"]
        lst["rules"] = [r for r in lst.get("rules", [])
                        if r.get("recipient_encryption") != "verify"]
        if lst["upstream"].get("tls") == "verify":
            lst["upstream"]["tls"] = "required"
    example.path.write_text(to_toml(data))
    pure = _check(example, pure_python=True)
    assert pure.returncode == 0, pure.stderr
    assert "W^X" not in pure.stderr


# --- the systemd unit, emulated with setpriv ----------------------------------------------------

def service_settings(*files: Path) -> dict[str, list[str]]:
    """The [Service] assignments of a unit file and its drop-ins, in order: key -> values."""
    out: dict[str, list[str]] = {}
    for path in files:
        section = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                out.setdefault(key.strip(), []).append(value.strip())
    return out


def capabilities(values: list[str]) -> list[str]:
    """A capability list setting as systemd reads it: an empty assignment resets, the others
    add (setpriv's names: CAP_NET_BIND_SERVICE -> net_bind_service)."""
    caps: set[str] = set()
    for value in values:
        if not value:
            caps = set()
        else:
            caps |= {c.lower().removeprefix("cap_") for c in value.split()}
    return sorted(caps)


# the unit's user and group `gateway`, as accounts that exist on Debian without it
TEST_USER, TEST_GROUP = "nobody", "nogroup"


def unit_emulation(settings: dict[str, list[str]]) -> tuple[list[str], str, str]:
    """(setpriv command line, W^X mode for WRAPPER, user) that run a command as the unit
    would: its user and group (gateway -> nobody/nogroup here), bounding set, ambient
    capabilities, no_new_privs; MemoryDenyWriteExecute=yes as PR_SET_MDWE where the kernel
    has it, else with ffi.callback refused."""
    user = settings.get("User", ["root"])[-1]
    group = settings.get("Group", [user])[-1]
    bounding = capabilities(settings.get("CapabilityBoundingSet", []))
    ambient = capabilities(settings.get("AmbientCapabilities", []))
    argv = ["setpriv", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in bounding)])]
    if user != "root":
        user = TEST_USER if user == "gateway" else user
        group = TEST_GROUP if group == "gateway" else group
        argv += ["--reuid", user, "--regid", group, "--clear-groups"]
    if ambient:
        caps = ",".join(f"+{c}" for c in ambient)
        argv += ["--inh-caps", caps, "--ambient-caps", caps]
    if settings.get("NoNewPrivileges", ["no"])[-1] == "yes":
        argv.append("--no-new-privs")
    wx = "plain"
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        wx = "mdwe" if mdwe_available() is None else "no-callback"
    return argv, wx, user


def _privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (the unit's CAP_NET_BIND_SERVICE is for these)."""
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="emulating the unit needs root and setpriv (util-linux)")


def _runs_as(user: str, directory: Path) -> str | None:
    """None if *user* can run this Python and import the gateway from *directory*; else why
    not (a checkout or interpreter under a directory only root may enter)."""
    probe = subprocess.run(
        ["setpriv", "--reuid", user, "--regid", TEST_GROUP, "--clear-groups", sys.executable,
         "-c", f"import gateway; open({str(directory / 'gateway.toml')!r}).close()"],
        capture_output=True, text=True, timeout=TIMEOUT, env=gateway_subprocess_env(),
        cwd=NEUTRAL_CWD)
    return None if probe.returncode == 0 else \
        f"{user} cannot run {sys.executable} with the gateway: {probe.stderr.strip()[-200:]}"


def test_the_unit_and_its_drop_in_say_what_they_assume():
    settings = service_settings(UNIT)
    assert settings["ExecStart"] == [
        "/opt/mail-tls-gateway/.venv/bin/gateway run -c /etc/gateway/gateway.toml"]
    assert settings["User"] == ["gateway"] and settings["Group"] == ["gateway"]
    assert settings["MemoryDenyWriteExecute"] == ["yes"]
    header = UNIT.read_text().split("[Unit]")[0]
    for needle in ("/opt/mail-tls-gateway", "/etc/gateway/gateway.toml",
                   "useradd --system --user-group --home /var/lib/gateway "
                   "--shell /usr/sbin/nologin gateway", "run-as-root.conf"):
        assert needle in header
    both = service_settings(UNIT, ROOT_DROPIN)
    assert both["User"][-1] == "root"
    assert capabilities(both["CapabilityBoundingSet"]) == [
        "chown", "dac_override", "kill", "net_bind_service", "setgid", "setuid"]
    assert capabilities(both["AmbientCapabilities"]) == []


def test_systemd_reads_the_unit_and_the_drop_in_without_complaint(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    (tmp_path / f"{UNIT.name}.d").mkdir()
    shutil.copy(ROOT_DROPIN, tmp_path / f"{UNIT.name}.d" / ROOT_DROPIN.name)
    # Documentation= names the manual pages; verify runs `man` for each: they are found where
    # pip installed them (the README's manpath)
    env = dict(os.environ, MANPATH=f"{sys.prefix}/share/man:")
    res = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)], capture_output=True,
                         text=True, timeout=TIMEOUT, env=env)
    # the only complaint allowed: the gateway is not installed in /opt on this machine
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines()
                  if ln.strip() and "/opt/mail-tls-gateway/.venv/bin/gateway is not executable"
                  not in ln]
    assert complaints == []


@needs_root
@needs_native
async def test_the_unit_as_shipped_runs_the_example_as_the_unprivileged_user(pubdir, ca):
    """Way (a): the service as `gateway` (nobody here) with only CAP_NET_BIND_SERVICE, W^X
    held, keys readable by that user: a port below 1024 binds and every listener serves."""
    argv, wx, user = unit_emulation(service_settings(UNIT))
    directory = instance_dir(pubdir, "wx")
    port = _privileged_port()
    example = Example(directory, ca, upstream_port=free_port(), user=TEST_USER,
                      group=TEST_GROUP, port_for={"inbound": port})
    for key in example.key_files:                 # way (a): the keys belong to the user
        shutil.chown(key, TEST_USER, TEST_GROUP)
    why_not = _runs_as(TEST_USER, directory)
    if why_not:
        pytest.skip(why_not)
    gw = Gateway(example, wx, prefix=argv)
    try:
        await serves_every_listener(gw, example, ca, directory)
        uids = {uid_of(gw.proc.pid)} | {uid_of(pid) for pid in gw.worker_pids()}
    finally:
        code = stop(gw)
    assert code == 0, "".join(gw.lines[-20:])
    assert gw.errors() == []
    assert uids == {pwd.getpwnam(TEST_USER).pw_uid}
    assert f"bind=127.0.0.1:{port} " in "".join(gw.lines)


@needs_root
@needs_native
async def test_the_unit_with_the_root_drop_in_runs_the_example_and_workers_drop(pubdir, ca):
    """Way (b): root with the drop-in's bounding set, keys root's only, [gateway] user/group
    set: the workers drop to the user and serve, and stop and drain on SIGTERM (the supervisor
    can signal them), W^X held."""
    argv, wx, user = unit_emulation(service_settings(UNIT, ROOT_DROPIN))
    assert user == "root"
    directory = instance_dir(pubdir, "wx")     # the workers reach their metrics directory
    example = Example(directory, ca, upstream_port=free_port(), user=TEST_USER,
                      group=TEST_GROUP)
    gw = Gateway(example, wx, prefix=argv)
    try:
        await serves_every_listener(gw, example, ca, directory)
        workers = gw.worker_pids()
        worker_uids = {uid_of(pid) for pid in workers}
        supervisor_uid = uid_of(gw.proc.pid)
    finally:
        code = stop(gw)
    assert code == 0, "".join(gw.lines[-20:])
    assert gw.errors() == []
    assert supervisor_uid == 0
    assert worker_uids == {pwd.getpwnam(TEST_USER).pw_uid}
    assert all(os.stat(k).st_mode & 0o077 == 0 and os.stat(k).st_uid == 0
               for k in example.key_files)


@needs_root
async def test_root_without_the_drop_in_fails_with_one_line(tmp_path, ca):
    """The old advice (the shipped unit with User=root and user/group set, no drop-in): the
    bounding set lacks what the privilege drop needs; the start fails with one line, no
    traceback and no worker left."""
    settings = service_settings(UNIT)
    settings["User"], settings["Group"] = ["root"], ["root"]
    argv, wx, _ = unit_emulation(settings)
    example = Example(tmp_path, ca, upstream_port=free_port(), user=TEST_USER, group=TEST_GROUP)
    gw = Gateway(example, wx, prefix=argv)
    with trio.fail_after(TIMEOUT):
        code = await in_thread(lambda: gw.proc.wait(TIMEOUT))
        await in_thread(lambda: gw.wait_for(r"^error: |event=fatal ", timeout=TIMEOUT))
    stop(gw)
    assert code != 0
    assert "Traceback" not in "".join(gw.lines)
    errors = gw.errors() + [ln for ln in gw.lines if "event=fatal" in ln]
    assert len(errors) == 1 and "not permitted" in errors[0], gw.lines


@needs_root
async def test_root_without_the_drop_in_exits_2_naming_the_user_key(tmp_path, ca):
    settings = service_settings(UNIT)
    settings["User"], settings["Group"] = ["root"], ["root"]
    argv, wx, _ = unit_emulation(settings)
    example = Example(tmp_path, ca, upstream_port=free_port(), user=TEST_USER, group=TEST_GROUP)
    gw = Gateway(example, wx, prefix=argv)
    with trio.fail_after(TIMEOUT):
        code = await in_thread(lambda: gw.proc.wait(TIMEOUT))
    stop(gw)
    errors = gw.errors() + [ln for ln in gw.lines if "event=fatal" in ln]
    assert code == 2
    assert len(errors) == 1 and "user" in errors[0], gw.lines


# --- the verify outcome: the C callback and the Python one agree, no ffi.callback per leg ------

class _NoCallbackFFI:
    """pyOpenSSL's ffi without `callback` (in this process, for the tests below)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def callback(self, *args, **kwargs):
        raise MemoryError("Cannot allocate write+execute memory for ffi.callback() (test)")


def _chains(ca: trustme.CA) -> dict:
    """name -> (PEM chain blobs, key PEM) of a peer certificate for each verify outcome."""
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    inter, stranger = ca.create_child_ca(), trustme.CA()
    self_signed = trustme.CA()

    def leaf(issuer, **kw):
        cert = issuer.issue_cert("peer.test", "localhost", **kw)
        return [p.bytes() for p in cert.cert_chain_pems], cert.private_key_pem.bytes()
    missing = leaf(inter)
    return {
        "good": leaf(ca),
        "good via an intermediate": leaf(inter),
        "unknown CA": leaf(stranger),
        "unknown CA via an intermediate": leaf(stranger.create_child_ca()),
        "intermediate missing": (missing[0][:1], missing[1]),
        "expired": leaf(ca, not_before=now - datetime.timedelta(days=10),
                        not_after=now - datetime.timedelta(days=1)),
        "self-signed": ([self_signed.cert_pem.bytes()], self_signed.private_key_pem.bytes()),
    }


# OpenSSL's verify result: the last error its chain check found (as `openssl s_client` says)
EXPECTED_VERIFY = {
    "good": None,
    "good via an intermediate": None,
    "unknown CA": "unable to verify the first certificate",
    "unknown CA via an intermediate": "unable to get local issuer certificate",
    "intermediate missing": "unable to verify the first certificate",
    "expired": "certificate has expired",
    "self-signed": "self-signed certificate",
}


async def _verify_outcomes(tmp_path, ca, server_cert, *, side: str) -> dict:
    """{case: (verified, verify_error)} of the verifying side ("server": a client certificate
    checked by the gateway's listener; "upstream": the server's checked by the gateway)."""
    import trio.testing

    from gateway.tls.context import client_context, server_context
    from gateway.tls.profiles import PREDEFINED, clone
    from gateway.tls.stream import TLSStream

    profile = clone(PREDEFINED["default"], "t", ca_file=str(server_cert.ca))
    out = {}
    for name, (chain, key) in _chains(ca).items():
        cert_file, key_file = tmp_path / "peer.crt", tmp_path / "peer.key"
        cert_file.write_bytes(b"".join(chain))
        key_file.write_bytes(key)
        if side == "server":
            sctx = server_context(profile, str(server_cert.cert), str(server_cert.key),
                                  request_client_cert=True)
            cctx = client_context(PREDEFINED["default"], cert_path=str(cert_file),
                                  key_path=str(key_file))
        else:
            sctx = server_context(PREDEFINED["default"], str(cert_file), str(key_file))
            cctx = client_context(profile, verify=True)
        a, b = trio.testing.memory_stream_pair()
        server = TLSStream(a, sctx, server_side=True)
        client = TLSStream(b, cctx, server_side=False, server_hostname="localhost",
                           verify_hostname=side == "upstream")
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
        info = server.info if side == "server" else client.info
        out[name] = (info.verified, info.verify_error)
    return out


@pytest.mark.parametrize("side", ["server", "upstream"])
async def test_the_c_and_the_python_verify_callback_give_the_same_outcome(
        tmp_path, ca, server_cert, monkeypatch, side):
    import OpenSSL._util
    import OpenSSL.crypto
    import OpenSSL.SSL

    from gateway.tls import _ossl
    from gateway.tls import context as tls_context
    from gateway.tls import stream as tls_stream
    from gateway.tls.profiles import PREDEFINED
    if tls_context.NATIVE_VERIFY is False:
        pytest.skip("the native core is not in use (not built, or GATEWAY_PURE_PYTHON=1)")

    with monkeypatch.context() as m:          # the C callback, and no ffi.callback anywhere
        fake = _NoCallbackFFI(OpenSSL._util.ffi)
        for module, name in ((OpenSSL._util, "ffi"), (OpenSSL.SSL, "_ffi"),
                             (OpenSSL.crypto, "_ffi"), (_ossl, "_ffi")):
            m.setattr(module, name, fake)
        native = await _verify_outcomes(tmp_path, ca, server_cert, side=side)
        # the stand-in bites: the Python callback cannot be made, and says why
        m.setattr(tls_context, "_VERIFY_ACCEPT_ADDRESS", None)
        with pytest.raises(ValueError, match="write\\+execute memory was refused"):
            tls_context.client_context(PREDEFINED["default"], verify=True)
    with monkeypatch.context() as m:          # the pure-Python fallback's Python callback
        m.setattr(tls_context, "_VERIFY_ACCEPT_ADDRESS", None)
        m.setattr(tls_stream, "NATIVE_VERIFY", False)
        python = await _verify_outcomes(tmp_path, ca, server_cert, side=side)
    expected = {name: (text is None, text) for name, text in EXPECTED_VERIFY.items()}
    assert native == expected
    assert python == expected
