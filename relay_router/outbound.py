"""Outbound: a local device calls a remote one through the bridge.

The router reads the device's A-ASSOCIATE-RQ, asks relay_router.routing where
the Called AE Title leads and whether to admit it, authenticates the
destination router's identity, opens an association stream through the bridge
and relays. Every refusal is a DICOM answer (A-ASSOCIATE-RJ) and a typed
`Outcome` (relay_router.outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.accel.hooks import accept_locally
from relay_router.association import RelayedAssociation, rejection_for
from relay_router.close_codes import received_refusal
from relay_router.grants import REJECT_SERVICE_NOT_GRANTED, check_services, granted_remote, record_decision
from relay_router.host import AssociationHost, tune_socket
from relay_router.open_retry import OpenRetry
from relay_router.outcome import Outcome, Result
from relay_router.pace import PathPace
from relay_router.peers import PeerUnapproved
from relay_router.routing import (
    REJECT_CONGESTION,
    REJECT_TOO_LARGE,
    REJECT_UNKNOWN_CALLED,
    Reject,
    Route,
    Running,
    admit_outbound,
)
from relay_router.seal import AssociationContext, HandshakeError, UnknownPeer, initiate
from relay_router.tunnel import LinkDown
from relay_router.ul import (
    AssociateRequested,
    PduType,
    Phase,
    ProtocolViolation,
    RelayConnection,
    Send,
    Side,
    a_associate_rj,
    parse_reject,
)
from relay_router.wire.codec import first_frame, handshake_message
from relay_router.wire.features import Features

log = logging.getLogger("relay_router")
# The Upper Layer framer's own limit for control PDUs: a length beyond it is a protocol error (A-ABORT),
# not a request we could have served with a bigger max_request_bytes.
UL_CONTROL_PDU_LIMIT = 1 << 20
# Seconds spent discarding the rest of a rejected oversized request, so that the A-ASSOCIATE-RJ is
# read before the connection closes (closing with unread data would reset it).
DISCARD_S = 2.0


class OutboundCalls(AssociationHost):
    """The part of `RouterService` that serves local devices calling out (the DICOM listener's handler)."""

    async def _local_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track(None)
        tune_socket(writer)
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        # Unfinished requests are capped before a byte is read: beyond a cap, the request is not readable
        # yet and an answer would need it, so the connection is closed at once (docs/configuration.md).
        full = self.pending.admit(address)
        if full is not None:
            self._log_pending_refusal(address, full)
            writer.close()
            return
        aid = uuid.uuid4().hex
        extra = {"assoc": aid}
        outcome = Outcome(aid, "outbound", "", address=address)
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
        finally:
            self.pending.done(address)
        if request is None:
            writer.close()
            return
        if isinstance(request, Reject):
            return await self._reject_oversized(reader, writer, outcome, request)
        outcome.calling_ae, outcome.called_ae = request.calling_ae, request.called_ae
        outcome.abstract_syntaxes = tuple(pc.abstract_syntax or "" for pc in request.presentation_contexts)
        self.active[aid] = outcome
        try:
            await self._relay_outbound(conn, request, reader, writer, outcome)
        finally:
            self._finished(outcome)

    def _log_pending_refusal(self, address: str, why: str) -> None:
        """At most one line a second: a client opening connections in a loop must not flood the log."""
        now = time.monotonic()
        if now - self._pending_logged >= 1.0:
            log.warning(
                "closed a connection from %r at once: %s (%d such connections so far)",
                address,
                why,
                self.pending.refused,
            )
            self._pending_logged = now

    async def _read_request(self, conn: RelayConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Read until the A-ASSOCIATE-RQ is complete; None if the peer misbehaved or left; a `Reject` if the
        request is larger than max_request_bytes.

        Never reads past the end of the request (its length is in the 6-byte PDU header), so what the
        router holds for an unfinished request is bounded by max_request_bytes.
        """
        header = b""
        while len(header) < 6:
            chunk = await reader.read(6 - len(header))
            if not chunk:
                break
            header += chunk
        budget = 65536  # not a request (or cut short): the connection answers it with A-ABORT at once
        if len(header) == 6 and header[0] == PduType.ASSOCIATE_RQ:
            length = int.from_bytes(header[2:6], "big")
            limit = self.config.dicom.max_request_bytes
            if limit < length <= UL_CONTROL_PDU_LIMIT:
                detail = f"A-ASSOCIATE-RQ of {length} bytes is larger than max_request_bytes ({limit})"
                return Reject(Reason.REQUEST_TOO_LARGE, detail, rj=REJECT_TOO_LARGE)
            budget = length
        data = header
        while True:
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
            if budget <= 0:  # cannot happen for a well-formed request: the connection decides on its last byte
                return None
            data = await reader.read(min(65536, budget))
            budget -= len(data)

    async def _reject_oversized(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outcome: Outcome, why: Reject
    ) -> None:
        """A-ASSOCIATE-RJ (permanent, local limit exceeded) to a request above max_request_bytes, without reading
        it: the rest is discarded as it arrives (for DISCARD_S at most), never held."""
        assert why.rj is not None
        outcome.refuse(Result.REJECTED, why.reason, why.detail)
        log.warning(
            "A-ASSOCIATE-RJ to %r: %s (PS3.8 reason: local limit exceeded)",
            outcome.address,
            why.detail,
            extra={"assoc": outcome.association_id},
        )
        writer.write(a_associate_rj(*why.rj))
        with contextlib.suppress(ConnectionError, TimeoutError):
            await writer.drain()
            deadline = time.monotonic() + DISCARD_S
            while time.monotonic() < deadline:
                discarded: bytes = await asyncio.wait_for(reader.read(65536), DISCARD_S)
                if not discarded:
                    break
        writer.close()
        self._finished(outcome)

    async def _reject(self, conn: RelayConnection, writer: asyncio.StreamWriter, outcome: Outcome, why: Reject) -> None:
        """Answer the local device's A-ASSOCIATE-RJ as `why` says, and record it."""
        assert why.rj is not None
        outcome.refuse(Result.REJECTED, why.reason, why.detail, security=why.security)
        # An unknown caller is something the PACS administrator wants to see (a device missing from
        # [[local]], or one that should not be there); titles escaped, they come from the request.
        level = logging.WARNING if why.reason is Reason.UNKNOWN_CALLING_AE else logging.INFO
        log.log(
            level,
            "A-ASSOCIATE-RJ to %r at %r -> %r: %s",
            outcome.calling_ae,
            outcome.address,
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
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        outcome: Outcome,
    ) -> None:
        retry_s = self.config.bridge.open_retry_s
        if retry_s > 0 and self.link.reconnecting(retry_s):  # moved between replicas a moment ago
            await self.link.wait_signed_on(retry_s)
        decision = admit_outbound(
            self.route_table(),
            request.called_ae,
            calling_ae=request.calling_ae,
            address=outcome.address,
            callers=self.callers,
            running=Running.count(self.active.values()),  # this one is already counted
            limits=self.limits,
            link_up=self.link.connected,
            link_error=self.link.last_error,
        )
        if isinstance(decision, Reject):
            outcome.site = decision.route.site if decision.route is not None else outcome.site
            return await self._reject(conn, writer, outcome, decision)
        route = decision.route
        assert route is not None
        outcome.site = route.site
        # Services the owner granted us (from the directory): nothing granted is refused here, with no WAN trip.
        removed: frozenset[int] = frozenset()
        receive_only: frozenset[int] = frozenset()
        granted = granted_remote(self.link.directory, route.site, route.ae_title)
        if granted is not None and conn.request_pdu is not None:
            services = check_services(conn.request_pdu, request, granted)
            record_decision(
                self.audit, outcome, services, granted, where="caller", extra={"assoc": outcome.association_id}
            )
            if services.nothing_allowed:
                detail = f"{route.site} granted {', '.join(granted)} on {route.ae_title}, none of what was requested"
                why = Reject(Reason.SERVICE_NOT_GRANTED, detail, rj=REJECT_SERVICE_NOT_GRANTED)
                return await self._reject(conn, writer, outcome, why)
            removed, receive_only = services.refused_ids, services.receive_only
        # Accelerated route whose destination's capabilities are known: this router answers (relay_router.accel).
        capabilities = self.accel.capabilities_for(request.called_ae, self.config) if self.accel is not None else None
        if capabilities is not None and self.accel is not None and conn.request_pdu is not None:
            return await accept_locally(
                self.accel, self.config, conn.request_pdu, request, capabilities, granted, reader, writer, outcome
            )
        try:
            peer = self.link.peers.identity(route.site)
        except UnknownPeer:
            # Let the bridge decide and record the refusal (typically: not shared with us). Nothing of the
            # association is sent: no handshake, no A-ASSOCIATE-RQ.
            return await self._open_without_key(conn, writer, outcome, route, request.calling_ae)
        except PeerUnapproved as exc:
            log.warning(
                "refusing %s -> %s/%s: %s",
                request.calling_ae,
                route.site,
                route.ae_title,
                exc,
                extra={"assoc": outcome.association_id},
            )
            exc.audit(self.audit, direction="outbound", called_ae=route.ae_title, association_id=outcome.association_id)
            why = Reject(Reason.PEER_UNAPPROVED, str(exc), rj=REJECT_UNKNOWN_CALLED)
            return await self._reject(conn, writer, outcome, why)
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
        offered = Features.offer(compression=self.config.dicom.compression, spill=self.config.dicom.spill)
        forwarded = conn.accept_request(called=route.ae_title, remove=removed, receive_only=receive_only)
        (forward,) = [a for a in forwarded if isinstance(a, Send)]
        retry = OpenRetry(self.link, route.site, retry_s)
        while True:  # more than once only while the bridge moves a router between replicas (open_retry)
            context = AssociationContext(outcome.association_id, self.link.site, route.site, route.ae_title)
            # The offer is signed with the handshake: the bridge cannot strip a feature from it unnoticed.
            handshake, sealer = initiate(self.link.identity, peer, context, offered.names())
            opening = pb.Open(
                association_id=outcome.association_id,
                to_site=route.site,
                called_ae_title=route.ae_title,
                calling_ae_title=request.calling_ae,
                first_data=first_frame(sealer, forward.data),
                handshake=handshake_message(handshake),
                features=offered.names(),
            )
            try:
                stream, answer = await self.link.open(opening)
            except LinkDown as exc:
                if retry_s > 0 and await retry.again(None):
                    self._next_attempt(outcome, str(exc))
                    continue
                outcome.refuse(Result.REFUSED, Reason.BRIDGE_UNREACHABLE, str(exc))
                writer.write(a_associate_rj(*REJECT_CONGESTION))
                writer.close()
                return
            if answer.HasField("refused") and retry_s > 0 and await retry.again(answer.refused.reason):
                stream.cancel()
                self._next_attempt(outcome, received_refusal(answer.refused)[1])
                continue
            break
        if answer.HasField("refused"):
            outcome.refuse(Result.REFUSED, *received_refusal(answer.refused))
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
            features=offered,
            confirm_from=(peer, route.site),
            blobs=self.blobs,
            spill=self.spill,
            pace=self.paces.setdefault(route.site, PathPace()),
            identity=self.identity.remote(request.called_ae),
            moves=self.accel.move_watch(route.site, request.calling_ae, outcome.association_id, self.config)
            if self.accel is not None
            else None,
        )
        outcome.bytes_to_remote += len(forward.data)
        await self._run(relay)

    def _next_attempt(self, outcome: Outcome, why: str) -> None:
        """The next Open is a new association for the bridge and the partner (a new id and handshake)."""
        previous = outcome.association_id
        outcome.association_id = uuid.uuid4().hex
        self.active.pop(previous, None)
        self.active[outcome.association_id] = outcome
        log.info(
            "bridge moving between replicas (%s); trying again as association %s",
            why,
            outcome.association_id,
            extra={"assoc": previous},
        )

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
                reason, detail = received_refusal(answer.refused, why.detail)
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
