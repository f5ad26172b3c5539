"""Prometheus scrape config and alert rules, checked with promtool."""

from __future__ import annotations

import re
import shutil
import subprocess

from relay.metrics import Metrics

from ._util import DEPLOY, METRIC_NAME, require_tool

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "dbgrelay.rules.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


def test_promtool_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_config_of_the_remote_example(tmp_path):
    """The credentials example passes promtool, given the files it names
    (promtool checks that they exist): a token, a CA, a client certificate."""
    import trustme

    folder = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, folder)
    secrets = folder / "secrets"
    secrets.mkdir()
    (secrets / "dbgrelay-metrics.token").write_text("3f9c2b7e4d1a8f60\n")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(secrets / "dbgrelay-metrics-ca.pem")
    client = client_ca.issue_cert("prometheus@monitoring")
    client.cert_chain_pems[0].write_to_path(secrets / "prometheus-client.pem")
    client.private_key_pem.write_to_path(secrets / "prometheus-client.key")
    tool = require_tool("promtool")
    result = subprocess.run(
        [tool, "check", "config", "prometheus-remote.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    text = (PROMETHEUS / "prometheus-remote.yml").read_text()
    assert "job_name: dbgrelay\n" in text and "scheme: https" in text


def test_promtool_check_rules():
    result = promtool("check", "rules", "dbgrelay.rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 rules found" in result.stdout


def test_alerts_fire_when_they_should():
    # The rule tests feed series to the rules and compare the alerts that fire,
    # with their labels and rendered annotations.
    result = promtool("test", "rules", "dbgrelay.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule.

    The rule file is YAML, and PyYAML is not a dependency, so this relies on
    the file's simple layout: one ``- alert:`` item per rule, ``expr:`` on
    one line.  promtool has already checked the file is valid.
    """
    blocks = re.split(r"^\s*- alert:\s*", RULES.read_text(), flags=re.MULTILINE)[1:]
    return {block.split(None, 1)[0]: block for block in blocks}


def test_rule_expressions_use_only_metrics_the_relay_exports():
    known = Metrics(version="test").metric_names()
    used: set[str] = set()
    for block in alert_blocks().values():
        [expr] = re.findall(r"^\s*expr:\s*(.+)$", block, flags=re.MULTILINE)
        used |= set(METRIC_NAME.findall(expr))
    assert used >= {
        "dbgrelay_forgotten_servers",
        "dbgrelay_auth_failures_total",
        "dbgrelay_backend_up",
        "dbgrelay_audit_write_errors_total",
        "dbgrelay_accept_paused",
    }
    assert used - known == set()


def test_every_alert_explains_itself():
    alerts = alert_blocks()
    assert set(alerts) == {
        "DbgrelayDown",
        "DbgrelayForgottenServer",
        "DbgrelayAuthFailureSpike",
        "DbgrelayBackendDown",
        "DbgrelayAuditWriteErrors",
        "DbgrelayAcceptPaused",
    }
    for name, block in alerts.items():
        assert re.search(r"^\s*summary: \S", block, flags=re.MULTILINE), name
        assert re.search(r"^\s*description: \S", block, flags=re.MULTILINE), name
        assert re.search(r"^\s*severity: (warning|critical)$", block, flags=re.MULTILINE), name
