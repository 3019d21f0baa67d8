"""Tracking records are written whole (SPEC §7): a full disk costs records, never mail, and a
torn record is never glued to the next one. Uses a 64 KiB tmpfs (needs root to mount)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.config import parse_config
from gateway.serve.conncount import ConnectionCounts
from gateway.observe.logs import EventLog
from gateway.serve.server import WorkerState, serve
from gateway.observe.tracking_log import TrackingLog, TrackingRecord, encode_record
from harness import (NEUTRAL_CWD, LogCapture, config_dict, gateway_subprocess_env, in_thread,
                     listener_dict, running_sink, smtp_send)


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self, amount=1):
        self.value += amount


class FakeMetrics:
    def __init__(self):
        self.tracking_errors_total = Counter()


def record(i, **kw) -> TrackingRecord:
    fields = dict(id=f"c.{i}", time=f"2026-11-24T10:00:{i % 60:02d}.000+00:00", listener="smtp",
                  client="192.0.2.1:4000", helo="client.test", mail_from="alice@client.test",
                  recipients=["bob@example.test", "carol@example.test"], size=100 + i,
                  client_tls=None, upstream="127.0.0.1:25", upstream_tls=None,
                  result="accepted", reply="250 2.0.0 Ok: queued", upstream_leg="plain")
    fields.update(kw)
    return TrackingRecord(**fields)


def track_json(path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "gateway", "track", "--json", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def fill(directory: Path) -> Path:
    """Use up every free block of the filesystem; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"x" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler


def check_lines(path: Path, written: dict[str, bytes], failed: set[str]) -> list[str]:
    """Every line is a record written whole, or the fragment of a failed one (never a fragment
    with a record glued on). Returns the ids of the whole records, in file order."""
    ids = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        try:
            rec = json.loads(raw)
        except ValueError:
            assert any(written[i].startswith(raw) and len(raw) < len(written[i])
                       for i in failed), raw
            continue
        assert raw + b"\n" == written[rec["id"]]
        ids.append(rec["id"])
    assert path.read_bytes().endswith(b"\n")
    return ids


def test_full_filesystem_loses_records_whole_and_the_next_starts_a_line(small_fs):
    path = small_fs / "tracking.jsonl"
    logs = LogCapture()
    metrics = FakeMetrics()
    tracking = TrackingLog(str(path), log=EventLog(fmt="json", stream=logs), metrics=metrics)
    written: dict[str, bytes] = {}
    try:
        def write(i):
            rec = record(i)
            written[rec.id] = encode_record(rec)
            before = tracking.errors
            tracking.write(rec)
            return tracking.errors == before

        assert write(0)
        filler = fill(small_fs)
        ok = [write(i) for i in range(1, 40)]
        assert not all(ok) and not any(ok[ok.index(False):])    # once full, every write fails
        failed = {e["id"] for e in logs.of("tracking_error")}
        assert len(failed) == ok.count(False) == tracking.errors == \
            metrics.tracking_errors_total.value
        events = logs.of("tracking_error")
        assert all(e["level"] == "error" and e["path"] == str(path) for e in events)
        # the first failure tore its record (a short write into the last block's slack)
        assert events[0]["reason"] == "short write"
        assert 0 < events[0]["written"] < events[0]["bytes"] == len(written[events[0]["id"]])
        assert not path.read_bytes().endswith(b"\n")

        filler.unlink()                                          # space is back
        for i in range(40, 45):
            assert write(i)
    finally:
        tracking.close()
    ids = check_lines(path, written, failed)
    after = [f"c.{i}" for i in range(40, 45)]
    assert ids[-5:] == after
    assert set(written) - failed <= set(ids) <= set(written)   # (a write torn just before
                                                               # its newline is whole)
    tracked = [r["id"] for r in track_json(path)]
    assert set(after) <= set(tracked) and set(tracked) == set(ids)


def test_a_torn_line_left_by_another_process_is_not_glued_on(tmp_path):
    path = tmp_path / "tracking.jsonl"
    whole = encode_record(record(1))
    path.write_bytes(whole + whole[:50])                     # another worker's torn record
    tracking = TrackingLog(str(path), log=EventLog(fmt="json", stream=LogCapture()))
    try:
        tracking.write(record(2))
        tracking.write(record(3))
    finally:
        tracking.close()
    assert path.read_bytes() == (whole + whole[:50] + b"\n" + encode_record(record(2))
                                 + encode_record(record(3)))
    assert [r["id"] for r in track_json(path)] == ["c.1", "c.2", "c.3"]


