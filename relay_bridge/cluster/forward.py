"""Cross-replica forwarding: an association whose destination router is held by another replica.

The origin replica (where the initiating router's Open arrived) has admitted the Open as it
would a local one, then takes a link to the replica that holds the destination (found in the
presence table): a warm mutual-TLS connection of relay_bridge.cluster.link, or, when that replica
has none (an older version) or cannot be reached on it, one `relay.cluster.v1.Cluster/Forward`
call. It sends the Open's frame, with the calling site in the link's header (the call's
metadata). The holding replica checks it again against its own view and limits and runs the
destination end exactly as for a local Open (`_run_initiator`: the notice on the destination's
control stream, the wait for its Join, the splice); its answer (Refused, or Accepted and then the
frames) comes back on the link.

At the origin the association is an ordinary `Splice` whose destination end is the link (or the
Forward call) instead of a Join: the same bounded `Channel`s, and the link is read only as fast as
the channel drains, so TCP flow control (HTTP/2's on a Forward call) carries backpressure across
the replica hop too (at most `depth` frames per direction held per replica). Frames cross as the
bytes they arrived as; only the holding replica's first answer is parsed (to tell Refused from
Accepted).

Zero trust: the call goes only to an address read from the replicas table (written by replicas,
never by a router), checked as HOST:PORT, over mutual TLS with the cluster CA; the receiving
replica accepts only callers presenting the cluster certificate. A link goes to the same host, at
the port the replica answered on that authenticated channel (`Cluster/Link`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge.admission import Rejection
from relay_bridge.cluster.link import Link, LinkClosed, LinkPool
from relay_bridge.cluster.link_codec import Header
from relay_bridge.cluster.pki import CLUSTER_NAME
from relay_bridge.cluster.presence import Location
from relay_bridge.cluster.tickets import DNS_LABEL, TICKET_FORM, JoinTickets
from relay_bridge.sessions import first_message
from relay_bridge.splice import Splice, finish
from relay_common.config import parse_host_port
from relay_common.errors import Reason, RelayError
from relay_common.setup_timing import mark
from relay_common.validate import is_site_name

if TYPE_CHECKING:
    from relay_bridge.splice import AssociationService

log = logging.getLogger("relay_bridge.cluster")
SERVICE = "relay.cluster.v1.Cluster"
FORWARD = f"/{SERVICE}/Forward"
EVICT = f"/{SERVICE}/Evict"
LINK = f"/{SERVICE}/Link"  # the replica's link port (relay_bridge.cluster.link), as decimal text
LINK_TIMEOUT_S = 2.0
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
FROM_SITE = "relay-from-site"  # metadata: the initiating site (authenticated by the origin replica)
SITE = "relay-site"  # Evict metadata: the site that signed on at the calling replica...
SINCE = "relay-since"  # ...and when (seconds since the epoch, as a decimal)
EVICT_TIMEOUT_S = 2.0
ORIGIN = "relay-replica"  # metadata: the origin replica's id (for the logs)
# Peer channels kept open (one per replica address); more addresses than this means replicas
# came and went: the least recently used channel is closed.
MAX_CHANNELS = 64
# How long the origin waits for the holding replica's first answer beyond the join timeout
# (which the holding replica applies itself and answers with Refused TIMEOUT).
ANSWER_MARGIN_S = 5.0
# While the holding replica has not answered an Open, the database is asked this often whether it still holds the
# destination site: a replica that stopped or restarted meanwhile may never answer (CI saw a Forward call to a
# restarting replica wait out the whole answer timeout), and the site has signed on elsewhere by then.
HOLDER_CHECK_S = 2.0
# After a direct join, the holding replica is told to let go this much later (its part holds only the
# notice's wait, counted against the destination's inbound cap there meanwhile).
LET_GO_AFTER_S = 0.1


class ReplicaUnreachable(LinkClosed):
    """The replica's cluster port itself did not answer (not only its link port): a Forward call over the same
    channel would not reach it either."""


def replica_unreachable(to_site: str) -> Rejection:
    """The replica holding the site did not answer: transient (its routers are reconnecting elsewhere)."""
    return Rejection(pb.Refused.SITE_OFFLINE, Reason.SITE_OFFLINE, f"site {to_site!r} is offline")


def channel_options(max_frame_bytes: int) -> list[tuple[str, int | str]]:
    size = max_frame_bytes + 64 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.ssl_target_name_override", CLUSTER_NAME),  # every replica's certificate names the cluster
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),  # as the router-facing server (server_options)
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.ping_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # A replica that restarts at the same address is found again quickly.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_http_proxy", 0),
    ]


def server_options(max_frame_bytes: int) -> list[tuple[str, int]]:
    """The internal port: the message sizes and initial window of the router-facing server, and the
    peers' keepalive pings accepted (every 10 s, also on an idle channel: a dead replica is found
    before an association waits on it)."""
    size = max_frame_bytes + 64 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


class Forwarder:
    """The origin side: one channel per peer replica, and the splice of a forwarded association."""

    def __init__(
        self,
        credentials: grpc.ChannelCredentials,
        replica_id: str,
        *,
        max_frame_bytes: int,
        join_timeout_s: float,
        links: LinkPool | None = None,
        join_label: str | None = None,
        tickets: JoinTickets | None = None,
    ) -> None:
        self._credentials = credentials
        self.links = links
        # The direct join (relay_bridge.cluster.tickets): this replica's name for routers, and its tickets.
        self.join_label = join_label
        self.tickets = tickets
        self.replica_id = replica_id
        self._options = channel_options(max_frame_bytes)
        self._answer_timeout = join_timeout_s + ANSWER_MARGIN_S
        self._channels: collections.OrderedDict[str, grpc.aio.Channel] = collections.OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        # The holder from the database (not the in-memory map), and the map's entry dropped: a cached
        # holder that refused an Open as site offline (set by relay_bridge.cluster.node).
        self.relocate: Callable[[str], Awaitable[Location | None]] | None = None
        self.forget_holder: Callable[[str, Location], None] | None = None

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a replica's advertised address (from the replicas table; checked before use)."""
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        host, port = parse_host_port(address, default_host="")  # ValueError: not HOST:PORT
        if not host or port == 0:
            raise ValueError(f"replica address {address!r} has no host or port")
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self._channels[address] = channel
        while len(self._channels) > MAX_CHANNELS:
            _, oldest = self._channels.popitem(last=False)
            self._close_later(oldest)
        return channel

    def forget(self, address: str) -> None:
        """Drop a channel whose replica failed (a new one is made on the next use)."""
        if self.links is not None:
            self.links.forget(address)
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._close_later(channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def evict(self, location: Location, site: str, since: float) -> None:
        """Tell the replica that held `site` that it signed on here at `since` (it cuts its stale stream)."""
        try:
            call = self.channel(location.address).unary_unary(EVICT)
            await call(b"", metadata=((SITE, site), (SINCE, repr(since))), timeout=EVICT_TIMEOUT_S)
        except (ValueError, grpc.aio.AioRpcError) as exc:  # it may well be dead: its lease settles it
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.info("could not tell replica %s that %s moved here: %s", location.replica, site, detail)

    async def link_port(self, location: Location) -> int | None:
        """Ask the replica for its link port on the authenticated channel; None: it has none."""
        try:
            answer = await self.channel(location.address).unary_unary(LINK)(b"", timeout=LINK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("replica %s has no link port (an older version): Forward calls to it", location.replica)
                return None
            failure = ReplicaUnreachable if exc.code() in UNREACHABLE_CODES else LinkClosed
            raise failure(f"replica {location.replica} did not say its link port: {exc.code().name}") from None
        text = answer.decode("ascii", "replace") if isinstance(answer, bytes) else ""
        if not text.isdigit() or not 0 < int(text) < 65536:
            log.error("replica %s answered a link port that is not one; Forward calls to it", location.replica)
            return None
        return int(text)

    async def _take_link(self, location: Location, aid: str) -> Link | None:
        if self.links is None:
            return None
        try:
            return await self.links.take(location.address, lambda: self.link_port(location))
        except ReplicaUnreachable:
            raise  # the caller settles it: no Forward call over a channel that just failed
        except (LinkClosed, ValueError) as exc:
            log.info("no link to replica %s: %s; using a Forward call", location.replica, exc, extra={"assoc": aid})
            return None

    async def close(self) -> None:
        if self.links is not None:
            await self.links.close()
        channels, self._channels = list(self._channels.values()), collections.OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    async def run(
        self,
        service: AssociationService,
        splice: Splice,
        op: pb.Open,
        context: grpc.aio.ServicerContext,
        location: Location,
    ) -> None:
        """The initiating router's end of an association whose destination `location` holds.

        A location from the in-memory map (`cached`) may be up to one renewal old. When that replica
        says the site is not there (Refused SITE_OFFLINE), that it is draining, or cannot be reached,
        the site may have moved since: the database is asked, and the Open forwarded once more if
        another replica holds the site now; else the first answer stands."""
        aid = splice.association_id
        refusal = await self._forward(service, splice, op, context, location)
        if refusal is None:
            return
        if self.forget_holder is not None:
            self.forget_holder(op.to_site, location)
        moved = await self._relocate(op.to_site, aid)
        if moved is not None and moved.replica != location.replica:
            log.info(
                "%s is no longer held by replica %s but by %s: forwarded there",
                op.to_site,
                location.replica,
                moved.replica,
                extra={"assoc": aid},
            )
            refusal = await self._forward(service, splice, op, context, moved)
            if refusal is None:
                return
        await refusal()

    async def _relocate(self, site: str, aid: str) -> Location | None:
        if self.relocate is None:
            return None
        try:
            return await self.relocate(site)
        except RelayError as exc:
            log.warning("cannot look up which replica holds %s: %s", site, exc, extra={"assoc": aid})
            return None

    async def _forward(
        self,
        service: AssociationService,
        splice: Splice,
        op: pb.Open,
        context: grpc.aio.ServicerContext,
        location: Location,
    ) -> Refusal | None:
        """One attempt at `location`; None: the association is over (spliced, or answered). Returned: a refusal
        not yet given, when `location` came from the in-memory map and may be stale (see `run`)."""
        aid = splice.association_id

        async def unreachable() -> None:
            await service.refuse(context, replica_unreachable(op.to_site), aid)

        try:
            channel = self.channel(location.address)
        except ValueError as exc:
            log.error("replica %s has an unusable address: %s", location.replica, exc, extra={"assoc": aid})
            return await _settle(unreachable, location)
        try:
            call: Link | grpc.aio.StreamStreamCall[bytes, bytes] | None = await self._take_link(location, aid)
        except ReplicaUnreachable as exc:
            log.warning("replica %s cannot be reached: %s", location.replica, exc, extra={"assoc": aid})
            self.forget(location.address)
            return await _settle(unreachable, location)
        if call is None:
            channel = self.channel(location.address)  # anew: another association may have dropped it meanwhile
            call = channel.stream_stream(FORWARD)(metadata=((FROM_SITE, splice.from_site), (ORIGIN, self.replica_id)))
        try:  # however this ends (even cancelled: the router went away), the link or call ends with it
            return await self._run_call(service, splice, self._offering(op), context, location, call)
        except LinkClosed as exc:
            log.warning("link to replica %s failed: %s", location.replica, exc, extra={"assoc": aid})
            return await _settle(unreachable, location)
        finally:
            call.cancel()
            if self.tickets is not None:
                self.tickets.revoke(aid)  # unused, or its grant (blob RPCs) ends with the association

    def _offering(self, op: pb.Open) -> pb.Open:
        """The Open as forwarded: a router's own `direct_join` dropped, this replica's offer added when it
        makes one (a ticket for the destination site to join here; relay_bridge.cluster.tickets)."""
        forwarded = pb.Open()
        forwarded.CopyFrom(op)
        forwarded.ClearField("direct_join")
        if self.join_label is not None and self.tickets is not None:
            ticket = self.tickets.issue(op.association_id, op.to_site)
            if ticket is not None:
                forwarded.direct_join.CopyFrom(pb.DirectJoin(replica=self.join_label, ticket=ticket))
        return forwarded

    async def _run_call(
        self,
        service: AssociationService,
        splice: Splice,
        op: pb.Open,
        context: grpc.aio.ServicerContext,
        location: Location,
        call: Link | grpc.aio.StreamStreamCall[bytes, bytes],
    ) -> Refusal | None:
        aid = splice.association_id

        async def unreachable() -> None:
            await service.refuse(context, replica_unreachable(op.to_site), aid)

        answer_read: asyncio.Future[Any] | None = None
        try:
            if isinstance(call, Link):  # the link's header and the Open, in one TLS record
                await call.write(
                    Header(splice.from_site, self.replica_id).encode(), pb.Frame(open=op).SerializeToString()
                )
            else:
                await call.write(pb.Frame(open=op).SerializeToString())
            mark("forwarded", aid)
            # The holding replica's answer, or (direct join offered) the destination router's Join here.
            answer_read = asyncio.ensure_future(call.read())
            answer_read.add_done_callback(_retrieved)
            pending: list[asyncio.Future[Any]] = [answer_read, splice.joined]
            if not await self._answered_while_held(pending, op.to_site, location, aid):
                answer_read.cancel()
                return unreachable  # run() asks the database again and forwards to the new holder
            if splice.joined.done():
                if not splice.joined.cancelled():  # cancelled: the initiating router's session ended
                    await self._spliced_directly(service, splice, op, context, location, call)
                return None
            if self.tickets is not None and self.tickets.revoke(aid) and op.HasField("direct_join"):
                log.info(
                    "%s joined through replica %s, not directly", op.to_site, location.replica, extra={"assoc": aid}
                )
            if not answer_read.done():
                answer_read.cancel()
                raise TimeoutError
            answer = answer_read.result()
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError, LinkClosed) as exc:
            failure = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            log.warning(
                "replica %s at %s did not take the association for %s: %s",
                location.replica,
                location.address,
                op.to_site,
                failure,
                extra={"assoc": aid},
            )
            if isinstance(exc, LinkClosed) or (
                isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE
            ):
                self.forget(location.address)
                return await _settle(unreachable, location)  # gone: the site may be held elsewhere now
            await unreachable()
            return None
        try:
            first = pb.Frame.FromString(answer) if isinstance(answer, bytes) else None
        except DecodeError:
            first = None
        if first is None or not (first.HasField("accepted") or first.HasField("refused")):
            log.error("replica %s answered an Open with no Accepted or Refused", location.replica, extra={"assoc": aid})
            await service.refuse(context, replica_unreachable(op.to_site), aid)
            return None
        if first.HasField("refused"):
            reason = first.refused.reason

            async def passed_on() -> None:
                service.state.metrics.refused(reason, aid, "refused by the replica holding the site")
                await context.write(answer)  # the holding replica's own code and text, as it sent them

            if reason in (pb.Refused.SITE_OFFLINE, pb.Refused.DRAINING):  # the site may have moved
                return await _settle(passed_on, location)
            await passed_on()
            return None
        splice.joined.set_result(None)
        mark("accepted sent", aid)
        log.info(
            "association %s -> %s/%s spliced through replica %s over %s",
            splice.from_site,
            op.to_site,
            op.called_ae_title,
            location.replica,
            "a link" if isinstance(call, Link) else "a Forward call",
            extra={"assoc": aid},
        )
        service.state.metrics.spliced(splice)
        await context.write(answer)
        await _splice_through(splice, context, call)
        return None

    async def _answered_while_held(
        self, pending: list[asyncio.Future[Any]], site: str, location: Location, aid: str
    ) -> bool:
        """Wait for the holding replica's answer (or a direct join) up to the answer timeout; False when, with no
        answer yet, the database says that replica no longer holds the site (a fresh read every `HOLDER_CHECK_S`).
        A holder that still holds the site is waited for: its router may take up to the join timeout."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._answer_timeout
        while (left := deadline - loop.time()) > 0:
            await asyncio.wait(pending, timeout=min(left, HOLDER_CHECK_S), return_when="FIRST_COMPLETED")
            if any(f.done() for f in pending):
                return True
            if self.relocate is None:
                continue
            try:
                holder = await self.relocate(site)
            except RelayError:
                continue  # the database cannot say: keep waiting for the answer
            if any(f.done() for f in pending):
                return True  # answered (or joined) during the look-up
            if holder is None or holder.replica != location.replica:
                log.warning(
                    "replica %s has not answered for %s after %.1f s and no longer holds it; asking again",
                    location.replica,
                    site,
                    loop.time() - started,
                    extra={"assoc": aid},
                )
                return False
        return True

    async def _spliced_directly(
        self,
        service: AssociationService,
        splice: Splice,
        op: pb.Open,
        context: grpc.aio.ServicerContext,
        location: Location,
        call: Link | grpc.aio.StreamStreamCall[bytes, bytes],
    ) -> None:
        """The destination router joined here with its ticket: splice both routers on this replica, and end the
        holding replica's part (its wait for a Join ends at our end mark, with nothing to refuse) a moment
        later, once the association's first frames are through: that replica's clean-up then does not
        compete for the CPU with the routers' setup. Never later than the association's end (an unsent end
        mark would read as a cut link there)."""
        sent = False

        async def let_go() -> None:
            nonlocal sent
            if sent:
                return
            sent = True
            try:
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, LinkClosed) as exc:
                log.info("could not tell replica %s: %s", location.replica, exc, extra={"assoc": splice.association_id})
            log.info(
                "association %s -> %s/%s spliced here by a direct join (the site is held by replica %s)",
                splice.from_site,
                op.to_site,
                op.called_ae_title,
                location.replica,
                extra={"assoc": splice.association_id},
            )

        async def later() -> None:
            await asyncio.sleep(LET_GO_AFTER_S)
            await let_go()

        letting_go = asyncio.ensure_future(later())
        try:
            await service.splice_here(splice, context)
        finally:
            if not letting_go.done():
                letting_go.cancel()
                await asyncio.gather(letting_go, return_exceptions=True)
            await let_go()


Refusal = Callable[[], Awaitable[None]]  # an answer to the initiating router not yet given


async def _settle(refusal: Refusal, location: Location) -> Refusal | None:
    """A refusal from (or for) a holder found in the in-memory map is returned for the caller to look again;
    any other is given now."""
    if location.cached:
        return refusal
    await refusal()
    return None


def _retrieved(read: asyncio.Future[bytes | object]) -> None:
    """A read left running after a direct join ends when the call does: its error is no one's concern."""
    if not read.cancelled():
        read.exception()


async def _splice_through(
    splice: Splice, context: grpc.aio.ServicerContext, call: Link | grpc.aio.StreamStreamCall[bytes, bytes]
) -> None:
    """Pump both directions: router -> channel -> replica link, and replica link -> channel -> router."""

    async def to_replica() -> None:
        try:
            await splice.drain(splice.to_destination, call.write)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, LinkClosed):
            await splice.to_initiator.close()  # the replica's call ended; its pump tells the router why

    from_router = asyncio.create_task(splice.pump(context.read, splice.to_destination, from_initiator=True))
    from_replica = asyncio.create_task(splice.pump(call.read, splice.to_initiator, from_initiator=False))
    writer = asyncio.create_task(to_replica())
    try:
        await splice.drain(splice.to_initiator, context.write)
    finally:
        await splice.to_initiator.close()
        await splice.to_destination.close()
        await finish(from_router)
        await finish(writer)
        await finish(from_replica)


