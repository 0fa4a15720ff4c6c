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
from dataclasses import asdict, dataclass
from pathlib import Path

from protos.relay.v1 import relay_pb2 as pb
from relay_common.audit import AuditLog
from relay_common.config import parse_host_port
from relay_router.association import Outcome, RelayedAssociation, rejection_for
from relay_router.compress import FEATURE as COMPRESSION
from relay_router.compress import SHUFFLE_FEATURE as SHUFFLE
from relay_router.config import RouterConfig, SharedDevice
from relay_router.metrics import RouterMetrics
from relay_router.pace import FEATURE as PACE
from relay_router.pace import PathPace
from relay_router.seal import (
    FLAG_SEALED,
    SUITE_NAME,
    AssociationContext,
    FrameSealer,
    Handshake,
    HandshakeError,
    TamperError,
    UnknownPeer,
    initiate,
    respond,
)
from relay_router.spill import FEATURE as SPILL
from relay_router.spill import BlobTransport
from relay_router.status import status_extra
from relay_router.tunnel import AssociationStream, BridgeLink, LinkDown
from relay_router.ul import (
    Action,
    AssociateRequested,
    Phase,
    ProtocolViolation,
    RejectResult,
    RejectSource,
    RelayConnection,
    Send,
    Side,
    a_associate_rj,
    parse_reject,
)

log = logging.getLogger("relay_router")
REJECT_UNKNOWN_CALLED = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)
REJECT_CONGESTION = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1)
REJECT_LIMIT = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 2)


