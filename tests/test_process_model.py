"""The process model of SPEC §9 with real processes on loopback: reloads that follow each other
while generations drain, workers that die with the supervisor, heartbeats and worker_timeout,
reload refusals, one instance per address, start-up exit codes, no leftovers (a killed
supervisor's directory goes at the next start, a running one's stays), every process but the
supervisor unprivileged, a drain that refuses new clients, and respawns under a steady scrape
(the supervisor runs no thread)."""
from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import trio

from harness import NEUTRAL_CWD, client_context, gateway_subprocess_env, in_thread, running_sink
from peers import free_port
from supervised import (GatewayProcess, children, fetch, gone, healthz, one_session,
                        plaintext_mail, poll, scrape, status_json, total, write_config)

REFUSED_PLAINTEXT = (530, b"5.7.0 Must issue a STARTTLS command first")


@pytest.fixture
def ports():
    return free_port(), free_port()


def greeted(port: int) -> socket.socket:
    """A client that read the greeting and stays idle (the caller closes it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    assert sock.makefile("rb").readline().startswith(b"220 ")
    return sock


def in_transaction(port: int) -> socket.socket:
    """A client that said MAIL FROM and waits in the transaction (the caller closes it)."""
    sock = greeted(port)
    f = sock.makefile("rb")
    sock.sendall(b"EHLO client.test\r\n")
    while (line := f.readline())[3:4] == b"-":
        pass
    assert line.startswith(b"250 "), line
    sock.sendall(b"MAIL FROM:<alice@client.test>\r\n")
    assert f.readline().startswith(b"250"), "MAIL FROM"
    return sock


def noop(sock: socket.socket) -> bytes:
    sock.sendall(b"NOOP\r\n")
    return sock.makefile("rb").readline()


def run_gateway(cfg, tmpdir, timeout: float = 30) -> subprocess.CompletedProcess:
    env = gateway_subprocess_env()
    env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], env=env,
                          cwd=NEUTRAL_CWD, capture_output=True, text=True, timeout=timeout)


def leftovers(tmpdir) -> list[str]:
    return glob.glob(os.path.join(str(tmpdir), "gateway-metrics-*"))


# --- 1. reloads while older generations drain ---------------------------------------------

async def test_sighups_back_to_back_while_a_generation_drains(tmp_path, server_cert, ports):
    """Two SIGHUPs back to back while the first generation still drains a transaction in
    flight (the supervisor used to die of StopIteration: a fixed table of 2 × workers rows),
    and a third after them: the supervisor lives and serves, and the second generation,
    retired at once (maybe before it listened: its retire signal waits until it does),
    exits. An idle session on the first generation gets 421 4.3.2 at once (SPEC §9)."""
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1, grace=30)
        gw = GatewayProcess(cfg)
        idle = busy = None
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                first = gw.worker_pids()[0]
                busy = await in_thread(in_transaction, port)  # held on generation 1
                idle = await in_thread(greeted, port)         # ... but not this one
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                told = await in_thread(idle.makefile("rb").readline)
                gw.proc.send_signal(signal.SIGHUP)            # (a pending SIGHUP is one)
                await in_thread(lambda: gw.wait_for(r"event=reloaded", count=2))
                # generation 2 retires and exits; generation 1 still drains the idle session
                await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=1))
                served = await in_thread(plaintext_mail, port)
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded", count=3))
                await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=2))
                again = await in_thread(plaintext_mail, port)
                still_open = await in_thread(noop, busy)
                alive = gw.proc.poll() is None
                draining = first in gw.worker_pids()
        finally:
            for sock in (idle, busy):
                if sock is not None:
                    sock.close()
            assert gw.stop() == 0
    assert alive and draining
    assert told == b"421 4.3.2 Service shutting down\r\n"
    assert served[0] == 250 and again[0] == 250
    assert still_open.startswith(b"250")
    assert "StopIteration" not in "".join(gw.lines)


async def test_a_reload_waits_when_every_row_is_draining(tmp_path, server_cert, ports):
    """8 rows per worker slot: with one slot, 7 generations may drain at once (each with
    a transaction in flight); the next reload is deferred (logged and counted), not a
    failure, and runs once a generation has drained."""
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1, grace=60)
        gw = GatewayProcess(cfg)
        idle = []
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                for n in range(1, 8):                 # generations 1..7 each hold a session
                    idle.append(await in_thread(in_transaction, port))
                    gw.proc.send_signal(signal.SIGHUP)
                    await in_thread(lambda: gw.wait_for(r"event=reloaded", count=n))
                    await in_thread(lambda: gw.wait_for(r"event=listening", count=n + 1))
                idle.append(await in_thread(in_transaction, port))   # generation 8, serving
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reload_deferred"))
                served = await in_thread(plaintext_mail, port)
                deferred = await in_thread(scrape, metrics_port)
                assert gw.count(r"event=reloaded") == 7
                idle.pop(0).close()                   # generation 1 has drained ...
                await in_thread(lambda: gw.wait_for(r"event=reloaded", count=8))  # ... so
                await in_thread(lambda: gw.wait_for(r"event=listening", count=9))
                after = await in_thread(plaintext_mail, port)
        finally:
            for sock in idle:
                sock.close()
            assert gw.stop() == 0
    assert served[0] == 250 and after[0] == 250
    assert total(deferred, "gateway_reloads_deferred_total") == 1
    assert gw.count(r"event=worker_exit") == 9


# --- 2. workers die with the supervisor ---------------------------------------------------

async def test_workers_and_helpers_die_with_the_supervisor(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(30):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                kids = children(gw.proc.pid)
                workers = gw.worker_pids()
                gw.proc.kill()                          # kill -9 the supervisor
                await in_thread(gw.proc.wait)
                await in_thread(lambda: poll(lambda: all(gone(p) for p in kids), 15,
                                             what="children of the killed supervisor"))
                refused = await in_thread(one_session, port, client_context(server_cert.ca), 1)
        finally:
            for pid in children(gw.proc.pid):
                os.kill(pid, signal.SIGKILL)
            gw.stop()
    assert set(workers) < set(kids) and len(kids) == 3     # 2 workers and the metrics process
    assert refused == "refused"                              # no orphan keeps serving


# --- 3. heartbeats and worker_timeout -----------------------------------------------------

async def test_a_stopped_worker_is_replaced_after_worker_timeout(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1, gateway_extra="worker_timeout = 2")
        gw = GatewayProcess(cfg)
        stopped = None
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                await in_thread(lambda: poll(lambda: healthz(metrics_port) == 200, 10,
                                             what="/healthz 200 at start"))
                await in_thread(lambda: poll(lambda: total(
                    scrape(metrics_port), "gateway_workers_healthy") == 1, 10,
                    what="gateway_workers_healthy 1"))
                before = await in_thread(scrape, metrics_port)
                stopped = gw.worker_pids()[0]
                os.kill(stopped, signal.SIGSTOP)         # alive, but its loop does not run
                await in_thread(lambda: poll(lambda: healthz(metrics_port) == 503, 10,
                                             what="/healthz 503"))
                timeout_line = await in_thread(lambda: gw.wait_for(r"event=worker_timeout"))
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                await in_thread(lambda: poll(lambda: healthz(metrics_port) == 200, 10,
                                             what="/healthz 200 again"))
                await in_thread(lambda: poll(lambda: total(
                    scrape(metrics_port), "gateway_workers_healthy") == 1, 10,
                    what="gateway_workers_healthy 1 again"))
                after = await in_thread(scrape, metrics_port)
                served = await in_thread(one_session, port, client_context(server_cert.ca), 1)
                replacement = gw.worker_pids()
        finally:
            if stopped is not None and not gone(stopped):
                os.kill(stopped, signal.SIGKILL)
            assert gw.stop() == 0
    assert f"worker_pid={stopped}" in timeout_line[0]
    assert replacement and stopped not in replacement
    assert served == "ok"
    assert total(before, "gateway_workers_configured") == 1
    assert total(before, "gateway_workers_healthy") == 1
    assert total(after, "gateway_workers_configured") == 1
    assert total(after, "gateway_worker_restarts_total") == 1


def test_worker_timeout_is_a_positive_number_of_seconds():
    from gateway.config import ConfigError, parse_config
    base = {"listeners": [{"name": "mx", "protocol": "smtp", "bind": "127.0.0.1:2525",
                           "tls": "off", "client_tls": "none",
                           "upstream": {"address": "127.0.0.1:2526", "tls": "none"}}]}
    assert parse_config(base).worker_timeout == 30
    assert parse_config({**base, "gateway": {"worker_timeout": 2.5}}).worker_timeout == 2.5
    for bad in (0, -1, "30"):
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "gateway": {"worker_timeout": bad}})
        assert info.value.path == "gateway.worker_timeout"


# --- 4. reloads that need a restart -------------------------------------------------------

async def test_reloads_that_need_a_restart_are_refused(tmp_path, server_cert, ports):
    """Each refused file also asks for client_tls = required: had anything of it been
    applied, plaintext MAIL would get 530."""
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        kw = dict(port=port, sink_port=sink.port, metrics_port=metrics_port,
                  server_cert=server_cert, workers=1)
        write_config(cfg, **kw)
        gw = GatewayProcess(cfg)
        changes = [
            ("bind", dict(kw, port=free_port())),
            ("workers", dict(kw, workers=2)),
            ("user", dict(kw, gateway_extra='user = "nobody"')),
            ("group", dict(kw, gateway_extra='group = "root"')),
            ("metrics", dict(kw, metrics_port=free_port())),
        ]
        answers = []
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                for n, (key, changed) in enumerate(changes, 1):
                    write_config(cfg, client_tls="required", **changed)
                    gw.proc.send_signal(signal.SIGHUP)
                    line = await in_thread(lambda: gw.wait_for(r"event=reload_refused",
                                                               count=n))
                    answers.append((key, line[-1], await in_thread(plaintext_mail, port)))
                write_config(cfg, client_tls="required", **kw)      # a change it may make
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                await in_thread(lambda: gw.wait_for(r"event=worker_exit"))
                applied = await in_thread(plaintext_mail, port)
        finally:
            assert gw.stop() == 0
    for key, line, answer in answers:
        assert f"changed={key} " in line and "a restart is needed" in line, line
        assert answer[0] == 250, (key, answer)
    assert gw.count(r"event=reloaded") == 1
    assert applied == REFUSED_PLAINTEXT


# --- 5, 6, 7. one instance per address, start-up errors, leftovers -------------------------

async def test_a_second_instance_on_the_same_address_exits_2(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert)
        second_cfg = tmp_path / "second.toml"           # its own metrics port: only the
        write_config(second_cfg, port=port, sink_port=sink.port,     # listener collides
                     metrics_port=free_port(), server_cert=server_cert)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                second = await in_thread(run_gateway, second_cfg, tmp_path)
                served = await in_thread(one_session, port, client_context(server_cert.ca), 1)
        finally:
            assert gw.stop() == 0
    assert second.returncode == 2
    assert f"mx 127.0.0.1:{port}: already served by another process" in second.stderr
    assert len(second.stderr.splitlines()) == 1 and "Traceback" not in second.stderr
    assert served == "ok"
    assert leftovers(tmp_path) == []


def test_foreign_listener_sees_a_socket_of_another_group():
    """The check after listen(): a LISTEN socket on the address that is not one of ours
    (what the probe cannot see when another process binds between probe and bind)."""
    from gateway.process.addrcheck import foreign_listener, listening

    def reuseport(port=0):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    other = reuseport()
    port = other.getsockname()[1]
    ours = [reuseport(port), reuseport(port)]
    try:
        assert ("127.0.0.1", port, os.fstat(other.fileno()).st_ino) in listening(
            socket.AF_INET)
        assert foreign_listener(ours)
        other.close()
        assert not foreign_listener(ours)
    finally:
        for sock in [other, *ours]:
            sock.close()


def test_start_errors_exit_2_with_one_line_and_leave_nothing(tmp_path, server_cert):
    """Exit 2 for what is found before serving (SPEC §9), one line naming the key or the
    listener and address, no traceback; and no prometheus directory left behind."""
    port, metrics_port = free_port(), free_port()
    kw = dict(port=port, sink_port=free_port(), metrics_port=metrics_port,
              server_cert=server_cert, workers=1)
    runs = tmp_path / "tmp"
    runs.mkdir()
    cases = []
    cfg = tmp_path / "user.toml"
    write_config(cfg, **kw, gateway_extra='user = "no-such-user-gw"')
    cases.append((cfg, 'gateway.user: no such user \\"no-such-user-gw\\"'))   # logfmt
    cfg = tmp_path / "tracking.toml"
    write_config(cfg, **kw, gateway_extra=f'tracking_log = "{tmp_path}/missing/t.jsonl"')
    cases.append((cfg, "gateway.tracking_log: directory"))
    blocker = socket.socket()                 # a plain listener (no SO_REUSEPORT) on the port
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    metrics_blocker = socket.socket()
    try:
        cfg = tmp_path / "bind.toml"
        write_config(cfg, **kw)
        cases.append((cfg, f"mx 127.0.0.1:{port}: already served by another process"))
        results = [(run_gateway(cfg, runs), expected) for cfg, expected in cases]
        blocker.close()
        metrics_blocker.bind(("127.0.0.1", metrics_port))
        metrics_blocker.listen()
        results.append((run_gateway(tmp_path / "bind.toml", runs),
                        f"gateway.metrics 127.0.0.1:{metrics_port}: "))
    finally:
        blocker.close()
        metrics_blocker.close()
    for result, expected in results:
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "level=error event=fatal" in result.stderr and "Traceback" not in result.stderr
    assert leftovers(runs) == []


async def test_no_metrics_directory_is_left_after_a_stop(tmp_path, server_cert, ports):
    port, metrics_port = ports
    runs = tmp_path / "tmp"
    runs.mkdir()
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1)
        gw = GatewayProcess(cfg, tmpdir=runs)
        try:
            with trio.fail_after(30):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                during = leftovers(runs)
        finally:
            assert gw.stop() == 0
    assert len(during) == 1                      # the directory was there while serving
    assert leftovers(runs) == []


async def test_a_killed_supervisors_directory_goes_at_the_next_start_a_running_ones_stays(
        tmp_path, server_cert):
    """SPEC §9: the directory of a supervisor killed with kill -9 is removed at the next start;
    the directory of another instance that runs (a lock it holds) is never taken for one."""
    runs = tmp_path / "tmp"
    runs.mkdir()

    def start(name: str) -> tuple[GatewayProcess, int]:
        port, metrics_port = free_port(), free_port()
        cfg = tmp_path / f"{name}.toml"
        write_config(cfg, port=port, sink_port=free_port(), metrics_port=metrics_port,
                     server_cert=server_cert, workers=1)
        gw = GatewayProcess(cfg, tmpdir=runs)
        gw.wait_for(r"event=listening")
        return gw, metrics_port

    running = []
    try:
        with trio.fail_after(60):
            killed, _ = await in_thread(start, "killed")
            running.append(killed)
            kids = children(killed.proc.pid)
            (left,) = leftovers(runs)
            killed.proc.kill()                           # kill -9: no clean-up
            await in_thread(killed.proc.wait)
            await in_thread(lambda: poll(lambda: all(gone(p) for p in kids), 15,
                                         what="children of the killed supervisor"))
            assert leftovers(runs) == [left]
            first, first_metrics = await in_thread(start, "first")
            running.append(first)
            after_first = leftovers(runs)
            second, _ = await in_thread(start, "second")      # while the first runs
            running.append(second)
            after_second = set(leftovers(runs))
            first_scrape = await in_thread(fetch, first_metrics, "/metrics")
    finally:
        for gw in running:
            gw.stop()
    assert left not in after_first and len(after_first) == 1
    assert after_first[0] in after_second and len(after_second) == 2
    assert first_scrape[0] == 200
    assert leftovers(runs) == []


def _proc_status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (ln.partition(":") for ln in f)}


DEMO_SUPERVISOR = """
import os, sys
os.umask(0o077)                       # as the systemd unit's UMask
from gateway.config import load_config
from gateway.observe.logs import EventLog
from gateway.process.supervisor import Supervisor
config = load_config(sys.argv[1])
sys.exit(Supervisor(config, EventLog(config.log_format), demo=True).run())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_every_process_but_the_supervisor_runs_unprivileged(tmp_path, server_cert):
    """SPEC §9: workers, the metrics/status process and the demo sink run as `user`/`group`
    with no capabilities left (/proc/PID/status); the metrics process still reads every
    file (the supervisor's and the workers', made under UMask 0077) and merges a retired
    worker's; the demo sink still takes mail."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, sink_port=sink_port, metrics_port=metrics_port,
                 server_cert=server_cert, workers=2, gateway_extra='user = "nobody"')
    gw = GatewayProcess(cfg, command=[sys.executable, "-c", DEMO_SUPERVISOR, str(cfg)])
    try:
        with trio.fail_after(60):
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
            await in_thread(lambda: poll(lambda: healthz(metrics_port) == 200, 10,
                                         what="/healthz"))
            kids = children(gw.proc.pid)
            status = {pid: _proc_status(pid) for pid in kids}
            own = _proc_status(gw.proc.pid)
            sent = await in_thread(one_session, port, client_context(server_cert.ca), 1)
            recent = await in_thread(lambda: poll(
                lambda: status_json(metrics_port)["listeners"][0]["sessions_last_minute"],
                10, what="the session in /status"))
            gw.proc.send_signal(signal.SIGHUP)
            await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=2))
            samples = await in_thread(scrape, metrics_port)
            retired = [int(p) for p in re.findall(r"event=worker_exit .*?worker_pid=(\d+)",
                                                   "".join(gw.lines))]
            values = glob.glob(os.path.join(gw.tmpdir, "gateway-metrics-*", "values"))[0]
            archives = [os.stat(a).st_uid for a in glob.glob(os.path.join(values, "merged.*"))]
            left = [f for pid in retired for f in glob.glob(os.path.join(values, f"*_{pid}.db"))]
    finally:
        assert gw.stop() == 0
    assert archives == [nobody.pw_uid]
    assert len(retired) == 2 and left == []          # merged by the unprivileged process
    assert len(kids) == 4, "".join(gw.lines)   # two workers, the metrics process, the demo sink
    for pid, st in status.items():
        assert st["Uid"] == [str(nobody.pw_uid)] * 4, (pid, st["Uid"])
        assert st["Gid"] == [str(nobody.pw_gid)] * 4, (pid, st["Gid"])
        assert st["Groups"] == [], (pid, st["Groups"])
        for cap in ("CapEff", "CapPrm", "CapAmb"):
            assert int(st[cap][0], 16) == 0, (pid, cap, st[cap])
    assert own["Uid"][0] == "0"                             # the supervisor keeps root
    assert sent == "ok" and recent == 1
    assert total(samples, "gateway_connections_total") == 1      # merged, not lost


# --- 8. a drain refuses new clients -------------------------------------------------------

async def test_sigterm_refuses_new_clients_while_data_in_flight_completes(tmp_path,
                                                                          server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2, client_tls="none")
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                except ConnectionRefusedError:
                    return True
                return False

            def scenario():
                busy = socket.create_connection(("127.0.0.1", port), timeout=20)
                bf = busy.makefile("rb")
                bf.readline()
                busy.sendall(b"EHLO c\r\n")
                while (line := bf.readline()).startswith(b"250-"):
                    pass
                busy.sendall(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
                replies = [line] + [bf.readline() for _ in range(3)]
                assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"], replies
                busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
                gw.proc.send_signal(signal.SIGTERM)
                gw.wait_for(r"event=draining", count=2)
                poll(refused, 10, what="a new connection refused")
                busy.sendall(b"second half\r\n.\r\nQUIT\r\n")
                final = bf.read()
                busy.close()
                return final
            with trio.fail_after(60):
                final = await in_thread(scenario)
                code = await in_thread(gw.proc.wait, 30)
        finally:
            gw.stop()
    assert final.startswith(b"250 2.0.0 Ok: queued")
    assert code == 0
    assert sink.messages and b"second half" in sink.messages[-1].data


# --- 9. forks under a scrape load: the supervisor runs no thread --------------------------

async def test_respawns_under_a_steady_scrape_load(tmp_path, server_cert, ports):
    port, metrics_port = ports
    kills = 6
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2)
        gw = GatewayProcess(cfg)
        stop = threading.Event()
        statuses: list = []

        def scraper():
            import urllib.request
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                timeout=10) as r:
                        r.read()
                        statuses.append(r.status)
                except Exception as exc:
                    statuses.append(repr(exc))
        threads = [threading.Thread(target=scraper, daemon=True) for _ in range(2)]
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                tasks = os.listdir(f"/proc/{gw.proc.pid}/task")
                for t in threads:
                    t.start()
                for n in range(kills):
                    victim = gw.workers_by_slot()[n % 2]          # alternate: little back-off
                    os.kill(victim, signal.SIGKILL)
                    await in_thread(lambda: gw.wait_for(r"event=worker_start", count=3 + n))
                    await in_thread(lambda: gw.wait_for(r"event=listening", count=3 + n))
                ctx = client_context(server_cert.ca)
                served = await in_thread(lambda: [one_session(port, ctx, n) for n in range(8)])
                current = gw.worker_pids()
                stop.set()
                for t in threads:
                    await in_thread(t.join, 15)
                samples = await in_thread(scrape, metrics_port)
        finally:
            stop.set()
            assert gw.stop() == 0
    assert tasks == [str(gw.proc.pid)]                   # the supervisor is one thread
    assert served == ["ok"] * 8
    assert len(statuses) > kills and set(statuses) == {200}
    assert total(samples, "gateway_worker_restarts_total") == kills
    workers = {ln.split("worker=")[1].split()[0] for ln in gw.lines
               if "event=conn_close" in ln and "worker=" in ln}
    assert workers and all(int(w) in current for w in workers)      # the replacements


async def test_sigusr1_reopens_the_tracking_log_after_logrotate_moved_it(tmp_path, server_cert,
                                                                        ports):
    """logrotate renames the file and sends SIGUSR1 (SPEC §9): every worker reopens the path,
    so the next records go to the new file and none is lost; the gateway keeps serving."""
    import json
    import smtplib
    port, metrics_port = ports
    tracking = tmp_path / "tracking.jsonl"
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=2,
                     gateway_extra=f'tracking_log = "{tracking}"')
        gw = GatewayProcess(cfg)

        def mail(n):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.sendmail("alice@client.test", ["bob@example.test"],
                           f"Subject: {n}\r\n\r\nhello\r\n".encode())

        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                for n in range(4):
                    await in_thread(mail, n)
                tracking.rename(tmp_path / "tracking.jsonl.1")
                gw.proc.send_signal(signal.SIGUSR1)
                await in_thread(lambda: gw.wait_for(r"event=reopen_logs"))
                # both workers reopened: each logs its reopen (TrackingLog's own event)
                while len([t for t in gw.lines if "event=tracking_reopened" in t]) < 2:
                    await trio.sleep(0.05)
                for n in range(4, 8):
                    await in_thread(mail, n)
        finally:
            assert gw.stop() == 0
    old = [json.loads(x) for x in (tmp_path / "tracking.jsonl.1").read_text().splitlines()]
    new = [json.loads(x) for x in tracking.read_text().splitlines()]
    assert len(old) == 4 and len(new) == 4
    assert all(r["result"] == "accepted" for r in old + new)


async def test_a_crash_looping_worker_is_respawned_with_growing_back_off(tmp_path, server_cert,
                                                                        ports):
    """A worker that keeps dying young is replaced after 0, 0.25, 0.5, 1, 2 s... (SPEC §9:
    with back-off when it keeps crashing), so a broken worker cannot fork-bomb the host."""
    import datetime
    import re
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                for n in range(1, 6):
                    await in_thread(lambda: gw.wait_for(r"event=worker_start", count=n))
                    os.kill(gw.workers_by_slot()[0], signal.SIGKILL)
                    await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=n))
                await in_thread(lambda: gw.wait_for(r"event=worker_start", count=6))
        finally:
            gw.stop()

    def stamp(line: str) -> float:
        ts = re.search(r"ts=(\S+)Z", line).group(1)
        return datetime.datetime.fromisoformat(ts).timestamp()

    exits = [stamp(x) for x in gw.lines if "event=worker_exit" in x][:5]
    starts = [stamp(x) for x in gw.lines if "event=worker_start" in x][1:6]
    gaps = [s - e for e, s in zip(exits, starts)]
    assert gaps[0] < 0.5                                 # the first death: at once
    for gap, least in zip(gaps[1:], (0.25, 0.5, 1.0, 2.0)):
        assert gap >= least - 0.02, gaps
    assert gaps[4] > gaps[2] > gaps[0], gaps
