"""The dashboard and the alert rules refer only to metrics (and label values) that a running bridge and
running routers really export: a renamed metric breaks this test, not a dashboard in a hospital."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.support.monitoring import dashboard_expressions, label_values, metric_names, rule_expressions

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"


def scrape(address: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_dashboard_and_alerts_use_only_exported_metrics(tmp_path: Path) -> None:
    net = LocalRelayNetwork(tmp_path / "net").start(bridge=False)
    with (net.workdir / "bridge.toml").open("a") as out:
        out.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    try:
        net.start_bridge()
        net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, 11112, ["site-a"])], metrics_listen="127.0.0.1:0")
        net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], metrics_listen="127.0.0.1:0")
        net.wait_connected()
        bridge_status = json.loads(Path(f"{net.workdir / 'bridge.sqlite3'}.status.json").read_text())
        addresses = [bridge_status["metrics"]["listen"]] + [
            net.status(site)["metrics"]["listen"] for site in ("site-a", "site-b")
        ]
        samples = [s for address in addresses for s in scrape(address)]
    finally:
        net.stop()

    exported = {name for name, _, _ in samples}
    values = {(label, value) for _, labels, _ in samples for label, value in labels.items()}
    used = {**rule_expressions(), **dashboard_expressions()}
    names = metric_names(used)
    assert len(names) > 30, sorted(names)  # the extraction works
    missing = {name: sorted(where) for name, where in names.items() if name not in exported}
    assert missing == {}, f"used but not exported: {missing}"
    unknown = {f"{label}={value}": sorted(where) for (label, value), where in label_values(used).items()}
    unknown = {k: v for k, v in unknown.items() if tuple(k.split("=", 1)) not in values}
    assert unknown == {}, f"label values matched but never exported: {unknown}"

    # The certificate expiry metrics carry real dates: the bridge's server certificate and the CA the routers trust.
    expiry = {
        (name, labels["role"]): value
        for name, labels, value in samples
        if name.endswith("_certificate_expiry_timestamp_seconds")
    }
    assert expiry[("relay_bridge_certificate_expiry_timestamp_seconds", "server")] > time.time() + 21 * 86400
    assert expiry[("relay_router_certificate_expiry_timestamp_seconds", "bridge_ca")] > time.time() + 21 * 86400
