"""Inbound: the bridge announces an association for one of this router's shared devices.

The router joins the association stream, admits or refuses it by its own rules
(relay_router.routing: the bridge is trusted neither to enforce sharing nor to
announce an association once), authenticates the calling router, connects to
the device and relays. Every refusal is a `Refused` frame with a reason code
and a typed `Outcome` (relay_router.outcome).
"""

from __future__ import annotations

import asyncio
import logging

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.accel.hooks import refuse_unaccelerated, run_far_session
from relay_router.association import RelayedAssociation
from relay_router.close_codes import FIXED_DETAILS, PEER_NOT_APPROVED
from relay_router.grants import check_services, record_decision
from relay_router.host import AssociationHost, tune_socket
from relay_router.outcome import Outcome, Result
from relay_router.pace import PathPace
from relay_router.peers import PeerUnapproved
from relay_router.routing import AUTHENTICATION_FAILED, Reject, Running, admit_inbound
from relay_router.seal import AssociationContext, Confirmation, FrameSealer, HandshakeError, PublicIdentity, respond
from relay_router.tunnel import AssociationStream, LinkDown
from relay_router.ul import AssociateRequested, RelayConnection, Side
from relay_router.wire.codec import FrameRejected, confirm_frame, handshake_from, open_first_frame
from relay_router.wire.features import Features

log = logging.getLogger("relay_router")


