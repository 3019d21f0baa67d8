"""The benchmark suite of issue #6: the gateway against nginx's mail proxy, Postfix as a relay
and a direct-to-sink baseline, side by side in one run (not a test).

    .venv/bin/python benchmarks/run.py [--quick] [--cores N] [--scenarios 1,2,3,4,5,6,7,micro]
        [--duration S] [--concurrency C] [--output FILE] [--profile]

Scenarios (each row: sessions/s, p50/p99 session latency, server CPU time per session = the
utime+stime of the server's whole process tree from /proc, after minus before, over the
sessions; for Postfix "after" is taken once its queue is empty, i.e. every message relayed):
  1  SMTP, client STARTTLS (TLS 1.3, ECDSA P-256), plaintext upstream, 10 KB, 1 worker
  2  the same without TLS
  3  TLS on both legs
  4  one 25 MB message over STARTTLS: MB/s and CPU per MB
  5  idle IMAP TLS sessions (STARTTLS, LOGIN, IDLE): gateway memory per session (RSS/PSS)
  6  gateway sessions/s and CPU per session against worker count 1..cores
  7  submission with AUTH: STARTTLS, AUTH PLAIN, 10 KB, QUIT; the gateway relaying AUTH, nginx
     (smtp_auth plain + proxy_smtp_auth) and Postfix submission itself, all three in front of
     the same Postfix + Dovecot SASL
  8  milters (SPEC 4.7), scenario 1's sessions: the gateway without a milter and with an
     accept-all milter (benchmarks/milter_stub.py: the gateway's own cost of the protocol),
     and the gateway + rspamd against Postfix (smtpd_milters) + the same rspamd
  micro  the native scanner micro-benchmarks (benchmarks/bench_scanner.py)

The results table (markdown) is printed and written to --output (default
benchmarks/results.md). Needs root (private Postfix and Dovecot instances), nginx with its
mail module and Postfix's smtp-sink (.ci/install-peers.sh installs them). Only 127.0.0.1 is used.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imap_idle  # noqa: E402
import loadgen  # noqa: E402
import servers as S  # noqa: E402

MB = 1_000_000


# ------------------------------------------------------------------------------- measuring


def measure(server, port: int, *, starttls: bool, size: int, concurrency: int,
            duration: float, processes: int, sessions: int | None = None, drain=None,
            warmup: int = 4, resume: bool = False, auth: tuple[str, str] | None = None,
            also: dict | None = None) -> dict:
    """Warm up, then run the closed loop against `port`; CPU of `server`'s process tree
    before/after (after `drain()` when given: Postfix relays after it answered). `auth`:
    AUTH PLAIN (user, password) in every session. `also`: {key: servers} whose CPU is
    measured over the same span, as res[key + "_cpu_ms"] per session."""
    if warmup:
        loadgen.run_load(port, starttls=starttls, size=min(size, 10240), concurrency=2,
                         processes=1, duration=30, sessions=warmup, auth=auth)
        if drain is not None:
            drain()
    also = also or {}
    a0 = {k: sum(s.cpu() for s in v) for k, v in also.items()}
    c0, m0 = server.cpu(), machine_cpu()
    res = loadgen.run_load(port, starttls=starttls, size=size, concurrency=concurrency,
                           processes=processes, duration=duration, sessions=sessions,
                           resume=resume, auth=auth)
    drained = drain() if drain is not None else True
    res["cpu_s"] = server.cpu() - c0
    for k, v in also.items():
        d = sum(s.cpu() for s in v) - a0[k]
        res[k + "_cpu_ms"] = d / res["sessions"] * 1000 if res["sessions"] else None
    m1 = machine_cpu()
    res["machine_busy"] = 1 - (m1[1] - m0[1]) / max(1e-9, m1[0] - m0[0])
    res["server_cores"] = res["cpu_s"] / res["wall"]
    res["drained"] = drained
    n = res["sessions"]
    res["cpu_ms"] = res["cpu_s"] / n * 1000 if n else None
    return res


def machine_cpu() -> tuple[float, float]:
    """(total, idle+iowait) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return float(sum(v[:8])), float(v[3] + v[4])


def postfix_drain(pf):
    return lambda: pf.wait_drained(120)


# ------------------------------------------------------------------------------- formatting


def fmt(v, nd=1, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.{nd}f}{unit}"


def ratio(a, b):
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}"


def session_table(rows: list[dict]) -> list[str]:
    """rows: {name, res} with the gateway first; ratios are gateway / this row."""
    out = ["| server | sessions | sessions/s | p50 ms | p99 ms | CPU ms/session | "
           "gw/peer sessions/s | gw/peer CPU/session | errors |",
           "|---|---|---|---|---|---|---|---|---|"]
    gw = next((r["res"] for r in rows if r["name"].startswith("gateway") and r.get("res")),
              None)
    for r in rows:
        res = r.get("res")
        if res is None:
            out.append(f"| {r['name']} | — | not available: {r.get('why', '?')} | | | | | | |")
            continue
        is_gw = res is gw
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], res["sessions"], fmt(res["rate"]),
            fmt(res["p50"] and res["p50"] * 1000, 2), fmt(res["p99"] and res["p99"] * 1000, 2),
            fmt(res["cpu_ms"], 2), "—" if is_gw else ratio(gw and gw["rate"], res["rate"]),
            "—" if is_gw else ratio(gw and gw["cpu_ms"], res["cpu_ms"]),
            res["errors"] if res["drained"] else f"{res['errors']} (queue not drained)"))
    return out


