"""`gateway run` in a subprocess for the supervisor tests (SPEC §9): the process with its log,
a configuration writer, and small clients (SMTP sessions, /metrics and /healthz).

Each GatewayProcess gets a TMPDIR of its own (removed by stop()), so that a gateway killed by
a test cannot leave its prometheus directory in the system's temporary directory."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from harness import NEUTRAL_CWD, gateway_subprocess_env


class GatewayProcess:
    """`gateway run` in a subprocess, with its log lines collected by a thread."""

    def __init__(self, config_path, *args, tmpdir=None, env=None, command=None):
        """`gateway run -c config_path *args`, or *command* (an argv) instead; *env* adds to
        the environment."""
        self.own_tmp = tmpdir is None
        self.tmpdir = str(tmpdir) if tmpdir is not None else tempfile.mkdtemp(prefix="gwrun-")
        os.chmod(self.tmpdir, 0o755)        # workers that drop to `user` reach the metrics dir
        env = {**gateway_subprocess_env(), **(env or {})}
        env["TMPDIR"] = self.tmpdir
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "gateway", "run", "-c", str(config_path), *args],
            stderr=subprocess.PIPE, text=True, env=env, cwd=NEUTRAL_CWD)
        self.lines: list[str] = []
        self._new = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> list[str]:
        """Block (in a thread) until *count* log lines match *pattern* in total."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.lines if rx.search(ln)]
            if len(found) >= count:
                return found
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in log:\n" + "".join(self.lines[-40:]))
            try:
                if self._new.get(timeout=left) is None and not [
                        ln for ln in self.lines if rx.search(ln)][count - 1:]:
                    raise AssertionError("gateway exited:\n" + "".join(self.lines[-40:]))
            except queue.Empty:
                pass

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for ln in list(self.lines) if rx.search(ln))

    def worker_pids(self) -> list[int]:
        """Workers started and not (yet) reported exited, retiring ones included."""
        started = [int(m.group(1)) for ln in list(self.lines)
                   if (m := re.search(r"event=worker_start .*worker_pid=(\d+)", ln))]
        exited = {int(m.group(1)) for ln in list(self.lines)
                  if (m := re.search(r"event=worker_exit .*worker_pid=(\d+)", ln))}
        return [p for p in started if p not in exited]

    def workers_by_slot(self) -> dict[int, int]:
        """{slot: pid} of the workers started and not (yet) reported exited, newest wins."""
        exited = {int(m.group(1)) for ln in list(self.lines)
                  if (m := re.search(r"event=worker_exit .*worker_pid=(\d+)", ln))}
        out = {}
        for ln in list(self.lines):
            m = re.search(r"event=worker_start .*worker_pid=(\d+) slot=(\d+)", ln)
            if m and int(m.group(1)) not in exited:
                out[int(m.group(2))] = int(m.group(1))
        return out

    def stop(self, timeout: float = 30) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise
        finally:
            if self.own_tmp:
                shutil.rmtree(self.tmpdir, ignore_errors=True)


def write_config(path, *, port, sink_port, metrics_port, server_cert, client_tls="optional",
                 workers=2, grace=10, extra="", gateway_extra=""):
    path.write_text(f"""
[gateway]
hostname = "mx.test"
workers = {workers}
metrics = "127.0.0.1:{metrics_port}"
shutdown_grace = {grace}
{gateway_extra}

[certificates.main]
cert = "{server_cert.cert}"
key = "{server_cert.key}"

[[listeners]]
name = "mx"
protocol = "smtp"
bind = "127.0.0.1:{port}"
tls = "starttls"
client_tls = "{client_tls}"
certificate = "main"
{extra}

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "none"
""")


def one_session(port: int, ctx, n: int) -> str:
    """One STARTTLS session; the outcome: ok, tempfail, closed or refused."""
    try:
        with smtplib.SMTP("localhost", port, timeout=30) as s:
            s.starttls(context=ctx)
            s.ehlo("client.test")
            s.sendmail("alice@client.test", ["bob@example.test"],
                       f"Subject: load {n}\r\n\r\nmessage {n}\r\n".encode())
            return "ok"
    except ConnectionRefusedError:
        return "refused"
    except smtplib.SMTPResponseException as exc:
        return "tempfail" if 400 <= exc.smtp_code < 500 else f"error {exc.smtp_code}"
    except (smtplib.SMTPServerDisconnected, ConnectionResetError, BrokenPipeError, OSError):
        return "closed"


def plaintext_mail(port: int):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        return s.docmd("MAIL FROM:<alice@client.test>")


def fetch(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def status_json(port: int) -> dict:
    """GET /status, checked to be JSON."""
    status, ctype, body = fetch(port, "/status")
    assert status == 200, body
    assert ctype.startswith("application/json"), ctype
    return json.loads(body)


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of the metrics endpoint."""
    status, _, body = fetch(port, "/metrics")
    assert status == 200, body
    out: dict = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = out.get(key, 0) + sample.value
    return out


def samples_of(samples: dict, name: str, **labels) -> list[float]:
    """The values of *name*'s samples whose labels include *labels*."""
    return [v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == val for k, val in labels.items())]


def total(samples: dict, name: str, **labels) -> float:
    return sum(samples_of(samples, name, **labels))


def healthz(port: int) -> int:
    """The status of GET /healthz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def poll(condition, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Call *condition* until it returns something true (returned) or *timeout* passes."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """The process no longer runs (or is a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out
