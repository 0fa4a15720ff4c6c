"""The direct join: joining an association at the bridge replica it waits at, not through our own.

With bridge replicas behind one load balancer, the incoming-association notice for an association
opened at another replica can carry a `DirectJoin` offer: that replica's name and a single-use
ticket. The router then opens (or reuses) a second channel **to its own configured bridge
address**, whose TLS server name is `<replica>.<server name>`; the balancer routes it on SNI to
that replica, which splices both routers itself, so no frame crosses a second replica
(docs/high-availability.md, "The direct join").

Zero trust: the bridge chooses only the first label of a name under our configured bridge name,
and only for TLS (the certificate must still verify against our CA); the address is always ours.
The label must be one DNS label; the ticket must look like one; at most `MAX_CHANNELS` such
channels are kept, each closed once idle. Whatever goes wrong (no such route at the balancer, a
certificate that does not cover the name, the ticket refused, no answer within
`DIRECT_JOIN_TIMEOUT_S`) the router joins the ordinary way, through its own replica.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_common.setup_timing import mark
from relay_router.association_stream import AssociationStream, ChannelCalls

log = logging.getLogger("relay_router.tunnel")
DIRECT_JOIN_PROTOCOL = "relay.v1.direct-join"  # in SignOn.protocols: we can join with a ticket
TICKET_METADATA = "relay-join-ticket"
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
TICKET_FORM = re.compile(r"[A-Za-z0-9_-]{32,64}")
# The join at another replica must answer within this, or the router joins through its own: the
# association's Open waits `join_timeout_s` (10 s by default) at the bridge for one or the other, so the
# ordinary join keeps 6 s. Not shorter: a replica that took the ticketed call has joined (and let the
# holding replica go), so an answer that is merely late, on a loaded machine, would end in an abort.
DIRECT_JOIN_TIMEOUT_S = 4.0
MAX_CHANNELS = 4  # replica channels kept (a cluster has a few replicas; more names: the oldest goes)
IDLE_CLOSE_S = 120.0  # a replica channel with no call for this long is closed
# After a direct join at a name failed, joins there are not tried for this long (a balancer without SNI
# routing, a certificate without the replica names: every association would pay a failed attempt).
RETRY_AFTER_S = 60.0
MAX_FAILED_NAMES = 64  # names remembered as failing (the bridge chooses the labels: bounded)


@dataclass(frozen=True)
class Offer:
    """A checked offer: the TLS server name to use (under our own bridge name) and the ticket."""

    replica: str
    server_name: str
    ticket: str


def base_server_name(address_host: str, server_name: str | None) -> str | None:
    """The bridge name replica names go under: the configured server name, else the address's host; None
    when that is an IP address or not a DNS name (no name to put a replica label under)."""
    name = (server_name or address_host).strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(name.strip("[]"))
        return None
    except ValueError:
        pass
    labels = name.split(".")
    if not name or len(name) > 253 - 64 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def check_offer(offer: pb.DirectJoin, base: str) -> Offer | None:
    """The bridge's offer if it is well-formed (a single DNS label, a ticket of the expected form), else None."""
    label = offer.replica.lower()
    if not DNS_LABEL.fullmatch(label) or not TICKET_FORM.fullmatch(offer.ticket):
        return None
    return Offer(label, f"{label}.{base}", offer.ticket)


class ReplicaChannels:
    """At most `MAX_CHANNELS` channels to our bridge address, one per replica server name, closed when idle."""

    def __init__(self, make_channel: Callable[[str], grpc.aio.Channel]) -> None:
        self._make_channel = make_channel
        # server name -> (channel, stub, live calls, last use)
        self._channels: collections.OrderedDict[str, _ReplicaChannel] = collections.OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._failed: collections.OrderedDict[str, float] = collections.OrderedDict()  # name -> retry time

    def __len__(self) -> int:
        return len(self._channels)

    def stub(self, server_name: str) -> tuple[pb_grpc.RelayStub, _ReplicaChannel]:
        self._close_idle()
        entry = self._channels.get(server_name)
        if entry is None:
            entry = _ReplicaChannel(self._make_channel(server_name))
            self._channels[server_name] = entry
            while len(self._channels) > MAX_CHANNELS:
                _, oldest = self._channels.popitem(last=False)
                self._close_later(oldest)
        self._channels.move_to_end(server_name)
        entry.used = time.monotonic()
        return entry.stub, entry

    def forget(self, server_name: str) -> None:
        """The join there failed: drop the channel, and do not try that name for RETRY_AFTER_S (then with a
        new connection)."""
        entry = self._channels.pop(server_name, None)
        if entry is not None:
            self._close_later(entry)
        self._failed[server_name] = time.monotonic() + RETRY_AFTER_S
        self._failed.move_to_end(server_name)
        while len(self._failed) > MAX_FAILED_NAMES:
            self._failed.popitem(last=False)

    def failing(self, server_name: str) -> bool:
        """A direct join at this name failed within the last RETRY_AFTER_S: join the ordinary way now."""
        until = self._failed.get(server_name)
        if until is not None and time.monotonic() >= until:
            del self._failed[server_name]
            return False
        return until is not None

    def _close_idle(self) -> None:
        now = time.monotonic()
        for name, entry in list(self._channels.items()):
            if not entry.live and now - entry.used > IDLE_CLOSE_S:
                del self._channels[name]
                self._close_later(entry)

    def _close_later(self, entry: _ReplicaChannel) -> None:
        """Close once the calls on it have ended (a running association is never cut)."""

        async def close() -> None:
            await entry.idle.wait()
            await entry.channel.close(grace=5.0)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in self._closing:
            task.cancel()
        entries, self._channels = list(self._channels.values()), collections.OrderedDict()
        await asyncio.gather(*(e.channel.close(grace=1.0) for e in entries), return_exceptions=True)


