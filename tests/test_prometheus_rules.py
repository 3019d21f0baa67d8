"""deploy/prometheus/alerts.yml (SPEC §11): `promtool check rules`, and `promtool test rules`
with deploy/prometheus/alerts.test.yml (series that fire each alert and series that must
not). promtool comes from Debian's `prometheus` package (.ci/install-peers.sh)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from peers import require

from gateway import metrics as M
from gateway.relay.upstream import FAILURE_KINDS, TLS_ALERT_REASONS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
# exported by the supervisor (SPEC §9, §11), not by gateway/metrics.py's table
SUPERVISOR_METRICS: set[str] = set()      # every name the rules read is in the metric table


def promtool(*args, cwd=DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_promtool_check_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


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
