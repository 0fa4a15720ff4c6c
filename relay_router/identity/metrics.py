"""Prometheus series of the patient identity sources, read from the running resolver at each scrape.

    relay_router_identity_lookups_total{result, cached}     lookups answered (mapped, unmapped, unavailable)
    relay_router_identity_source_skips_total{source, reason} a source skipped: down, slow, a bad answer
    relay_router_identity_adt_messages_total{ack}           ADT feed messages answered (AA, AE, AR)
    relay_router_identity_cache_entries                     cached lookups

Labels are fixed vocabularies and the source names of router.toml: never an identifier.
The router's identity runtime is found at `owner.identity.runtime` (the service's wiring); without
one every series is 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from relay_router.identity.resolver import SKIP_REASONS

RESULTS = ("mapped", "unmapped", "unavailable")
ACKS = ("AA", "AE", "AR")


class IdentityCollector(Collector):
    def __init__(self, owner: object) -> None:
        self.owner = owner

    def _runtime(self) -> Any:
        return getattr(getattr(self.owner, "identity", None), "runtime", None)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        runtime = self._runtime()
        resolver = getattr(runtime, "resolver", None)
        adt = getattr(runtime, "adt", None)
        lookups = CounterMetricFamily(
            "relay_router_identity_lookups",
            "Patient identity lookups, by result (mapped, unmapped, unavailable: no source answered) and whether "
            "the answer came from the cache",
            labels=["result", "cached"],
        )
        counts = resolver.lookups if resolver is not None else {}
        for result in RESULTS:
            for cached in (False, True):
                lookups.add_metric([result, str(cached).lower()], counts.get((result, cached), 0))
        yield lookups
        skips = CounterMetricFamily(
            "relay_router_identity_source_skips",
            "Mapping sources skipped during a lookup (down, slower than timeout_s, an unusable answer), by source "
            "name and reason",
            labels=["source", "reason"],
        )
        if resolver is not None:
            # Every configured source and reason from the start, so that rate() and alerts see 0, not nothing.
            known = {(source.name, reason): 0 for source in resolver.sources for reason in SKIP_REASONS}
            for (source, reason), count in sorted((known | dict(resolver.skips)).items()):
                skips.add_metric([source, reason], count)
        yield skips
        acks = CounterMetricFamily(
            "relay_router_identity_adt_messages",
            "ADT feed messages answered, by acknowledgement code (AA applied or ignored, AE not applied, AR refused)",
            labels=["ack"],
        )
        answered = adt.processor.acks if adt is not None else {}
        for ack in ACKS:
            acks.add_metric([ack], answered.get(ack, 0))
        yield acks
        size = len(resolver._cache) if resolver is not None else 0
        yield GaugeMetricFamily("relay_router_identity_cache_entries", "Patient identity lookups cached", value=size)
