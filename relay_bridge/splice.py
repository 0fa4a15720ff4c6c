"""The whole life of an association at the bridge: admission, splice, join, timeout, pumping, cleanup.

`AssociationService.Associate` takes both ends: the initiating router's Open
(admitted by relay_bridge.admission, then announced to the destination on its
control stream) and the destination router's Join; the two calls are spliced
until either ends, and the association is then audited, counted and its
leftover blobs released.

The bridge never parses DICOM, nor even the frames after the first: the
Associate method is registered with identity (de)serializers, so a frame from
one router is handed to the other as the serialized bytes it arrived as.
Each stream handler writes only to its own gRPC call (grpc.aio
contexts are not shared between tasks); frames cross between the two handlers
through a `Channel` per direction that holds at most a few frames, so a slow
receiver stops the sender's reads and HTTP/2 flow control pushes back all the
way to the sending router. Memory per association is bounded by
2 x `depth` x the maximum frame size.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge.admission import Rejection
from relay_bridge.cluster.tickets import TICKET_METADATA
from relay_bridge.directory_view import KEM_NAME
from relay_bridge.sessions import first_message
from relay_common.errors import Reason, RelayError
from relay_common.setup_timing import mark

if TYPE_CHECKING:
    from relay_bridge.sessions import RouterSession
    from relay_bridge.state import BridgeState

log = logging.getLogger("relay_bridge.splice")
# The association's own log lines keep the bridge's logger name (operators grep them).
assoc_log = logging.getLogger("relay_bridge")
PUMP_GRACE_S = 1.0


class Channel:
    """A bounded FIFO of frames with a close that never blocks.

    `put` waits while `depth` frames are queued (backpressure). `close`
    appends an optional last frame regardless of the bound, so a dying end can
    always tell its partner why; after it, `get` drains what is queued and
    then returns None.
    """

    def __init__(self, depth: int) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._depth = depth
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, frame: bytes) -> bool:
        """Queue a frame; False if the channel was closed (the frame is dropped)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or len(self._items) < self._depth)
            if self._closed:
                return False
            self._items.append(frame)
            self._changed.notify_all()
            return True

    async def get(self) -> bytes | None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or bool(self._items))
            if self._items:
                frame = self._items.popleft()
                self._changed.notify_all()
                return frame
            return None

    async def close(self, last: bytes | None = None) -> None:
        async with self._changed:
            if not self._closed:
                if last is not None:
                    self._items.append(last)
                self._closed = True
            self._changed.notify_all()


def close_frame(reason: pb.Close.Reason, detail: str) -> bytes:
    return pb.Frame(close=pb.Close(reason=reason, detail=detail)).SerializeToString()


@dataclass
class Splice:
    """One association between an initiating and a destination router."""

    association_id: str
    from_site: str
    to_site: str
    called_ae_title: str
    calling_ae_title: str
    depth: int = 4
    opened: float = field(default_factory=time.time)
    joined: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    to_destination: Channel = field(init=False)
    to_initiator: Channel = field(init=False)
    bytes_from_initiator: int = 0
    bytes_from_destination: int = 0
    frames: int = 0
    # How the destination joined: "direct" (a ticketed Join at this origin replica,
    # relay_bridge.cluster.tickets), or "" (an ordinary Join, or the far end of a link).
    joined_by: str = ""
    # At a holding replica: the destination joined the origin replica directly instead, so this
    # replica's part ended before it carried anything (not an association of its own to audit).
    handed_off: bool = False

    def __post_init__(self) -> None:
        self.to_destination = Channel(self.depth)
        self.to_initiator = Channel(self.depth)

    async def pump(self, read, outbound: Channel, *, from_initiator: bool) -> None:
        """Read frames from one call (`read` is context.read) into the partner's channel."""
        side = self.from_site if from_initiator else self.to_site
        try:
            while True:
                frame = await read()
                if frame is None or frame is grpc.aio.EOF:
                    await outbound.close()
                    return
                # Serialized frames: payload plus a few bytes of protobuf framing.
                if from_initiator:
                    self.bytes_from_initiator += len(frame)
                else:
                    if not self.bytes_from_destination:
                        mark("destination's first frame", self.association_id)
                    self.bytes_from_destination += len(frame)
                self.frames += 1
                if not await outbound.put(frame):
                    return  # partner gone; its own handler reports why
        except asyncio.CancelledError:
            await outbound.close(close_frame(pb.Close.ABORTED, f"the link to {side} was lost"))
            raise
        except Exception as exc:  # any read failure means that end is gone
            log.info("stream from %s ended: %s", side, exc, extra={"assoc": self.association_id})
            await outbound.close(close_frame(pb.Close.ABORTED, f"the link to {side} was lost"))

    async def drain(self, inbound: Channel, write) -> None:
        """Write frames from our channel to our own call until the partner is done."""
        while (frame := await inbound.get()) is not None:
            await write(frame)


