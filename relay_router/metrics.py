"""The router's Prometheus metrics and its recent-activity summary.

`RouterService` creates one `RouterMetrics` and calls `finished(outcome)` for
every association it ends (both directions, including refusals) and
`relay_finished(relay)` when a relayed association's driver returns. Bytes and
frames of associations still running are brought up to date before every
scrape, so a long transfer shows up while it runs; counters only ever grow.

Labels use fixed vocabularies only (direction, result, reason) and, for the
route gauge, the AE titles configured in [[remote]] and their site names:
never a title a remote party chose, never patient data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from relay_common.audit import AuditExportCollector
from relay_common.certmetrics import register_certificates, router_certificate_files
from relay_common.errors import Reason
from relay_common.metrics import SETUP_BUCKETS, MetricsServer, RecentWindow, never_raises, new_registry, package_version
from relay_router.accel.commitment import register_commitment_metrics
from relay_router.accel.metrics import DeliveryStats, register_accel_metrics
from relay_router.accel.move_metrics import register_move_metrics
from relay_router.outcome import Result

if TYPE_CHECKING:
    from relay_router.association import RelayedAssociation
    from relay_router.outcome import Outcome
    from relay_router.service import RouterService

DIRECTIONS = ("outbound", "inbound")
RESULTS = ("released", "closed", "aborted", "rejected", "refused")
BYTE_DIRECTIONS = ("to_remote", "to_local")

# The refusal reasons a label may carry (relay_common.errors.Reason values), all exported from the start.
REFUSAL_REASONS: tuple[str, ...] = tuple(
    str(r)
    for r in (
        Reason.SECURITY,
        Reason.UNKNOWN_CALLED_AE,
        Reason.ROUTER_LIMIT,
        Reason.BRIDGE_UNREACHABLE,
        Reason.UNKNOWN_IDENTITY,
        Reason.UNKNOWN_DEVICE,
        Reason.NOT_PERMITTED,
        Reason.SITE_OFFLINE,
        Reason.TIMEOUT,
        Reason.OVERLOADED,
        Reason.DEVICE_UNREACHABLE,
        Reason.DEVICE_REJECTED,
        Reason.UNKNOWN_CALLING_AE,
        Reason.INBOUND_LIMIT,
        Reason.REQUEST_TOO_LARGE,
        Reason.PEER_UNAPPROVED,
        Reason.OTHER,
    )
)
REFUSAL_RESULTS = (Result.REJECTED, Result.REFUSED)


def refusal_reason(outcome: Outcome) -> str | None:
    """A bounded label for why an association was refused or rejected; None if it was not.

    Read from the typed outcome, never from its detail: a security event is
    "security" whatever its reason; a rejection the relay did not decide (no
    reason) is the called device's own A-ASSOCIATE-RJ.
    """
    if outcome.result not in REFUSAL_RESULTS:
        return None
    if outcome.security:
        return str(Reason.SECURITY)
    if outcome.reason is None:
        return str(Reason.DEVICE_REJECTED if outcome.result == Result.REJECTED else Reason.OTHER)
    return str(outcome.reason) if outcome.reason in REFUSAL_REASONS else str(Reason.OTHER)


class _LinkCollector(Collector):
    """State read from the service at scrape time: the bridge link and the configured routes."""

    def __init__(self, service: RouterService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        link = self.service.link
        yield GaugeMetricFamily(
            "relay_router_bridge_connected", "1 while the router is signed on to the bridge", value=int(link.connected)
        )
        since = GaugeMetricFamily(
            "relay_router_bridge_connected_since_seconds",
            "Unix time of the current sign-on to the bridge (absent while not signed on)",
        )
        if link.connected_since is not None:
            since.add_metric([], link.connected_since)
        yield since
        yield CounterMetricFamily(
            "relay_router_bridge_reconnects",
            "Attempts to reconnect to the bridge after the control stream ended or failed",
            value=link.reconnects,
        )
        online = {(e.site, e.ae_title) for e in link.directory if e.online}
        known = {(e.site, e.ae_title) for e in link.directory}
        route = GaugeMetricFamily(
            "relay_router_remote_device_online",
            "1 if the [[remote]] device behind this local AE title is online at its site, 0 if not "
            "(or not in this router's directory)",
            labels=["ae_title", "site"],
        )
        for remote in self.service.config.remote:
            key = (remote.site, remote.target)
            route.add_metric([remote.ae_title, remote.site], float(key in online and key in known))
        yield route


class _SpillCollector(Collector):
    """The cloud spill's counters (the RouterService's SpillState), read at scrape time."""

    def __init__(self, service: RouterService) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.service.spill.stats

        def by_direction(name: str, documentation: str, sent: int, received: int) -> CounterMetricFamily:
            family = CounterMetricFamily(name, documentation, labels=["direction"])
            family.add_metric(["sent"], sent)
            family.add_metric(["received"], received)
            return family

        yield by_direction(
            "relay_router_spill_datasets",
            "Data sets that travelled through the blob store: sent (spilled by this router) and received "
            "(fetched, verified and delivered to a local device)",
            stats.blobs_sent,
            stats.blobs_received,
        )
        yield by_direction(
            "relay_router_spill_bytes",
            "DICOM Upper Layer bytes that travelled through the blob store instead of the bridge "
            "(sent: spilled from local devices; received: delivered to local devices from blobs)",
            stats.bytes_spilled,
            stats.bytes_received,
        )
        yield by_direction(
            "relay_router_spill_store_bytes",
            "Bytes uploaded to (sent) and downloaded from (received) the blob store: sealed, maybe compressed parts",
            stats.stored_bytes_sent,
            stats.stored_bytes_received,
        )
        yield by_direction(
            "relay_router_spill_parts",
            "Blob parts stored (sent) and fetched and verified (received)",
            stats.parts_sent,
            stats.parts_received,
        )
        yield CounterMetricFamily(
            "relay_router_spill_fallbacks",
            "Data sets above the spill threshold sent inline because the blob store could not be used",
            value=stats.fallbacks,
        )
        yield by_direction(
            "relay_router_spill_failures",
            "Blobs that failed after the spill began, each aborting its association (sent: the store failed "
            "after parts were stored; received: a part could not be fetched or did not verify)",
            stats.send_failures,
            stats.receive_failures,
        )


class RouterMetrics:
    def __init__(self, service: RouterService) -> None:
        self.service = service
        self.registry = registry = new_registry()
        self.associations = Counter(
            "relay_router_associations",
            "Associations ended, by direction (outbound: a local device called out; inbound: another site "
            "called a shared device) and result",
            ["direction", "result"],
            registry=registry,
        )
        self.bytes = Counter(
            "relay_router_relayed_bytes",
            "DICOM Upper Layer bytes relayed: to_remote (read from local devices, sent towards the other site) "
            "and to_local (written to local devices)",
            ["direction"],
            registry=registry,
        )
        self.frames = Counter(
            "relay_router_frames",
            "Data frames exchanged with the bridge: to_remote (sent) and to_local (received)",
            ["direction"],
            registry=registry,
        )
        self.refusals = Counter(
            "relay_router_refusals",
            "Associations refused or rejected, by reason (device_rejected: the called device answered A-ASSOCIATE-RJ)",
            ["reason"],
            registry=registry,
        )
        self.setup = Histogram(
            "relay_router_association_setup_seconds",
            "Time from the start of an association (local TCP connection, or the bridge's notice for inbound) "
            "to the called device's A-ASSOCIATE-AC",
            ["direction"],
            buckets=SETUP_BUCKETS,
            registry=registry,
        )
        active = Gauge("relay_router_active_associations", "Associations in progress", registry=registry)
        active.set_function(lambda: len(service.active))
        Info("relay_router", "This router", registry=registry).info(
            {"site": service.config.router.name, "version": package_version()}
        )
        registry.register(_LinkCollector(service))
        from relay_router.identity.metrics import IdentityCollector  # patient identity sources (issue 14)

        registry.register(IdentityCollector(service))
        from relay_router.identity.wiring import CoercionCollector  # patient identity coercion (issue 14)

        registry.register(CoercionCollector(service))
        registry.register(_SpillCollector(service))
        register_certificates(registry, "relay_router", router_certificate_files(service.config))
        registry.register(AuditExportCollector(service, "relay_router"))  # audit export (relay_common.audit)
        # Accelerated routes: the spool (`service.spool` once accelerated routes run) and the delivery pools'
        # counters (pools are given `metrics.accel` as their `stats`).
        self.accel_stats = DeliveryStats()
        register_accel_metrics(registry, lambda: getattr(service, "spool", None), self.accel_stats)
        register_commitment_metrics(registry, lambda: None)  # storage commitment: zeros until accelerated routes run
        # Held C-MOVE final responses (relay_router.accel.moves), read from the running accelerated routes.
        register_move_metrics(registry, lambda: getattr(getattr(service, "accel", None), "moves", None))
        for direction in DIRECTIONS:
            for result in RESULTS:
                self.associations.labels(direction, result)
            self.setup.labels(direction)
        for direction in BYTE_DIRECTIONS:
            self.bytes.labels(direction)
            self.frames.labels(direction)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        # Bytes, frames and setups already counted for associations still running.
        self._bytes_seen: dict[str, tuple[int, int]] = {}
        self._frames_seen: dict[str, tuple[int, int]] = {}
        self._setup_seen: set[str] = set()
        self.recent = RecentWindow()
        self.server = MetricsServer(registry, before_scrape=self.refresh)

    # -- hooks called by RouterService ----------------------------------------------
    @never_raises
    def finished(self, outcome: Outcome) -> None:
        """An association ended (called after it left `service.active`)."""
        self._count_bytes(outcome)
        self._bytes_seen.pop(outcome.association_id, None)
        self._count_setup(outcome)
        self._setup_seen.discard(outcome.association_id)
        direction = outcome.direction if outcome.direction in DIRECTIONS else "outbound"
        self.associations.labels(direction, outcome.result).inc()
        reason = refusal_reason(outcome)
        if reason is not None:
            self.refusals.labels(reason).inc()
        ended = outcome.ended or time.time()
        self.recent.add(
            outcome.result,
            {
                "time": round(ended, 3),
                "association": outcome.association_id,
                "direction": outcome.direction,
                "site": outcome.site,
                "calling_ae": outcome.calling_ae,
                "called_ae": outcome.called_ae,
                "result": outcome.result,
                "reason": reason,
                "bytes_to_remote": outcome.bytes_to_remote,
                "bytes_to_local": outcome.bytes_to_local,
                "seconds": round(ended - outcome.started, 3),
                "detail": outcome.detail,
            },
            at=ended,
        )

    @never_raises
    def relay_finished(self, relay: RelayedAssociation) -> None:
        """A relayed association's driver returned: count its last frames."""
        self._count_frames(relay)
        self._frames_seen.pop(relay.outcome.association_id, None)

    # -- scrape-time refresh -------------------------------------------------------
    def refresh(self) -> None:
        """Count the bytes, frames and setups of associations still in progress."""
        for outcome in list(self.service.active.values()):
            self._count_bytes(outcome)
            self._count_setup(outcome)
        for relay in list(self.service.relays):
            self._count_frames(relay)

    def _count_bytes(self, outcome: Outcome) -> None:
        aid = outcome.association_id
        before_remote, before_local = self._bytes_seen.get(aid, (0, 0))
        now_remote, now_local = outcome.bytes_to_remote, outcome.bytes_to_local
        if now_remote > before_remote:
            self.bytes.labels("to_remote").inc(now_remote - before_remote)
        if now_local > before_local:
            self.bytes.labels("to_local").inc(now_local - before_local)
        self._bytes_seen[aid] = (max(now_remote, before_remote), max(now_local, before_local))

    def _count_frames(self, relay: RelayedAssociation) -> None:
        # The sequence numbers are the frame counts: each direction numbers its Data frames from 0.
        aid = relay.outcome.association_id
        sent, received = relay.frames_sent, relay.frames_received
        before_sent, before_received = self._frames_seen.get(aid, (0, 0))
        if sent > before_sent:
            self.frames.labels("to_remote").inc(sent - before_sent)
        if received > before_received:
            self.frames.labels("to_local").inc(received - before_received)
        self._frames_seen[aid] = (max(sent, before_sent), max(received, before_received))

    def _count_setup(self, outcome: Outcome) -> None:
        established = getattr(outcome, "established", None)
        if established is None or outcome.association_id in self._setup_seen:
            return
        self._setup_seen.add(outcome.association_id)
        direction = outcome.direction if outcome.direction in DIRECTIONS else "outbound"
        self.setup.labels(direction).observe(max(0.0, established - outcome.started))

    # -- serving and status ----------------------------------------------------------
    async def start(self, listen: str) -> None:
        await self.server.start(listen)

    async def stop(self) -> None:
        await self.server.stop()

    def status(self) -> dict[str, object]:
        return {
            "recent": self.recent.summary(),
            "metrics": {"listen": self.server.address, "error": self.server.error},
        }
