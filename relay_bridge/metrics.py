"""The bridge's Prometheus metrics and its recent-activity summary.

`BridgeState` creates one `BridgeMetrics`; the services call it at sign-on
(success or failure, labelled by the refusal's type), at every refusal it sends, when an association is spliced (the
destination router joined) and when a splice closes. Bytes and frames of
associations still running are brought up to date before every scrape.

Labels: router (site) names, which are the bridge's own accounts, and fixed
vocabularies. Never AE titles, never patient data (the bridge sees none).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.admission import SignOnFailure
from relay_common.audit import AuditExportCollector
from relay_common.certmetrics import bridge_certificate_files, register_certificates
from relay_common.metrics import SETUP_BUCKETS, MetricsServer, RecentWindow, never_raises, new_registry, package_version

if TYPE_CHECKING:
    from relay_bridge.splice import Splice
    from relay_bridge.state import BridgeState

OUTCOMES = ("relayed", "refused", "abandoned")
REFUSAL_REASONS = tuple(
    name.lower() for name, number in pb.Refused.Reason.items() if number != 0 and not name.endswith("UNSPECIFIED")
)
BYTE_DIRECTIONS = ("from_initiator", "from_destination")
# Why a sign-on failed: the labels are relay_bridge.admission.SignOnFailure's values.
SIGN_ON_REASONS = tuple(failure.value for failure in SignOnFailure)


def refusal_label(reason: int) -> str:
    try:
        return pb.Refused.Reason.Name(reason).lower()
    except ValueError:
        return "other"


class _SessionCollector(Collector):
    """Per-account state, read at scrape time: which routers are signed on."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sessions = dict(self.state.sessions)
        signed_on = GaugeMetricFamily(
            "relay_bridge_router_signed_on",
            "1 while the router (account) is signed on, 0 otherwise; every account is listed",
            labels=["site"],
        )
        active = GaugeMetricFamily(
            "relay_bridge_router_active_associations",
            "Associations in progress in which the router takes part (either end)",
            labels=["site"],
        )
        # The accounts as last read off the loop (the status writer reads them every second): a scrape
        # runs on the event loop and must not wait for the database.
        accounts = {r.name: r for r in self.state.directory.known_routers}
        for name in sorted(set(accounts) | set(sessions)):
            session = sessions.get(name)
            signed_on.add_metric([name], float(session is not None))
            active.add_metric([name], float(len(session.associations) if session is not None else 0))
        yield signed_on
        yield active


