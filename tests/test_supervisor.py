"""The supervisor with real worker processes (SPEC §9, §11): crash replacement under load,
reload, drain on SIGTERM, and the shared metrics endpoint. The gateway runs as
`python -m gateway run -c FILE` in a subprocess; the upstream is the sink in this process."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio

from harness import client_context, in_thread, raw_starttls, running_sink
from peers import free_port
from supervised import (GatewayProcess, healthz, one_session, plaintext_mail, scrape, total,
                        write_config)


@pytest.fixture
def ports():
    return free_port(), free_port()


async def test_kill_9_worker_under_load_loses_nothing(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert)
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
            ctx = client_context(server_cert.ca)
            victim = gw.worker_pids()[0]
            killed = threading.Event()

            def load():
                results = []
                with ThreadPoolExecutor(8) as pool:
                    futures = []
                    for n in range(200):
                        futures.append(pool.submit(one_session, port, ctx, n))
                        if n == 60:
                            os.kill(victim, signal.SIGKILL)
                            killed.set()
                    results = [f.result() for f in futures]
                return results
            with trio.fail_after(120):
                results = await in_thread(load)
                await in_thread(lambda: gw.wait_for(r"event=worker_start", count=3))
                after = await in_thread(
                    lambda: [one_session(port, ctx, 1000 + n) for n in range(20)])
                samples = await in_thread(scrape, metrics_port)
        finally:
            assert gw.stop() == 0
    assert killed.is_set()
    assert "refused" not in results
    assert set(results) <= {"ok", "tempfail", "closed"}
    assert results.count("ok") >= 150
    assert after == ["ok"] * 20                         # the replacement serves
    # every acknowledged message reached the upstream
    bodies = [m.data for m in sink.messages]
    for n, r in enumerate(results):
        if r == "ok":
            assert any(b.endswith(b"\r\nmessage %d\r\n" % n) for b in bodies), n
    assert total(samples, "gateway_worker_restarts_total") == 1


async def test_metrics_count_what_happened_across_workers(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert)
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
            ctx = client_context(server_cert.ca)
            with trio.fail_after(60):
                results = await in_thread(
                    lambda: list(ThreadPoolExecutor(4).map(
                        lambda n: one_session(port, ctx, n), range(30))))
                await in_thread(lambda: gw.wait_for(r"event=conn_close", count=30))
                samples = await in_thread(scrape, metrics_port)
                health = await in_thread(healthz, metrics_port)
        finally:
            assert gw.stop() == 0
    assert results == ["ok"] * 30
    served = {ln.split("worker=")[1].split()[0] for ln in gw.lines
              if "event=conn_close" in ln and "worker=" in ln}
    assert total(samples, "gateway_connections_total", listener="mx", protocol="smtp") == 30
    assert total(samples, "gateway_messages_total", listener="mx", result="accepted") == 30
    assert total(samples, "gateway_tls_handshakes_total", listener="mx", side="client",
                 version="TLSv1.3", result="ok") == 30
    assert total(samples, "gateway_connections_active", listener="mx") == 0
    assert total(samples, "gateway_session_seconds_count", listener="mx") == 30
    assert total(samples, "gateway_message_bytes_total", listener="mx") > 0
    assert total(samples, "gateway_build_info") >= 1
    assert health == 200, "".join(gw.lines)
    assert len(served) >= 1


async def test_sighup_reload_changes_policy_without_refusing(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        kw = dict(port=port, sink_port=sink.port, metrics_port=metrics_port,
                  server_cert=server_cert)
        write_config(cfg, **kw)
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
            ctx = client_context(server_cert.ca)
            assert (await in_thread(plaintext_mail, port))[0] == 250
            stop = threading.Event()

            def load():
                out = []
                n = 0
                while not stop.is_set() and n < 400:
                    out.append(one_session(port, ctx, n))
                    n += 1
                return out

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    box = []
                    nursery.start_soon(lambda: _collect(box, load))
                    write_config(cfg, client_tls="required", **kw)
                    gw.proc.send_signal(signal.SIGHUP)
                    await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                    await in_thread(lambda: gw.wait_for(r"event=worker_exit", count=2))
                    after = await in_thread(plaintext_mail, port)
                    cfg.write_text("this is [ not toml")
                    gw.proc.send_signal(signal.SIGHUP)
                    await in_thread(lambda: gw.wait_for(r"event=reload_failed"))
                    still = await in_thread(plaintext_mail, port)
                    stop.set()
        finally:
            assert gw.stop() == 0
    results = box[0]
    assert results and set(results) == {"ok"}           # not one refused or failed session
    assert after == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert still == (530, b"5.7.0 Must issue a STARTTLS command first")


async def _collect(box, fn):
    box.append(await trio.to_thread.run_sync(fn))


async def test_sigterm_lets_data_finish_and_idle_sessions_get_421(tmp_path, server_cert, ports):
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1, client_tls="none")
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening"))

            def scenario():
                busy = socket.create_connection(("127.0.0.1", port), timeout=20)
                idle = socket.create_connection(("127.0.0.1", port), timeout=20)
                bf, idf = busy.makefile("rb"), idle.makefile("rb")
                bf.readline(), idf.readline()
                busy.sendall(b"EHLO c\r\n")
                while not bf.readline().startswith(b"250 "):
                    pass
                busy.sendall(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
                replies = [bf.readline() for _ in range(3)]
                busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
                gw.proc.send_signal(signal.SIGTERM)
                idle_reply = idf.read()                       # 421, then close
                busy.sendall(b"second half\r\n.\r\nQUIT\r\n")
                final = bf.read()
                busy.close(), idle.close()
                return replies, idle_reply, final
            with trio.fail_after(60):
                replies, idle_reply, final = await in_thread(scenario)
                code = await in_thread(gw.proc.wait, 30)
        finally:
            gw.stop()
    assert replies[2].startswith(b"354")
    assert idle_reply == b"421 4.3.2 Service shutting down\r\n"
    assert final.startswith(b"250 2.0.0 Ok: queued")
    assert code == 0
    assert sink.messages and b"second half" in sink.messages[0].data


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_workers_drop_privileges_after_loading_keys(tmp_path, server_cert, ports):
    import pwd
    nobody = pwd.getpwnam("nobody")
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1)
        text = cfg.read_text().replace('hostname = "mx.test"',
                                       'hostname = "mx.test"\nuser = "nobody"')
        cfg.write_text(text)
        key_mode = os.stat(server_cert.key).st_mode
        os.chmod(server_cert.key, 0o600)                  # readable by root only
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening"))
            pid = gw.worker_pids()[0]
            status = open(f"/proc/{pid}/status").read()
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
            ctx = client_context(server_cert.ca)
            result = await in_thread(one_session, port, ctx, 1)
        finally:
            os.chmod(server_cert.key, key_mode)
            assert gw.stop() == 0
    assert set(uids) == {str(nobody.pw_uid)}
    assert os.getpid() != pid
    assert result == "ok", "".join(gw.lines[-30:])


def _starttls_session(port: int, ctx, session=None):
    """EHLO, STARTTLS, EHLO over TLS (so TLS 1.3 tickets have been read), QUIT; returns
    (session, reused)."""
    with raw_starttls(port, ctx, session=session) as tls:
        tls.sendall(b"EHLO client.test\r\n")
        buf = b""
        while b"\r\n250 " not in b"\r\n" + buf:
            buf += tls.recv(4096)
        reused = tls.session_reused
        new_session = tls.session
        tls.sendall(b"QUIT\r\n")
        tls.recv(4096)
        return new_session, reused


async def test_tls_sessions_resume_on_any_worker(tmp_path, server_cert, ports):
    """The supervisor builds the TLS contexts before it forks: every worker has the same
    session-ticket keys, so a client's ticket from one worker resumes on the other."""
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert)
        gw = GatewayProcess(cfg)
        try:
            await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
            ctx = client_context(server_cert.ca)

            def clients():
                session, reused = _starttls_session(port, ctx)
                out = [reused]
                for _ in range(16):
                    out.append(_starttls_session(port, ctx, session)[1])
                return out
            with trio.fail_after(60):
                reused = await in_thread(clients)
                resumed = await in_thread(lambda: gw.wait_for(
                    r"event=tls .*side=client.*resumed=true", count=16))
        finally:
            assert gw.stop() == 0
    assert reused == [False] + [True] * 16
    workers = {re.search(r"worker=(\d+)", line).group(1) for line in resumed}
    assert len(workers) == 2                # resumed on both workers (1 in 32,768 to fail)


