"""deploy/prometheus/alerts.yml (SPEC §11): `promtool check rules`, and `promtool test rules`
with deploy/prometheus/alerts.test.yml (series that fire each alert and series that must
not). promtool comes from Debian's `prometheus` package (.ci/install-peers.sh)."""
from __future__ import annotations

import inspect
import re
import shutil
import tomllib
import subprocess
from pathlib import Path

from peers import require

from gateway.observe import metrics as M
from gateway.relay import milter_client
from gateway.relay.upstream import FAILURE_KINDS, TLS_ALERT_REASONS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
SCRAPE = DEPLOY / "scrape.yml"
EXAMPLE = DEPLOY.parent / "gateway.example.toml"
# exported by the supervisor (SPEC §9, §11), not by gateway/observe/metrics.py's table
SUPERVISOR_METRICS: set[str] = set()      # every name the rules read is in the metric table


def promtool(*args, cwd=DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_promtool_check_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


def test_promtool_test_rules():
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_rule_tests_bite(tmp_path):
    """A rule that fires too early fails the tests: the series that must not fire count."""
    shutil.copy(RULE_TESTS, tmp_path)
    (tmp_path / "alerts.yml").write_text(
        RULES.read_text().replace("< 14 * 86400", "< 31 * 86400"))
    proc = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "MailGatewayCertificateExpiresSoon" in proc.stdout + proc.stderr


def test_rules_read_metrics_and_labels_the_gateway_exports():
    text = RULES.read_text()
    names = set(re.findall(r"\b(gateway_[a-z_]+)", text))
    assert names <= set(M.METRIC_NAMES) | SUPERVISOR_METRICS, names
    reasons = set(re.findall(r'reason="([a-z_]+)"', RULE_TESTS.read_text()))
    assert reasons and reasons <= set(TLS_ALERT_REASONS)
    assert set(TLS_ALERT_REASONS) <= set(FAILURE_KINDS.values())
    for regex in re.findall(r'reason=~"([^"]+)"', text):
        assert set(regex.split("|")) <= set(FAILURE_KINDS.values()), regex


def test_milter_rule_reads_the_failure_results_the_milter_client_raises():
    text = RULES.read_text()
    [regex] = re.findall(r'gateway_milter_results_total\{result=~"([^"]+)"\}', text)
    assert set(regex.split("|")) == {"error", "timeout"}
    # MilterError's results (gateway/relay/milter_client.py): "error" by default, "timeout"
    assert inspect.signature(milter_client.MilterError).parameters["result"].default == "error"
    assert '"timeout") from None' in inspect.getsource(milter_client)
    results = set(re.findall(r'milter="[a-z]+", result="([a-z]+)"', RULE_TESTS.read_text()))
    assert {"error", "timeout"} < results          # the tests also hold verdicts that must not


def test_scrape_config_is_valid_and_targets_the_example_metrics_address():
    proc = promtool("check", "config", str(SCRAPE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = tomllib.loads(EXAMPLE.read_text())["gateway"]["metrics"]
    targets = re.findall(r"^\s+- (\S+:\d+)\s*$", SCRAPE.read_text(), re.M)
    assert targets == [metrics] == ["127.0.0.1:9108"]
