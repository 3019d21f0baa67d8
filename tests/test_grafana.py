"""deploy/grafana/ (SPEC §11): the dashboard loads as Grafana's import format, and every
panel's query runs against a real Prometheus (Debian's `prometheus`, a private instance)
scraping a real `gateway run` under a little traffic: STARTTLS mail through a milter to a
STARTTLS sink, an AUTH exchange, a policy refusal and a pregreet refusal. A query that does
not parse or returns nothing fails the test."""
from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio

from gateway.observe import metrics as M
from harness import client_context, in_thread, running_sink, server_ssl_context
from milters import scripted_milter
from peers import free_port, require
from supervised import GatewayProcess, samples_of, scrape
from test_milter_gateway import Script

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "mail-tls-gateway.json"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.yml"
USER, PASSWORD = "alice", "s3cret"
MESSAGES = 3

# Grafana's own variables, as a dashboard over the last hour would have them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too, rows themselves left out."""
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def targets(board: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(board) for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The gateway metrics an expression reads, as named in gateway/observe/metrics.py's table."""
    names = set()
    for name in re.findall(r"\b(gateway_[a-z_]+)", expr):
        names.add(re.sub(r"_(bucket|sum|count)$", "", name)
                  if name not in M.METRIC_NAMES else name)
    return names


# --- the file --------------------------------------------------------------------------------

def test_dashboard_is_grafanas_import_format():
    board = dashboard()
    assert board["__inputs"] == [{
        "name": "DS_PROMETHEUS", "label": "Prometheus", "description": "",
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}]
    assert {"type": "datasource", "id": "prometheus", "name": "Prometheus",
            "version": "1.0.0"} in board["__requires"]
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for row in board["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels(board):
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert target["refId"] and target["expr"], panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        used = {t["refId"] for t in panel["targets"]}
        assert len(used) == len(panel["targets"]), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == source, variable["name"]
    # the types the panels use are required (Grafana checks them on import)
    kinds = {r["id"] for r in board["__requires"] if r["type"] == "panel"}
    assert {p["type"] for p in panels(board)} <= kinds


def test_dashboard_covers_the_operators_metrics():
    used = set().union(*(metric_names(expr) for _, expr in targets(dashboard())))
    assert used <= set(M.METRIC_NAMES), used - set(M.METRIC_NAMES)
    # sessions and messages by result, TLS versions per leg, policy refusals, TLS alerts,
    # milter results and time, AUTH, certificate expiry, workers (SPEC §11)
    assert {
        "gateway_connections_total", "gateway_messages_total", "gateway_tls_handshakes_total",
        "gateway_policy_rejections_total", "gateway_connections_rejected_total",
        "gateway_tls_alerts_total", "gateway_milter_results_total", "gateway_milter_seconds",
        "gateway_auth_total", "gateway_certificate_expiry_timestamp_seconds",
        "gateway_workers_healthy", "gateway_workers_configured",
        "gateway_worker_restarts_total"} <= used
    exprs = " ".join(expr for _, expr in targets(dashboard()))
    assert "by (side, version" in exprs.replace("by (version, side", "by (side, version")


# --- a real Prometheus ----------------------------------------------------------------------

class Prometheus:
    """A private `prometheus` on 127.0.0.1:<free port>, its data in *directory*."""

    def __init__(self, directory: Path, config: str):
        self.port = free_port()
        (directory / "prometheus.yml").write_text(config)
        self.log = open(directory / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [require("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=directory)
        self.directory = directory

    def get(self, path: str, **params) -> tuple[int, dict | None]:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body.startswith(b"{") else None
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return 0, None

    def query(self, expr: str) -> tuple[int, dict | None]:
        return self.get("/api/v1/query", query=expr)

    def values(self, expr: str) -> list[float]:
        status, answer = self.query(expr)
        assert status == 200, answer
        return [float(r["value"][1]) for r in answer["data"]["result"]]

    def wait(self, condition, timeout: float, what: str):
        end = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_text()}")
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.log_text()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        self.log.flush()
        return (self.directory / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()


def scrape_config(metrics_port: int) -> str:
    """deploy/prometheus/scrape.yml, scraping the test's gateway every second."""
    text = SCRAPE.read_text()
    assert "- 127.0.0.1:9108" in text and "scrape_interval: 15s" in text
    return (text.replace("- 127.0.0.1:9108", f"- 127.0.0.1:{metrics_port}")
            .replace("scrape_interval: 15s", "scrape_interval: 1s"))


def gateway_config(path: Path, *, port, edge_port, sink_port, metrics_port, milter, cert):
    path.write_text(f"""
[gateway]
hostname = "mx.test"
workers = 1
metrics = "127.0.0.1:{metrics_port}"
shutdown_grace = 5
spool_dir = "{path.parent / 'spool'}"

[certificates.main]
cert = "{cert.cert}"
key = "{cert.key}"

[[listeners]]
name = "mx"
bind = "127.0.0.1:{port}"
tls = "starttls"
client_tls = "optional"
certificate = "main"
auth = "passthrough"

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "required"

[[listeners.rules]]
sender = "*"
recipient = "secure.example"
sender_encryption = "required"
recipient_encryption = "required"

[[listeners.milters]]
name = "scanner"
address = "{milter}"

[[listeners.milters]]
name = "signer"
address = "{milter}"

[[listeners]]
name = "edge"
bind = "127.0.0.1:{edge_port}"
tls = "off"
client_tls = "none"
pregreet_wait = 5

[listeners.upstream]
address = "127.0.0.1:{sink_port}"
tls = "none"
""")


def traffic(port: int, edge_port: int, ca) -> None:
    """STARTTLS mail, an AUTH exchange, a refusal by policy, a refusal before the greeting."""
    ctx = client_context(ca)
    for n in range(MESSAGES):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.starttls(context=ctx)
            s.ehlo("client.test")
            if n == 0:
                s.user, s.password = USER, PASSWORD
                assert s.auth("PLAIN", s.auth_plain)[0] == 235
            s.sendmail("alice@client.test", ["bob@remote.example"],
                       f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:     # plaintext: rule 0 refuses
        s.ehlo("client.test")
        assert s.mail("alice@client.test")[0] == 250
        assert s.rcpt("bob@secure.example")[0] == 530
    with socket.create_connection(("127.0.0.1", edge_port), timeout=20) as sock:
        sock.recv(512)                                   # "220-" at once, the rest after 5 s
        sock.sendall(b"EHLO early.test\r\n")              # a pregreet talker: 554 and closed
        reply = b""
        while chunk := sock.recv(512):
            reply += chunk
        assert b"554 " in reply, reply


def substituted(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):      # $__range before $__r...
        expr = expr.replace(name, variables[name])
    assert "$" not in expr, expr
    return expr


@pytest.mark.peers
async def test_every_panel_query_answers_from_a_real_prometheus(tmp_path, server_cert,
                                                                 upstream_cert):
    require("prometheus")
    board = dashboard()
    port, edge_port, metrics_port = free_port(), free_port(), free_port()
    script = Script()
    prometheus = gw = None
    with trio.fail_after(55):
        async with running_sink(ssl_context=server_ssl_context(upstream_cert),
                                auth={USER: PASSWORD}) as sink, \
                scripted_milter(script) as milter:
            config = tmp_path / "gateway.toml"
            gateway_config(config, port=port, edge_port=edge_port, sink_port=sink.port,
                           metrics_port=metrics_port, milter=milter, cert=server_cert)
            try:
                gw = GatewayProcess(config)
                await in_thread(lambda: gw.wait_for(r"event=listening", count=2))
                started = await in_thread(scrape, metrics_port)
                prom_dir = tmp_path / "prometheus"
                prom_dir.mkdir()
                prometheus = Prometheus(prom_dir, scrape_config(metrics_port))
                await in_thread(traffic, port, edge_port, server_cert.ca)
                # Prometheus has the traffic...
                seen = await in_thread(prometheus.wait, lambda: prometheus.values(
                    'sum(gateway_messages_total{result="accepted"}) >= %d' % MESSAGES), 30,
                    "the messages in Prometheus")
                assert seen == [MESSAGES]
                # ...and two scrapes more, so that rate() has two samples of every series
                [last] = prometheus.values("timestamp(up)")
                await in_thread(prometheus.wait, lambda: prometheus.values(
                    f"timestamp(up) > {last + 1.5}"), 10, "two more scrapes")
                # the dashboard's variables, as Grafana would fill them ("All")
                variables = dict(GRAFANA_VARIABLES)
                for variable in board["templating"]["list"]:
                    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)",
                                     variable["query"]["query"])
                    assert m, variable
                    path = f"/api/v1/label/{m.group(2)}/values"
                    match = substituted(m.group(1), variables)
                    status, answer = await in_thread(
                        lambda: prometheus.get(path, **{"match[]": match}))
                    assert status == 200 and answer["data"], (variable["name"], answer)
                    variables["$" + variable["name"]] = "(" + "|".join(
                        re.escape(v).replace("\\", "\\\\") for v in answer["data"]) + ")"
                answers = {}
                for title, expr in targets(board):
                    query = substituted(expr, variables)
                    answers[(title, expr)] = await in_thread(prometheus.query, query)
                milter_counts = await in_thread(
                    prometheus.values,
                    'sum by (milter) (gateway_milter_seconds_count{listener="mx"})')
            finally:
                if prometheus is not None:
                    prometheus.stop()
                if gw is not None:
                    assert gw.stop() == 0
    # every panel's query parses and returns something
    failures = []
    for (title, expr), (status, answer) in answers.items():
        if status != 200 or answer.get("status") != "success":
            failures.append(f"{title}: {expr}: {status} {answer}")
        elif not answer["data"]["result"]:
            failures.append(f"{title}: {expr}: empty")
    assert not failures, "\n".join(failures)
    # the counters the milter alert rule reads exist at 0 from the start (SPEC §11), and so
    # does the milter time histogram, so that rate() sees the first messages' times
    for milter_name in ("scanner", "signer"):
        assert samples_of(started, "gateway_milter_seconds_count", listener="mx",
                          milter=milter_name) == [0], milter_name
        for result in ("error", "timeout"):
            assert samples_of(started, "gateway_milter_results_total", listener="mx",
                              milter=milter_name, result=result) == [0], (milter_name, result)
    # one observation per milter per message (gateway_milter_seconds)
    assert milter_counts == [MESSAGES, MESSAGES]
    assert len(sink.messages) == MESSAGES and sink.messages[0].auth_user == USER
