"""One replica's part in the cluster: the internal gRPC server, the link server, its presence rows, its forwarder.

Started by `relay_bridge.server.start` when `[cluster] listen` is set; stopped by the CLI after
the drain (its rows are removed, so the other replicas stop forwarding here at once).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from relay_bridge.cluster.forward import Forwarder, ForwardService, handlers, server_options
from relay_bridge.cluster.link import LinkPool, LinkServer, client_context, server_context
from relay_bridge.cluster.presence import Load, Location, PresenceKeeper
from relay_bridge.cluster.tickets import JoinTickets, replica_label
from relay_bridge.config import ClusterSection
from relay_common.config import parse_host_port
from relay_common.errors import RelayError

if TYPE_CHECKING:
    from relay_bridge.splice import AssociationService

log = logging.getLogger("relay_bridge.cluster")
STOP_GRACE_S = 1.0


def replica_id_for(section: ClusterSection) -> str:
    """The configured id, or the host name and the internal port (unique on one host and across hosts)."""
    if section.replica_id:
        return section.replica_id
    return f"{socket.gethostname()}-{parse_host_port(section.advertise)[1]}"[:64]


class ClusterNode:
    def __init__(self, section: ClusterSection, associations: AssociationService) -> None:
        assert section.tls_cert and section.tls_key and section.ca
        self.section = section
        self.associations = associations
        state = associations.state
        self.replica_id = replica_id_for(section)
        cert, key, ca = section.tls_cert.read_bytes(), section.tls_key.read_bytes(), section.ca.read_bytes()
        self._server_credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        limits = state.config.limits
        self.links = LinkServer(associations, server_context(section.tls_cert, section.tls_key, section.ca))
        self.forwarder = Forwarder(
            grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert),
            self.replica_id,
            max_frame_bytes=limits.max_frame_bytes,
            join_timeout_s=limits.join_timeout_s,
            links=LinkPool(
                client_context(section.tls_cert, section.tls_key, section.ca),
                max_frame_bytes=limits.max_frame_bytes,
            )
            if section.links
            else None,
        )
        self.presence = PresenceKeeper(
            state.directory,
            self.replica_id,
            section.advertise,
            lease_s=section.lease_s,
            renew_s=section.renew_s,
            load=Load(lambda: state.draining, lambda: len(state.sessions), lambda: len(state.splices)),
            on_lost=self._site_lost,
            on_taken=self._site_taken,
        )
        # The direct join (relay_bridge.cluster.tickets): the name routers join here at, and the tickets
        # issued for it (one per association waiting for its destination: bounded like the associations).
        self.join_label = replica_label(self.replica_id) if section.direct_join else None
        if section.direct_join and self.join_label is None:
            log.warning("replica id %r is not a DNS label: no direct joins at this replica", self.replica_id)
        self.tickets = JoinTickets(limits.max_associations, limits.join_timeout_s)
        self.forwarder.join_label, self.forwarder.tickets = self.join_label, self.tickets
        self.forwarder.relocate = lambda site: self.presence.locate(site, fresh=True)
        self.forwarder.forget_holder = self.presence.forget_holder
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the internal port, then register (the others may forward here from then on)."""
        server = grpc.aio.server(options=server_options(self.associations.state.config.limits.max_frame_bytes))
        host, port = parse_host_port(self.section.listen)
        # The link server on the same interface, at a port the system picks: the others ask for it
        # on the authenticated gRPC channel (Cluster/Link).
        if self.section.links:
            await self.links.start(host, self.section.link_port)
        service = ForwardService(self.associations, self.presence.evicted, link_port=lambda: self.links.port)
        server.add_generic_rpc_handlers([handlers(service)])
        self.port = server.add_secure_port(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}", self._server_credentials
        )
        await server.start()
        self.server = server
        await self.presence.start()
        log.info(
            "replica %s: cluster port %s, advertised as %s; link port %d",
            self.replica_id,
            self.section.listen,
            self.section.advertise,
            self.links.port,
        )

    async def stop(self) -> None:
        await self.presence.stop()
        await self.forwarder.close()
        await self.links.stop()
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)

    async def locate_quietly(self, site: str, association_id: str) -> Location | None:
        """The replica holding `site` (from the in-memory map while fresh: relay_bridge.cluster.presence); None
        when no live one does or the database cannot say (logged)."""
        try:
            return await self.presence.locate(site)
        except RelayError as exc:
            log.warning("cannot look up which replica holds %s: %s", site, exc, extra={"assoc": association_id})
            return None

    def _site_taken(self, site: str, since: float, previous: Location) -> None:
        """`site` signed on here and was held by `previous`: tell it now (it cuts its stale stream)."""
        self._in_background(self.forwarder.evict(previous, site, since))

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _site_lost(self, site: str) -> None:
        """`site` signed on at another replica: end its stale stream here and abort what it carried."""
        from relay_bridge.splice import abort_associations

        state = self.associations.state
        session = state.sessions.get(site)
        if session is None:
            return
        if state.draining and session.ended.is_set():
            return  # moved by this replica's drain: its running associations go on (relay_bridge.lifecycle)
        session.end()
        self._in_background(
            abort_associations(self.associations.state.splices, session, "the router signed on at another replica")
        )
