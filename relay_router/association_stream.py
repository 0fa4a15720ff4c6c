"""One Associate call as the association driver sees it (relay_router.tunnel makes them)."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb


class ChannelCalls:
    """The Associate calls opened on one channel: `idle` is set while none is running, `used` is when
    the last one started or ended (monotonic)."""

    def __init__(self) -> None:
        self.live: set[grpc.aio.Call] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.used = time.monotonic()

    def track(self, call: grpc.aio.Call) -> None:
        self.live.add(call)
        self.idle.clear()
        self.used = time.monotonic()
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        self.live.discard(call)
        self.used = time.monotonic()
        if not self.live:
            self.idle.set()


class AssociationStream:
    """One Associate call: send and receive frames; `seq` numbering is the caller's."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def send(self, frame: pb.Frame) -> None:
        await self._call.write(frame)

    async def receive(self) -> pb.Frame | None:
        """The next frame, or None when the bridge ended the stream."""
        frame = await self._call.read()
        return None if frame is grpc.aio.EOF else frame

    async def finish(self) -> None:
        """Half-close our direction (the bridge then ends the partner's stream)."""
        try:
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError):
            pass

    def cancel(self) -> None:
        self._call.cancel()
