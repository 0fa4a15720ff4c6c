"""What the bridge's services share: configuration, directory, audit, sessions, splices, blob store, metrics."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay_bridge.config import BridgeConfig
from relay_bridge.directory_view import DirectoryCache
from relay_bridge.ratelimit import AuditLimiter
from relay_bridge.sessions import LoginThrottle, SessionRegistry
from relay_common.audit import AuditLog

if TYPE_CHECKING:
    from relay_bridge.blobs import BlobBroker
    from relay_bridge.cluster.node import ClusterNode
    from relay_bridge.db.backend import DirectoryBackend
    from relay_bridge.db.shared_limits import SharedAssociationLeases, SharedSignOnCounts
    from relay_bridge.metrics import BridgeMetrics
    from relay_bridge.splice import Splice


@dataclass
class BridgeState:
    config: BridgeConfig
    directory: DirectoryBackend
    audit: AuditLog
    sessions: SessionRegistry
    throttle: LoginThrottle
    splices: dict[str, Splice] = field(default_factory=dict)
    blobs: BlobBroker | None = None  # the cloud spill's store; None: spill off
    draining: bool = False  # SIGTERM: new Opens and sign-ons are refused (relay_bridge.lifecycle)
    metrics: BridgeMetrics = field(init=False)
    # The directory as routers and Opens see it, from memory (relay_bridge.directory_view).
    directory_cache: DirectoryCache = field(init=False)
    # Refusal audits a hostile router can trigger at will are rate-limited per source or router.
    refusal_audits: AuditLimiter = field(default_factory=AuditLimiter)
    # This replica's part in a cluster ([cluster] listen); None: a single bridge.
    cluster: ClusterNode | None = None
    # This process among the replicas (names its association leases; docs/high-availability.md).
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    # On PostgreSQL: failed sign-ons and running associations counted with the other replicas.
    shared_sign_ons: SharedSignOnCounts | None = None
    shared_associations: SharedAssociationLeases | None = None

    @classmethod
    def create(cls, config: BridgeConfig, directory: DirectoryBackend, audit: AuditLog) -> BridgeState:
        from relay_bridge.metrics import BridgeMetrics

        state = cls(
            config,
            directory,
            audit,
            SessionRegistry(require_client_cert=config.server.require_client_cert),
            LoginThrottle(
                config.limits.login_failures,
                config.limits.login_window_s,
                max_pending=config.limits.max_pending_logins,
            ),
        )
        state.metrics = BridgeMetrics(state)
        state.directory_cache = DirectoryCache(directory)
        if config.cluster.listen:  # one id for this replica's row, its presence and its association leases
            from relay_bridge.cluster.node import replica_id_for

            state.replica_id = replica_id_for(config.cluster)
        if directory.backend == "postgresql":
            from relay_bridge.db.postgres import PostgresDirectory
            from relay_bridge.db.shared_limits import SharedAssociationLeases, SharedSignOnCounts

            assert isinstance(directory, PostgresDirectory)
            limits = config.limits
            state.shared_sign_ons = SharedSignOnCounts(directory, limits.login_failures, limits.login_window_s)
            state.shared_associations = SharedAssociationLeases(
                directory,
                state.replica_id,
                max_out=limits.max_associations_per_router,
                max_in=limits.max_inbound_per_router,
            )
        return state

    def online_sites(self) -> Collection[str]:
        """Sites signed on here, or (in a cluster) at any live replica."""
        return self.sessions if self.cluster is None else self.cluster.presence.online_with(self.sessions)