async def test_a_worker_that_cannot_start_stops_the_gateway_with_exit_code_1(tmp_path,
                                                                             server_cert,
                                                                             ports):
    """A failure after serving began is exit 1 (SPEC §9): here the worker cannot open its
    tracking log, a directory (the supervisor's check only sees that its parent exists)."""
    port, metrics_port = ports
    async with running_sink() as sink:
        cfg = tmp_path / "gw.toml"
        write_config(cfg, port=port, sink_port=sink.port, metrics_port=metrics_port,
                     server_cert=server_cert, workers=1,
                     gateway_extra=f'tracking_log = "{tmp_path}"')
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=fatal .*a worker could not start"))
                await in_thread(lambda: gw.wait_for(r"event=supervisor_exit .*code=1"))
                code = await in_thread(lambda: gw.proc.wait(30))
        finally:
            gw.stop()
    assert code == 1                        # it was 0: an init script saw a clean stop


async def test_a_certificate_openssl_refuses_stops_the_start_and_is_refused_on_reload(
        tmp_path, server_cert, upstream_cert, ports):
    """The supervisor checks the certificates before forking: a key that does not belong to
    its certificate ends the start with exit code 2 (found before serving, SPEC §9) and a
    line naming the key, and a reload to such a pair keeps the running workers."""
    port, metrics_port = ports
    broken = types.SimpleNamespace(cert=server_cert.cert, key=upstream_cert.key)
    async with running_sink() as sink:
        kw = dict(port=port, sink_port=sink.port, metrics_port=metrics_port, workers=1)
        cfg = tmp_path / "gw.toml"
        write_config(cfg, server_cert=broken, **kw)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(
                    r"event=fatal .*certificates.main: .*(cannot be used|does not match)"))
                assert await in_thread(lambda: gw.proc.wait(30)) == 2
        finally:
            gw.stop()
        write_config(cfg, server_cert=server_cert, **kw)
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))
                write_config(cfg, server_cert=broken, **kw)
                gw.proc.send_signal(signal.SIGHUP)
                # (the reload's file check already refuses the pair, before build_tls would)
                await in_thread(lambda: gw.wait_for(r"event=reload_failed .*key"))
                still = await in_thread(plaintext_mail, port)
        finally:
            assert gw.stop() == 0
    assert still[0] == 250 and "event=reloaded" not in "".join(gw.lines)
