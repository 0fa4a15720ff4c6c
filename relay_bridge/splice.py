"""Pairs the two Associate streams of one association and pumps frames between them.

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
from dataclasses import dataclass, field

import grpc.aio

from protos.relay.v1 import relay_pb2 as pb

log = logging.getLogger("relay_bridge.splice")


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


def close_frame(reason: int, detail: str) -> bytes:
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

    def __post_init__(self) -> None:
        self.to_destination = Channel(self.depth)
        self.to_initiator = Channel(self.depth)

    async def pump(self, read, outbound: Channel, *, from_initiator: bool) -> None:  # noqa: ANN001
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
                    self.bytes_from_destination += len(frame)
                self.frames += 1
                if not await outbound.put(frame):
                    return  # partner gone; its own handler reports why
        except asyncio.CancelledError:
            await outbound.close(close_frame(pb.Close.ABORTED, f"the link to {side} was lost"))
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure means that end is gone
            log.info("stream from %s ended: %s", side, exc, extra={"assoc": self.association_id})
            await outbound.close(close_frame(pb.Close.ABORTED, f"the link to {side} was lost"))

    async def drain(self, inbound: Channel, write) -> None:  # noqa: ANN001
        """Write frames from our channel to our own call until the partner is done."""
        while (frame := await inbound.get()) is not None:
            await write(frame)