@dataclass(frozen=True)
class Route:
    """Where a local AE title leads: a device at another site."""

    site: str
    ae_title: str


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
        self.audit = AuditLog.from_section(config.audit, app="relay-router", source_id=config.router.name)
        self.link = BridgeLink(config, self._incoming, self.audit)
        self.blobs = BlobTransport(self.link)  # cloud spill: blob parts via URLs the bridge signs
        self.paces: dict[str, PathPace] = {}  # the speed of the path to each remote site (relay_router.pace)
        self.shared: dict[str, SharedDevice] = {d.ae_title: d for d in config.shared}
        self.active: dict[str, Outcome] = {}
        self.relays: set[RelayedAssociation] = set()
        # Association ids accepted since start (insertion-ordered, bounded): refuses replays of a recorded one.
        self._seen_associations: dict[str, None] = {}
        self.history: collections.deque[Outcome] = collections.deque(maxlen=1000)
        self._server: asyncio.base_events.Server | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.port: int | None = None
        self.metrics = RouterMetrics(self)

    # -- routing table -------------------------------------------------------
    def routes(self) -> dict[str, Route]:
        """Local AE title -> remote device, from [[remote]] and (with expose_all) the directory."""
        table = {r.ae_title: Route(r.site, r.target) for r in self.config.remote}
        if self.config.dicom.expose_all:
            counts = collections.Counter(e.ae_title for e in self.link.directory)
            for entry in self.link.directory:
                title = entry.ae_title
                if counts[title] == 1 and title not in table and title not in self.shared:
                    table[title] = Route(entry.site, title)
        return table

    def local_alias(self, site: str, ae_title: str) -> str | None:
        """The local title under which a remote device is exposed here, if any."""
        for title, route in self.routes().items():
            if route.site == site and route.ae_title == ae_title:
                return title
        return None

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
        if outcome.detail.startswith("SECURITY"):
            result = "alert"
        else:
            result = "success" if outcome.result in ("released", "closed") else "failure"
        self.audit.event(
            "association",
            result,
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
            studies=outcome.studies or None,  # DICOM Instances Transferred when any (relay_router.studytap)
            queries=outcome.queries or None,  # DICOM Query messages (C-FIND identifiers)
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

    async def _reject(
        self, conn: RelayConnection, writer: asyncio.StreamWriter, outcome: Outcome, rj: tuple[int, int, int], why: str
    ) -> None:
        outcome.result, outcome.detail = "rejected", why
        log.info(
            "A-ASSOCIATE-RJ to %s -> %s: %s",
            outcome.calling_ae,
            outcome.called_ae,
            why,
            extra={"assoc": outcome.association_id},
        )
        for action in conn.reject_request(*rj):
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
        route = self.routes().get(request.called_ae)
        if route is None:
            return await self._reject(
                conn,
                writer,
                outcome,
                REJECT_UNKNOWN_CALLED,
                f"called AE title {request.called_ae!r} is not a remote device on this router",
            )
        outcome.site = route.site
        if len(self.active) > self.config.dicom.max_associations:  # this one is already counted
            return await self._reject(conn, writer, outcome, REJECT_LIMIT, "too many associations on this router")
        if not self.link.connected:
            return await self._reject(
                conn,
                writer,
                outcome,
                REJECT_CONGESTION,
                f"the bridge is not reachable ({self.link.last_error or 'connecting'})",
            )
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
            return await self._reject(conn, writer, outcome, REJECT_UNKNOWN_CALLED, f"SECURITY: {exc}")
        context = AssociationContext(outcome.association_id, self.link.site, route.site, route.ae_title)
        handshake, sealer = initiate(self.link.identity, peer, context)
        (forward,) = [a for a in conn.accept_request(called=route.ae_title) if isinstance(a, Send)]
        opening = pb.Open(
            association_id=outcome.association_id,
            to_site=route.site,
            called_ae_title=route.ae_title,
            calling_ae_title=request.calling_ae,
            first_data=pb.Data(payload=sealer.seal(forward.data, 0), seq=0, flags=FLAG_SEALED),
            handshake=pb.Handshake(
                kem_ciphertext=handshake.kem_ciphertext, signature=handshake.signature, suite=SUITE_NAME
            ),
            features=[COMPRESSION, SHUFFLE, SPILL, PACE] if self.config.dicom.compression else [SPILL, PACE],
        )
        try:
            stream, answer = await self.link.open(opening)
        except LinkDown as exc:
            outcome.result, outcome.detail = "refused", str(exc)
            writer.write(a_associate_rj(*REJECT_CONGESTION))
            writer.close()
            return
        if answer.HasField("refused"):
            outcome.result = "refused"
            outcome.detail = answer.refused.detail or pb.Refused.Reason.Name(answer.refused.reason)
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
            confirm_from=(peer, route.site),
            blobs=self.blobs,
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
        try:
            stream, answer = await self.link.open(opening)
            stream.cancel()
            if answer.HasField("refused"):
                detail = answer.refused.detail or detail
                rj = rejection_for(answer.refused.reason)
                outcome.result, outcome.detail = "rejected", detail
                log.info("A-ASSOCIATE-RJ: %s", detail, extra={"assoc": outcome.association_id})
                for action in conn.reject_request(*parse_reject(rj)):
                    if isinstance(action, Send):
                        writer.write(action.data)
                writer.close()
                return
        except LinkDown as exc:
            detail = str(exc)
        await self._reject(conn, writer, outcome, REJECT_UNKNOWN_CALLED, detail)

    # -- inbound: a remote device calls one of ours --------------------------
    async def _incoming(self, notice: pb.IncomingAssociation) -> None:
        self._track(None)
        aid = notice.association_id
        extra = {"assoc": aid}
        outcome = Outcome(aid, "inbound", notice.from_site, called_ae=notice.called_ae_title)
        overloaded = len(self.active) >= self.config.dicom.max_associations
        self.active[aid] = outcome
        try:
            if overloaded:
                stream = await self.link.join(aid)
                detail = f"site {self.link.site} has reached its association limit"
                log.warning("refusing an association from %s: %s", notice.from_site, detail, extra=extra)
                return await self._refuse_inbound(stream, outcome, pb.Refused.OVERLOADED, detail)
            await self._relay_inbound(notice, outcome, extra)
        except LinkDown as exc:
            log.warning("could not join association: %s", exc, extra=extra)
        finally:
            self._finished(outcome)

    async def _refuse_inbound(
        self, stream: AssociationStream, outcome: Outcome, reason: int, detail: str, public_detail: str | None = None
    ) -> None:
        outcome.result, outcome.detail = "refused", detail
        await stream.send(pb.Frame(refused=pb.Refused(reason=reason, detail=public_detail or detail)))
        await stream.finish()

    def _verify_incoming(self, notice: pb.IncomingAssociation) -> tuple[bytes, FrameSealer, bytes]:
        """Authenticate the initiating router; returns (confirmation, sealer, A-ASSOCIATE-RQ bytes)."""
        initiator = self.link.peers.identity(notice.from_site)
        context = AssociationContext(notice.association_id, notice.from_site, self.link.site, notice.called_ae_title)
        handshake = Handshake(notice.handshake.kem_ciphertext, notice.handshake.signature)
        confirmation, sealer = respond(self.link.identity, initiator, handshake, context)
        first = notice.first_frame.data
        if first.seq != 0 or first.flags != FLAG_SEALED:
            raise HandshakeError("the first frame of the association is not sealed")
        try:
            return confirmation, sealer, sealer.open(first.payload, 0)
        except TamperError as exc:
            raise HandshakeError(str(exc)) from exc

    async def _relay_inbound(self, notice: pb.IncomingAssociation, outcome: Outcome, extra: dict[str, str]) -> None:
        device = self.shared.get(notice.called_ae_title)
        stream = await self.link.join(notice.association_id)
        if device is None:
            return await self._refuse_inbound(
                stream, outcome, pb.Refused.UNKNOWN_DEVICE, f"no shared device {notice.called_ae_title!r}"
            )
        # Enforce our own sharing rules: the bridge is not trusted to (it could invent a calling site).
        if notice.from_site not in device.share_with and "*" not in device.share_with:
            detail = f"SECURITY: {device.ae_title} is not shared with {notice.from_site!r}"
            log.error(
                "%s; refused (the bridge should have refused it)", detail, extra={**extra, "security_alert": "access"}
            )
            return await self._refuse_inbound(
                stream, outcome, pb.Refused.NOT_PERMITTED, detail, "end-to-end authentication failed"
            )
        if notice.association_id in self._seen_associations:
            detail = f"SECURITY: association {notice.association_id} was already seen (replayed by the bridge?)"
            log.error("%s; refused", detail, extra={**extra, "security_alert": "replay"})
            return await self._refuse_inbound(
                stream, outcome, pb.Refused.NOT_PERMITTED, detail, "end-to-end authentication failed"
            )
        self._seen_associations[notice.association_id] = None
        while len(self._seen_associations) > 100_000:  # bounded memory: forget the oldest
            del self._seen_associations[next(iter(self._seen_associations))]
        try:
            confirmation, sealer, request_pdu = self._verify_incoming(notice)
        except HandshakeError as exc:
            log.error(
                "SECURITY: refused an association claiming to come from %s: %s",
                notice.from_site,
                exc,
                extra={**extra, "security_alert": "handshake"},
            )
            return await self._refuse_inbound(
                stream, outcome, pb.Refused.NOT_PERMITTED, f"SECURITY: {exc}", "end-to-end authentication failed"
            )
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(device.host, device.port, limit=1 << 20), self.config.dicom.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            where = f"{device.host}:{device.port}"
            detail = f"{notice.from_site} -> {device.ae_title}: cannot connect to {where} ({exc or 'timeout'})"
            log.warning("%s", detail, extra=extra)
            return await self._refuse_inbound(
                stream,
                outcome,
                pb.Refused.DEVICE_UNREACHABLE,
                detail,
                f"device {device.ae_title} at site {self.link.site} is not reachable",
            )
        tune_socket(writer)
        compress = self.config.dicom.compression and COMPRESSION in notice.features
        features = [COMPRESSION] if compress else []
        shuffle = compress and SHUFFLE in notice.features
        if shuffle:
            features.append(SHUFFLE)
        spill = SPILL in notice.features
        if spill:
            features.append(SPILL)
        pace = PACE in notice.features
        if pace:
            features.append(PACE)
        await stream.send(pb.Frame(confirm=pb.Confirm(signature=confirmation, features=features)))
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
            compression_agreed=compress,
            shuffle_agreed=shuffle,
            blobs=self.blobs,
            spill_agreed=spill,
            pace=self.paces.setdefault(notice.from_site, PathPace()),
            pace_agreed=pace,
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
