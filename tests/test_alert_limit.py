"""The alert e-mail limit shared by every worker and kept across reloads (SPEC §8, §13; issue
#21 item 14): state_dir/state.sqlite (gateway.serve.state), its atomic claim raced by processes, and
a supervised gateway with two workers and a reload delivering exactly one alert per domain and
reason per alert_interval to a sink upstream; state_dir errors name the key."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.serve.state import FILENAME, StateStore, prepare_state_dir
from harness import (NEUTRAL_CWD, config_dict, gateway_subprocess_env, in_thread,
                     listener_dict, running_sink, to_toml)
from peers import free_port
from supervised import GatewayProcess

T = 30
REFUSED = (451, b"4.7.5 TLS is required, but was not offered by host")


# --- the store --------------------------------------------------------------------------------

def test_a_claim_holds_for_the_interval_per_domain_and_reason(tmp_path):
    store = StateStore(str(tmp_path))
    try:
        assert store.claim_alerts(["a.test"], "tls_failed", 60, now=1000.0) == (["a.test"], {})
        assert store.claim_alerts(["a.test", "b.test"], "tls_failed", 60, now=1030.0) == \
            (["b.test"], {"a.test": 1000.0})
        assert store.claim_alerts(["a.test"], "not_trusted", 60, now=1030.0)[0] == ["a.test"]
        assert store.claim_alerts(["a.test"], "tls_failed", 60, now=1059.9)[0] == []
        assert store.claim_alerts(["a.test"], "tls_failed", 60, now=1060.0)[0] == ["a.test"]
        # the clock stepped back by more than an interval: due again, not held for ever
        assert store.claim_alerts(["a.test"], "tls_failed", 60, now=900.0)[0] == ["a.test"]
        # a successful claim forgets the pairs quiet for an interval
        store.claim_alerts(["c.test"], "tls_failed", 60, now=2000.0)
        conn = sqlite3.connect(store.path)
        rows = conn.execute("SELECT domain, reason FROM alerts").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.close()
    finally:
        store.close()
    assert rows == [("c.test", "tls_failed")]
    assert mode == "wal"


def _race(directory, barrier, results):
    store = StateStore(directory)
    barrier.wait(10)
    claimed, _ = store.claim_alerts(["example.test"], "tls_not_offered", 3600)
    results.put(len(claimed))
    store.close()


def test_of_processes_racing_for_one_alert_exactly_one_claims_it(tmp_path):
    """Eight processes claim the same alert at the same moment on a fresh database."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results))
             for _ in range(8)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=T) for _ in procs]
    finally:
        for p in procs:
            p.join(T)
    assert sorted(got) == [0] * 7 + [1]
    assert all(p.exitcode == 0 for p in procs)


def test_the_state_dir_is_made_0700_for_the_workers_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another user")
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    (path / FILENAME).write_bytes(b"")            # left by an earlier run as root
    prepare_state_dir(str(path), "nobody", None)
    st, db = path.stat(), (path / FILENAME).stat()
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert (db.st_uid, db.st_gid) == (nobody.pw_uid, nobody.pw_gid)


async def test_without_a_usable_store_each_worker_still_limits_its_alerts(tmp_path):
    """The database cannot be opened (its directory is a file): alerts go out under this
    process' own limit, and the failure is logged once."""
    from gateway.serve.alerts import AlertMailer

    class Log:
        events = []

        def event(self, name, **fields):
            self.events.append((name, fields))
    (tmp_path / "file").write_text("")
    mailer = AlertMailer(None, sender="gw@x.test", recipients=["ops@x.test"],
                         hostname="gw.x.test", listener="in", log=Log(), interval=3600,
                         store=StateStore(str(tmp_path / "file")))
    with trio.fail_after(T):
        first = await mailer.claim(["a.test", "b.test"], "tls_failed")
        again = await mailer.claim(["c.test"], "tls_failed")
    assert first == ["a.test", "b.test"] and again == ["c.test"]
    assert [name for name, _ in Log.events] == ["alert_state_error"]
    assert Log.events[0][1]["level"] == "warning"


# --- configuration ----------------------------------------------------------------------------

def _check(cfg, *, as_nobody: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gateway", "check", "-c", str(cfg)]
    if as_nobody:
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD,
                          capture_output=True, text=True, timeout=T)