def abandon_pending(splices: Mapping[str, Splice], session: RouterSession) -> None:
    """A router's control stream ended: associations still waiting for a Join will not get one."""
    for assoc_id in list(session.associations):
        splice = splices.get(assoc_id)
        if splice is not None and not splice.joined.done():
            splice.joined.cancel()


async def abort_associations(splices: Mapping[str, Splice], session: RouterSession, detail: str) -> None:
    """Tell both ends of each of the router's associations that it is aborted (e.g. the router was disabled)."""
    for assoc_id in list(session.associations):
        splice = splices.get(assoc_id)
        if splice is not None:
            await splice.to_initiator.close(close_frame(pb.Close.ABORTED, detail))
            await splice.to_destination.close(close_frame(pb.Close.ABORTED, detail))


class AssociationService:
    """The Associate RPC: one call per end of an association."""

    def __init__(self, state: BridgeState, splice_class: type[Splice] = Splice) -> None:
        self.state = state
        self.splice_class = splice_class  # a seam for tests that play a malicious or slow bridge
        self._blob_tasks: set[asyncio.Task[int]] = set()
        self._lease_tasks: set[asyncio.Task[None]] = set()

    async def Associate(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        ticket = dict(context.invocation_metadata() or ()).get(TICKET_METADATA)
        if ticket is not None:  # a destination router joining here directly, with no session here
            return await self.join_with_ticket(str(ticket), context)
        session = await self.state.sessions.authenticate_caller(context)
        raw = await first_message(context, self.state.config.limits, "Associate", session.name)
        if not isinstance(raw, bytes):  # grpc.aio.EOF: the caller went away
            return
        try:
            first = pb.Frame.FromString(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame is not a relay.v1.Frame")
            raise AssertionError("context.abort() raises") from exc
        if first.HasField("open"):
            await self.initiate(session, first.open, context)
        elif first.HasField("join"):
            await self.join(session, first.join, context)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Open or Join")

    async def refuse(self, context: grpc.aio.ServicerContext, rejection: Rejection, assoc: str) -> None:
        assoc_log.info("association refused: %s", rejection.detail, extra={"assoc": assoc})
        self.state.metrics.refused(rejection.code, assoc, rejection.detail)
        await context.write(frame_bytes(refused=pb.Refused(reason=rejection.code, detail=rejection.detail)))

    def _access_refused(self, session: RouterSession, op: pb.Open, aid: str) -> None:
        """Audit it, and tell the device's owner that someone asked for a device it did not share."""
        limiter = self.state.refusal_audits
        if not limiter.allow(f"access_refused:{session.name}"):
            return  # counted in the metrics; the audit trail and the owner already heard of this router
        self.state.audit.event(
            "access_refused",
            "alert",
            router=session.name,
            to_site=op.to_site,
            called_ae=op.called_ae_title,
            calling_ae=op.calling_ae_title,
            association=aid,
            suppressed=limiter.suppressed(f"access_refused:{session.name}"),
        )
        owner = self.state.sessions.get(op.to_site)
        if owner is not None:
            owner.send(
                pb.BridgeMessage(
                    audit=pb.AuditNotice(
                        event="access_refused",
                        peer_site=session.name,
                        ae_title=op.called_ae_title,
                        detail=f"{session.name} asked for {op.called_ae_title}, which is not shared with it",
                    )
                )
            )
        assoc_log.warning(
            "router %s asked for %s/%s, which is not shared with it",
            session.name,
            op.to_site,
            op.called_ae_title,
            extra={"assoc": aid},
        )

    def _initiated_by(self, session: RouterSession) -> int:
        """The associations `session`'s router opened (its share of max_associations_per_router)."""
        splices = self.state.splices
        return sum(
            1 for aid in session.associations if (s := splices.get(aid)) is not None and s.from_site == session.name
        )

    def _towards(self, session: RouterSession) -> int:
        """The associations other routers opened to `session`'s router (max_inbound_per_router)."""
        return len(session.associations) - self._initiated_by(session)

    async def precheck_open(self, op: pb.Open, context: grpc.aio.ServicerContext) -> Rejection | None:
        """What every Open passes before anything is looked up, logged or audited, whether a router
        sent it here or another replica forwarded it (relay_bridge.cluster.forward.accept_forwarded):
        a new association id (else the call is aborted), a replica that is not draining, valid fields."""
        if not admission.valid_association_id(op.association_id, self.state.splices):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "association_id must be 32 new hex digits")
        if self.state.draining:
            return admission.draining()
        return admission.invalid_open(
            to_site=op.to_site, called_ae_title=op.called_ae_title, calling_ae_title=op.calling_ae_title
        )

    async def initiate(self, session: RouterSession, op: pb.Open, context: grpc.aio.ServicerContext) -> None:
        state, aid, limits = self.state, op.association_id, self.state.config.limits
        mark("open", aid)
        invalid = await self.precheck_open(op, context)
        if invalid is not None:
            if invalid.reason is not Reason.SHUTDOWN and state.refusal_audits.allow(f"invalid_open:{session.name}"):
                state.audit.event(
                    "association_refused",
                    "failure",
                    router=session.name,
                    association=aid,
                    reason=invalid.reason.value,
                    detail=invalid.detail,
                    suppressed=state.refusal_audits.suppressed(f"invalid_open:{session.name}"),
                )
            return await self.refuse(context, invalid, aid)
        # From the in-memory view: an Open does not wait behind the database (publications, sign-ons).
        view = await state.directory_cache.view()
        device = view.device(op.to_site, op.called_ae_title)
        destination = state.sessions.get(op.to_site)
        # In a cluster, a destination not signed on here may be held by another replica (relay_bridge.cluster).
        elsewhere = None
        if destination is None and state.cluster is not None and device is not None:
            elsewhere = await state.cluster.locate_quietly(op.to_site, aid)
            mark("located from the map" if elsewhere is not None and elsewhere.cached else "located", aid)
        rejection = admission.admit_open(
            caller=session.name,
            to_site=op.to_site,
            called_ae_title=op.called_ae_title,
            device=device,
            destination_online=destination is not None or elsewhere is not None,
            active=len(state.splices),
            caller_active=self._initiated_by(session),
            destination_inbound=0 if destination is None else self._towards(destination),
            limits=admission.Limits(
                limits.max_associations, limits.max_associations_per_router, limits.max_inbound_per_router
            ),
        )
        if rejection is not None:
            if rejection.access_refused:
                self._access_refused(session, op, aid)
            return await self.refuse(context, rejection, aid)
        if not admission.valid_association_id(aid, state.splices):  # taken while the directory was read
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "association_id must be 32 new hex digits")
        over = await shared_limit_refusal(state, aid, session.name, op.to_site)
        if over is not None:
            return await self.refuse(context, over, aid)
        mark("admitted", aid)
        splice = self.splice_class(
            aid, session.name, op.to_site, op.called_ae_title, op.calling_ae_title, depth=limits.frame_queue_depth
        )
        state.splices[aid] = splice
        session.associations.add(aid)
        if destination is None:  # held by another replica: the destination end is a Forward call
            assert elsewhere is not None and state.cluster is not None
            try:
                await state.cluster.forwarder.run(self, splice, op, context, elsewhere)
            finally:
                state.splices.pop(aid, None)
                session.associations.discard(aid)
                self._finished(splice)
            return
        destination.associations.add(aid)
        try:
            await self._run_initiator(splice, destination, op, context, view.identities.get(session.name))
        finally:
            state.splices.pop(aid, None)
            session.associations.discard(aid)
            destination.associations.discard(aid)
            self._finished(splice)
            if state.shared_associations is not None:
                lease = asyncio.get_running_loop().create_task(release_lease(state, aid))
                self._lease_tasks.add(lease)
                lease.add_done_callback(self._lease_tasks.discard)

    async def _run_initiator(
        self,
        splice: Splice,
        destination: RouterSession,
        op: pb.Open,
        context: grpc.aio.ServicerContext,
        caller_keys: tuple[bytes, bytes] | None = None,
        *,
        direct: pb.DirectJoin | None = None,
        origin_gone: asyncio.Future[object] | None = None,
    ) -> None:
        """Announce the association to `destination`, wait for its Join, splice. With `direct` (a forwarded
        Open whose origin offered a direct join, to a router that can make one) the notice carries it, and
        `origin_gone` completing first means the router joined at the origin: this replica is done."""
        aid = splice.association_id
        notice = pb.IncomingAssociation(
            association_id=aid,
            from_site=splice.from_site,
            called_ae_title=op.called_ae_title,
            first_frame=pb.Frame(data=op.first_data),
            handshake=op.handshake,
            features=op.features,
        )
        if caller_keys is not None:  # for this association only (directory_view.callers_of)
            notice.caller_identity.CopyFrom(pb.Identity(sign_key=caller_keys[0], kem_key=caller_keys[1], kem=KEM_NAME))
        if direct is not None:
            notice.direct_join.CopyFrom(direct)
        if not destination.send(pb.BridgeMessage(incoming=notice)):
            return await self.refuse(context, admission.destination_overloaded(op.to_site), aid)
        mark("notice queued", aid)
        waits: list[asyncio.Future[Any]] = [splice.joined] if origin_gone is None else [splice.joined, origin_gone]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=self.state.config.limits.join_timeout_s, return_when="FIRST_COMPLETED"
            )
            if not splice.joined.done() and origin_gone is not None and origin_gone in done:
                splice.joined.cancel()
                if (
                    origin_gone.cancelled()
                    or origin_gone.exception() is not None
                    or origin_gone.result() is not grpc.aio.EOF
                ):
                    # Cut (or a frame before the answer): the origin is gone, the association with it.
                    assoc_log.info(
                        "association %s -> %s: the origin replica went away",
                        splice.from_site,
                        op.to_site,
                        extra={"assoc": aid},
                    )
                    return
                splice.handed_off = True  # the origin's end mark: the router joined there
                assoc_log.info(
                    "association %s -> %s joined at replica %s directly",
                    splice.from_site,
                    op.to_site,
                    direct.replica if direct is not None else "?",
                    extra={"assoc": aid},
                )
                return
            if not splice.joined.done() or splice.joined.cancelled():
                raise TimeoutError
        except (TimeoutError, asyncio.CancelledError):
            if not splice.joined.done():
                splice.joined.cancel()
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return await self.refuse(context, admission.join_timed_out(op.to_site), aid)
        assoc_log.info(
            "association %s -> %s/%s spliced", splice.from_site, op.to_site, op.called_ae_title, extra={"assoc": aid}
        )
        await self.splice_here(splice, context)

    async def splice_here(self, splice: Splice, context: grpc.aio.ServicerContext) -> None:
        """The destination has joined: tell the initiating end (a router, or the origin replica's link) and
        pump until the association ends."""
        self.state.metrics.spliced(splice)
        mark("accepted sent", splice.association_id)
        await context.write(frame_bytes(accepted=pb.Accepted(association_id=splice.association_id)))
        pump = asyncio.create_task(splice.pump(context.read, splice.to_destination, from_initiator=True))
        try:
            await splice.drain(splice.to_initiator, context.write)
        finally:
            await splice.to_initiator.close()  # unblock the partner if we are gone
            await finish(pump)

    def _finished(self, splice: Splice) -> None:
        """Release what the routers did not, then audit, log and count the association."""
        aid = splice.association_id
        if splice.handed_off:  # the origin replica runs, audits and counts it (a direct join)
            self.state.metrics.forget(aid)
            return
        if self.state.blobs is not None:
            self.state.blobs.association_ended(aid)
            task = asyncio.get_running_loop().create_task(self.state.blobs.release(aid))
            self._blob_tasks.add(task)
            task.add_done_callback(self._blob_tasks.discard)
        self.state.audit.event(
            "association",
            "success" if splice.joined.done() and not splice.joined.cancelled() else "failure",
            association=aid,
            from_site=splice.from_site,
            to_site=splice.to_site,
            called_ae=splice.called_ae_title,
            calling_ae=splice.calling_ae_title,
            bytes_from_initiator=splice.bytes_from_initiator,
            bytes_from_destination=splice.bytes_from_destination,
            seconds=round(time.time() - splice.opened, 3),
        )
        assoc_log.info(
            "association closed: %d bytes from %s, %d bytes from %s, %d frames, %.1f s",
            splice.bytes_from_initiator,
            splice.from_site,
            splice.bytes_from_destination,
            splice.to_site,
            splice.frames,
            time.time() - splice.opened,
            extra={"assoc": aid},
        )
        self.state.metrics.closed(splice)

    async def join(self, session: RouterSession, join: pb.Join, context: grpc.aio.ServicerContext) -> None:
        mark("join", join.association_id)
        splice = self.state.splices.get(join.association_id)
        admitted = admission.admit_join(
            caller=session.name,
            to_site=splice.to_site if splice is not None else None,
            already_joined=splice is not None and splice.joined.done(),
        )
        if not admitted or splice is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no association waiting for this router with that id")
            return
        splice.joined.set_result(None)
        await self._run_destination(splice, context)

    async def join_with_ticket(self, ticket: str, context: grpc.aio.ServicerContext) -> None:
        """A destination router joins here, at the origin replica, with the ticket this replica issued for the
        association (relay_bridge.cluster.tickets): A and B are then spliced here, as a local association.

        The ticket is consumed before anything else is checked, so it cannot be tried twice; the router is
        answered Accepted before any frame, so that it knows to join the ordinary way when refused here. The
        ticket names the association, so it is joined as soon as the call arrives: the Join frame the router
        sends with it (the first message) is checked before any frame of the router's reaches the initiating
        end, not waited for first (on a loaded replica it arrives a millisecond or more after the call)."""
        state = self.state
        tickets = state.cluster.tickets if state.cluster is not None else None
        entry = tickets.redeem(ticket, context.peer()) if tickets is not None else None
        if entry is None:
            log.warning("a join ticket from %s was refused: unknown, used or expired", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join ticket refused: unknown, used or expired")
            raise AssertionError("unreachable: abort raises")
        assert tickets is not None
        aid = entry.association_id
        mark("ticket join", aid)
        problem = state.sessions.certificate_problem(context, entry.site)
        if problem:
            tickets.revoke(aid)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        splice = state.splices.get(aid)
        if splice is None or splice.to_site != entry.site or splice.joined.done():
            tickets.revoke(aid)
            await context.abort(grpc.StatusCode.NOT_FOUND, "no association waiting for this router with that id")
            return
        # Joined from here on (no await since the check above: the link cannot have answered meanwhile), so
        # the origin's Accepted to the initiating router does not wait for this one to be written either.
        splice.joined_by = "direct"
        splice.joined.set_result(None)
        mark("ticket join accepted", aid)
        await context.write(frame_bytes(accepted=pb.Accepted(association_id=aid)))
        checked = False

        async def read() -> object:
            nonlocal checked
            if not checked:  # the Join, within the first-message limits, then the router's frames
                checked = True
                raw = await first_message(context, state.config.limits, "Associate", f"{entry.site} (join ticket)")
                if not _is_join_of(raw, aid):
                    log.warning(
                        "a join ticket for %s was presented without a Join of it; the association is aborted",
                        entry.site,
                        extra={"assoc": aid},
                    )
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED, "a join ticket must come with the Join of its association"
                    )
            return await context.read()

        await self._run_destination(splice, context, read)

    async def _run_destination(
        self, splice: Splice, context: grpc.aio.ServicerContext, read: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        pump = asyncio.create_task(splice.pump(read or context.read, splice.to_initiator, from_initiator=False))
        try:
            await splice.drain(splice.to_destination, context.write)
        finally:
            await splice.to_destination.close()
            await finish(pump)


def _is_join_of(raw: object, aid: str) -> bool:
    """`raw` (a first message) is a well-formed Frame whose Join names `aid`."""
    if not isinstance(raw, bytes):
        return False
    try:
        first = pb.Frame.FromString(raw)
    except DecodeError:
        return False
    return first.HasField("join") and first.join.association_id == aid


async def shared_limit_refusal(state: BridgeState, aid: str, caller: str, to_site: str) -> Rejection | None:
    """With replicas: lease the association's slots in the database, or refuse it (the limits are
    cluster-wide). A database that is away does not stop traffic: this replica's own counts,
    already checked, decide alone meanwhile (logged)."""
    if state.shared_associations is None:
        return None
    try:
        over = await state.shared_associations.acquire(aid, caller, to_site)
    except RelayError as exc:
        log.warning("association limits counted on this replica only: %s", exc, extra={"assoc": aid})
        return None
    return None if over is None else admission.over_cluster_limit(over.router, over.direction)


async def release_lease(state: BridgeState, aid: str) -> None:
    assert state.shared_associations is not None
    try:
        await state.shared_associations.release(aid)
    except RelayError as exc:  # the next renewal drops it (relay_bridge.db.notify)
        log.warning("association lease not released yet: %s", exc, extra={"assoc": aid})


def frame_bytes(**kind: object) -> bytes:
    return pb.Frame(**kind).SerializeToString()  # type: ignore[arg-type]


async def finish(task: asyncio.Task[None]) -> None:
    """Give a pump a moment to see its stream's end, then stop it."""
    try:
        await asyncio.wait_for(task, PUMP_GRACE_S)
    except (TimeoutError, asyncio.CancelledError):
        pass
