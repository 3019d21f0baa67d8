"""The README's first command: `gateway run --demo`, then swaks --tls through it."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from harness import NEUTRAL_CWD, gateway_subprocess_env
from peers import require, run_swaks

pytestmark = pytest.mark.peers


def _wait_for_line(proc, needle: str, lines: list[str]) -> None:
    for line in proc.stderr:          # bounded by the subprocess timeout below
        lines.append(line)
        if needle in line:
            return
    raise AssertionError("gateway exited early:\n" + "".join(lines))


def test_demo_with_swaks_tls():
    require("swaks")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--demo"],
                            stderr=subprocess.PIPE, text=True, env=gateway_subprocess_env(),
                            cwd=NEUTRAL_CWD)
    lines: list[str] = []
    try:
        _wait_for_line(proc, "listener=demo-smtps", lines)
        result = run_swaks("--server", "127.0.0.1:2525", "--tls", "--to", "bob@example.test",
                           "--from", "alice@example.test", timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "TLS started" in result.stdout
        assert "250 2.0.0 Ok: queued" in result.stdout
        _wait_for_line(proc, "event=message", lines)
        assert "client_tls=TLSv1.3" in lines[-1] and "result=accepted" in lines[-1]
        assert any("event=demo_certificate" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