# ------------------------------------------------------------------------------- scenarios


class Suite:
    def __init__(self, args):
        self.a = args
        self.work = Path(tempfile.mkdtemp(prefix="gwbench-", dir="/tmp"))
        os.chmod(self.work, 0o755)
        self.cert, self.key = S.write_ecdsa_cert(self.work)
        self.md: list[str] = []
        self.summary: dict = {}
        self.started: list = []
        self.notes: list[str] = []

    def keep(self, srv):
        self.started.append(srv)
        return srv

    def stop_all(self):
        for srv in reversed(self.started):
            try:
                srv.stop()
            except Exception:       # noqa: BLE001 - best effort cleanup
                pass
        self.started.clear()

    # -- servers ---------------------------------------------------------------------------

    def sinks(self):
        if not hasattr(self, "plain_sink"):
            self.plain_sink = self.keep(S.SmtpSink().start(self.work))
            self.tls_sink = self.keep(S.TlsSink().start(self.work, self.cert, self.key))
        return self.plain_sink, self.tls_sink

    def gateway(self, workers: int, tag: str = "gateway"):
        plain, tls = self.sinks()
        ports = [S.free_port() for _ in range(3)]
        common = {"protocol": "smtp", "type": "public", "certificate": "bench",
                  "max_connections": 10000, "max_connections_per_ip": 0, "backlog": 1024}
        listeners = [
            dict(name="starttls", bind=f"127.0.0.1:{ports[0]}", tls="starttls",
                 client_tls="optional", **common,
                 upstream={"address": f"127.0.0.1:{plain.port}", "tls": "none"}),
            dict(name="plain", bind=f"127.0.0.1:{ports[1]}", tls="off", client_tls="none",
                 **common, upstream={"address": f"127.0.0.1:{plain.port}", "tls": "none"}),
            dict(name="tlsboth", bind=f"127.0.0.1:{ports[2]}", tls="starttls",
                 client_tls="optional", **common,
                 upstream={"address": f"127.0.0.1:{tls.port}", "tls": "required",
                           "mode": "starttls"}),
        ]
        toml = S.gateway_toml(workers=workers, cert=self.cert, key=self.key,
                              listeners=listeners, metrics_port=S.free_port())
        gw = self.keep(S.Gateway().start(self.work, toml, ports, tag=tag))
        gw.p_tls, gw.p_plain, gw.p_both = ports
        return gw

    def try_start(self, name, fn):
        try:
            return fn()
        except Exception as exc:        # noqa: BLE001 - reported as "not available"
            self.notes.append(f"{name}: {exc}")
            return None

    def load(self, srv, port, starttls, **kw):
        a = self.a
        kw.setdefault("size", 10240)
        return measure(srv, port, starttls=starttls, concurrency=a.concurrency,
                       duration=a.duration, processes=a.processes, **kw)

    # -- 1-3 -------------------------------------------------------------------------------

    def smtp_scenarios(self, which: set[str]):
        plain, tls = self.sinks()
        gw = self.gateway(1)
        ng = self.try_start("nginx", lambda: self.keep(
            S.Nginx().start(self.work, self.cert, self.key, plain.port)))
        pf = self.try_start("postfix", lambda: self.keep(
            S.Postfix().start(self.work, self.cert, self.key, plain.port, "none")))
        pf_tls = None
        if "3" in which:
            pf_tls = self.try_start("postfix (TLS relay)", lambda: self.keep(S.Postfix().start(
                self.work, self.cert, self.key, tls.port, "encrypt", tag="postfix-tls")))
        na = lambda why: {"res": None, "why": why}           # noqa: E731
        if "1" in which:
            rows = [{"name": "gateway (1 worker)", "res": self.load(gw, gw.p_tls, True)}]
            rows.append({"name": "nginx mail proxy (1 worker)",
                         "res": self.load(ng, ng.port_tls, True)} if ng else
                        {"name": "nginx mail proxy", **na("nginx did not start")})
            rows.append({"name": "postfix relay (queue, then smtp)",
                         "res": self.load(pf, pf.port_tls, True, drain=postfix_drain(pf))}
                        if pf else {"name": "postfix relay", **na("postfix did not start")})
            rows.append({"name": "direct to sink (gateway sink, STARTTLS)",
                         "res": self.load(tls, tls.port, True)})
            # as MTAs do (Postfix's TLS session cache): each client offers its last session
            for name, srv, port, drain in (
                    ("gateway (1 worker), clients resume TLS sessions", gw, gw.p_tls, None),
                    ("postfix relay, clients resume TLS sessions", pf,
                     pf.port_tls if pf else None, postfix_drain(pf) if pf else None)):
                if srv is None:
                    continue
                res = self.load(srv, port, True, resume=True, drain=drain)
                rows.append({"name": f"{name} ({res['resumed']} of {res['sessions']} "
                                     "resumed)", "res": res})
            self.section("1. SMTP STARTTLS client leg, plaintext upstream, 10 KB, 1 worker "
                         "(nginx is configured without session cache and tickets, so it "
                         "never resumes)", session_table(rows))
            self.summary["s1"] = rows
            if self.a.profile:          # an extra run, so the figures above are unprofiled
                self.profile(gw)
        if "2" in which:
            rows = [{"name": "gateway (1 worker)", "res": self.load(gw, gw.p_plain, False)}]
            rows.append({"name": "nginx mail proxy (1 worker)",
                         "res": self.load(ng, ng.port_plain, False)} if ng else
                        {"name": "nginx mail proxy", **na("nginx did not start")})
            rows.append({"name": "postfix relay (queue, then smtp)",
                         "res": self.load(pf, pf.port_plain, False, drain=postfix_drain(pf))}
                        if pf else {"name": "postfix relay", **na("postfix did not start")})
            rows.append({"name": "direct to sink (smtp-sink)",
                         "res": self.load(plain, plain.port, False)})
            self.section("2. SMTP without TLS, 10 KB, 1 worker", session_table(rows))
            self.summary["s2"] = rows
        if "3" in which:
            rows = [{"name": "gateway (1 worker)", "res": self.load(gw, gw.p_both, True)}]
            rows.append({"name": "postfix relay (queue, then smtp, TLS encrypt)",
                         "res": self.load(pf_tls, pf_tls.port_tls, True,
                                          drain=postfix_drain(pf_tls))}
                        if pf_tls else {"name": "postfix relay", **na("postfix did not start")})
            rows.append({"name": "direct to sink (gateway sink, STARTTLS)",
                         "res": self.load(tls, tls.port, True)})
            rows.append({"name": "nginx mail proxy", **na("nginx has no TLS to the upstream "
                                                          "in its mail module")})
            self.section("3. TLS on both legs (STARTTLS in, STARTTLS to the sink), 10 KB, "
                         "1 worker", session_table(rows))
            self.summary["s3"] = rows
        if "4" in which:
            self.big_message(gw, ng, pf, tls)
        for srv in (ng, pf, pf_tls, gw):
            if srv is not None:
                srv.stop()

    # -- 7 ---------------------------------------------------------------------------------

    AUTH_USER, AUTH_PASSWORD = "alice", "s3cret pass+/="

    def auth_submission(self):
        """Scenario 7: mail clients submitting with AUTH PLAIN after STARTTLS, 10 KB each.
        Every front (gateway, nginx) relays to the same Postfix submission server with Dovecot
        SASL, which checks the password and relays the message to smtp-sink; the Postfix row
        is that server talked to directly. Columns: the front's CPU per session (for Postfix:
        Postfix + Dovecot) and the backend's (Postfix + Dovecot) beside it."""
        plain, _ = self.sinks()
        title = ("7. Submission with AUTH: STARTTLS, AUTH PLAIN, 10 KB, QUIT (1 worker; "
                 "backend Postfix + Dovecot SASL)")
        dc = self.try_start("dovecot auth", lambda: self.keep(S.DovecotAuth().start(
            self.work, {self.AUTH_USER: self.AUTH_PASSWORD})))
        pf = dc and self.try_start("postfix submission", lambda: self.keep(S.Postfix().start(
            self.work, self.cert, self.key, plain.port, "none", tag="postfix-submission",
            extra=S.submission_settings(dc.sasl_path), plain_opts=S.SUBMISSION_PLAIN_OPTS)))
        if pf is None:
            self.section(title, ["not available: " + (self.notes[-1] if self.notes else "?")])
            return
        backend = {"backend": [pf, dc]}
        auth = (self.AUTH_USER, self.AUTH_PASSWORD)
        drain = postfix_drain(pf)
        rows: list[dict] = []
        # The gateway's rows: AUTH relayed to Postfix over STARTTLS (the SPEC's default
        # demand on an auth listener), and over a plaintext leg as nginx does
        # (plaintext_auth = true). Until `gateway check` accepts the AUTH keys (issue #15)
        # they say "not available" with check's message and the run goes on.
        gw, why = self.auth_gateway(pf)
        for name, attr in (("gateway (1 worker), AUTH relayed, upstream STARTTLS", "p_auth_tls"),
                           ("gateway (1 worker), AUTH relayed, plaintext upstream "
                            "(plaintext_auth, as nginx)", "p_auth_plain")):
            rows.append({"name": name, "res": self.load(gw, getattr(gw, attr), True,
                                                        auth=auth, drain=drain, also=backend)}
                        if gw else {"name": name, "res": None, "why": why})
        ng = self.try_start("nginx submission", lambda: self.keep(S.NginxSubmission().start(
            self.work, self.cert, self.key, pf.port_plain)))
        name = "nginx mail proxy (1 worker), smtp_auth plain, proxy_smtp_auth on"
        rows.append({"name": name, "res": self.load(ng, ng.port, True, auth=auth, drain=drain,
                                                    also=backend)}
                    if ng else {"name": name, "res": None, "why": "nginx did not start"})
        both = _Group(pf, dc)
        rows.append({"name": "postfix submission + dovecot, direct (queue, then smtp)",
                     "res": self.load(both, pf.port_tls, True, auth=auth, drain=drain,
                                      also=backend)})
        out = session_table(rows)
        out += ["", "| server | front CPU ms/session | backend (Postfix + Dovecot) CPU "
                "ms/session | front + backend |", "|---|---|---|---|"]
        for r in rows:
            res = r["res"]
            if res is None:
                continue
            direct = r["name"].startswith("postfix")
            front = None if direct else res["cpu_ms"]
            back = res.get("backend_cpu_ms")
            out.append(f"| {r['name']} | {fmt(front, 2) if front is not None else '—'} | "
                       f"{fmt(back, 2)} | "
                       f"{fmt(back if direct else (front or 0) + (back or 0), 2)} |")
        self.section(title, out)
        self.summary["s7"] = rows
        for srv in (gw, ng, pf, dc):
            if srv is not None:
                srv.stop()

    def auth_gateway(self, pf):
        """(gateway, None), or (None, why) while the gateway does not take these keys."""
        ports = [S.free_port() for _ in range(2)]
        common = {"protocol": "smtp", "type": "public", "certificate": "bench",
                  "max_connections": 10000, "backlog": 1024, "tls": "starttls",
                  "client_tls": "required", "auth": "required",
                  "auth_mechanisms": ["PLAIN", "LOGIN"]}
        listeners = [
            dict(name="submission", bind=f"127.0.0.1:{ports[0]}", **common,
                 upstream={"address": f"127.0.0.1:{pf.port_tls}", "tls": "required",
                           "mode": "starttls"}),
            dict(name="submission-plain-up", bind=f"127.0.0.1:{ports[1]}", **common,
                 upstream={"address": f"127.0.0.1:{pf.port_plain}", "tls": "none",
                           "plaintext_auth": True}),
        ]
        toml = S.gateway_toml(workers=1, cert=self.cert, key=self.key, listeners=listeners,
                              metrics_port=S.free_port())
        try:
            gw = self.keep(S.Gateway().start(self.work, toml, ports, tag="gateway-auth"))
        except Exception as exc:        # noqa: BLE001 - reported as "not available"
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return None, f"the gateway does not relay AUTH yet ({why})"
        gw.p_auth_tls, gw.p_auth_plain = ports
        return gw, None

    # -- 8 ---------------------------------------------------------------------------------

    def milters(self):
        """Scenario 8: scenario 1's sessions (STARTTLS, 10 KB) through milters. The gateway
        (1 worker) without a milter, with the accept-all stub (every stage answered: the
        protocol's whole cost) and with rspamd; Postfix with the same rspamd in
        smtpd_milters. CPU per session of the front and of the milter process side by side."""
        plain, _ = self.sinks()
        title = ("8. Milters: STARTTLS, 10 KB, 1 worker; the milter's own CPU beside the "
                 "front's")
        stub = self.try_start("milter stub", lambda: self.keep(S.MilterStub().start(self.work)))
        rs = self.try_start("rspamd", lambda: self.keep(S.Rspamd().start(self.work)))
        ports = {"nomilter": S.free_port()}
        common = {"protocol": "smtp", "type": "public", "certificate": "bench",
                  "max_connections": 10000, "backlog": 1024, "tls": "starttls",
                  "client_tls": "optional",
                  "upstream": {"address": f"127.0.0.1:{plain.port}", "tls": "none"}}
        listeners = [dict(name="nomilter", bind=f"127.0.0.1:{ports['nomilter']}", **common)]
        for name, milter in (("stub", stub), ("rspamd", rs)):
            if milter is not None:
                ports[name] = S.free_port()
                listeners.append(dict(name=name, bind=f"127.0.0.1:{ports[name]}", **common,
                                      milters=[{"name": name, "address": milter.address}]))
        spool = self.work / "gateway-spool"
        toml = S.gateway_toml(workers=1, cert=self.cert, key=self.key, listeners=listeners,
                              metrics_port=S.free_port(), gateway={"spool_dir": str(spool)})
        gw = self.try_start("gateway with milters", lambda: self.keep(S.Gateway().start(
            self.work, toml, list(ports.values()), tag="gateway-milters")))
        pf = rs and self.try_start("postfix with rspamd", lambda: self.keep(S.Postfix().start(
            self.work, self.cert, self.key, plain.port, "none", tag="postfix-milter",
            extra={"smtpd_milters": rs.address, "milter_default_action": "tempfail",
                   "milter_protocol": "6"})))
        if gw is None:
            self.section(title, ["not available: " + (self.notes[-1] if self.notes else "?")])
            return
        na = lambda name, why: {"name": name, "res": None, "why": why}     # noqa: E731
        rows = [{"name": "gateway (1 worker), no milter",
                 "res": self.load(gw, ports["nomilter"], True)}]
        rows.append({"name": "gateway (1 worker), accept-all milter",
                     "res": self.load(gw, ports["stub"], True, also={"milter": [stub]})}
                    if stub else na("gateway, accept-all milter", "the stub did not start"))
        rows.append({"name": "gateway (1 worker) + rspamd",
                     "res": self.load(gw, ports["rspamd"], True, also={"milter": [rs]})}
                    if rs else na("gateway + rspamd", "rspamd did not start"))
        rows.append({"name": "postfix relay + rspamd (smtpd_milters; queue, then smtp)",
                     "res": self.load(pf, pf.port_tls, True, drain=postfix_drain(pf),
                                      also={"milter": [rs]})}
                    if pf else na("postfix + rspamd", "postfix or rspamd did not start"))
        out = session_table(rows)
        out += ["", "| front | front CPU ms/session | milter CPU ms/session | front + milter | "
                "front's cost over no milter |", "|---|---|---|---|---|"]
        base = rows[0]["res"]["cpu_ms"]
        for r in rows:
            res = r["res"]
            if res is None or not res["cpu_ms"]:
                continue
            front, mil = res["cpu_ms"], res.get("milter_cpu_ms")
            own = f"+{front - base:.2f} ms ({front / base:.2f}x)" \
                if r["name"].startswith("gateway") and base else "—"
            out.append(f"| {r['name']} | {fmt(front, 2)} | "
                       f"{fmt(mil, 2) if mil is not None else '—'} | "
                       f"{fmt(front + (mil or 0), 2)} | {own} |")
        left = sorted(os.listdir(spool)) if spool.exists() else []
        out += ["", f"Spool directory after the run: {len(left)} entries."]
        self.section(title, out)
        self.summary["s8"] = rows
        for srv in (gw, pf, rs, stub):
            if srv is not None:
                srv.stop()

    # -- 4 ---------------------------------------------------------------------------------

    def big_message(self, gw, ng, pf, tls):
        size = 25 * MB
        runs = self.a.big_runs
        targets = [("gateway (1 worker)", gw, gw.p_tls, None)]
        if ng:
            targets.append(("nginx mail proxy (1 worker)", ng, ng.port_tls, None))
        if pf:
            targets.append(("postfix relay (queue, then smtp)", pf, pf.port_tls,
                            postfix_drain(pf)))
        targets.append(("direct to sink (gateway sink, STARTTLS)", tls, tls.port, None))
        out = ["| server | runs | MB/s (wall, median) | CPU s/MB (all runs) | MB per CPU-second | "
               "gw/peer MB/s | gw/peer CPU/MB |", "|---|---|---|---|---|---|---|"]
        results = []
        for name, srv, port, drain in targets:
            walls, cpus = [], []
            for i in range(runs):
                r = measure(srv, port, starttls=True, size=size, concurrency=1,
                            duration=120, processes=1, sessions=1, drain=drain,
                            warmup=2 if i == 0 else 0)
                if r["sessions"] != 1:
                    walls = None
                    why = r["error_samples"]
                    break
                walls.append(r["p50"])
                cpus.append(r["cpu_s"])
            if not walls:
                results.append((name, None, None))
                out.append(f"| {name} | — | failed: {why} | | | | |")
                continue
            wall = sorted(walls)[len(walls) // 2]
            # CPU over all runs: /proc counts in 10 ms steps, ~10 % of one gateway run
            cpu = sum(cpus) / len(cpus)
            results.append((name, size / MB / wall, cpu / (size / MB)))
        gw_r = results[0]
        for name, mbps, cpu_per_mb in results:
            if mbps is None:
                continue
            is_gw = name == gw_r[0]
            out.append("| {} | {} | {} | {} | {} | {} | {} |".format(
                name, runs, fmt(mbps), f"{cpu_per_mb:.4f}",
                fmt(1 / cpu_per_mb if cpu_per_mb else None),
                "—" if is_gw else ratio(gw_r[1], mbps),
                "—" if is_gw else ratio(gw_r[2], cpu_per_mb)))
        self.section("4. One 25 MB message over STARTTLS (plaintext upstream)", out)
        self.summary["s4"] = results

    # -- 5 ---------------------------------------------------------------------------------

    def imap(self):
        n = self.a.imap_sessions
        have = S.raise_nofile(4 * n + 4096)
        up = S.Proc()
        up.port = S.free_port()
        up.popen([sys.executable, str(HERE / "imap_idle.py"), "upstream", "--port",
                  str(up.port), "--cert", str(self.cert), "--key", str(self.key)],
                 self.work / "imap-upstream.log", nofile=4 * n + 4096)
        self.keep(up)
        up.ready(lambda: S.wait_smtp(up.port, alive=up.alive, banner=b"* OK"))
        gw_port = S.free_port()
        listeners = [dict(name="imap", protocol="imap", type="private",
                          bind=f"127.0.0.1:{gw_port}", tls="starttls", client_tls="required",
                          certificate="bench", max_connections=n + 1000, backlog=4096,
                          max_connections_per_ip=0,
                          upstream={"address": f"127.0.0.1:{up.port}", "mode": "starttls",
                                    "tls": "none"})]
        toml = S.gateway_toml(workers=1, cert=self.cert, key=self.key, listeners=listeners,
                              metrics_port=None)
        out = ["| server | idle sessions | setup s | RSS before MiB | RSS after MiB | "
               "RSS KiB/session | PSS KiB/session | errors |",
               "|---|---|---|---|---|---|---|---|"]
        rows = []
        gw = None
        try:
            gw = self.keep(S.Gateway().start(self.work, toml, [gw_port], tag="gateway-imap",
                                             banner=b"* OK", timeout=10))
        except Exception as exc:       # noqa: BLE001
            why = str(exc).splitlines()[0][:160]
            out.append(f"| gateway | not available: the gateway does not serve IMAP yet "
                       f"({why}) | | | | | | |")
            rows.append(("gateway", None))
        targets = ([("gateway (1 worker)", gw, gw_port)] if gw else []) + \
            [("suite's IMAP upstream, direct over TLS (Python asyncio: its SSL transport "
              "keeps large per-connection buffers; a reference only)", up, up.port)]
        for name, srv, port in targets:
            time.sleep(0.5)
            m0 = srv.mem()
            ic = imap_idle.IdleClients(port, n, processes=self.a.processes)
            try:
                r = ic.open(timeout=max(60, n / 20))
                time.sleep(1.0)
                m1 = srv.mem()
            finally:
                ic.close()
            k = max(1, r["open"])
            rss = (m1["rss_kib"] - m0["rss_kib"]) / k
            pss = (m1["pss_kib"] - m0["pss_kib"]) / k
            rows.append((name, {"open": r["open"], "rss": rss, "pss": pss}))
            out.append("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {} |".format(
                name, r["open"], r["setup_s"], m0["rss_kib"] / 1024, m1["rss_kib"] / 1024,
                rss, pss, f"{r['errors']} {r['samples'][:1]}" if r["errors"] else 0))
        if have < 2 * n + 100:
            self.notes.append(f"RLIMIT_NOFILE {have} may be too low for {n} sessions")
        self.section(f"5. {n} idle IMAP sessions (STARTTLS, LOGIN, IDLE): memory per session",
                     out)
        self.summary["s5"] = rows
        if gw:
            gw.stop()
        up.stop()

    # -- 6 ---------------------------------------------------------------------------------

    def scaling(self):
        rows = []
        for w in range(1, self.a.cores + 1):
            gw = self.gateway(w, tag=f"gateway-w{w}")
            res = measure(gw, gw.p_tls, starttls=True, size=10240,
                          concurrency=max(self.a.concurrency, 8 * w), duration=self.a.duration,
                          processes=max(self.a.processes, min(w, 4)))
            gw.stop()
            rows.append((w, res))
        base = rows[0][1]["rate"] or None
        out = ["| workers | sessions/s | speedup | efficiency | CPU ms/session | p50 ms | "
               "p99 ms | gateway CPU cores used | machine CPU busy | errors |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for w, res in rows:
            sp = res["rate"] / base if base else None
            out.append("| {} | {} | {} | {} | {} | {} | {} | {:.2f} | {:.0f} % | {} |".format(
                w, fmt(res["rate"]), fmt(sp, 2, "x"), fmt(sp and sp / w * 100, 0, " %"),
                fmt(res["cpu_ms"], 2), fmt(res["p50"] and res["p50"] * 1000, 2),
                fmt(res["p99"] and res["p99"] * 1000, 2), res["server_cores"],
                res["machine_busy"] * 100, res["errors"]))
        if rows and (max(r["machine_busy"] for _, r in rows) > 0.85
                     or self.a.cores >= (os.cpu_count() or 1)):
            out += ["", "The load generator, the sink and any other processes share these "
                    "CPUs with the workers, so sessions/s cannot scale with the worker count "
                    "here; compare the CPU time per session (flat = no per-worker overhead) "
                    "and the cores the gateway got. On a larger machine run `--cores N` with "
                    "N well below the CPU count."]
        self.section(f"6. Gateway worker scaling (scenario 1 load, 1..{self.a.cores} workers)",
                     out)
        self.summary["s6"] = rows

    # -- micro -----------------------------------------------------------------------------

    def micro(self):
        cmd = [sys.executable, str(HERE / "bench_scanner.py")]
        if self.a.quick:
            cmd += ["--mb", "1", "--calls", "20000"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = p.stdout.strip().splitlines()
        out = ["| benchmark | unit | native | python | speedup |", "|---|---|---|---|---|"]
        for line in lines[1:]:
            m = re.match(r"(.+?)\s{2,}(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+x)$", line)
            if m:
                out.append("| " + " | ".join(m.groups()) + " |")
        if p.returncode != 0:
            out.append(f"| bench_scanner.py failed: {p.stderr.strip()[-200:]} | | | | |")
        self.section("Micro: native scanner vs its Python twin (bench_scanner.py)", out)

    # -- profile ---------------------------------------------------------------------------

    def profile(self, gw):
        pyspy = shutil.which("py-spy", path=str(S.VENV_BIN) + os.pathsep + os.environ["PATH"])
        if pyspy is None:
            self.notes.append("profile: py-spy not installed (.venv/bin/pip install py-spy)")
            return
        workers = [p for p in gw.workers() if _is_python(p)]
        if not workers:
            self.notes.append("profile: no gateway worker found")
            return
        pid = max(workers)
        raw = self.work / "profile.txt"
        dur = max(3, int(self.a.duration))
        cmd = [pyspy, "record", "-p", str(pid), "-d", str(dur), "-r", "200", "-f", "raw",
               "-o", str(raw)] + (["--native"] if self.a.profile_native else [])
        spy = subprocess.Popen(cmd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        loadgen.run_load(gw.p_tls, starttls=True, size=10240, concurrency=self.a.concurrency,
                         processes=self.a.processes, duration=dur)
        try:
            spy.wait(dur + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
        if not raw.exists():
            self.notes.append(f"profile: py-spy failed: {spy.stderr.read().decode()[-300:]}")
            return
        dest = Path(self.a.profile_out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, dest)
        self.section("Profile: gateway worker during an extra scenario 1 run (py-spy "
                     f"{'--native ' if self.a.profile_native else ''}record, 200 Hz; "
                     f"collapsed stacks in {_rel(dest)})", summarise_profile(raw))

    # -- output ----------------------------------------------------------------------------

    def section(self, title, lines):
        block = [f"### {title}", ""] + lines + [""]
        print("\n".join(block), flush=True)
        self.md.extend(block)


class _Group:
    """Several servers measured as one (their process trees' CPU summed)."""

    def __init__(self, *servers):
        self.servers = servers

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.servers)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(S.ROOT))
    except ValueError:
        return str(p)


def _is_python(pid: int) -> bool:
    try:
        return "python" in os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False


def summarise_profile(raw: Path, top: int = 15) -> list[str]:
    """Self and inclusive shares per function, from py-spy's collapsed (raw) output."""
    selfc: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return ["(no samples)"]
    cats: collections.Counter = collections.Counter()
    for fn, n in selfc.items():
        cats[_category(fn)] += n
    out = [f"{total} samples (on-CPU only). Where the worker's time goes, by the code its "
           "leaf frame is in:", "", "| share | category |", "|---|---|"]
    out += [f"| {n / total * 100:.1f} % | {c} |" for c, n in cats.most_common()]
    out += ["", "Top functions:", "", "| self % | function | | inclusive % | gateway function |",
           "|---|---|---|---|---|"]
    s = selfc.most_common(top)
    i = [x for x in incl.most_common() if "gateway/" in x[0] and x[1] < 0.9 * total][:top]
    for k in range(max(len(s), len(i))):
        a = s[k] if k < len(s) else ("", 0)
        b = i[k] if k < len(i) else ("", 0)
        out.append(f"| {a[1] / total * 100:.1f} | `{a[0]}` | | "
                   f"{b[1] / total * 100:.1f} | `{b[0]}` |")
    return out


CATEGORIES = [
    ("socket syscalls (send/recv/connect/accept in trio's socket layer)",
     ("_nonblocking_helper", "sock_method_wrapper", "_SocketType.connect",
      "_SocketType.accept", "socket.py")),
    ("TLS: pyOpenSSL wrappers + OpenSSL", ("SSL.py", "OpenSSL", "libssl", "libcrypto", "ssl_",
                                          "tls13", "EVP_", "ossl_", "ecp_nistz256", "_rust.abi3.so",
                                          "aesni", "gcm", "sha256", "x25519", "CRYPTO_",
                                          "BN_", "bn_", "EC_", "ec_", "ECDSA", "_openssl")),
    ("gateway TLS stream (memory BIOs)", ("tls/stream.py", "tls/context.py")),
    ("cffi / native core", ("native/scanner.py", "_native", "cffi", "native/scanner_py.py")),
    ("logging (logfmt lines)", ("logs.py",)),
    ("metrics (prometheus_client)", ("metrics.py", "prometheus_client", "mmap_dict",
                                     "values.py")),
    ("SMTP protocol + relay (gateway)", ("smtp_session.py", "upstream.py", "smtp_server.py",
                                         "smtp_client.py", "replies.py", "rules.py",
                                         "server.py", "gateway/serve/runtime.py", "net/accept.py",
                                         "net/proxy_stream.py", "observe/tracking_log.py",
                                         "conncount.py")),
    ("trio runtime + sockets", ("trio/", "_run.py", "_socket.py", "_highlevel", "_traps.py",
                                "_io_epoll.py", "_ki.py", "outcome", "sniffio", "_core",
                                "_timeouts.py", "_sync.py")),
    ("kernel / syscalls (native frames)", ("libc.so", "syscall", "__libc", "epoll",
                                           "send", "recv", "[kernel")),
]


def _category(fn: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in fn for k in keys):
            return name
    return "other Python (interpreter, GC, stdlib, attrs/outcome objects)"


def _short(frame: str) -> str:
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    fn, path = m.groups()
    parts = path.split("/")
    for anchor in ("site-packages", "gateway", "python3.11"):
        if anchor in parts:
            j = len(parts) - 1 - parts[::-1].index(anchor)
            path = "/".join(parts[j + (anchor != "gateway"):])
            break
    else:
        path = parts[-1]
    return f"{fn} ({path})"


# ------------------------------------------------------------------------------- main


def machine() -> list[str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    osr = "?"
    try:
        osr = dict(line.strip().split("=", 1) for line in open("/etc/os-release")
                   if "=" in line)["PRETTY_NAME"].strip('"')
    except (OSError, KeyError):
        pass

    def ver(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception:       # noqa: BLE001
            return "not installed"
    try:
        from OpenSSL import SSL
        gw_ssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:       # noqa: BLE001
        gw_ssl = "?"
    return [f"- machine: {os.cpu_count()} CPUs ({cpu}), {mem} RAM, {osr}, "
            f"kernel {platform.release()}",
            f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            "(other processes share the CPUs: CPU time per session is the robust figure)",
            f"- Python {platform.python_version()}; gateway TLS: {gw_ssl}; load generator "
            f"TLS: {ssl.OPENSSL_VERSION}",
            f"- peers: {ver(['nginx', '-v'])}; postfix "
            f"{ver([S.which('postconf') or 'postconf', '-d', '-h', 'mail_version'])}"]


def targets_md(summary: dict) -> list[str]:
    out = ["| target | measured | met? |", "|---|---|---|"]
    s1 = summary.get("s1")
    if s1:
        gw = s1[0]["res"]
        ng = next((r["res"] for r in s1 if r["name"].startswith("nginx")), None)
        if gw and ng and gw["cpu_ms"] and ng["cpu_ms"]:
            out.append(f"| 1: gateway CPU/session ≤ nginx's | {gw['cpu_ms']:.2f} ms vs "
                       f"{ng['cpu_ms']:.2f} ms ({gw['cpu_ms'] / ng['cpu_ms']:.1f}x) | "
                       f"{'yes' if gw['cpu_ms'] <= ng['cpu_ms'] else 'no'} |")
    s4 = summary.get("s4")
    if s4 and s4[0][2]:
        per_core = 1 / s4[0][2]
        out.append(f"| 4: ≥ 300 MB/s per core | {per_core:.0f} MB per CPU-second "
                   f"({per_core / 300 * 100:.0f} % of target), {s4[0][1]:.0f} MB/s wall | "
                   f"{'yes' if per_core >= 300 else 'no'} |")
    s5 = summary.get("s5")
    if s5:
        gw = s5[0][1]
        if gw is None:
            out.append("| 5: ≤ 64 KiB per idle session | gateway does not serve IMAP yet | "
                       "not measured |")
        else:
            out.append(f"| 5: ≤ 64 KiB per idle session | {gw['pss']:.1f} KiB PSS, "
                       f"{gw['rss']:.1f} KiB RSS | {'yes' if gw['pss'] <= 64 else 'no'} |")
    s6 = summary.get("s6")
    if s6 and len(s6) > 1 and s6[0][1]["rate"]:
        w, res = s6[-1]
        sp = res["rate"] / s6[0][1]["rate"]
        shared = w >= (os.cpu_count() or 1)
        verdict = ("not shown: the load generator shares the CPUs with the workers"
                   if shared else ("yes" if sp / w >= 0.8 else "no") +
                   " (≥ 80 % counted as near-linear)")
        out.append(f"| 6: near-linear scaling | {sp:.2f}x with {w} workers "
                   f"({sp / w * 100:.0f} % efficiency), CPU/session {s6[0][1]['cpu_ms']:.2f} "
                   f"→ {res['cpu_ms']:.2f} ms | {verdict} |")
    return out


def choose_source(choice: str, suite) -> None:
    if choice == "worktree":
        return
    if choice == "auto":
        err = S.gateway_importable()
        if err is None:
            return
        suite.notes.append(f"the working tree's gateway does not import ({err}); "
                           "measured the last commit (HEAD) instead")
        choice = "HEAD"
    if choice == "HEAD":
        snap = suite.work / "gateway-head"
        snap.mkdir()
        rev = subprocess.run(["git", "-C", str(S.ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        arch = subprocess.run(["git", "-C", str(S.ROOT), "archive", "HEAD", "gateway"],
                              capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=arch, check=True, timeout=60)
        for so in (S.ROOT / "gateway").glob("_native*.so"):
            shutil.copy(so, snap / "gateway" / so.name)
        S.use_source(snap, f"commit {rev} (git archive HEAD + the built native module)")
    else:
        S.use_source(Path(choice).resolve(), f"source tree {choice}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="scenario 6 goes up to this many workers (default: CPUs)")
    ap.add_argument("--scenarios", default="1,2,3,4,5,6,7,8,micro")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 6; "
                    "quick 1)")
    ap.add_argument("--concurrency", type=int, default=32, help="sessions in flight")
    ap.add_argument("--processes", type=int, default=2, help="load-generator processes")
    ap.add_argument("--imap-sessions", type=int, help="scenario 5 (default 5000; quick 300)")
    ap.add_argument("--big-runs", type=int, help="scenario 4 repetitions (default 3; quick 1)")
    ap.add_argument("--output", default=str(HERE / "results.md"), help="markdown results file")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy a gateway worker during an extra scenario 1 run")
    ap.add_argument("--gateway-src", default="auto",
                    help="worktree (the editable install), HEAD (a `git archive HEAD` "
                    "snapshot plus the built native module), a directory, or auto (the "
                    "working tree if it imports, else HEAD)")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native: C frames (OpenSSL, cffi) too")
    ap.add_argument("--keep-workdir", action="store_true",
                    help="keep the work directory (configs, logs) under /tmp")
    ap.add_argument("--profile-out", default=str(HERE / "results-profile.txt"))
    a = ap.parse_args()
    a.duration = a.duration or (1.0 if a.quick else 6.0)
    a.imap_sessions = a.imap_sessions or (300 if a.quick else 5000)
    a.big_runs = a.big_runs or (1 if a.quick else 3)
    which = {s.strip() for s in a.scenarios.split(",") if s.strip()}
    if os.geteuid() != 0:
        print("warning: not root: the Postfix peer will be skipped", file=sys.stderr)
    S.raise_nofile(65536)
    t0 = time.monotonic()
    suite = Suite(a)
    choose_source(a.gateway_src, suite)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    header = [f"# Benchmark results ({now} UTC)", ""] + machine() + [
        f"- gateway code: {S.GATEWAY_SRC}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- load: {a.concurrency} sessions in flight from {a.processes} load-generator "
        f"processes, {a.duration:g} s per measurement, every session a new connection and "
        "full TLS 1.3 handshake (ECDSA P-256, no resumption)", ""]
    print("\n".join(header), flush=True)
    try:
        if which & {"1", "2", "3", "4"}:
            suite.smtp_scenarios(which)
        if "6" in which:
            suite.scaling()
        if "micro" in which:
            suite.micro()
        if "5" in which:
            suite.imap()
        if "7" in which:
            suite.auth_submission()
        if "8" in which:
            suite.milters()
    except Exception:       # noqa: BLE001 - report what ran
        suite.notes.append("run aborted: " + traceback.format_exc(limit=3).replace("\n", " "))
        traceback.print_exc()
    finally:
        suite.stop_all()
    tail = ["### Targets", ""] + targets_md(suite.summary) + [""]
    if suite.notes:
        tail += ["### Notes", ""] + [f"- {n}" for n in suite.notes] + [""]
    tail.append(f"Total run time: {time.monotonic() - t0:.0f} s." + (
        f" Work directory (logs, configs): {suite.work}" if a.keep_workdir else ""))
    print("\n".join(tail))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text("\n".join(header + suite.md + tail) + "\n")
    print(f"\nwritten: {a.output}")
    json_path = Path(a.output).with_suffix(".json")
    json_path.write_text(json.dumps(suite.summary, default=str, indent=1))
    if not a.keep_workdir:
        shutil.rmtree(suite.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