class ForwardService:
    """The holding side: relay.cluster.v1.Cluster/Forward, one call per forwarded association."""

    def __init__(
        self,
        associations: AssociationService,
        evicted: Callable[[str, float], bool] = lambda site, since: False,
        link_port: Callable[[], int] = lambda: 0,
    ) -> None:
        self.associations = associations
        self.evicted = evicted
        self.link_port = link_port

    async def Link(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The port of this replica's link server (relay_bridge.cluster.link), on this host."""
        await _require_cluster_certificate(context)
        port = self.link_port()
        if not port:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this replica has no link server")
        return str(port).encode("ascii")

    async def Evict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Another replica took one of our sites over: cut our stream for it if it is older."""
        await _require_cluster_certificate(context)
        metadata = dict(context.invocation_metadata() or ())
        site, since = str(metadata.get(SITE, "")), str(metadata.get(SINCE, ""))
        try:
            when = float(since)
        except ValueError:
            when = math.nan
        if not is_site_name(site) or not math.isfinite(when):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{SITE} must be a site name, {SINCE} a time")
        self.evicted(site, when)
        return b""

    async def Forward(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        service = self.associations
        state = service.state
        await _require_cluster_certificate(context)
        metadata = dict(context.invocation_metadata() or ())
        from_site, origin = str(metadata.get(FROM_SITE, "")), str(metadata.get(ORIGIN, ""))[:64]
        if not is_site_name(from_site):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{FROM_SITE} must be a site name")
        raw = await first_message(context, state.config.limits, "Forward", f"replica {origin!r}")
        if not isinstance(raw, bytes):
            return
        try:
            first = pb.Frame.FromString(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame is not a relay.v1.Frame")
            raise AssertionError("context.abort() raises") from exc
        if not first.HasField("open"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Open")
        await accept_forwarded(service, from_site, first.open, context)


async def _require_cluster_certificate(context: grpc.aio.ServicerContext) -> None:
    """The TLS layer required a certificate from the cluster CA; it must also be the cluster's own."""
    names = context.auth_context().get("x509_common_name") or []
    if [n.decode(errors="replace") for n in names] != [CLUSTER_NAME]:
        log.error("call from %s without the cluster certificate; refused", context.peer())
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the cluster certificate is required")


async def accept_forwarded(
    service: AssociationService, from_site: str, op: pb.Open, context: grpc.aio.ServicerContext
) -> None:
    """Run the destination end of an association another replica admitted, as a local Open would."""
    state, aid, limits = service.state, op.association_id, service.state.config.limits
    mark("forward received", aid)
    invalid = await service.precheck_open(op, context)
    if invalid is not None:
        return await service.refuse(context, invalid, aid)
    # Checked again here (the same database, but this replica's own view and its own limits).
    view = await state.directory_cache.view()
    destination = state.sessions.get(op.to_site)
    rejection = admission.admit_open(
        caller=from_site,
        to_site=op.to_site,
        called_ae_title=op.called_ae_title,
        device=view.device(op.to_site, op.called_ae_title),
        destination_online=destination is not None,
        active=len(state.splices),
        caller_active=0,  # the origin replica counted the caller's own associations
        destination_inbound=0 if destination is None else service._towards(destination),
        limits=admission.Limits(
            limits.max_associations, limits.max_associations_per_router, limits.max_inbound_per_router
        ),
    )
    if rejection is not None or destination is None:
        assert rejection is not None
        return await service.refuse(context, rejection, aid)
    splice = service.splice_class(
        aid, from_site, op.to_site, op.called_ae_title, op.calling_ae_title, depth=limits.frame_queue_depth
    )
    state.splices[aid] = splice
    destination.associations.add(aid)
    direct = direct_offer(op) if destination.direct_join else None
    ahead = ReadAhead(context) if direct is not None else None
    try:
        await service._run_initiator(
            splice,
            destination,
            op,
            context if ahead is None else ahead,
            view.identities.get(from_site),
            direct=direct,
            origin_gone=None if ahead is None else ahead.first,
        )
    finally:
        state.splices.pop(aid, None)
        destination.associations.discard(aid)
        service._finished(splice)
        if ahead is not None:
            ahead.close()


def direct_offer(op: pb.Open) -> pb.DirectJoin | None:
    """The origin replica's offer in a forwarded Open, if well-formed (its name a DNS label, the ticket of the
    expected form): only then is it passed on to the destination router, which checks it again."""
    if not op.HasField("direct_join"):
        return None
    offer = op.direct_join
    if not DNS_LABEL.fullmatch(offer.replica) or not TICKET_FORM.fullmatch(offer.ticket):
        log.warning(
            "a forwarded Open carried a malformed direct-join offer; not passed on", extra={"assoc": op.association_id}
        )
        return None
    return offer


class ReadAhead:
    """A forwarded association's call (or link) with its first read started at once.

    The origin sends nothing before it has the answer, so when that read completes while the
    destination has not joined here, the origin has let go: the router joined there directly (its
    end mark), or the origin is gone. Once the destination joins here, the splice's pump gets that
    first read's frame, then reads on as usual."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.first: asyncio.Future[object] = asyncio.ensure_future(context.read())
        self._taken = False

    async def read(self) -> object:
        if not self._taken:
            self._taken = True
            return await self.first
        return await self._context.read()

    async def write(self, frame: bytes) -> None:
        await self._context.write(frame)

    async def abort(self, code: grpc.StatusCode, detail: str) -> None:
        await self._context.abort(code, detail)

    def peer(self) -> str:
        return str(self._context.peer())

    def close(self) -> None:
        if not self.first.done():
            self.first.cancel()
        elif not self.first.cancelled():
            self.first.exception()  # retrieved: a cut link is no error once the association is over


def handlers(service: ForwardService) -> grpc.GenericRpcHandler:
    """Forward with frames left serialized, as the router-facing Associate."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Forward": grpc.stream_stream_rpc_method_handler(service.Forward),
            "Evict": grpc.unary_unary_rpc_method_handler(service.Evict),
            "Link": grpc.unary_unary_rpc_method_handler(service.Link),
        },
    )