class _SpillCollector(Collector):
    """The cloud spill's broker counters (relay_bridge.blobs.BlobBroker), read at scrape time."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily]:
        broker = self.state.blobs  # None when spill is off
        slots = CounterMetricFamily(
            "relay_bridge_spill_blob_slots",
            "Presigned blob-part URLs issued to routers, by method (put: upload, get: download)",
            labels=["method"],
        )
        served = CounterMetricFamily(
            "relay_bridge_spill_served_bytes",
            "Blob-part bytes the bridge itself stored (PutBlobPart) or fetched (GetBlobPart) for routers; "
            "only a file:// store is served by the bridge (S3 and GCS are reached directly)",
            labels=["direction"],
        )
        for method in ("put", "get"):
            slots.add_metric([method], broker.slots[method] if broker is not None else 0)
        for direction in ("stored", "fetched"):
            served.add_metric([direction], broker.served[direction] if broker is not None else 0)
        yield slots
        yield served


class BridgeMetrics:
    def __init__(self, state: BridgeState) -> None:
        self.state = state
        self.registry = registry = new_registry()
        self.associations = Counter(
            "relay_bridge_associations",
            "Associations opened through the bridge, by outcome: relayed (the destination joined), refused "
            "(the bridge answered Refused), abandoned (the caller left before the destination joined)",
            ["outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "relay_bridge_refusals", "Refused answers sent by the bridge, by reason", ["reason"], registry=registry
        )
        self.bytes = Counter(
            "relay_bridge_relayed_bytes",
            "Serialized frame bytes forwarded, by the side that sent them",
            ["direction"],
            registry=registry,
        )
        self.frames = Counter("relay_bridge_frames", "Frames forwarded between routers", registry=registry)
        self.sign_ons = Counter("relay_bridge_sign_ons", "Successful router sign-ons", registry=registry)
        self.sign_on_failures = Counter(
            "relay_bridge_sign_on_failures", "Refused router sign-ons, by reason", ["reason"], registry=registry
        )
        self.setup = Histogram(
            "relay_bridge_association_setup_seconds",
            "Time from a router's Open to the destination router's Join",
            buckets=SETUP_BUCKETS,
            registry=registry,
        )
        Gauge("relay_bridge_active_associations", "Associations in progress", registry=registry).set_function(
            lambda: len(state.splices)
        )
        Gauge("relay_bridge_signed_on_routers", "Routers signed on now", registry=registry).set_function(
            lambda: len(state.sessions)
        )
        # The replica's id labels this process's series in a cluster (join on it; docs/high-availability.md).
        Info("relay_bridge", "This bridge", registry=registry).info(
            {"version": package_version(), "replica": state.replica_id}
        )
        Gauge("relay_bridge_draining", "1 while this replica drains (SIGTERM)", registry=registry).set_function(
            lambda: float(state.draining)
        )
        registry.register(_SessionCollector(state))
        registry.register(_SpillCollector(state))
        register_certificates(registry, "relay_bridge", bridge_certificate_files(state.config))
        registry.register(AuditExportCollector(state, "relay_bridge"))  # audit export (relay_common.audit)
        for outcome in OUTCOMES:
            self.associations.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for direction in BYTE_DIRECTIONS:
            self.bytes.labels(direction)
        for reason in SIGN_ON_REASONS:
            self.sign_on_failures.labels(reason)
        self._seen: dict[str, tuple[int, int, int]] = {}  # association -> bytes and frames already counted
        self._refused: set[str] = set()
        self.recent = RecentWindow()
        # Load balancers' HTTP health checks (docs/high-availability.md, "Health checks"): /readyz answers 503
        # from the first moment of a drain, so `http-check expect status 200` fails at once instead of at a
        # timeout; /livez says only that the process serves.
        probes = {"/readyz": self.readiness, "/livez": lambda: ("200 OK", b"live\n")}
        self.server = MetricsServer(registry, before_scrape=self.refresh, probes=probes)

    # -- hooks called by the services ---------------------------------------------
    @never_raises
    def signed_on(self) -> None:
        self.sign_ons.inc()

    @never_raises
    def sign_on_failed(self, failure: SignOnFailure) -> None:
        self.sign_on_failures.labels(failure.value).inc()

    @never_raises
    def refused(self, reason: int, association_id: str, detail: str = "") -> None:
        label = refusal_label(reason)
        self.refusals.labels(label).inc()
        self.associations.labels("refused").inc()
        splice = self.state.splices.get(association_id)
        if splice is not None:
            self._refused.add(association_id)  # closed() will not count it again
        self.recent.add(
            "refused",
            {
                "time": round(time.time(), 3),
                "association": association_id,
                "from_site": splice.from_site if splice else None,
                "to_site": splice.to_site if splice else None,
                "outcome": "refused",
                "reason": label,
                "detail": detail,
            },
        )

    @never_raises
    def spliced(self, splice: Splice) -> None:
        self.setup.observe(max(0.0, time.time() - splice.opened))

    @never_raises
    def closed(self, splice: Splice) -> None:
        """A splice ended (called after it left `state.splices`)."""
        aid = splice.association_id
        self._count(splice)
        self._seen.pop(aid, None)
        if aid in self._refused:
            self._refused.discard(aid)
            return
        joined = splice.joined.done() and not splice.joined.cancelled()
        outcome = "relayed" if joined else "abandoned"
        self.associations.labels(outcome).inc()
        now = time.time()
        self.recent.add(
            outcome,
            {
                "time": round(now, 3),
                "association": aid,
                "from_site": splice.from_site,
                "to_site": splice.to_site,
                "called_ae": splice.called_ae_title,
                "calling_ae": splice.calling_ae_title,
                "outcome": outcome,
                "bytes_from_initiator": splice.bytes_from_initiator,
                "bytes_from_destination": splice.bytes_from_destination,
                "frames": splice.frames,
                "seconds": round(now - splice.opened, 3),
            },
            at=now,
        )

    # -- scrape-time refresh --------------------------------------------------------
    def forget(self, association_id: str) -> None:
        """An association this replica held only a moment for another one (a direct join there): not ours."""
        self._seen.pop(association_id, None)

    def refresh(self) -> None:
        for splice in list(self.state.splices.values()):
            self._count(splice)

    def _count(self, splice: Splice) -> None:
        aid = splice.association_id
        before = self._seen.get(aid, (0, 0, 0))
        now = (splice.bytes_from_initiator, splice.bytes_from_destination, splice.frames)
        if now[0] > before[0]:
            self.bytes.labels("from_initiator").inc(now[0] - before[0])
        if now[1] > before[1]:
            self.bytes.labels("from_destination").inc(now[1] - before[1])
        if now[2] > before[2]:
            self.frames.inc(now[2] - before[2])
        self._seen[aid] = tuple(max(a, b) for a, b in zip(now, before, strict=True))  # type: ignore[assignment]

    # -- serving and status -----------------------------------------------------------
    def readiness(self) -> tuple[str, bytes]:
        """200 while this bridge takes new connections, 503 while it drains (the same moment the gRPC health
        service turns NOT_SERVING: relay_bridge.lifecycle.drain)."""
        if self.state.draining:
            return "503 Service Unavailable", b"draining\n"
        return "200 OK", b"ready\n"

    async def start(self, listen: str) -> None:
        await self.server.start(listen)

    async def stop(self) -> None:
        await self.server.stop()
