"""Small fakes for the ops tests: a router service without sockets, a prometheus text parser."""

from __future__ import annotations

import types
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay_common.config import parse_config
from relay_router.config import RouterConfig
from relay_router.metrics import RouterMetrics
from relay_router.spill import SpillState
from relay_router.tunnel import DirectoryEntry

ROUTER = {
    "router": {"name": "hospital-a", "state_dir": "state"},
    "bridge": {"address": "bridge.example.org:443", "insecure": True, "password": "correct horse battery"},
    "shared": [{"ae_title": "WS_A", "host": "10.1.0.31", "port": 11113, "share_with": ["hospital-b"]}],
    "remote": [
        {"ae_title": "PACS_B", "site": "hospital-b", "remote_ae_title": "ORTHANC"},
        {"ae_title": "CT_C", "site": "hospital-c"},
    ],
}


def router_config(tmp_path: Path, **sections: object) -> RouterConfig:
    return parse_config({**ROUTER, **sections}, RouterConfig, base_dir=tmp_path)


class FakeService:
    """What RouterMetrics and status_extra read from a RouterService."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.link = types.SimpleNamespace(
            connected=True,
            connected_since=1_700_000_000.0,
            reconnects=2,
            last_error=None,
            directory=[
                DirectoryEntry("hospital-b", "ORTHANC", "main archive", True),
                DirectoryEntry("hospital-c", "CT_C", "", False),
            ],
        )
        self.active: dict[str, object] = {}
        self.relays: set[object] = set()
        self.status_file: Path | None = None
        self.spill = SpillState()
        self.metrics = RouterMetrics(self)  # type: ignore[arg-type]


def samples(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a registry as {(name, sorted labels): value}, through the text exposition."""
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):  # type: ignore[arg-type]
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