class InboundCalls(AssociationHost):
    """The part of `RouterService` that serves other sites calling our shared devices (the link's notice handler)."""

    async def _incoming(self, notice: pb.IncomingAssociation) -> None:
        self._track(None)
        aid = notice.association_id
        extra = {"assoc": aid}
        outcome = Outcome(aid, "inbound", notice.from_site, called_ae=notice.called_ae_title)
        running = Running.count(self.active.values())  # before this one
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
        # Only the code and a fixed text cross the bridge (relay_router.close_codes); `detail` stays here.
        public = why.public_detail if why.public_detail in FIXED_DETAILS else ""
        await stream.send(pb.Frame(refused=pb.Refused(reason=why.refused, detail=public)))
        await stream.finish()

    def _verify_incoming(
        self, notice: pb.IncomingAssociation, answered: Features
    ) -> tuple[Confirmation, FrameSealer, bytes]:
        """Authenticate the initiating router and record the association as seen.

        Returns (our Confirm, sealer, A-ASSOCIATE-RQ bytes). The id enters the replay record only
        once the handshake verified: forged notices can neither fill it nor push a real id out."""
        offered = notice.caller_identity if notice.HasField("caller_identity") else None
        initiator = self.link.peers.caller_identity(
            notice.from_site, None if offered is None else PublicIdentity(offered.sign_key, offered.kem_key)
        )
        context = AssociationContext(notice.association_id, notice.from_site, self.link.site, notice.called_ae_title)
        confirmation, sealer = respond(
            self.link.identity,
            initiator,
            handshake_from(notice.handshake),
            context,
            offered=list(notice.features),
            answered=answered.names(),
        )
        try:
            request_pdu = open_first_frame(sealer, notice.first_frame.data)
        except FrameRejected as exc:
            raise HandshakeError(exc.detail) from exc
        try:
            fresh = self._seen_associations.claim(notice.association_id, notice.handshake.sent_unix_ms)
        except ValueError as exc:
            raise HandshakeError(str(exc)) from exc
        if not fresh:
            raise HandshakeError(f"association {notice.association_id} was already seen (replayed by the bridge?)")
        return confirmation, sealer, request_pdu

    async def _relay_inbound(
        self, notice: pb.IncomingAssociation, outcome: Outcome, extra: dict[str, str], running: Running
    ) -> None:
        offer = notice.direct_join if notice.HasField("direct_join") else None
        stream = await self.link.join(notice.association_id, offer)
        # Our own limit, device and sharing rules: the bridge is not trusted to enforce them (it could invent
        # a calling site, or announce an association twice).
        decision = admit_inbound(
            self.shared,
            from_site=notice.from_site,
            called_ae=notice.called_ae_title,
            association_id=notice.association_id,
            seen=self._seen_associations,
            running=running,
            limits=self.limits,
            our_site=self.link.site,
        )
        if isinstance(decision, Reject):
            if decision.log is not None and decision.security:
                log.error("%s", decision.log, extra={**extra, "security_alert": decision.alert or "access"})
            elif decision.log is not None:
                log.warning("%s", decision.log, extra=extra)
            return await self._refuse_inbound(stream, outcome, decision)
        device = self.shared[notice.called_ae_title]
        accelerated = self.accel is not None and self.accel.accepts(device)
        features = Features.answer(
            notice.features,
            compression=self.config.dicom.compression,
            spill=self.config.dicom.spill,
            accel=accelerated,
        )
        if Features.parse(notice.features).accel and not features.accel:
            why = Reject(
                Reason.SERVICE_NOT_GRANTED,
                f"{notice.from_site} asked for an accelerated transfer to {device.ae_title}, which takes none",
                refused=refuse_unaccelerated(),
            )
            return await self._refuse_inbound(stream, outcome, why)
        try:
            confirmation, sealer, request_pdu = self._verify_incoming(notice, features)
        except PeerUnapproved as exc:
            # Not yet an attack (a new partner's first call looks the same): refused and waiting for the
            # operator, who compares the fingerprint with the partner's operator (relay_router.approvals).
            log.warning("refused an association from %s: %s", notice.from_site, exc, extra=extra)
            exc.audit(
                self.audit, direction="inbound", called_ae=notice.called_ae_title, association_id=notice.association_id
            )
            why = Reject(
                Reason.PEER_UNAPPROVED,
                str(exc),
                refused=pb.Refused.NOT_PERMITTED,
                public_detail=PEER_NOT_APPROVED,
            )
            return await self._refuse_inbound(stream, outcome, why)
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
        if features.accel and self.accel is not None:  # the payload is a record stream (relay_router.accel)
            return await run_far_session(
                self.accel,
                self.config,
                stream,
                device=device,
                from_site=notice.from_site,
                hello=request_pdu,
                sealer=sealer,
                confirmation=confirmation,
                features=features,
                outcome=outcome,
                identity=self.identity.shared(device.ae_title),
            )
        if self.accel is not None:  # held C-MOVE responses must not wait for sub-operations coming this way
            self.accel.transparent_inbound(notice.from_site, device)
        # Parse the RQ before contacting the device: the services this site may use are checked against our
        # own configuration (never the directory's copy), and a request for nothing granted never reaches it.
        conn = RelayConnection(Side.REMOTE)
        actions = conn.receive(Side.REMOTE, request_pdu)
        request = next((a.info for a in actions if isinstance(a, AssociateRequested)), None)
        removed: frozenset[int] = frozenset()
        receive_only: frozenset[int] = frozenset()
        if request is not None and conn.request_pdu is not None:
            outcome.calling_ae, outcome.called_ae = request.calling_ae, request.called_ae
            outcome.abstract_syntaxes = tuple(pc.abstract_syntax or "" for pc in request.presentation_contexts)
            granted = device.services_for(notice.from_site)
            services = check_services(conn.request_pdu, request, granted)
            record_decision(self.audit, outcome, services, granted, where="owner", extra=extra)
            if services.nothing_allowed:
                why = Reject(
                    Reason.SERVICE_NOT_GRANTED,
                    f"{notice.from_site} may not use {', '.join(services.refused_syntaxes)} on {device.ae_title}",
                    refused=pb.Refused.SERVICE_NOT_GRANTED,
                )
                return await self._refuse_inbound(stream, outcome, why)
            removed, receive_only = services.refused_ids, services.receive_only
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
            )
            return await self._refuse_inbound(stream, outcome, why)
        tune_socket(writer)
        await stream.send(confirm_frame(confirmation, features))
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
            identity=self.identity.shared(device.ae_title),
        )
        if request is None:
            await self._run(relay, actions)  # the connection has produced the abort
            return
        alias = self.local_alias(notice.from_site, request.calling_ae)
        await self._run(relay, conn.accept_request(calling=alias, remove=removed, receive_only=receive_only))
