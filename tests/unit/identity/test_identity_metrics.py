"""The identity series: lookups, skips by source and reason, ADT answers, cache size."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from relay_router.identity.metrics import IdentityCollector
from relay_router.identity.model import PatientRef
from relay_router.identity.resolver import SKIP_REASONS, MemorySource, Resolver, SourceUnavailable

A, B = "HOSP_A", "HOSP_B"


class Down:
    name, timeout_s = "mpi", 1.0

    async def lookup(self, ref: PatientRef, target: str, *, dataset: object = None) -> object:
        raise SourceUnavailable("connection-failed", "127.0.0.1:1")


def scrape(owner: object) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(IdentityCollector(owner))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("relay_router_identity"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_counts_lookups_skips_and_cache() -> None:
    resolver = Resolver([Down(), MemorySource([(PatientRef("1", A), PatientRef("9", B))], name="table")])
    owner = SimpleNamespace(identity=SimpleNamespace(runtime=SimpleNamespace(resolver=resolver, adt=None)))
    await resolver.lookup(PatientRef("1", A), B)  # mpi skipped, table maps (not cached: a source was skipped)
    await resolver.lookup(PatientRef("2", A), B)
    samples = scrape(owner)
    assert samples['relay_router_identity_lookups_total{cached="false",result="mapped"}'] == 1
    assert samples['relay_router_identity_lookups_total{cached="false",result="unmapped"}'] == 1
    assert samples['relay_router_identity_source_skips_total{reason="connection-failed",source="mpi"}'] == 2
    assert samples['relay_router_identity_source_skips_total{reason="timeout",source="table"}'] == 0  # from the start
    assert samples['relay_router_identity_adt_messages_total{ack="AA"}'] == 0
    assert samples["relay_router_identity_cache_entries"] == 0


def test_without_identity_every_series_is_zero() -> None:
    samples = scrape(SimpleNamespace())
    assert samples['relay_router_identity_lookups_total{cached="true",result="mapped"}'] == 0
    assert not [name for name in samples if "source_skips" in name]


def test_every_reason_a_source_can_give_is_in_the_vocabulary() -> None:
    package = Path(__file__).resolve().parents[3] / "relay_router" / "identity"
    text = "\n".join(p.read_text() for p in package.glob("*.py"))
    given = set(re.findall(r'SourceUnavailable\(\s*"([a-z-]+)"', text))
    for pair in re.findall(r'reason = "([a-z-]+)" if [^\n]* else "([a-z-]+)"', text):
        given |= set(pair)
    assert given and given <= set(SKIP_REASONS), given - set(SKIP_REASONS)
