"""The bridge's gRPC server: the relay.v1.Relay services wired together, TLS, and `start()`.

The decisions live in the service modules (see docs/architecture.md, "Bridge
modules"): relay_bridge.control (sign-on, the directory, enrollment),
relay_bridge.splice (the life of an association), relay_bridge.blobs (the blob
RPCs), relay_bridge.sessions (sessions, throttle, caller authentication) and
relay_bridge.admission (pure admission decisions). Reloading certificates and
draining on SIGTERM: relay_bridge.lifecycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.blobs import BlobBroker, BlobService
from relay_bridge.config import BridgeConfig
from relay_bridge.control import ControlService
from relay_bridge.db.backend import DirectoryBackend, open_directory
from relay_bridge.directory import AsyncDirectory, Directory
from relay_bridge.sessions import RouterSession
from relay_bridge.splice import AssociationService, Splice
from relay_bridge.state import BridgeState
from relay_common.audit import AuditLog
from relay_common.config import parse_host_port
from relay_common.tlsreload import CertificateFiles, ReloadingServerCredentials

if TYPE_CHECKING:
    from relay_bridge.metrics import BridgeMetrics

__all__ = ["RelayServicer", "RouterSession", "server_options", "start"]


class RelayServicer:
    """relay.v1.Relay: each RPC handed to the service that owns it, all sharing one `BridgeState`."""

    # Seams for tests that play a malicious or slow bridge: the class that pumps one association,
    # and the services' classes.
    splice_class: type[Splice] = Splice
    control_class: type[ControlService] = ControlService
    association_class: type[AssociationService] = AssociationService
    blob_class: type[BlobService] = BlobService
    enroll_port: int | None = None
    # Set by start(): the health service (NOT_SERVING while draining) and the certificate files
    # re-read on SIGHUP and before each new TLS handshake.
    health: health.aio.HealthServicer | None = None
    certificates: tuple[CertificateFiles, ...] = ()

    def __init__(
        self, config: BridgeConfig, directory: Directory | DirectoryBackend, audit: AuditLog | None = None
    ) -> None:
        if isinstance(directory, Directory):
            directory = AsyncDirectory(directory)
        self.state = BridgeState.create(config, directory, audit or AuditLog(None, app="relay-bridge"))
        self.control = self.control_class(self.state)
        self.associations = self.association_class(self.state, self.splice_class)
        self.blob_rpcs = self.blob_class(self.state)

    # What the status writer, the metrics and tests read.
    @property
    def config(self) -> BridgeConfig:
        return self.state.config

    @property
    def directory(self) -> DirectoryBackend:
        return self.state.directory

    @property
    def audit(self) -> AuditLog:
        return self.state.audit

    @property
    def sessions(self) -> dict[str, RouterSession]:
        return self.state.sessions

    @property
    def splices(self) -> dict[str, Splice]:
        return self.state.splices

    @property
    def metrics(self) -> BridgeMetrics:
        return self.state.metrics

    @property
    def blobs(self) -> BlobBroker | None:
        return self.state.blobs

    @blobs.setter
    def blobs(self, broker: BlobBroker | None) -> None:
        self.state.blobs = broker

    async def Control(
        self, request_iterator: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> None:
        if self.state.draining:  # the router retries with backoff; behind a load balancer, elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the bridge is restarting (draining); reconnect")
        await self.control.Control(request_iterator, context)

    async def Associate(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        await self.associations.Associate(request_iterator, context)

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        return await self.control.Enroll(request, context)

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:
        return await self.blob_rpcs.BlobSlot(request, context)

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        return await self.blob_rpcs.PutBlobPart(request, context)

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:
        return await self.blob_rpcs.GetBlobPart(request, context)

    async def ReleaseBlob(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        return await self.blob_rpcs.ReleaseBlob(request, context)


def _handlers(servicer: RelayServicer) -> grpc.GenericRpcHandler:
    """relay.v1.Relay, with Associate frames left serialized (the bridge forwards bytes)."""
    return grpc.method_handlers_generic_handler(
        "relay.v1.Relay",
        {
            "Control": grpc.stream_stream_rpc_method_handler(
                servicer.Control,
                request_deserializer=pb.RouterMessage.FromString,
                response_serializer=pb.BridgeMessage.SerializeToString,
            ),
            # No (de)serializers: requests arrive and responses leave as bytes.
            "Associate": grpc.stream_stream_rpc_method_handler(servicer.Associate),
            "Enroll": grpc.unary_unary_rpc_method_handler(
                servicer.Enroll,
                request_deserializer=pb.EnrollRequest.FromString,
                response_serializer=pb.EnrollResponse.SerializeToString,
            ),
            **{
                name: grpc.unary_unary_rpc_method_handler(
                    getattr(servicer, name),
                    request_deserializer=req.FromString,
                    response_serializer=res.SerializeToString,
                )
                for name, req, res in (
                    ("BlobSlot", pb.BlobSlotRequest, pb.BlobSlotResponse),
                    ("PutBlobPart", pb.BlobPart, pb.BlobPartAck),
                    ("GetBlobPart", pb.BlobPart, pb.BlobPart),
                    ("ReleaseBlob", pb.BlobSlotRequest, pb.BlobPartAck),
                )
            },
        },
    )


def server_options(config: BridgeConfig) -> list[tuple[str, int]]:
    limits = config.limits
    size = limits.max_frame_bytes + 64 * 1024
    age: list[tuple[str, int]] = []
    if limits.max_connection_age_s > 0:
        # After the age, the connection gets GOAWAY (no new streams); running calls (associations)
        # may continue for the grace before the connection is closed.
        age = [
            ("grpc.max_connection_age_ms", int(limits.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(limits.connection_age_grace_s * 1000)),
        ]
    return [
        # A connection may not open streams without bound (each Associate holds a splice).
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        *age,
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # Routers ping every 20 s to keep idle streams alive through load balancers.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.ping_timeout_ms", 10_000),  # what grpcio really uses to time a keepalive ping out
        ("grpc.so_reuseport", 0),
        # Start every stream with a large flow-control window; BDP probing still tunes it.
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
    ]


async def start(
    config: BridgeConfig, *, insecure: bool = False, servicer_class: type[RelayServicer] = RelayServicer
) -> tuple[grpc.aio.Server, int, RelayServicer]:
    """Build and start the server; returns it, the bound port and the servicer."""
    # SQLite or PostgreSQL by [storage] database; raises migrations.SchemaError on a schema it cannot use.
    directory = await open_directory(
        config.storage.database,
        password_file=config.storage.password_file,
        hash_threads=config.limits.login_hash_threads,
    )
    await directory.routers()  # the accounts a metrics scrape lists until the status writer reads them again
    audit = AuditLog.from_section(config.audit, app="relay-bridge")
    servicer = servicer_class(config, directory, audit)
    servicer.blobs = BlobBroker.from_config(config)
    if servicer.blobs is not None:
        servicer.blobs.start()
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers([_handlers(servicer)])
    servicer.health = health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, port = parse_host_port(config.server.listen)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if insecure:
        bound = server.add_insecure_port(address)
    else:
        assert config.server.tls_cert and config.server.tls_key
        # Re-read before every new handshake when the files changed (relay_common.tlsreload): a renewed
        # certificate is served to new connections, existing ones keep theirs.
        files = CertificateFiles("server certificate", cert=config.server.tls_cert, key=config.server.tls_key)
        client_ca = None
        if config.server.require_client_cert:
            assert config.server.client_ca is not None
            client_ca = CertificateFiles("client CA (server.client_ca)", ca=config.server.client_ca)
        servicer.certificates = (files,) if client_ca is None else (files, client_ca)
        credentials = ReloadingServerCredentials(files, client_ca=client_ca).credentials()
        bound = server.add_secure_port(address, credentials)
        if config.server.enroll_listen:
            # Server-authenticated only; Control and Associate refuse callers without a client certificate.
            enroll_host, enroll_port = parse_host_port(config.server.enroll_listen)
            servicer.enroll_port = server.add_secure_port(
                f"{enroll_host}:{enroll_port}", ReloadingServerCredentials(files).credentials()
            )
    if config.cluster.listen:  # a replica: the internal port, and its rows in the replicas and presence tables
        from relay_bridge.cluster.node import ClusterNode

        node = ClusterNode(config.cluster, servicer.associations)
        node.presence.on_change = servicer.control.request_broadcast
        await node.start()  # before routers can sign on here: every sign-on is then recorded
        servicer.state.cluster = node
    await server.start()
    await health_servicer.set("relay.v1.Relay", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, servicer