def test_state_dir_errors_name_the_key(pubdir):
    """A relative path fails parsing; `gateway check` (as root, and as the unprivileged user
    a systemd unit may run as) names gateway.state_dir for a file, a path under a file, a
    directory it may not write and one it may not create; without alert e-mail the state
    directory is not used, so not checked."""
    with pytest.raises(ConfigError) as err:
        parse_config(config_dict([listener_dict(upstream_port=25)], state_dir="state"))
    assert str(err.value).startswith("gateway.state_dir: ")
    base = Path(tempfile.mkdtemp(dir=pubdir))          # readable by nobody, unlike tmp_path
    try:
        os.chmod(base, 0o755)
        afile = base / "afile"
        afile.write_text("")
        rootdir = base / "root-owned"
        rootdir.mkdir(mode=0o755)
        out = {}
        for name, state_dir, as_nobody in [
                ("file", afile, False), ("under-file", afile / "sub", False),
                ("unwritable", rootdir, True), ("uncreatable", rootdir / "sub", True),
                ("unused", afile, False)]:
            if as_nobody and os.geteuid() != 0:
                continue
            cfg = base / f"{name}.toml"
            extra = {} if name == "unused" else {"alert_recipients": ["ops@example.test"]}
            cfg.write_text(to_toml(config_dict([listener_dict(upstream_port=25)],
                                               state_dir=str(state_dir), **extra)))
            os.chmod(cfg, 0o644)
            proc = _check(cfg, as_nobody=as_nobody)
            out[name] = (proc.returncode, proc.stdout + proc.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert out["file"][0] == 2
    assert f"gateway.state_dir: {afile} is not a directory" in out["file"][1]
    assert out["under-file"][0] == 2
    assert f"gateway.state_dir: cannot create {afile / 'sub'}: {afile} is not a directory" \
        in out["under-file"][1]
    assert out["unused"][0] == 0, out["unused"][1]
    if os.geteuid() == 0:
        assert out["unwritable"][0] == 2
        assert f"gateway.state_dir: {rootdir} is not writable" in out["unwritable"][1]
        assert out["uncreatable"][0] == 2
        assert f"gateway.state_dir: cannot create {rootdir / 'sub'}: {rootdir} is not " \
               "writable" in out["uncreatable"][1]


# --- a supervised gateway: two workers and a reload -------------------------------------------

def _refused_once(port: int):
    with smtplib.SMTP("127.0.0.1", port, timeout=T) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        return s.rcpt("bob@example.test")


def _workers_alerting(gw: GatewayProcess) -> set[int]:
    return {int(m.group(1)) for ln in list(gw.lines)
            if "event=tls_alert" in ln and (m := re.search(r" worker=(\d+)", ln))}


def _ts(line: str) -> float:
    stamp = re.search(r"ts=(\S+)", line).group(1).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


async def test_one_alert_per_domain_and_reason_across_workers_and_a_reload(tmp_path):
    """Required TLS to a sink without STARTTLS fails on both workers of two generations
    (a reload between them) within alert_interval: exactly one alert e-mail reaches the sink.
    Once the interval has passed, the next failure sends the second one."""
    interval = 6.0
    port = free_port()
    async with running_sink(offer_starttls=False) as sink:
        cfg = tmp_path / "gw.toml"
        state = tmp_path / "state"
        data = config_dict([listener_dict("mx", upstream_port=sink.port,
                                          upstream_tls="required")],
                           workers=2, alert_recipients=["ops@example.test"],
                           alert_interval=interval, state_dir=str(state))
        data["listeners"][0]["bind"] = f"127.0.0.1:{port}"
        cfg.write_text(to_toml(data))
        gw = GatewayProcess(cfg)
        replies = []
        try:
            with trio.fail_after(90):
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                first = set(gw.worker_pids())
                start = time.monotonic()
                # until both workers of the first generation have refused (and alerted)
                while not first <= _workers_alerting(gw) and len(replies) < 60:
                    replies.append(await in_thread(_refused_once, port))
                gw.proc.send_signal(signal.SIGHUP)
                await in_thread(lambda: gw.wait_for(r"event=reloaded"))
                await in_thread(lambda: gw.wait_for(r"event=listening", count=4))
                second = set(gw.worker_pids()) - first
                while not second <= _workers_alerting(gw) and len(replies) < 120:
                    replies.append(await in_thread(_refused_once, port))
                within = time.monotonic() - start
                await in_thread(lambda: gw.wait_for(r"event=alert_mail "))
                # held back until the interval has passed since the first: keep failing
                # until the second one goes out
                sent = []
                while not sent and len(replies) < 400:
                    replies.append(await in_thread(_refused_once, port))
                    try:
                        sent = await in_thread(
                            lambda: gw.wait_for(r"event=alert_mail ", count=2, timeout=0.5))
                    except AssertionError:
                        pass
                await sink.wait_for_messages(2)
                alerted = _workers_alerting(gw)
        finally:
            assert gw.stop() == 0
    mails = [ln for ln in gw.lines if "event=alert_mail " in ln]
    alerts = [m for m in sink.messages if b"Subject: TLS alert: " in m.data]
    assert set(replies) == {REFUSED}
    assert first <= alerted and second <= alerted and len(first | second) == 4
    assert within < interval, "the failures of both generations took longer than the interval"
    assert len(mails) == 2, mails
    assert len(alerts) == 2
    assert b"tls_not_offered for example.test" in alerts[0].data
    assert _ts(mails[1]) - _ts(mails[0]) >= interval - 0.01
    assert os.path.exists(state / FILENAME)
