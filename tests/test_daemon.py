"""What a Linux admin expects around the daemon (SPEC §9): systemd's readiness notifications
(a unix datagram socket stands in for systemd), the pid file, the event log in a file that
SIGUSR1 reopens, and syslog with facility mail (a datagram socket stands in for /dev/log)."""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from harness import NEUTRAL_CWD, client_context, gateway_subprocess_env, in_thread, running_sink
from peers import free_port
from supervised import GatewayProcess, one_session, poll, write_config

SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


@pytest.fixture
def ports():
    return free_port(), free_port()


class FakeSystemd:
    """The NOTIFY_SOCKET end: an abstract unix datagram socket (as systemd's is)."""

    def __init__(self):
        self.name = f"@gwtest-notify-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(message)
        return message

    def close(self):
        self.sock.close()


async def test_systemd_is_told_ready_reloading_and_stopping_in_order(tmp_path, server_cert,
                                                                     ports):
    port, metrics_port = ports
    systemd = FakeSystemd()
    pid_file = tmp_path / "gateway.pid"
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2, grace=5,
                     gateway_extra=f'pid_file = "{pid_file}"')
        gw = GatewayProcess(cfg, env={"NOTIFY_SOCKET": systemd.name})
        try:
            with trio.fail_after(90):
                ready = await in_thread(systemd.next)
                assert ready["READY"] == "1"
                assert ready["STATUS"].startswith("serving: 2 workers, generation 0")
                # READY=1 once every worker serves: both listen, a session works at once
                await in_thread(lambda: gw.wait_for(r"event=listening", 10, count=2))
                assert pid_file.read_text() == f"{gw.proc.pid}\n"
                ctx = client_context(server_cert.ca)
                assert await in_thread(one_session, port, ctx, 1) == "ok"

                gw.proc.send_signal(signal.SIGHUP)
                reloading = await in_thread(systemd.next)
                assert reloading["RELOADING"] == "1"
                assert int(reloading["MONOTONIC_USEC"]) > 0
                ready = await in_thread(systemd.next)
                assert ready["READY"] == "1"
                assert "generation 1" in ready["STATUS"]
                await in_thread(lambda: gw.wait_for(r"event=reloaded", 10))
                await in_thread(lambda: gw.wait_for(r"event=listening", 10, count=4))

                # a refused reload (workers changes): RELOADING=1, then READY=1 at once
                cfg.write_text(cfg.read_text().replace("workers = 2", "workers = 3"))
                gw.proc.send_signal(signal.SIGHUP)
                assert (await in_thread(systemd.next))["RELOADING"] == "1"
                assert (await in_thread(systemd.next))["READY"] == "1"
                await in_thread(lambda: gw.wait_for(r"event=reload_refused", 10))

                gw.proc.send_signal(signal.SIGTERM)
                stopping = await in_thread(systemd.next)
                assert stopping["STOPPING"] == "1"
                assert await in_thread(gw.proc.wait, 30) == 0
        finally:
            gw.stop()
            systemd.close()
    assert [next(iter(m)) for m in systemd.messages] == [
        "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    assert not pid_file.exists()                      # removed at exit


def test_pid_file_in_a_missing_directory_is_a_start_error(tmp_path, server_cert, ports):
    port, metrics_port = ports
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=free_port(), metrics_port=metrics_port,
                 server_cert=server_cert, workers=1,
                 gateway_extra=f'pid_file = "{tmp_path}/missing/gateway.pid"')
    env = gateway_subprocess_env()
    env["TMPDIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], env=env,
                       cwd=NEUTRAL_CWD, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    fatal = [ln for ln in p.stderr.splitlines() if "event=fatal" in ln]
    assert len(fatal) == 1 and "gateway.pid_file" in fatal[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("key,value", [("log_file", "gateway.log"), ("pid_file", "run/gw.pid"),
                                       ("log_file", "syslog:dev/log")])
def test_log_and_pid_file_must_be_absolute(tmp_path, key, value):
    from gateway.config import ConfigError, load_config
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\n{key} = "{value}"\n[[listeners]]\nname = "a"\nprotocol = "smtp"\n'
                   f'bind = "127.0.0.1:2525"\ntls = "off"\n[listeners.upstream]\n'
                   f'address = "127.0.0.1:25"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert f"gateway.{key}" in str(info.value)


async def test_log_file_gets_every_process_lines_and_sigusr1_reopens_it(tmp_path, server_cert,
                                                                       ports):
    port, metrics_port = ports
    log_file = tmp_path / "gateway.log"
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2,
                     gateway_extra=f'log_file = "{log_file}"')
        gw = GatewayProcess(cfg)

        def lines(path) -> list[str]:
            return path.read_text().splitlines() if path.exists() else []

        def mail():
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.sendmail("alice@client.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n")

        try:
            with trio.fail_after(60):
                await in_thread(poll, lambda: sum("event=listening" in ln
                                                  for ln in lines(log_file)) == 2, 30)
                await in_thread(mail)
                await in_thread(poll, lambda: any("event=message" in ln
                                                  for ln in lines(log_file)), 10)
                log_file.rename(tmp_path / "gateway.log.1")
                gw.proc.send_signal(signal.SIGUSR1)
                # the supervisor's reopen_logs goes to the new file, and so do the workers'
                # lines of the next sessions
                await in_thread(poll, lambda: any("event=reopen_logs" in ln
                                                  for ln in lines(log_file)), 10)
                await in_thread(mail)
                await in_thread(mail)
                await in_thread(poll, lambda: sum("event=message" in ln
                                                  for ln in lines(log_file)) == 2, 10)
        finally:
            assert gw.stop() == 0
    old = lines(tmp_path / "gateway.log.1")
    new = lines(log_file)
    assert sum("event=message" in ln for ln in old) == 1
    assert any("event=supervisor_start" in ln for ln in old)
    assert any("event=supervisor_exit" in ln for ln in new)
    assert all(re.match(r"ts=\S+ level=\w+ event=\w+", ln) for ln in old + new)
    # nothing of the event log on stderr
    assert not [ln for ln in gw.lines if "event=" in ln]


async def test_syslog_gets_facility_mail_with_each_lines_severity(tmp_path, server_cert, ports):
    port, metrics_port = ports
    path = tmp_path / "log.sock"
    if len(str(path)) > 100:
        path = Path(tempfile.gettempdir()) / f"gwlog-{secrets.token_hex(4)}.sock"
    syslogd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslogd.bind(str(path))
    os.chmod(path, 0o666)
    got: list[bytes] = []
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1,
                     gateway_extra=f'log_file = "syslog:{path}"')
        gw = GatewayProcess(cfg)

        def collect_until(pattern: bytes, timeout: float = 30):
            syslogd.settimeout(timeout)
            while not any(pattern in d for d in got):
                got.append(syslogd.recv(65536))

        try:
            with trio.fail_after(60):
                await in_thread(collect_until, b"event=listening")
                ctx = client_context(server_cert.ca)
                assert await in_thread(one_session, port, ctx, 1) == "ok"
                await in_thread(collect_until, b"event=message")
        finally:
            assert gw.stop() == 0
            syslogd.close()
            os.unlink(path)
    pids = set()
    for datagram in got:
        m = re.match(rb"<(\d+)>gateway\[(\d+)\]: (ts=\S+ level=(\w+) event=\w+.*)", datagram)
        assert m, datagram
        priority, pid, level = int(m.group(1)), int(m.group(2)), m.group(4).decode()
        assert priority == 2 * 8 + SEVERITY[level]       # facility mail (2)
        pids.add(pid)
    assert gw.proc.pid in pids and len(pids) >= 2        # the supervisor and its worker
