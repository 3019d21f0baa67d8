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
from gateway.observe import metrics as M

ROOT = Path(gateway.__file__).resolve().parent.parent

PRELUDE = textwrap.dedent("""
    import json, os, sys, urllib.error, urllib.request
    from gateway.observe import metrics as M

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
                m.connections_total.labels("smtp-in", "public", "smtp").inc()
                m.connections_active.labels("smtp-in", "public").inc()
                m.tls_handshake_seconds.labels("smtp-in", "client").observe(0.004 * (i + 1))
                m.session_seconds.labels("smtp-in", "smtp").observe(2.0)
            for i in range(n - open_left):
                m.connections_active.labels("smtp-in", "public").dec()
            m.message_bytes_total.labels("smtp-in", "public").inc(1000 * n)
            m.messages_total.labels("smtp-in", "public", "accepted").inc(n)
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
    from gateway.native import scanner
    out = run_script("""
        M.prepare_multiprocess_dir()
        m = M.Metrics()
        body, ctype = M.render()
        print(json.dumps(families(body.decode())))
    """)
    expect = "yes" if scanner.BACKEND == "native" else "no"
    assert value(out, "gateway_build_info", "gateway_build_info",
                 version=gateway.__version__, native=expect) == 1


# SPEC §11 as written there: every metric's name and labels (the listener's `type` on the
# connection and message counters, §2, §11), and the label values it fixes. Written out here,
# not read from the code's table, and checked against a real gateway's /metrics.
SPEC_METRICS = {
    "gateway_connections_total": ("counter", {"listener", "type", "protocol"}),
    "gateway_connections_active": ("gauge", {"listener", "type"}),
    "gateway_connections_rejected_total": ("counter", {"listener", "type", "reason"}),
    "gateway_tls_handshakes_total": ("counter", {"listener", "side", "version", "result"}),
    "gateway_tls_handshake_seconds": ("histogram", {"listener", "side"}),
    "gateway_policy_rejections_total": ("counter", {"listener", "reason"}),
    "gateway_messages_total": ("counter", {"listener", "type", "result"}),
    "gateway_message_bytes_total": ("counter", {"listener", "type"}),
    "gateway_upstream_errors_total": ("counter", {"listener", "reason"}),
    "gateway_tls_alerts_total": ("counter", {"listener", "reason"}),
    "gateway_session_seconds": ("histogram", {"listener", "protocol"}),
    "gateway_worker_restarts_total": ("counter", set()),
    "gateway_demo_certificate": ("gauge", set()),
    "gateway_build_info": ("gauge", {"version", "native"}),
    "gateway_auth_total": ("counter", {"listener", "mechanism", "result"}),
    "gateway_milter_results_total": ("counter", {"listener", "milter", "result"}),
    "gateway_certificate_expiry_timestamp_seconds": ("gauge", {"certificate", "key_type"}),
    "gateway_config_last_reload_successful": ("gauge", set()),
    "gateway_config_last_reload_success_timestamp_seconds": ("gauge", set()),
    "gateway_workers_healthy": ("gauge", set()),
    "gateway_workers_configured": ("gauge", set()),
    "gateway_tracking_errors_total": ("counter", set()),
    "gateway_milter_seconds": ("histogram", {"listener", "milter"}),
}
SPEC_VALUES = {
    ("gateway_connections_rejected_total", "reason"): {
        "max_connections", "per_ip", "pregreet", "proxy_untrusted", "proxy_malformed"},
    ("gateway_messages_total", "result"): {"accepted", "rejected", "tempfail", "discarded"},
    ("gateway_tls_alerts_total", "reason"): {"tls_not_offered", "tls_failed", "not_trusted"},
}


async def _spec_scrape(tmp_path, server_cert, upstream_cert):
    """A real `gateway run` (STARTTLS, AUTH passthrough, a milter, a client rule), after a
    session that relays one authenticated message and one refused at MAIL FROM: its
    exposition parsed into {family: (type, [(sample name, labels, value)])}."""
    import smtplib

    import trio
    from prometheus_client.parser import text_string_to_metric_families

    from harness import (client_context, config_dict, in_thread, listener_dict, running_sink,
                         server_ssl_context, smtp_send, to_toml)
    from milters import CONTINUE, scripted_milter
    from peers import free_port
    from supervised import GatewayProcess, fetch

    async def milter(peer):
        await peer.negotiate(actions=0x1FF, protocol=0)
        while (packet := await peer.recv()) is not None:
            if packet[0] not in (b"D", b"A", b"Q", b"K"):
                await peer.send(CONTINUE)

    port, metrics_port = free_port(), free_port()
    async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                            auth={"alice": "pw"}) as sink, \
            scripted_milter(milter) as address:
        listener = listener_dict(
            "sub", upstream_port=sink.port, cert="main", type="private", auth="passthrough",
            upstream_tls="required",
            client_rules=[{"match": "secure.example", "client_tls": "required"}],
            milters=[{"name": "m", "address": address}])
        listener["bind"] = f"127.0.0.1:{port}"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(to_toml(config_dict(
            [listener], server_cert=server_cert, workers=1, shutdown_grace=5,
            spool_dir=str(tmp_path / "spool"), metrics=f"127.0.0.1:{metrics_port}")))
        gw = GatewayProcess(cfg)
        try:
            with trio.fail_after(60):
                await in_thread(lambda: gw.wait_for(r"event=listening"))

                def relay():
                    with smtplib.SMTP("localhost", port, timeout=20) as s:
                        s.starttls(context=client_context(server_cert.ca))
                        s.login("alice", "pw")
                        return s.sendmail("alice@client.test", ["bob@example.test"],
                                          b"Subject: spec\r\n\r\nhello\r\n")
                assert await in_thread(relay) == {}
                assert (await in_thread(lambda: smtp_send(
                    port, mail_from="alice@secure.example")))[0] == 530
                await in_thread(lambda: gw.wait_for(r"event=conn_close ", count=2))
                status, _, body = await in_thread(fetch, metrics_port, "/metrics")
        finally:
            assert gw.stop() == 0
    assert status == 200, body
    return {fam.name: (fam.type, [(s.name, s.labels, s.value) for s in fam.samples])
            for fam in text_string_to_metric_families(body)}


async def test_every_spec_name_is_exposed_with_its_labels(tmp_path, server_cert,
                                                           upstream_cert):
    families = await _spec_scrape(tmp_path, server_cert, upstream_cert)
    for name, (kind, labels) in SPEC_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert family in families, (name, sorted(families))
        got_kind, samples = families[family]
        assert got_kind == kind, name
        assert samples, name
        for sample, sample_labels, _ in samples:
            assert set(sample_labels) - {"le"} == labels, (name, sample, sample_labels)
        if kind == "histogram":
            assert {s for s, _, _ in samples} == {name + "_bucket", name + "_count",
                                                  name + "_sum"}, name
        else:
            assert {s for s, _, _ in samples} == {name}, name
    # the fixed value sets: every value, for the listener, and nothing else
    for (name, label), values in SPEC_VALUES.items():
        _, samples = families[name.removesuffix("_total")]
        assert {lab[label] for s, lab, _ in samples if s == name} == values, name
        assert all(lab["listener"] == "sub" for s, lab, _ in samples if s == name), name
    # the traffic's own values: what this session really made the gateway emit
    def value(name, **labels):
        _, samples = families[name.removesuffix("_total")]
        return [v for s, lab, v in samples
                if s == name and all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert value("gateway_messages_total", listener="sub", type="private",
                 result="accepted") == [1]
    assert value("gateway_messages_total", listener="sub", type="private",
                 result="rejected") == [1]
    assert value("gateway_connections_total", listener="sub", type="private",
                 protocol="smtp") == [2]
    assert value("gateway_auth_total", listener="sub", mechanism="PLAIN",
                 result="success") == [1]
    assert value("gateway_milter_results_total", listener="sub", milter="m",
                 result="continue")[0] >= 1
    assert value("gateway_tls_handshakes_total", listener="sub", side="client",
                 version="TLSv1.3", result="ok") == [1]
    assert value("gateway_tls_handshakes_total", listener="sub", side="upstream",
                 version="TLSv1.3", result="ok") == [1]
    # no doubled suffix anywhere
    assert not any("_total_total" in s for _, samples in families.values()
                   for s, _, _ in samples)


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
    assert len(M.METRICS) == len(M.METRIC_NAMES) == len(M.ATTRIBUTES) == 26
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
            M.Metrics().connections_total.labels("a", "private", "imap").inc(4)
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
    n.connections_total.labels("l", "public", "smtp").inc()
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
