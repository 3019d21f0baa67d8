"""`gateway run` in a subprocess for the operator-tools tests: its log lines, its metrics
endpoint. (tests/test_supervisor.py has its own; this one stays out of its way.)"""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from harness import NEUTRAL_CWD, gateway_subprocess_env


class GatewayProcess:
    """`python -m gateway run -c FILE` with its stderr log collected by a thread."""

    def __init__(self, config_path, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path), *args],
            stderr=subprocess.PIPE, text=True, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> list[str]:
        """Block until *count* log lines match *pattern* (call it in a thread)."""
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
                if self._new.get(timeout=left) is None and len(
                        [ln for ln in self.lines if rx.search(ln)]) < count:
                    raise AssertionError("gateway exited:\n" + "".join(self.lines[-40:]))
            except queue.Empty:
                pass

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def fetch(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


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
    return [v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == val for k, val in labels.items())]


def status_json(port: int) -> dict:
    status, ctype, body = fetch(port, "/status")
    assert status == 200, body
    assert ctype.startswith("application/json"), ctype
    return json.loads(body)
