"""The shipped alert rules and dashboard: promtool checks the rules and runs their unit tests; the
dashboard's PromQL is checked by promtool too (as recording rules), and its layout by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from tests.support.monitoring import ALERTS, ALERTS_TEST, DASHBOARD, dashboard_expressions, rule_expressions


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing (Debian package prometheus: apt-get install prometheus, or make system-deps)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        series = [s["series"] for s in case["input_series"]]
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            alerts = check.get("exp_alerts") or []
            if alerts:
                firing.add(name)
            # Quiet: an evaluation expecting nothing, or input series that the expected alerts leave out.
            if not alerts or len(alerts) < len(series):
                quiet.add(name)
    rules = set(rule_expressions())
    assert rules - firing == set(), "rules never shown firing"
    assert rules - quiet == set(), "rules never shown staying quiet"


def test_alerts_say_what_to_do() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40, rule["alert"]


def test_certificate_alert_threshold_is_21_days() -> None:
    expr = rule_expressions()["DicomRelayCertificateExpiresSoon"]
    assert expr.count("< 21 * 86400") == 2 and "relay_bridge_" in expr and "relay_router_" in expr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # Grafana variables are replaced as Grafana would expand them; promtool then parses every query.
    records = []
    for i, expr in enumerate(dashboard_expressions().values()):
        if expr.startswith("label_values("):
            continue
        expr = expr.replace("$__rate_interval", "5m").replace("$router", ".*").replace("$bridge", ".*")
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = run(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisioning_ready() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "dicom-relay" and "id" not in dashboard  # Grafana assigns ids on import
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    provisioning = Path(DASHBOARD).parent / "provisioning" / "dashboards" / "dicom-relay.yaml"
    provider = yaml.safe_load(provisioning.read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
