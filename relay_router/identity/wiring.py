"""Which associations get an identity filter, and the resolver they share (the router service's part).

Only a ``[[remote]]`` or ``[[shared]]`` entry with ``patient_identity = true`` gets one; every
other association is relayed exactly as before. The partner's issuer comes from that entry
(our configuration), never from the bridge or the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay_router.identity.coerce import Domain, RouteIdentity, UnmappedQuery
from relay_router.identity.filter import Resolver

if TYPE_CHECKING:
    from relay_common.audit import AuditLog
    from relay_router.config import RemoteDevice, RouterConfig, SharedDevice
    from relay_router.identity.sources import IdentityRuntime

log = logging.getLogger("relay_router.identity")

__all__ = ["IdentityRoute", "IdentityWiring"]


@dataclass(frozen=True)
class IdentityRoute:
    """What an association on an identity route needs: its settings, the resolver, the audit trail."""

    route: RouteIdentity
    resolver: Resolver
    audit: Callable[..., Any]


class IdentityWiring:
    """The router's identity runtime (pid-sources' resolver, table and ADT feed) and its identity routes.

    The runtime exists once ``[identity] issuer`` is set; ``start``/``stop`` follow the service's.
    """

    def __init__(self, config: Callable[[], RouterConfig], audit: AuditLog) -> None:
        self._config = config
        self._audit = audit
        self.runtime: IdentityRuntime | None = None
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
        return IdentityRoute(route, self.runtime.resolver, self._audit.event)

    def remote(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[remote]]`` device a local device called, if it has one."""
        return self.for_device(next((r for r in self._config().remote if r.ae_title == ae_title), None))

    def shared(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[shared]]`` device another site called, if it has one."""
        return self.for_device(next((d for d in self._config().shared if d.ae_title == ae_title), None))