class _ReplicaChannel(ChannelCalls):
    """A channel to one replica name, with the calls on it (closed once idle long enough)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__()
        self.channel = channel
        self.stub = pb_grpc.RelayStub(channel)


@dataclass
class PendingJoin:
    """A Join sent with its ticket to the offered replica; `answer()` waits for that replica's Accepted."""

    replicas: ReplicaChannels
    call: grpc.aio.StreamStreamCall[pb.Frame, pb.Frame]
    stub: pb_grpc.RelayStub
    association_id: str
    offer: Offer
    deadline: float  # loop time: the whole direct join gets DIRECT_JOIN_TIMEOUT_S

    async def answer(self) -> bool:
        """True once the replica answered Accepted for this association; False (the call cancelled, the
        channel dropped, logged): join the ordinary way."""
        left = max(0.0, self.deadline - asyncio.get_running_loop().time())
        try:
            answer = await asyncio.wait_for(self.call.read(), left)
        except grpc.aio.AioRpcError as exc:
            return self._failed(f"{exc.code().name}: {exc.details()}")
        except (TimeoutError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            return self._failed(f"no answer within {DIRECT_JOIN_TIMEOUT_S:g} s ({type(exc).__name__})")
        except asyncio.CancelledError:  # the association was given up meanwhile
            self.call.cancel()
            raise
        if (
            not isinstance(answer, pb.Frame)
            or not answer.HasField("accepted")
            or answer.accepted.association_id != self.association_id
        ):
            return self._failed("the replica did not accept the join")
        mark("router: direct join accepted", self.association_id)
        log.info("joined directly at replica %s", self.offer.replica, extra={"assoc": self.association_id})
        return True

    def _failed(self, why: str) -> bool:
        self.call.cancel()
        self.replicas.forget(self.offer.server_name)
        log.info(
            "direct join at replica %s failed (%s); joining through our own replica",
            self.offer.replica,
            why,
            extra={"assoc": self.association_id},
        )
        return False


async def send_direct_join(replicas: ReplicaChannels, association_id: str, offer: Offer) -> PendingJoin | None:
    """Send the Join with the ticket over the replica's channel (the first time: its TCP and TLS handshake),
    at once, so that it travels while the caller checks the notice; None: it could not be sent (logged), or a
    join at that name failed a moment ago."""
    mark("router: direct join sent", association_id)
    if replicas.failing(offer.server_name):
        return None
    stub, channel = replicas.stub(offer.server_name)
    deadline = asyncio.get_running_loop().time() + DIRECT_JOIN_TIMEOUT_S
    call = stub.Associate(metadata=((TICKET_METADATA, offer.ticket),))
    pending = PendingJoin(replicas, call, stub, association_id, offer, deadline)
    try:
        await asyncio.wait_for(call.write(pb.Frame(join=pb.Join(association_id=association_id))), DIRECT_JOIN_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        pending._failed(f"{exc.code().name}: {exc.details()}")
        return None
    except (TimeoutError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
        pending._failed(f"not sent within {DIRECT_JOIN_TIMEOUT_S:g} s ({type(exc).__name__})")
        return None
    except asyncio.CancelledError:
        call.cancel()
        raise
    channel.track(call)
    return pending


class JoiningStream(AssociationStream):
    """A direct join whose answer has not come yet (relay_router.direct_join). Frames sent meanwhile go to
    that replica at once, behind the Join, and are kept: if it does not accept the join, the ordinary Join
    is made and they are sent again there, in order. So the answer's round trip is not in the
    association's setup. Receiving waits for the answer. Shielded: a pump cancelled while waiting does
    not cancel the join under the others."""

    def __init__(
        self,
        pending: PendingJoin,
        direct: Callable[[], AssociationStream],
        fallback: Callable[[], Awaitable[AssociationStream]],
    ) -> None:
        self._pending = pending
        self._early: list[pb.Frame] = []  # sent before the answer (the Confirm, in practice)
        self._direct_open = True
        self._joining = asyncio.ensure_future(self._resolve(direct, fallback))

    async def _resolve(
        self, direct: Callable[[], AssociationStream], fallback: Callable[[], Awaitable[AssociationStream]]
    ) -> AssociationStream:
        if await self._pending.answer():
            self._early.clear()
            return direct()
        self._direct_open = False  # from now on sends wait for the ordinary Join
        stream = await fallback()
        sent = 0
        while sent < len(self._early):  # a send in progress may still append one
            await stream.send(self._early[sent])
            sent += 1
        self._early.clear()
        return stream

    async def _stream(self) -> AssociationStream:
        return await asyncio.shield(self._joining)

    async def send(self, frame: pb.Frame) -> None:
        if self._direct_open and not self._joining.done():
            self._early.append(frame)
            try:
                await self._pending.call.write(frame)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass  # the answer decides: the ordinary Join gets this frame again
            return
        await (await self._stream()).send(frame)

    async def receive(self) -> pb.Frame | None:
        return await (await self._stream()).receive()

    async def finish(self) -> None:
        try:
            stream = await self._stream()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        await stream.finish()

    def cancel(self) -> None:
        if not self._joining.done():
            self._joining.cancel()
        elif not self._joining.cancelled() and self._joining.exception() is None:
            self._joining.result().cancel()
