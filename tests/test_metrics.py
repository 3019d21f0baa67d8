"""Metrics (SPEC §11): multiprocess aggregation across forked workers, the HTTP endpoint,
NullMetrics. Multiprocess tests run in a fresh interpreter: this test process may already
have imported prometheus_client without the multiprocess directory set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import gateway
from gateway import metrics as M

ROOT = Path(gateway.__file__).resolve().parent.parent

PRELUDE = textwrap.dedent("""
    import json, os, sys, urllib.error, urllib.request
    from gateway import metrics as M

    def fetch(port, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.headers.get("Content-Type"), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read().decode()

    def families(text):
        from prometheus_client.parser import text_string_to_metric_families
        out = {}
        for fam in text_string_to_metric_families(text):
            out[fam.name] = {"type": fam.type, "samples": [
                [s.name, s.labels, s.value] for s in fam.samples]}
        return out

    def fork(fn):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fn()
            except BaseException:
                import traceback; traceback.print_exc(); code = 3
            os._exit(code)
        return pid

    def reap(pids):
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
""")


def run_script(body: str, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory() as tmp:     # its gateway-metrics-* dirs go with it
        env.setdefault("TMPDIR", tmp)
        proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                              env=env, timeout=60, cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout.strip().splitlines()[-1])


def value(fams, family, sample, **labels):
    for name, lab, val in fams[family]["samples"]:
        if name == sample and all(lab.get(k) == v for k, v in labels.items()):
            return val
    raise KeyError((family, sample, labels))


def test_two_workers_are_summed(tmp_path):
    out = run_script(f"""
        d = M.prepare_multiprocess_dir({str(tmp_path / "mp")!r})
        assert "prometheus_client" not in sys.modules
        mode = oct(os.stat(d).st_mode & 0o777)

        def worker(n, open_left):
            m = M.Metrics()
            for i in range(n):
                m.connections_total.labels("smtp-in", "smtp").inc()
                m.connections_active.labels("smtp-in").inc()
                m.tls_handshake_seconds.labels("smtp-in", "client").observe(0.004 * (i + 1))
                m.session_seconds.labels("smtp-in", "smtp").observe(2.0)
            for i in range(n - open_left):
                m.connections_active.labels("smtp-in").dec()
            m.message_bytes_total.labels("smtp-in").inc(1000 * n)
            m.messages_total.labels("smtp-in", "accepted").inc(n)
            m.tls_handshakes_total.labels("smtp-in", "client", "TLSv1.3", "ok").inc(n)
            m.demo_certificate.set(1)

        pids = [fork(lambda: worker(2, 1)), fork(lambda: worker(3, 2))]
        reap(pids)

        sup = M.Metrics()                  # the supervisor's own (restart counter)
        sup.worker_restarts_total.inc()
        server = M.MetricsServer("127.0.0.1", 0, healthy=lambda: True)
        server.start()
        try:
            _, _, before = fetch(server.port, "/metrics")
            for pid in pids:
                M.mark_process_dead(pid)
            status, ctype, after = fetch(server.port, "/metrics")
        finally:
            server.stop()
        print(json.dumps({{"mode": mode, "dir": d, "env": os.environ["PROMETHEUS_MULTIPROC_DIR"],
                          "status": status, "ctype": ctype,
                          "before": families(before), "after": families(after)}}))
    """)
    assert out["mode"] == "0o700"
    assert out["env"] == out["dir"] == str(tmp_path / "mp")
    assert out["status"] == 200
    assert out["ctype"].startswith("text/plain")
    before, after = out["before"], out["after"]

    for fams in (before, after):
        assert value(fams, "gateway_connections", "gateway_connections_total",
                     listener="smtp-in", protocol="smtp") == 5
        assert value(fams, "gateway_message_bytes", "gateway_message_bytes_total",
                     listener="smtp-in") == 5000
        assert value(fams, "gateway_messages", "gateway_messages_total",
                     listener="smtp-in", result="accepted") == 5
        assert value(fams, "gateway_tls_handshakes", "gateway_tls_handshakes_total",
                     listener="smtp-in", side="client", version="TLSv1.3", result="ok") == 5
        assert value(fams, "gateway_worker_restarts", "gateway_worker_restarts_total") == 1
        h = "gateway_tls_handshake_seconds"
        assert value(fams, h, h + "_count", listener="smtp-in", side="client") == 5
        assert value(fams, h, h + "_bucket", listener="smtp-in", side="client", le="0.005") == 2
        assert value(fams, h, h + "_bucket", listener="smtp-in", side="client", le="+Inf") == 5
        assert value(fams, h, h + "_sum", listener="smtp-in", side="client") == \
            pytest.approx(0.004 * (1 + 2) + 0.004 * (1 + 2 + 3))
        s = "gateway_session_seconds"
        assert value(fams, s, s + "_count", listener="smtp-in", protocol="smtp") == 5
        assert value(fams, s, s + "_bucket", listener="smtp-in", protocol="smtp", le="1.0") == 0
        assert value(fams, s, s + "_bucket", listener="smtp-in", protocol="smtp",
                     le="2.5") == 5
        assert value(fams, s, s + "_bucket", listener="smtp-in", protocol="smtp",
                     le="3600.0") == 5
        info = [lab for name, lab, v in fams["gateway_build_info"]["samples"] if v == 1]
        assert info, fams["gateway_build_info"]
        assert all(lab["version"] == gateway.__version__ for lab in info)
        assert {lab["native"] for lab in info} <= {"yes", "no"}

    # livesum: 1 + 2 connections still open while the workers' files count as live...
    assert value(before, "gateway_connections_active", "gateway_connections_active",
                 listener="smtp-in") == 3
    assert value(before, "gateway_demo_certificate", "gateway_demo_certificate") == 1
    # ...and gone once the supervisor marks the reaped workers dead.
    # (a family with no live process left is not exposed at all)
    none = {"samples": []}
    active = [v for n, lab, v in after.get("gateway_connections_active", none)["samples"]
              if lab.get("listener") == "smtp-in"]
    assert sum(active) == 0
    demo = after.get("gateway_demo_certificate", none)["samples"]
    assert sum(v for _, _, v in demo) == 0


def test_build_info_native_label():
    from gateway import native
    out = run_script("""
        M.prepare_multiprocess_dir()
        m = M.Metrics()
        body, ctype = M.render()
        print(json.dumps(families(body.decode())))
    """)
    expect = "yes" if native.BACKEND == "native" else "no"
    assert value(out, "gateway_build_info", "gateway_build_info",
                 version=gateway.__version__, native=expect) == 1


def test_every_spec_name_is_exposed():
    out = run_script("""
        M.prepare_multiprocess_dir()
        m = M.Metrics()
        m.connections_total.labels("l", "smtp").inc()
        m.connections_active.labels("l").inc()
        m.connections_rejected_total.labels("l", "limit").inc()
        m.tls_handshakes_total.labels("l", "server", "TLSv1.3", "ok").inc()
        m.tls_handshake_seconds.labels("l", "server").observe(0.01)
        m.policy_rejections_total.labels("l", "tls_required").inc()
        m.messages_total.labels("l", "accepted").inc()
        m.message_bytes_total.labels("l").inc(10)
        m.upstream_errors_total.labels("l", "connect").inc()
        m.tls_alerts_total.labels("l", "no_starttls").inc()
        m.session_seconds.labels("l", "smtp").observe(1)
        m.worker_restarts_total.inc()
        m.demo_certificate.set(1)
        m.auth_total.labels("l", "PLAIN", "success").inc()
        m.milter_results_total.labels("l", "rspamd", "reject").inc()
        m.certificate_expiry.labels("main", "ecdsa").set(1.8e9)
        m.upstream_last_result.labels("l", "ok").set(1.7e9)
        m.reload_sessions_cut_total.labels("l", "generation_cap").inc()
        m.reloads_deferred_total.inc()
        body, _ = M.render()
        names = set()
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                names.add(line.split("{")[0].split(" ")[0])
        print(json.dumps(sorted(names)))
    """)
    names = set(out)
    for spec in M.METRICS:
        name = spec.name
        if spec.kind == "histogram":
            assert {name + "_bucket", name + "_count", name + "_sum"} <= names, name
        else:
            assert name in names, (name, sorted(names))
    # no doubled suffix anywhere
    assert not any("_total_total" in n for n in names)


def test_the_exposition_follows_the_table():
    out = run_script("""
        M.prepare_multiprocess_dir()
        m = M.Metrics()
        for spec in M.METRICS:
            metric = getattr(m, spec.attribute)
            if spec.labels:
                metric = metric.labels(*["x"] * len(spec.labels))
            getattr(metric, {"counter": "inc", "gauge": "set",
                             "histogram": "observe"}[spec.kind])(1)
        body, _ = M.render()
        help_lines = [line for line in body.decode().splitlines() if line.startswith("# HELP")]
        print(json.dumps({"families": families(body.decode()), "help": help_lines}))
    """)
    fams = out["families"]
    assert len(M.METRICS) == len(M.METRIC_NAMES) == len(M.ATTRIBUTES) == 25
    for spec in M.METRICS:
        family = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
        assert fams[family]["type"] == spec.kind, spec
        for _name, labels, _value in fams[family]["samples"]:
            assert set(labels) - {"le"} == set(spec.labels), (spec, labels)
        assert any(line.startswith(f"# HELP {spec.name} {spec.doc}")
                   for line in out["help"]), spec


def test_healthz_and_404():
    out = run_script("""
        M.prepare_multiprocess_dir()
        state = {"ok": True}
        server = M.MetricsServer("127.0.0.1", 0, healthy=lambda: state["ok"])
        server.start()
        plain = M.MetricsServer("127.0.0.1", 0)
        plain.start()
        try:
            res = {"port": server.port}
            res["healthy"] = fetch(server.port, "/healthz")
            state["ok"] = False
            res["unhealthy"] = fetch(server.port, "/healthz")
            res["missing"] = fetch(server.port, "/nope")
            res["plain"] = fetch(plain.port, "/healthz")
            res["metrics"] = fetch(server.port, "/metrics")[0]
        finally:
            server.stop()
            plain.stop()
        print(json.dumps(res))
    """)
    assert out["port"] > 0
    assert out["healthy"][0] == 200 and out["healthy"][2] == "ok\n"
    assert out["unhealthy"][0] == 503
    assert out["missing"][0] == 404
    assert out["plain"][0] == 200
    assert out["metrics"] == 200


def test_prepare_refuses_after_plain_import():
    out = run_script("""
        import prometheus_client
        try:
            M.prepare_multiprocess_dir()
        except RuntimeError as e:
            print(json.dumps({"raised": True}))
        else:
            print(json.dumps({"raised": False}))
    """)
    assert out == {"raised": True}


def test_prepare_wipes_existing_dir(tmp_path):
    d = tmp_path / "mp"
    d.mkdir(mode=0o755)
    (d / "counter_123.db").write_bytes(b"stale")
    out = run_script(f"""
        d = M.prepare_multiprocess_dir({str(d)!r})
        print(json.dumps({{"files": os.listdir(d), "mode": oct(os.stat(d).st_mode & 0o777),
                          "env": os.environ["PROMETHEUS_MULTIPROC_DIR"]}}))
    """)
    assert out == {"files": [], "mode": "0o700", "env": str(d)}


def test_metrics_survive_a_fork_after_construction():
    # The supervisor builds Metrics() before forking workers that build their own.
    out = run_script("""
        M.prepare_multiprocess_dir()
        sup = M.Metrics()
        def worker():
            M.Metrics().connections_total.labels("a", "imap").inc(4)
        reap([fork(worker)])
        body, _ = M.render()
        print(json.dumps(families(body.decode())))
    """)
    assert value(out, "gateway_connections", "gateway_connections_total",
                 listener="a", protocol="imap") == 4


def test_null_metrics_api():
    n = M.NullMetrics()
    for attr in M.ATTRIBUTES:
        metric = getattr(n, attr)
        assert metric.labels("a", "b") is metric
        assert metric.labels(listener="a") is metric
        metric.inc()
        metric.inc(5)
        metric.dec()
        metric.dec(2)
        metric.set(1)
        metric.observe(0.5)
    n.connections_total.labels("l", "smtp").inc()
    n.tls_handshake_seconds.labels("l", "server").observe(0.1)
    n.worker_restarts_total.inc()
    n.demo_certificate.set(0)


def test_null_metrics_matches_metrics_attributes():
    # Same attribute set as Metrics(), checked in a fresh interpreter.
    out = run_script("""
        M.prepare_multiprocess_dir()
        print(json.dumps(sorted(vars(M.Metrics()))))
    """)
    assert sorted(out) == sorted(M.ATTRIBUTES) == sorted(vars(M.NullMetrics()))
