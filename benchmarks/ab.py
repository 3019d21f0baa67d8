"""A/B: two gateway source trees side by side in one run, for speed work (not a test).

    .venv/bin/python benchmarks/ab.py [--a HEAD] [--b worktree] [--scenarios 1,2,4]
        [--rounds 4] [--duration 3]

Both gateways (1 worker each) relay to the same smtp-sink; the measurements alternate
A B B A A B ... so that whatever else loads the machine falls on both about equally. Each
row gives the median over the rounds and B/A (below 1: B is cheaper). Scenario 1 is the
suite's STARTTLS 10 KB session, 2 the same in plaintext, 4 a 25 MB message over STARTTLS
(CPU per MB, 4 messages per measurement). `--a`/`--b`: `HEAD` or any commit (`HEAD~1`,
`cef6187`): a `git archive` snapshot whose native module is compiled from that commit's own
`_native/` sources; `worktree` (the package installed in .venv); or a source directory. Each
side's `gateway --version` is printed (both must say native).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as suite_mod  # noqa: E402
import servers as S  # noqa: E402

MB = 1_000_000
DEFAULTS = (list(S.GATEWAY_CMD), dict(S.GATEWAY_ENV), S.GATEWAY_SRC, S.GATEWAY_CWD)


def select(choice: str, work: Path, tag: str) -> str:
    """Point servers.py at *choice*; returns its label."""
    S.GATEWAY_CMD, S.GATEWAY_ENV, S.GATEWAY_SRC, S.GATEWAY_CWD = (
        list(DEFAULTS[0]), dict(DEFAULTS[1]), DEFAULTS[2], DEFAULTS[3])
    if choice == "worktree":
        return "working tree"
    path = Path(choice)
    if path.is_dir():
        S.use_source(path.resolve(), f"source tree {choice}")
        return S.GATEWAY_SRC
    snap = work / f"gateway-{tag}"
    snap.mkdir()
    rev = subprocess.run(["git", "-C", str(S.ROOT), "rev-parse", "--short", choice],
                         capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    arch = subprocess.run(["git", "-C", str(S.ROOT), "archive", rev, "gateway", "_native"],
                          capture_output=True, timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=arch, check=True, timeout=60)
    build_native(snap)
    S.use_source(snap, f"commit {rev}")
    return S.GATEWAY_SRC


def build_native(src: Path) -> None:
    """Compile the snapshot's native module from the snapshot's own C sources (never a copy
    of another tree's module: after a move or an API change that would leave the side on its
    pure-Python twin, or on the other side's C)."""
    for old in (src / "gateway").glob("_native*.so"):
        old.unlink()
    subprocess.run([sys.executable, "_native/build.py"], cwd=src, check=True, timeout=300,
                   capture_output=True)


def version_line() -> str:
    """`gateway --version` of the side servers.py points at now (says native or python)."""
    p = subprocess.run([*S.GATEWAY_CMD, "--version"], capture_output=True, text=True,
                       timeout=60, env=S.gateway_env(), cwd=S.GATEWAY_CWD)
    return (p.stdout or p.stderr).strip().replace("\n", "; ")


def start_gateway(work: Path, tag: str, sink_port: int, cert: Path, key: Path):
    ports = [S.free_port(), S.free_port()]
    common = {"protocol": "smtp", "type": "public", "certificate": "bench",
              "max_connections": 10000, "backlog": 1024}
    up = {"address": f"127.0.0.1:{sink_port}", "tls": "none"}
    listeners = [
        dict(name="starttls", bind=f"127.0.0.1:{ports[0]}", tls="starttls",
             client_tls="optional", **common, upstream=up),
        dict(name="plain", bind=f"127.0.0.1:{ports[1]}", tls="off", client_tls="none",
             **common, upstream=up),
    ]
    toml = S.gateway_toml(workers=1, cert=cert, key=key, listeners=listeners,
                          metrics_port=S.free_port())
    gw = S.Gateway().start(work, toml, ports, tag=tag)
    gw.p_tls, gw.p_plain = ports
    return gw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="HEAD")
    ap.add_argument("--b", default="worktree")
    ap.add_argument("--scenarios", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--processes", type=int, default=2)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gwab-", dir="/tmp"))
    work.chmod(0o755)
    cert, key = S.write_ecdsa_cert(work)
    started = []
    try:
        sink = S.SmtpSink().start(work)
        started.append(sink)
        gws, labels = {}, {}
        for side, choice in (("A", a.a), ("B", a.b)):
            labels[side] = select(choice, work, side)
            labels[side] += f"  [{version_line()}]"
            gws[side] = start_gateway(work, f"gw-{side}", sink.port, cert, key)
            started.append(gws[side])
        print(f"A = {labels['A']}\nB = {labels['B']}\n")
        rows = []
        for sc in a.scenarios.split(","):
            vals = {"A": [], "B": []}
            rates = {"A": [], "B": []}
            for r in range(a.rounds):
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                for side in order:
                    gw = gws[side]
                    if sc == "4":
                        # 4 messages per measurement: /proc CPU time has 10 ms steps
                        m = suite_mod.measure(gw, gw.p_tls, starttls=True, size=25 * MB,
                                              concurrency=1, duration=300, processes=1,
                                              sessions=4, warmup=2 if r == 0 else 0)
                        vals[side].append(m["cpu_s"] / (25 * m["sessions"]) * 1000)
                        rates[side].append(25 / m["p50"] if m["p50"] else 0)
                    else:
                        m = suite_mod.measure(gw, gw.p_tls if sc == "1" else gw.p_plain,
                                              starttls=sc == "1", size=10240,
                                              concurrency=a.concurrency,
                                              duration=a.duration, processes=a.processes)
                        vals[side].append(m["cpu_ms"])
                        rates[side].append(m["rate"])
                    if m.get("errors"):
                        print(f"  scenario {sc} {side}: {m['errors']} errors "
                              f"{m.get('error_samples')}")
            unit = "CPU ms/MB" if sc == "4" else "CPU ms/session"
            rate_unit = "MB/s" if sc == "4" else "sessions/s"
            ma, mb = statistics.median(vals["A"]), statistics.median(vals["B"])
            rows.append((sc, unit, ma, mb, mb / ma, rate_unit,
                         statistics.median(rates["A"]), statistics.median(rates["B"]),
                         vals))
        print("| scenario | figure | A | B | B/A | A rate | B rate |")
        print("|---|---|---|---|---|---|---|")
        for sc, unit, ma, mb, rt, ru, ra, rb, _ in rows:
            print(f"| {sc} | {unit} | {ma:.3f} | {mb:.3f} | {rt:.2f} | {ra:.0f} {ru} "
                  f"| {rb:.0f} {ru} |")
        print()
        for sc, unit, *_, vals in rows:
            print(f"scenario {sc} rounds: A {[round(v, 3) for v in vals['A']]} "
                  f"B {[round(v, 3) for v in vals['B']]}")
    finally:
        for srv in reversed(started):
            try:
                srv.stop()
            except Exception:       # noqa: BLE001 - best effort cleanup
                pass
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
