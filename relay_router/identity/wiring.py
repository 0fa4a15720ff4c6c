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

log = logging.getLogger("relay_router.identity")

__all__ = ["IdentityRoute", "IdentityWiring", "build_resolver"]


@dataclass(frozen=True)
class IdentityRoute:
    """What an association on an identity route needs: its settings, the resolver, the audit trail."""

    route: RouteIdentity
    resolver: Resolver
    audit: Callable[..., Any]


def build_resolver(config: RouterConfig, audit: AuditLog) -> Resolver:
    """The resolver of the ``[identity]`` section: its ``kind = "table"`` sources, in the configured order.

    A router with identity routes but no source gets the cross-reference table at its default path.
    """
    from relay_router.identity.cli import table_path
    from relay_router.identity.resolver import Resolver as SourcesResolver
    from relay_router.identity.resolver import Source
    from relay_router.identity.xref import XrefSource, XrefTable

    identity = config.identity
    sources: list[Source] = []
    for section in identity.source or []:
        if section.kind == "table":
            table = XrefTable(section.path or table_path(config))
            sources.append(XrefSource(table, name=section.label, timeout_s=section.timeout_s))
        else:
            log.warning("identity source %s (kind %s) is not wired into the router yet", section.label, section.kind)
    if not identity.source:
        sources.append(XrefSource(XrefTable(table_path(config))))
    return SourcesResolver(sources, audit=audit, cache_ttl_s=identity.cache_ttl_s, cache_entries=identity.cache_entries)


class IdentityWiring:
    """Builds the resolver on first use and an :class:`IdentityRoute` for each identity route."""

    def __init__(self, config: Callable[[], RouterConfig], audit: AuditLog) -> None:
        self._config = config
        self._audit = audit
        self._resolver: Resolver | None = None

    def for_device(self, device: SharedDevice | RemoteDevice | None) -> IdentityRoute | None:
        if device is None or not device.patient_identity:
            return None
        config = self._config()
        identity = config.identity
        if self._resolver is None:
            self._resolver = build_resolver(config, self._audit)
        route = RouteIdentity(
            Domain(identity.issuer, identity.universal_id, identity.universal_id_type),
            device.patient_issuer,
            UnmappedQuery(identity.unmapped_query),
            identity.take_demographics,
        )
        return IdentityRoute(route, self._resolver, self._audit.event)

    def remote(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[remote]]`` device a local device called, if it has one."""
        return self.for_device(next((r for r in self._config().remote if r.ae_title == ae_title), None))

    def shared(self, ae_title: str) -> IdentityRoute | None:
        """The identity route of the ``[[shared]]`` device another site called, if it has one."""
        return self.for_device(next((d for d in self._config().shared if d.ae_title == ae_title), None))
