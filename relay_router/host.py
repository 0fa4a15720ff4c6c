"""What the two halves of the router service share: the state they use and the hooks they call.

`RouterService` (relay_router/service.py: lifecycle, routing table, status) is
made of `OutboundCalls` (relay_router/outbound.py: a local device calls a
remote one) and `InboundCalls` (relay_router/inbound.py: the bridge announces
an association for one of our shared devices). Both are written against
`AssociationHost`, which names what `RouterService` provides; the decisions
themselves (routes, admission) are in relay_router/routing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay_common.audit import AuditLog
    from relay_router.accel.runtime import AccelRuntime
    from relay_router.association import RelayedAssociation
    from relay_router.config import RouterConfig, SharedDevice
    from relay_router.identity.wiring import IdentityWiring
    from relay_router.outcome import Outcome
    from relay_router.pace import PathPace
    from relay_router.replay import SeenAssociations
    from relay_router.routing import Callers, Limits, PendingRequests, RouteTable
    from relay_router.spill import BlobTransport, SpillState
    from relay_router.tunnel import BridgeLink
    from relay_router.ul import Action


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY: DICOM's small PDUs otherwise wait ~40 ms for delayed ACKs."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class AssociationHost:
    """The state and hooks `OutboundCalls` and `InboundCalls` use; `RouterService` provides them."""

    config: RouterConfig
    audit: AuditLog
    link: BridgeLink
    blobs: BlobTransport
    spill: SpillState
    paces: dict[str, PathPace]
    shared: dict[str, SharedDevice]
    active: dict[str, Outcome]
    _seen_associations: SeenAssociations
    callers: Callers  # the LAN allow-list ([[local]], [[shared]] from their hosts)
    limits: Limits  # association caps by direction and calling site
    pending: PendingRequests  # unfinished A-ASSOCIATE-RQs
    _pending_logged: float  # when a connection closed for the pending caps was last logged
    identity: IdentityWiring  # patient identity routes (relay_router.identity)
    accel: AccelRuntime | None  # accelerated routes (relay_router.accel), when any is configured

    def route_table(self) -> RouteTable:
        raise NotImplementedError

    def local_alias(self, site: str, ae_title: str) -> str | None:
        raise NotImplementedError

    async def _run(self, relay: RelayedAssociation, initial: list[Action] | None = None) -> None:
        """Drive a relayed association to its end (registered while it runs)."""
        raise NotImplementedError

    def _track(self, coro: object) -> None:
        """Register the current task, so that stop() can wait for it."""
        raise NotImplementedError

    def _finished(self, outcome: Outcome) -> None:
        """An association ended: history, metrics, audit."""
        raise NotImplementedError
