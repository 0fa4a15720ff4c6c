"""Which associations get an identity filter, and the resolver they share (the router service's part).

Only a ``[[remote]]`` or ``[[shared]]`` entry with ``patient_identity = true`` gets one; every
other association is relayed exactly as before. The partner's issuer comes from that entry
(our configuration), never from the bridge or the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from relay_router.identity.coerce import Domain, Outcome, RouteIdentity, UnmappedQuery
from relay_router.identity.filter import Flow, Resolver

if TYPE_CHECKING:
    from relay_common.audit import AuditLog
    from relay_router.config import RemoteDevice, RouterConfig, SharedDevice
    from relay_router.identity.sources import IdentityRuntime

log = logging.getLogger("relay_router.identity")

__all__ = ["CoercionCollector", "IdentityRoute", "IdentityWiring"]


@dataclass(frozen=True)
class IdentityRoute:
    """What an association on an identity route needs: its settings, the resolver, the audit trail."""

    route: RouteIdentity
    resolver: Resolver
    audit: Callable[..., Any]
    counts: dict[tuple[str, str], int] | None = None  # coercions by (flow, outcome), for the metrics


class IdentityWiring:
    """The router's identity runtime (pid-sources' resolver, table and ADT feed) and its identity routes.

    The runtime exists once ``[identity] issuer`` is set; ``start``/``stop`` follow the service's.
    """

    def __init__(self, config: Callable[[], RouterConfig], audit: AuditLog) -> None:
        self._config = config
        self._audit = audit
        self.runtime: IdentityRuntime | None = None
        self.coercions: dict[tuple[str, str], int] = {}  # by (flow, outcome): CoercionCollector reads it
        cfg = config()
        if cfg.identity.enabled:
            from relay_router.identity.sources import IdentityRuntime

            self.runtime = IdentityRuntime(cfg.identity, state_dir=cfg.router.state_dir, audit=audit)
            devices: list[SharedDevice | RemoteDevice] = [*cfg.shared, *cfg.remote]
            routes = [d.ae_title for d in devices if d.patient_identity]
            if routes and not cfg.identity.source:
                log.warning(
                    "patient_identity is on for %s but [identity] has no source: nothing can be mapped, "
                    "queries by patient ID answer no match",
                    ", ".join(routes),
                )

    async def start(self) -> None:
        if self.runtime is not None:
            await self.runtime.start()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()

    def for_device(self, device: SharedDevice | RemoteDevice | None) -> IdentityRoute | None:
        if device is None or not device.patient_identity or self.runtime is None:
            return None
        identity = self._config().identity
        route = RouteIdentity(
            Domain(identity.issuer, identity.universal_id, identity.universal_id_type),
            device.patient_issuer,
            UnmappedQuery(identity.unmapped_query),
            identity.take_demographics,
        )
        return IdentityRoute(route, self.runtime.resolver, self._audit.event, self.coercions)

    def remote(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[remote]]`` device a local device called, if it has one."""
        return self.for_device(next((r for r in self._config().remote if r.ae_title == ae_title), None))

    def shared(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[shared]]`` device another site called, if it has one."""
        return self.for_device(next((d for d in self._config().shared if d.ae_title == ae_title), None))


class CoercionCollector(Collector):
    """``relay_router_identity_coercions_total{flow, outcome}``: what the identity filters did.

    Labels are fixed vocabularies (``Flow``, ``Outcome``), never an identifier; every pair is
    exported from 0 so that a rate of ``refused`` or ``unavailable`` can be alerted on.
    """

    def __init__(self, owner: object) -> None:
        self.owner = owner

    def collect(self) -> Iterator[CounterMetricFamily]:
        wiring = getattr(self.owner, "identity", None)
        counts: dict[tuple[str, str], int] = getattr(wiring, "coercions", {})
        family = CounterMetricFamily(
            "relay_router_identity_coercions",
            "Data sets and query identifiers seen by the patient identity filters, by flow (leaving, arriving) "
            "and outcome (mapped, refused, unmapped, unavailable, stamped, conflict, remote_ids, unchanged)",
            labels=["flow", "outcome"],
        )
        for flow in Flow:
            for outcome in Outcome:
                family.add_metric([flow.value, outcome.value], counts.get((flow.value, outcome.value), 0))
        yield family
