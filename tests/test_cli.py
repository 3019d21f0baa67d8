"""The `gateway` command line (SPEC §12), run as `python -m gateway` in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cli
from harness import NEUTRAL_CWD, gateway_subprocess_env
from gateway.config import GatewayConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "gateway.example.toml"


def gateway(*args: str, cwd: Path = Path(NEUTRAL_CWD)) -> subprocess.CompletedProcess:
    env = gateway_subprocess_env()
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def test_version_names_the_backend_of_the_scanner_and_of_the_matcher():
    result = gateway("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert re.fullmatch(r"gateway 0\.1\.0 \(scanner: (native|python), matcher: (native|python)\)",
                        line), line
    if os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1":
        assert line.endswith("(scanner: native, matcher: native)")


def test_version_says_python_for_both_when_forced():
    env = {**gateway_subprocess_env(), "GATEWAY_PURE_PYTHON": "1"}
    result = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True,
                            text=True, timeout=60, cwd=NEUTRAL_CWD, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "gateway 0.1.0 (scanner: python, matcher: python)\n"


def test_check_example_file():
    result = gateway("check", "-c", str(EXAMPLE), "--syntax-only")
    assert result.returncode == 0, result.stderr
    for name in ("inbound", "submission", "smtps", "imap", "imaps"):
        assert f"\n{name} " in result.stdout, name
    assert "0.0.0.0:25" in result.stdout and "[::]:587" in result.stdout
    assert "starttls/optional" in result.stdout and "implicit/required" in result.stdout
    assert "10.0.0.5:25" in result.stdout and "starttls/preferred" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_without_syntax_only_checks_files():
    result = gateway("check", "-c", str(EXAMPLE))
    assert result.returncode == 2
    assert "error: certificates.main.cert: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_broken_file_names_the_key(tmp_path):
    path = tmp_path / "broken.toml"
    text = EXAMPLE.read_text().replace('recipient = "partner.example"',
                                       'recipient = "partner.*.example"')
    path.write_text(text)
    result = gateway("check", "-c", str(path), "--syntax-only")
    assert result.returncode == 2
    assert result.stderr.startswith("error: listeners[0].rules[0].recipient: ")
    assert "Traceback" not in result.stderr


def test_check_unknown_key(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[[listeners]]\nname = "a"\nbind = "127.0.0.1:25"\nmax_conn = 5\n'
                    '[listeners.upstream]\naddress = "127.0.0.1:2526"\n')
    result = gateway("check", "-c", str(path), "--syntax-only")
    assert result.returncode == 2
    assert 'error: listeners[0].max_conn: unknown key "max_conn"' in result.stderr


def test_check_toml_syntax_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[gateway\nworkers = 1\n")
    result = gateway("check", "-c", str(path))
    assert result.returncode == 2
    assert "TOML syntax error" in result.stderr and "line 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    result = gateway("check", "-c", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_check_prints_warnings(tmp_path):
    path = tmp_path / "warn.toml"
    path.write_text('[[listeners]]\nname = "a"\nbind = "127.0.0.1:25"\nesmtp = false\n'
                    '[listeners.upstream]\naddress = "127.0.0.1:2526"\n')
    result = gateway("check", "-c", str(path), "--syntax-only")
    assert result.returncode == 0, result.stderr
    assert "warning: listeners[0]: esmtp = false disables STARTTLS" in result.stderr


def test_usage_errors_exit_2():
    assert gateway("check").returncode == 2
    assert gateway("run").returncode == 2
    assert gateway("frobnicate").returncode == 2
    assert gateway().returncode == 2


def test_run_config_error_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[gateway]\nworkers = -3\n')
    result = gateway("run", "-c", str(path))
    assert result.returncode == 2
    assert "error: gateway.workers:" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def fake_server(monkeypatch):
    """Replace gateway.process.launch.run (another module) with a recorder."""
    import types
    calls = []
    module = types.ModuleType("gateway.process.launch")

    def run(config, log, demo=False):
        calls.append((config, log, demo))
        return 0
    module.run = run
    monkeypatch.setitem(sys.modules, "gateway.process.launch", module)
    import gateway.process
    monkeypatch.setattr(gateway.process, "launch", module, raising=False)
    return calls


def test_run_passes_the_config_and_overrides_workers(fake_server, tmp_path):
    assert cli.main(["run", "--demo", "--workers", "3", "--log-format", "json"]) == 0
    config, log, demo = fake_server[-1]
    assert isinstance(config, GatewayConfig) and demo is True
    assert config.workers == 3 and config.listeners[0].name == "demo-smtp"
    assert log.fmt == "json"

    assert cli.main(["run", "-c", str(EXAMPLE), "--single-process"]) == 0
    config, log, demo = fake_server[-1]
    assert demo is False and config.workers == 1 and config.single_process
    assert log.fmt == "logfmt"


def test_certs_demo_calls_the_writer(monkeypatch, tmp_path, capsys):
    import types
    module = types.ModuleType("gateway.tls.certs")
    seen = []

    def write_demo_certificate(directory, hostname):
        seen.append((directory, hostname))
        return Path(directory) / "demo.crt", Path(directory) / "demo.key"
    module.write_demo_certificate = write_demo_certificate
    monkeypatch.setitem(sys.modules, "gateway.tls.certs", module)
    import gateway.tls
    monkeypatch.setattr(gateway.tls, "certs", module, raising=False)
    assert cli.main(["certs", "demo", str(tmp_path / "d"), "--hostname", "mx.test"]) == 0
    assert seen == [(str(tmp_path / "d"), "mx.test")]
    out = capsys.readouterr().out
    assert "demo.crt" in out and "demo.key" in out


def test_sink_calls_main_sink(monkeypatch):
    import types
    module = types.ModuleType("gateway.sink")
    seen = []
    module.main_sink = lambda *args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "gateway.sink", module)
    import gateway
    monkeypatch.setattr(gateway, "sink", module, raising=False)
    assert cli.main(["sink", "--listen", "[::1]:2600", "--cert", "c.pem", "--key", "k.pem",
                     "--maildir", "/tmp/md"]) == 0
    host, port, cert, key, maildir, log = seen[0]
    assert (host, port, cert, key, maildir) == ("::1", 2600, "c.pem", "k.pem", "/tmp/md")
    assert cli.main(["sink", "--listen", "nope"]) == 2


def test_summary_table_lists_every_listener():
    from gateway.config import load_config
    table = cli.summary_table(load_config(EXAMPLE))
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["NAME", "TYPE", "BIND", "PROTOCOL"]
    assert [row.split()[0] for row in rows] == ["inbound", "submission", "smtps", "imap",
                                                "imaps"]
    assert "7 (+3 client)" in rows[0]


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [
    ["--version"],
    ["--help"],
    ["track", "--help"],
    ["check", "-c", str(EXAMPLE), "--syntax-only"],
    ["policy", "-c", str(EXAMPLE), "--listener", "inbound", "--client", "192.0.2.7",
     "--rcpt", "bob@partner.example"],
], ids=["version", "help", "track-help", "check", "policy"])
def test_every_command_ends_quietly_when_its_reader_is_gone(args, buffered):
    # `gateway ... | head` where head has already exited: the pipe has no reader, so every
    # write to stdout fails (EPIPE). The command stops without a traceback (SPEC §12), the
    # output buffered (an operator's shell) or not (PYTHONUNBUFFERED, as under systemd units)
    env = gateway_subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "gateway", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60,
                                cwd=NEUTRAL_CWD, env=env)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    # Python's recipe for EPIPE: exit 1, quietly. Unbuffered, argparse's help meets the
    # error in its own write, which it ignores: 0
    assert result.returncode == (0 if "--help" in args and not buffered else 1)