WRITER = textwrap.dedent("""
    import sys
    from gateway.observe.tracking_log import TrackingLog, TrackingRecord
    path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = TrackingLog(path)
    sys.stdin.read()                          # every writer starts at once
    for i in range(count):
        t.write(TrackingRecord(id=f"{name}.{i}", time="2026-11-24T10:00:00Z", listener="l",
                               client="c", helo="h" * (i * 37 % 700), mail_from="a@b.test",
                               recipients=["c@d.test"], size=i, client_tls=None,
                               upstream="u", upstream_tls=None, result="accepted",
                               reply="250 2.0.0 Ok"))
    t.close()
""")


def test_writers_in_several_processes_never_leave_a_blank_line(tmp_path):
    """Workers append to one file at once (SPEC §7: the next record starts on a new line,
    never an empty one): records of 100 to 800 bytes cross page boundaries while another
    process looks at the file's last byte."""
    path = tmp_path / "tracking.jsonl"
    count, names = 2000, [f"w{n}" for n in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(count)],
                              stdin=subprocess.PIPE, env=gateway_subprocess_env(),
                              cwd=NEUTRAL_CWD) for name in names]
    try:
        for proc in procs:
            proc.stdin.close()
        assert [proc.wait(timeout=120) for proc in procs] == [0] * len(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    blank = sum(1 for line in lines[:-1] if not line)
    assert blank == 0, f"{blank} blank lines among {len(lines) - 1}"
    ids = [json.loads(line)["id"] for line in lines[:-1]]
    assert sorted(ids) == sorted(f"{name}.{i}" for name in names for i in range(count))


def test_a_file_it_may_not_read_is_still_written(tmp_path, monkeypatch):
    path = tmp_path / "tracking.jsonl"
    path.write_bytes(b"torn")
    real_open = os.open

    def no_read(name, flags, *args):          # as for a write-only file (root reads anything)
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(name, flags, *args)
    monkeypatch.setattr(os, "open", no_read)
    tracking = TrackingLog(str(path))
    try:
        tracking.write(record(1))             # it cannot see the torn end: no newline added
    finally:
        tracking.close()
    assert path.read_bytes() == b"torn" + encode_record(record(1))


def test_reopen_follows_a_rotated_file(tmp_path):
    path = tmp_path / "tracking.jsonl"
    logs = LogCapture()
    tracking = TrackingLog(str(path), log=EventLog(fmt="json", stream=logs))
    try:
        tracking.write(record(1))
        path.rename(tmp_path / "tracking.jsonl.1")            # logrotate moves it away
        tracking.write(record(2))                             # still the old file
        assert tracking.reopen() is True
        tracking.write(record(3))
        os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-gone"))
        try:
            assert tracking.reopen() is False                 # the directory is gone
            tracking.write(record(4))                         # the old file stays in use
        finally:
            os.rename(tmp_path.with_name(tmp_path.name + "-gone"), tmp_path)
    finally:
        tracking.close()
    assert (tmp_path / "tracking.jsonl.1").read_bytes() == encode_record(record(1)) \
        + encode_record(record(2))
    assert path.read_bytes() == encode_record(record(3)) + encode_record(record(4))
    (event,) = logs.of("tracking_error")
    assert event["reason"].startswith("reopen: ") and event["path"] == str(path)


def test_without_a_log_the_error_is_a_logfmt_line_on_stderr():
    script = textwrap.dedent("""
        from gateway.observe.tracking_log import TrackingLog, TrackingRecord
        t = TrackingLog("/dev/full")
        t.write(TrackingRecord(id="x.1", time="2026-11-24T10:00:00Z", listener="l",
                               client="c", helo=None, mail_from="", recipients=[], size=0,
                               client_tls=None, upstream="u", upstream_tls=None,
                               result="rejected", reply="550 no"))
        print(t.errors)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert out.returncode == 0 and out.stdout == "1\n", out.stderr
    (line,) = out.stderr.splitlines()
    assert "level=error event=tracking_error path=/dev/full id=x.1" in line
    assert 'reason="No space left on device" written=0 bytes=' in line


def test_the_error_counter_is_exposed(tmp_path):
    script = textwrap.dedent("""
        import json
        from gateway.observe import metrics as M
        M.prepare_multiprocess_dir()
        from gateway.observe.logs import EventLog
        from gateway.observe.tracking_log import TrackingLog, TrackingRecord
        import io
        m = M.Metrics()
        t = TrackingLog("/dev/full", log=EventLog(stream=io.StringIO()), metrics=m)
        rec = TrackingRecord(id="x.1", time="2026-11-24T10:00:00Z", listener="l", client="c",
                             helo=None, mail_from="", recipients=[], size=0, client_tls=None,
                             upstream="u", upstream_tls=None, result="rejected", reply="550")
        t.write(rec)
        t.write(rec)
        body, _ = M.render()
        print(json.dumps([l for l in body.decode().splitlines()
                          if l.startswith("gateway_tracking_errors_total")]))
    """)
    # the metrics directory goes into tmp_path (TMPDIR), not the system's temp directory
    env = {**gateway_subprocess_env(), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=env, cwd=NEUTRAL_CWD)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["gateway_tracking_errors_total 2.0"]


async def test_mail_keeps_flowing_while_the_tracking_file_is_full(small_fs):
    path = small_fs / "tracking.jsonl"
    async with running_sink() as sink:
        config = parse_config(config_dict([listener_dict(upstream_port=sink.port)],
                                          tracking_log=str(path)))
        logs = LogCapture()
        log = EventLog(fmt="json", stream=logs)
        metrics = FakeMetrics()
        state = WorkerState(ConnectionCounts(1, 1))
        # as the worker builds it: the gateway's log and metrics
        state.tracking = TrackingLog(str(path), log=log, metrics=metrics)
        try:
            async with trio.open_nursery() as nursery:
                gw = await nursery.start(partial(serve, config, log, state=state))
                port = gw.addresses["smtp"][1]

                async def send(sender):
                    with trio.fail_after(30):
                        return await in_thread(lambda: smtp_send(port, mail_from=sender))
                assert (await send("first@client.test"))[0] == 250
                filler = fill(small_fs)
                for i in range(20):                      # enough to fill the last block
                    assert (await send(f"full{i}@client.test"))[0] == 250
                filler.unlink()
                for i in range(3):
                    assert (await send(f"after{i}@client.test"))[0] == 250
                nursery.cancel_scope.cancel()
        finally:
            state.tracking.close()
    errors = logs.of("tracking_error")
    assert errors and len(errors) == metrics.tracking_errors_total.value
    assert len(logs.of("message", result="accepted")) == 24
    senders = [r["mail_from"] for r in track_json(path)]
    assert senders[0] == "first@client.test"
    assert senders[-3:] == ["after0@client.test", "after1@client.test", "after2@client.test"]
    assert 24 - len(errors) <= len(senders) <= 24 - len(errors) + 1    # (torn before "\n")
    lines = path.read_bytes().split(b"\n")[:-1]
    assert sum(1 for line in lines if line.startswith(b"{") and line.endswith(b"}")) == \
        len(senders)


async def test_whole_lines_through_a_reopen_and_a_killed_worker(tmp_path):
    """A supervised gateway, two workers writing one tracking file: messages from several
    clients at once, logrotate's move and SIGUSR1 (every worker reopens), a worker
    SIGKILLed while sessions are under way and replaced: every line of both files is a
    JSON object (no blank line, no fragment), each record once (SPEC §7, §9)."""
    import signal
    import smtplib

    from harness import to_toml
    from peers import free_port
    from supervised import GatewayProcess

    path = tmp_path / "tracking.jsonl"
    port = free_port()
    outcomes: list = []

    def client(n: int, batch: str) -> None:
        for i in range(n):
            try:
                outcomes.append(smtp_send(port, mail_from=f"{batch}{i}@client.test",
                                          body=b"Subject: x\r\n\r\n" + b"y" * (97 * i)
                                          + b"\r\n")[0])
            except (smtplib.SMTPException, OSError) as exc:
                outcomes.append(type(exc).__name__)

    async def batch(name: str, clients: int = 4, each: int = 6) -> None:
        async with trio.open_nursery() as nursery:
            for c in range(clients):
                nursery.start_soon(in_thread, client, each, f"{name}{c}x")

    async with running_sink() as sink:
        listener = listener_dict("mx", upstream_port=sink.port)
        listener["bind"] = f"127.0.0.1:{port}"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict([listener], workers=2, shutdown_grace=5,
                                           tracking_log=str(path))))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(120):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                await batch("a")
                path.rename(tmp_path / "tracking.jsonl.1")           # logrotate
                gw.proc.send_signal(signal.SIGUSR1)
                await in_thread(lambda: gw.wait_for(r"event=tracking_reopened", count=2))
                victim = gw.worker_pids()[0]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(batch, "b")
                    await in_thread(lambda: gw.wait_for(r"event=message ", count=30))
                    os.kill(victim, signal.SIGKILL)
                await in_thread(lambda: gw.wait_for(r"event=worker_start", count=3))
                await in_thread(lambda: gw.wait_for(r"event=listening", count=3))
                await batch("c")
        finally:
            assert gw.stop() == 0
    assert outcomes.count(250) >= 48 and len(outcomes) == 72, outcomes
    ids = []
    for name in ("tracking.jsonl.1", "tracking.jsonl"):
        data = (tmp_path / name).read_bytes()
        assert data.endswith(b"\n"), name
        for line in data.split(b"\n")[:-1]:
            assert line, f"a blank line in {name}"
            record = json.loads(line)
            assert isinstance(record, dict) and record["result"], line
            ids.append(record["id"])
    assert len(ids) == len(set(ids)) >= outcomes.count(250)
    assert sum(1 for ln in gw.lines if " event=message " in ln) == len(ids)
