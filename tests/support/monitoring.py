"""What the shipped dashboard and alert rules refer to: metric names and label values in their PromQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dicom-relay.json"
METRIC = re.compile(r"\b(relay_(?:bridge|router)_[a-z_]+)\b")
LABEL_MATCH = re.compile(r'\b(reason|direction|outcome|result|role|method)\s*(?:=|!=|=~|!~)\s*"([^"]*)"')


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for group in rules["groups"] for r in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = variable["definition"]
    return found


def metric_names(expressions: dict[str, str]) -> dict[str, set[str]]:
    """metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    for where, expr in expressions.items():
        for name in METRIC.findall(expr):
            used.setdefault(name, set()).add(where)
    return used


def label_values(expressions: dict[str, str]) -> dict[tuple[str, str], set[str]]:
    """(label, value) -> where it is matched; regex alternatives are split on '|'."""
    used: dict[tuple[str, str], set[str]] = {}
    for where, expr in expressions.items():
        for label, values in LABEL_MATCH.findall(expr):
            for value in values.split("|"):
                if value and value != ".*":
                    used.setdefault((label, value), set()).add(where)
    return used
