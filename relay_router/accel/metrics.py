"""Metrics and status of accelerated routes: the spool's fill and states, delivery outcomes.

Read at scrape time from the spool (one pass over its index) and from the
delivery pools' counters. Labels are fixed vocabularies (entry states,
outcomes) and route names from the router's own configuration: never a title
a peer chose, never patient data.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from relay_router.accel.spool import EntryState, read_entries

if TYPE_CHECKING:
    from relay_router.accel.spool import Spool

__all__ = ["DeliveryStats", "SpoolCollector", "register_accel_metrics", "spool_status"]

OUTCOMES = ("delivered", "retry", "dead")


class DeliveryStats:
    """Counters the delivery pools increase from their worker threads (thread-safe, only ever grow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (route, outcome)
        self.association_failures: Counter[str] = Counter()  # route

    def outcome(self, route: str, outcome: str) -> None:
        with self._lock:
            self.outcomes[(route, str(outcome))] += 1

    def association_failed(self, route: str) -> None:
        with self._lock:
            self.association_failures[route] += 1

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        with self._lock:
            return dict(self.outcomes), dict(self.association_failures)


class SpoolCollector(Collector):
    """relay_router_spool_* and relay_router_accel_* families, read when Prometheus scrapes."""

    def __init__(
        self, spool: Callable[[], Spool | None], stats: DeliveryStats, routes: Callable[[], list[str]]
    ) -> None:
        self.spool = spool
        self.stats = stats
        self.routes = routes  # the configured accelerated routes: every label exists from the start

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        spool = self.spool()
        # Without a spool (no accelerated route) the families exist with zeros, as every label does.
        used, limit, counts = spool.usage() if spool is not None else (0, 0, dict.fromkeys(EntryState, 0))
        entries = GaugeMetricFamily(
            "relay_router_spool_entries", "Instances in the accelerated routes' spool, by state", labels=["state"]
        )
        for state in EntryState:
            entries.add_metric([str(state)], counts[state])
        yield entries
        yield GaugeMetricFamily(
            "relay_router_spool_bytes", "Bytes held by the spool (committed and being received)", value=used
        )
        yield GaugeMetricFamily(
            "relay_router_spool_max_bytes", "The spool's limit ([accelerate] spool_max_bytes)", value=limit
        )
        outcomes, failures = self.stats.snapshot()
        routes = sorted(set(self.routes()) | {route for route, _ in outcomes} | set(failures))
        deliveries = CounterMetricFamily(
            "relay_router_accel_deliveries",
            "Delivery attempts of spooled instances to their destination, by route and outcome "
            "(delivered; retry: a transient failure, tried again later; "
            "dead: a permanent failure or too many attempts)",
            labels=["route", "outcome"],
        )
        refused = CounterMetricFamily(
            "relay_router_accel_association_failures",
            "Associations the delivery pool could not open to the destination (refused, rejected, unreachable)",
            labels=["route"],
        )
        for route in routes:
            for outcome in OUTCOMES:
                deliveries.add_metric([route, outcome], outcomes.get((route, outcome), 0))
            refused.add_metric([route], failures.get(route, 0))
        yield deliveries
        yield refused


_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, SpoolCollector] = weakref.WeakKeyDictionary()


def register_accel_metrics(
    registry: CollectorRegistry,
    spool: Callable[[], Spool | None],
    stats: DeliveryStats,
    routes: Callable[[], list[str]] = list,
) -> SpoolCollector:
    """Add the spool and delivery families to the router's registry.

    RouterMetrics registers them at once (zeros until accelerated routes run); whoever runs the spool
    calls this again with the real sources, which replaces them: a registry never gets the families twice.
    """
    collector = _REGISTERED.get(registry)
    if collector is not None:
        collector.spool, collector.stats, collector.routes = spool, stats, routes
        return collector
    collector = SpoolCollector(spool, stats, routes)
    registry.register(collector)
    _REGISTERED[registry] = collector
    return collector


def spool_status(root: Path, max_bytes: int | None = None, *, dead_listed: int = 20) -> dict[str, object]:
    """The spool as `relay-router status` shows it, read from disk (the router need not be running)."""
    entries = read_entries(root)
    counts = {str(state): 0 for state in EntryState}
    for entry in entries:
        counts[str(entry.state)] += 1
    dead = [e for e in entries if e.state is EntryState.DEAD]
    return {
        "dir": str(root),
        "bytes_used": sum(e.size for e in entries),
        "max_bytes": max_bytes,
        "entries": counts,
        "dead": [
            {
                "id": e.id,
                "route": e.route,
                "sop_instance_uid": e.sop_instance_uid,
                "attempts": e.attempts,
                "error": e.last_error,
            }
            for e in dead[:dead_listed]
        ],
    }
