"""docs/operations.md and docs/configuration.md agree with what the programs do."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.ops.helpers import FakeService, router_config

REPO = Path(__file__).resolve().parents[3]
OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def exported(registry: object) -> tuple[set[str], set[str]]:
    """(family names, sample names) of the relay_* metrics in a registry."""
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))  # type: ignore[arg-type]
    names = {f.name for f in families if f.name.startswith("relay_")}
    samples = {s.name for f in families for s in f.samples if s.name.startswith("relay_")}
    return names, samples


def registries(tmp_path: Path) -> list[object]:
    from relay_bridge.config import BridgeConfig, ServerSection
    from relay_bridge.directory import Directory
    from relay_bridge.server import RelayServicer

    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), Directory(":memory:"))
    return [FakeService(router_config(tmp_path)).metrics.registry, servicer.metrics.registry]


def test_every_metric_in_the_docs_exists_and_every_metric_is_documented(tmp_path: Path) -> None:
    families: set[str] = set()
    samples: set[str] = set()
    for registry in registries(tmp_path):
        f, s = exported(registry)
        families |= f
        samples |= s
    documented = set(re.findall(r"`(relay_(?:router|bridge)_[a-z_]+)`", OPERATIONS))
    assert documented, "no metric names found in docs/operations.md"
    unknown = {name for name in documented if name not in families | samples}
    assert not unknown, f"documented but not exported: {sorted(unknown)}"
    for family in families:
        assert any(name == family or name.startswith(family + "_") for name in documented), family


def test_the_install_procedure_uses_options_the_script_has() -> None:
    script = (REPO / "deploy" / "install.sh").read_text()
    assert "deploy/install.sh router" in OPERATIONS
    for option in re.findall(r"install\.sh[^\n`]*?(--[a-z]+)", OPERATIONS):
        assert f"{option})" in script or f"{option}=" in script, option
    for section in ("## Install as a service", "## Upgrade", "## Backup of the bridge database", "## Key rotation",
                    "## Monitoring", "## Troubleshooting by symptom"):  # fmt: skip
        assert section in OPERATIONS


def test_configuration_reference_has_the_metrics_section() -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert reference.count("### `[metrics]`") == 2
    assert '"127.0.0.1:9464"' in reference and '"127.0.0.1:9465"' in reference
    assert "relay-router -c F status" in reference and "relay-bridge -c F status" in reference
