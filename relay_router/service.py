"""The router service: DICOM on the hospital LAN, associations through the bridge.

Outbound: a local device connects to the router's DICOM port; the router reads
its A-ASSOCIATE-RQ, finds the remote device by Called AE Title, opens an
association stream through the bridge and relays the association.
Inbound: the bridge announces an association for a device this router shares;
the router joins the stream, connects to the device and relays.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from protos.relay.v1 import relay_pb2 as pb
from relay_common.audit import AuditLog
from relay_common.config import parse_host_port
from relay_common.errors import REFUSED_REASON_NAMES, Reason
from relay_router.association import RelayedAssociation, rejection_for
from relay_router.config import RouterConfig, SharedDevice
from relay_router.metrics import RouterMetrics
from relay_router.outcome import Outcome, Result
from relay_router.pace import PathPace
from relay_router.routing import (
    AUTHENTICATION_FAILED,
    REJECT_CONGESTION,
    REJECT_UNKNOWN_CALLED,
    Reject,
    Route,
    RouteCache,
    RouteTable,
    SeenAssociations,
    admit_inbound,
    admit_outbound,
)
from relay_router.seal import (
    SUITE_NAME,
    AssociationContext,
    FrameSealer,
    Handshake,
    HandshakeError,
    UnknownPeer,
    initiate,
    respond,
)
from relay_router.spill import BridgeBlobTransport, SpillState
from relay_router.status import status_extra
from relay_router.tunnel import AssociationStream, BridgeLink, LinkDown
from relay_router.ul import (
    Action,
    AssociateRequested,
    Phase,
    ProtocolViolation,
    RelayConnection,
    Send,
    Side,
    a_associate_rj,
    parse_reject,
)
from relay_router.wire.codec import FrameRejected, first_frame, open_first_frame
from relay_router.wire.features import Features

log = logging.getLogger("relay_router")
__all__ = ["Route", "RouterService", "tune_socket"]  # Route lives in relay_router.routing


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY: DICOM's small PDUs otherwise wait ~40 ms for delayed ACKs."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RouterService:
    def __init__(self, config: RouterConfig, *, status_file: Path | None = None) -> None:
        self.config = config
        self.status_file = status_file
        audit_path = config.audit.file if config.audit.enabled else None
        self.audit = AuditLog(audit_path, app="relay-router", syslog=config.audit.syslog)
        self.link = BridgeLink(config, self._incoming, self.audit)
        self.blobs = BridgeBlobTransport(self.link)  # cloud spill: blob parts via URLs the bridge signs
        self.spill = SpillState()  # ... its counters (relay_router.metrics) and pause after a store failure
        self.paces: dict[str, PathPace] = {}  # the speed of the path to each remote site (relay_router.pace)
        self.shared: dict[str, SharedDevice] = {d.ae_title: d for d in config.shared}
        self.active: dict[str, Outcome] = {}
        self.relays: set[RelayedAssociation] = set()
        # Association ids accepted since start (bounded): refuses replays of a recorded one.
        self._seen_associations = SeenAssociations()
        self._routes = RouteCache(config.remote, self.shared, expose_all=config.dicom.expose_all)
        self.history: collections.deque[Outcome] = collections.deque(maxlen=1000)
        self._server: asyncio.base_events.Server | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.port: int | None = None
        self.metrics = RouterMetrics(self)

    # -- routing table -------------------------------------------------------
    def route_table(self) -> RouteTable:
        """The table of the current directory (relay_router.routing; rebuilt only when the directory changes)."""
        return self._routes.table(self.link.directory)

    def routes(self) -> dict[str, Route]:
        """Local AE title -> remote device, from [[remote]] and (with expose_all) the directory."""
        return dict(self.route_table().routes)

    def local_alias(self, site: str, ae_title: str) -> str | None:
        """The local title under which a remote device is exposed here, if any."""
        return self.route_table().local_alias(site, ae_title)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        host, port = parse_host_port(self.config.dicom.listen)
        self._server = await asyncio.start_server(self._local_connection, host, port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._link_task = asyncio.create_task(self.link.run())
        if self.status_file is not None:
            self._status_task = asyncio.create_task(self._write_status())
        log.info(
            "listening for DICOM on %s:%d; %d shared, %d remote devices configured",
            host,
            self.port,
            len(self.config.shared),
            len(self.config.remote),
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for `grace_s`, then abort the rest."""
        if self._server is not None:
            self._server.close()
        if self._tasks:
            log.info("waiting up to %.0f s for %d associations", grace_s, len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for relay in list(self.relays):  # still running after the grace period: abort, never just drop
                await relay.abort("the router is shutting down", close_reason=pb.Close.SHUTDOWN)
            if pending:
                _, pending = await asyncio.wait(pending, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.link.stop()
        for task in (self._link_task, self._status_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self, relay: RelayedAssociation, initial: list[Action] | None = None) -> None:
        self.relays.add(relay)
        try:
            await relay.run(initial)
        finally:
            self.relays.discard(relay)
            self.metrics.relay_finished(relay)

    def _track(self, coro: object) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _finished(self, outcome: Outcome) -> None:
        self.active.pop(outcome.association_id, None)
        outcome.ended = outcome.ended or time.time()
        self.history.append(outcome)
        self.metrics.finished(outcome)
        self.audit.event(
            "association",
            outcome.audit_outcome,
            association=outcome.association_id,
            direction=outcome.direction,
            site=outcome.site,
            calling_ae=outcome.calling_ae,
            called_ae=outcome.called_ae,
            result=outcome.result,
            detail=outcome.detail,
            abstract_syntaxes=list(outcome.abstract_syntaxes),
            bytes_out=outcome.bytes_to_remote,
            bytes_in=outcome.bytes_to_local,
            seconds=round(outcome.ended - outcome.started, 3),
        )

    # -- outbound: a local device calls a remote one -------------------------
    async def _local_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track(None)
        tune_socket(writer)
        peer = writer.get_extra_info("peername")
        aid = uuid.uuid4().hex
        extra = {"assoc": aid}
        outcome = Outcome(aid, "outbound", "")
        conn = RelayConnection(Side.LOCAL)
        try:
            request = await asyncio.wait_for(
                self._read_request(conn, reader, writer), self.config.dicom.artim_timeout_s
            )
        except TimeoutError:
            log.warning(
                "no A-ASSOCIATE-RQ from %s within %.0f s (ARTIM); closing",
                peer,
                self.config.dicom.artim_timeout_s,
                extra=extra,
            )
            writer.close()
            return
        if request is None:
            writer.close()
            return
        outcome.calling_ae, outcome.called_ae = request.calling_ae, request.called_ae
        outcome.abstract_syntaxes = tuple(pc.abstract_syntax or "" for pc in request.presentation_contexts)
        self.active[aid] = outcome
        try:
            await self._relay_outbound(conn, request, reader, writer, outcome)
        finally:
            self._finished(outcome)

    async def _read_request(self, conn: RelayConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):  # noqa: ANN202
        """Read until the A-ASSOCIATE-RQ is complete; None if the peer misbehaved or left."""
        while True:
            data = await reader.read(65536)
            actions = conn.receive(Side.LOCAL, data) if data else conn.peer_closed(Side.LOCAL)
            request = None
            # Look at every action: the same read may hold the request and a violation right behind it.
            for action in actions:
                if isinstance(action, Send) and action.to is Side.LOCAL:
                    writer.write(action.data)
                elif isinstance(action, AssociateRequested):
                    request = action.info
                elif isinstance(action, ProtocolViolation):
                    host, port = writer.get_extra_info("peername")[:2]
                    log.warning("protocol error from local device %s:%s: %s; sent A-ABORT", host, port, action.detail)
            if request is not None and conn.phase is not Phase.CLOSED:
                return request
            if not data or conn.phase is Phase.CLOSED:
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return None

    async def _reject(self, conn: RelayConnection, writer: asyncio.StreamWriter, outcome: Outcome, why: Reject) -> None:
        """Answer the local device's A-ASSOCIATE-RJ as `why` says, and record it."""
        assert why.rj is not None
        outcome.refuse(Result.REJECTED, why.reason, why.detail, security=why.security)
        log.info(
            "A-ASSOCIATE-RJ to %s -> %s: %s",
            outcome.calling_ae,
            outcome.called_ae,
            why.detail,
            extra={"assoc": outcome.association_id},
        )
        for action in conn.reject_request(*why.rj):
            if isinstance(action, Send):
                writer.write(action.data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _relay_outbound(
        self,
        conn: RelayConnection,
        request,
        reader: asyncio.StreamReader,  # noqa: ANN001
        writer: asyncio.StreamWriter,
        outcome: Outcome,
    ) -> None:
        decision = admit_outbound(
            self.route_table(),
            request.called_ae,
            running=len(self.active),  # this one is already counted
            limit=self.config.dicom.max_associations,
            link_up=self.link.connected,
            link_error=self.link.last_error,
        )
        if isinstance(decision, Reject):
            outcome.site = decision.route.site if decision.route is not None else outcome.site
            return await self._reject(conn, writer, outcome, decision)
        route = decision.route
        assert route is not None
        outcome.site = route.site
        try:
            peer = self.link.peers.identity(route.site)
        except UnknownPeer:
            # Let the bridge decide and record the refusal (typically: not shared with us). Nothing of the
            # association is sent: no handshake, no A-ASSOCIATE-RQ.
            return await self._open_without_key(conn, writer, outcome, route, request.calling_ae)
        except HandshakeError as exc:
            log.error(
                "SECURITY: refusing %s -> %s/%s: %s",
                request.calling_ae,
                route.site,
                route.ae_title,
                exc,
                extra={"assoc": outcome.association_id, "security_alert": "handshake"},
            )
            why = Reject(Reason.SECURITY, f"SECURITY: {exc}", rj=REJECT_UNKNOWN_CALLED, security=True)
            return await self._reject(conn, writer, outcome, why)
        context = AssociationContext(outcome.association_id, self.link.site, route.site, route.ae_title)
        handshake, sealer = initiate(self.link.identity, peer, context)
        (forward,) = [a for a in conn.accept_request(called=route.ae_title) if isinstance(a, Send)]
        opening = pb.Open(
            association_id=outcome.association_id,
            to_site=route.site,
            called_ae_title=route.ae_title,
            calling_ae_title=request.calling_ae,
            first_data=first_frame(sealer, forward.data),
            handshake=pb.Handshake(
                kem_ciphertext=handshake.kem_ciphertext, signature=handshake.signature, suite=SUITE_NAME
            ),
            features=Features.offer(compression=self.config.dicom.compression).names(),
        )
        try:
            stream, answer = await self.link.open(opening)
        except LinkDown as exc:
            outcome.refuse(Result.REFUSED, Reason.BRIDGE_UNREACHABLE, str(exc))
            writer.write(a_associate_rj(*REJECT_CONGESTION))
            writer.close()
            return
        if answer.HasField("refused"):
            outcome.refuse(Result.REFUSED, *self._bridge_refusal(answer.refused))
            log.info("bridge refused the association: %s", outcome.detail, extra={"assoc": outcome.association_id})
            writer.write(rejection_for(answer.refused.reason))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            stream.cancel()
            return
        relay = RelayedAssociation(
            conn,
            reader,
            writer,
            stream,
            outcome,
            dicom=self.config.dicom,
            sealer=sealer,
            initiator=True,
            features=Features.offer(compression=self.config.dicom.compression),
            confirm_from=(peer, route.site),
            blobs=self.blobs,
            spill=self.spill,
            pace=self.paces.setdefault(route.site, PathPace()),
        )
        outcome.bytes_to_remote += len(forward.data)
        await self._run(relay)

    async def _open_without_key(
        self, conn: RelayConnection, writer: asyncio.StreamWriter, outcome: Outcome, route: Route, calling_ae: str
    ) -> None:
        opening = pb.Open(
            association_id=outcome.association_id,
            to_site=route.site,
            called_ae_title=route.ae_title,
            calling_ae_title=calling_ae,
        )
        detail = f"no identity key is known for site {route.site}"
        why = Reject(Reason.UNKNOWN_IDENTITY, detail, rj=REJECT_UNKNOWN_CALLED)
        try:
            stream, answer = await self.link.open(opening)
            stream.cancel()
            if answer.HasField("refused"):
                reason, detail = self._bridge_refusal(answer.refused, why.detail)
                rj = rejection_for(answer.refused.reason)
                outcome.refuse(Result.REJECTED, reason, detail)
                log.info("A-ASSOCIATE-RJ: %s", detail, extra={"assoc": outcome.association_id})
                for action in conn.reject_request(*parse_reject(rj)):
                    if isinstance(action, Send):
                        writer.write(action.data)
                writer.close()
                return
        except LinkDown as exc:
            why = Reject(Reason.BRIDGE_UNREACHABLE, str(exc), rj=REJECT_UNKNOWN_CALLED)
        await self._reject(conn, writer, outcome, why)

    @staticmethod
    def _bridge_refusal(refused: pb.Refused, default_detail: str | None = None) -> tuple[Reason, str]:
        """The reason and the local detail of a `Refused` answer (the reason comes from its code, never its text)."""
        # A code this version does not know (or a hostile bridge's) is "other", not a crash.
        known = refused.reason in pb.Refused.Reason.values()
        name = pb.Refused.Reason.Name(refused.reason) if known else str(refused.reason)
        return REFUSED_REASON_NAMES.get(name, Reason.OTHER), refused.detail or default_detail or name

    # -- inbound: a remote device calls one of ours --------------------------
    async def _incoming(self, notice: pb.IncomingAssociation) -> None:
        self._track(None)
        aid = notice.association_id
        extra = {"assoc": aid}
        outcome = Outcome(aid, "inbound", notice.from_site, called_ae=notice.called_ae_title)
        running = len(self.active)  # before this one
        self.active[aid] = outcome
        try:
            await self._relay_inbound(notice, outcome, extra, running)
        except LinkDown as exc:
            log.warning("could not join association: %s", exc, extra=extra)
        finally:
            self._finished(outcome)

    async def _refuse_inbound(self, stream: AssociationStream, outcome: Outcome, why: Reject) -> None:
        """Answer the calling router `Refused` as `why` says, and record it."""
        assert why.refused is not None
        outcome.refuse(Result.REFUSED, why.reason, why.detail, security=why.security)
        public = why.public_detail or why.detail
        await stream.send(pb.Frame(refused=pb.Refused(reason=why.refused, detail=public)))
        await stream.finish()

    def _verify_incoming(self, notice: pb.IncomingAssociation) -> tuple[bytes, FrameSealer, bytes]:
        """Authenticate the initiating router; returns (confirmation, sealer, A-ASSOCIATE-RQ bytes)."""
        initiator = self.link.peers.identity(notice.from_site)
        context = AssociationContext(notice.association_id, notice.from_site, self.link.site, notice.called_ae_title)
        handshake = Handshake(notice.handshake.kem_ciphertext, notice.handshake.signature)
        confirmation, sealer = respond(self.link.identity, initiator, handshake, context)
        try:
            return confirmation, sealer, open_first_frame(sealer, notice.first_frame.data)
        except FrameRejected as exc:
            raise HandshakeError(exc.detail) from exc

    async def _relay_inbound(
        self, notice: pb.IncomingAssociation, outcome: Outcome, extra: dict[str, str], running: int
    ) -> None:
        stream = await self.link.join(notice.association_id)
        # Our own limit, device and sharing rules: the bridge is not trusted to enforce them (it could invent
        # a calling site, or announce an association twice).
        decision = admit_inbound(
            self.shared,
            from_site=notice.from_site,
            called_ae=notice.called_ae_title,
            association_id=notice.association_id,
            seen=self._seen_associations,
            running=running,
            limit=self.config.dicom.max_associations,
            our_site=self.link.site,
        )
        if isinstance(decision, Reject):
            if decision.log is not None and decision.security:
                log.error("%s", decision.log, extra={**extra, "security_alert": decision.alert or "access"})
            elif decision.log is not None:
                log.warning("%s", decision.log, extra=extra)
            return await self._refuse_inbound(stream, outcome, decision)
        self._seen_associations.add(notice.association_id)
        device = self.shared[notice.called_ae_title]
        try:
            confirmation, sealer, request_pdu = self._verify_incoming(notice)
        except HandshakeError as exc:
            log.error(
                "SECURITY: refused an association claiming to come from %s: %s",
                notice.from_site,
                exc,
                extra={**extra, "security_alert": "handshake"},
            )
            why = Reject(
                Reason.SECURITY,
                f"SECURITY: {exc}",
                refused=pb.Refused.NOT_PERMITTED,
                public_detail=AUTHENTICATION_FAILED,
                security=True,
            )
            return await self._refuse_inbound(stream, outcome, why)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(device.host, device.port, limit=1 << 20), self.config.dicom.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            where = f"{device.host}:{device.port}"
            detail = f"{notice.from_site} -> {device.ae_title}: cannot connect to {where} ({exc or 'timeout'})"
            log.warning("%s", detail, extra=extra)
            why = Reject(
                Reason.DEVICE_UNREACHABLE,
                detail,
                refused=pb.Refused.DEVICE_UNREACHABLE,
                public_detail=f"device {device.ae_title} at site {self.link.site} is not reachable",
            )
            return await self._refuse_inbound(stream, outcome, why)
        tune_socket(writer)
        features = Features.answer(notice.features, compression=self.config.dicom.compression)
        await stream.send(pb.Frame(confirm=pb.Confirm(signature=confirmation, features=features.names())))
        conn = RelayConnection(Side.REMOTE)
        relay = RelayedAssociation(
            conn,
            reader,
            writer,
            stream,
            outcome,
            dicom=self.config.dicom,
            sealer=sealer,
            initiator=False,
            features=features,
            blobs=self.blobs,
            spill=self.spill,
            pace=self.paces.setdefault(notice.from_site, PathPace()),
        )
        actions = conn.receive(Side.REMOTE, request_pdu)
        request = next((a.info for a in actions if isinstance(a, AssociateRequested)), None)
        if request is None:
            await self._run(relay, actions)  # the connection has produced the abort
            return
        outcome.calling_ae, outcome.called_ae = request.calling_ae, request.called_ae
        outcome.abstract_syntaxes = tuple(pc.abstract_syntax or "" for pc in request.presentation_contexts)
        alias = self.local_alias(notice.from_site, request.calling_ae)
        await self._run(relay, conn.accept_request(calling=alias))

    # -- reporting -----------------------------------------------------------
    def status(self) -> dict[str, object]:
        return {
            "site": self.config.router.name,
            "connected": self.link.connected,
            "connected_since": self.link.connected_since,
            "last_error": self.link.last_error,
            "reconnects": self.link.reconnects,
            "dicom_port": self.port,
            "directory": [asdict(e) for e in self.link.directory],
            "routes": {title: asdict(route) for title, route in sorted(self.routes().items())},
            "active_associations": len(self.active),
            **status_extra(self),
        }

    async def _write_status(self) -> None:
        """Keep `status_file` current (atomically replaced) for supervisors and tests."""
        assert self.status_file is not None
        previous = ""
        while True:
            text = json.dumps(self.status(), sort_keys=True)
            if text != previous:
                tmp = self.status_file.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(self.status_file)
                previous = text
            await asyncio.sleep(0.2)
