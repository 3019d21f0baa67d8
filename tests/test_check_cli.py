"""`gateway check` and `gateway status` with a broken file (SPEC §12, §11): every error of the
file in one run — the file checks too, so a wrong value does not hide a missing certificate —
the summary's milters, and a status that reads only the metrics address."""
from __future__ import annotations

import subprocess
import sys

import trio

from harness import NEUTRAL_CWD, gateway_subprocess_env, in_thread, running_sink
from peers import free_port
from supervised import GatewayProcess, write_config


def gateway(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, cwd=NEUTRAL_CWD, env=gateway_subprocess_env())


def errors_of(stderr: str) -> list[str]:
    return [ln[len("error: "):] for ln in stderr.splitlines() if ln.startswith("error: ")]


def test_check_reports_wrong_values_and_missing_files_in_one_run(tmp_path, server_cert):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"""
[gateway]
workers = -1
user = "no-such-user-here"

[certificates.main]
cert = "{tmp_path}/missing.crt"
key = "{server_cert.key}"

[[listeners]]
name = "mx"
protocol = "smtp"
bind = "127.0.0.1:{free_port()}"
certificate = "main"
max_connections = 0
backlog = "many"
profile = "nope"

[listeners.upstream]
address = "127.0.0.1:25"
tls = "sometimes"
""")
    result = gateway("check", "-c", str(cfg))
    assert result.returncode == 2
    lines = errors_of(result.stderr)
    paths = [ln.split(":", 1)[0] for ln in lines]
    assert paths == ["gateway.workers", "listeners[0].profile", "listeners[0].upstream.tls",
                     "listeners[0].max_connections", "listeners[0].backlog",
                     "certificates.main.cert", "gateway.user"], result.stderr
    assert "cannot read" in lines[5] and "missing.crt" in lines[5]
    assert "Traceback" not in result.stderr
    # --syntax-only reads no file: the value errors alone
    syntax = gateway("check", "-c", str(cfg), "--syntax-only")
    assert [ln.split(":", 1)[0] for ln in errors_of(syntax.stderr)] == paths[:5]


def test_check_summary_lists_each_listeners_milters(tmp_path, server_cert):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"""
[certificates.main]
cert = "{server_cert.cert}"
key = "{server_cert.key}"

[[listeners]]
name = "mx"
protocol = "smtp"
bind = "127.0.0.1:{free_port()}"
certificate = "main"
[listeners.upstream]
address = "127.0.0.1:25"
[[listeners.milters]]
name = "rspamd"
address = "inet:127.0.0.1:11332"
[[listeners.milters]]
name = "opendkim"
address = "unix:/run/opendkim/opendkim.sock"

[[listeners]]
name = "imap"
protocol = "imap"
bind = "127.0.0.1:{free_port()}"
certificate = "main"
[listeners.upstream]
address = "127.0.0.1:143"
""")
    result = gateway("check", "-c", str(cfg), "--syntax-only")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()[:3]
    assert header.split()[-1] == "MILTERS"
    assert rows[0].split()[0] == "mx" and rows[0].split()[-1] == "rspamd,opendkim"
    assert rows[1].split()[0] == "imap" and rows[1].split()[-1] == "-"


async def test_status_reads_only_the_metrics_address_of_a_broken_file(tmp_path, server_cert):
    port, metrics_port = free_port(), free_port()
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                # the file is broken after the start: a wrong value, an unknown key
                broken = tmp_path / "broken.toml"
                broken.write_text(cfg.read_text().replace("workers = 1", "workers = -3\n"
                                                          "no_such_key = 1"))
                assert gateway("check", "-c", str(broken)).returncode == 2
                result = await in_thread(gateway, "status", "-c", str(broken))
                assert result.returncode == 0, result.stderr
                assert "mx" in result.stdout and result.stderr == ""
        finally:
            assert gw.stop() == 0
    # not even TOML: the default address, with a warning (nothing serves it here: exit 1)
    garbage = tmp_path / "garbage.toml"
    garbage.write_text("[gateway\nworkers = = 2\n")
    result = gateway("status", "-c", str(garbage))
    assert "not valid TOML" in result.stderr and "127.0.0.1:9108" in result.stderr
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr
