"""relay_bridge.splice: bounded frame channels and the pumps between two Associate calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.splice import Channel, Splice, close_frame


async def settle(rounds: int = 10) -> None:
    """Let every ready task run until nothing changes any more."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def drain_all(channel: Channel) -> list[bytes | None]:
    """Everything `channel` yields, ending with the None that says it is closed."""
    out: list[bytes | None] = []
    while True:
        frame = await asyncio.wait_for(channel.get(), 1.0)
        out.append(frame)
        if frame is None:
            return out


def reader(items: Iterable[object]) -> tuple[Callable[[], Awaitable[object]], list[int]]:
    """A fake `context.read`: returns the items in turn, raising those that are exceptions."""
    it = iter(items)
    calls = [0]

    async def read() -> object:
        calls[0] += 1
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item

    return read, calls


def data(payload: bytes, seq: int) -> bytes:
    return pb.Frame(data=pb.Data(payload=payload, seq=seq)).SerializeToString()


def make_splice(depth: int = 4) -> Splice:
    return Splice("0" * 32, "hospital-a", "hospital-b", "PACS", "CT", depth=depth)


# -- Channel -------------------------------------------------------------------------


async def test_channel_is_fifo() -> None:
    ch = Channel(4)
    for f in (b"1", b"2", b"3"):
        assert await ch.put(f) is True
    assert [await ch.get(), await ch.get(), await ch.get()] == [b"1", b"2", b"3"]
    assert not ch.closed


async def test_put_blocks_at_depth_until_a_get() -> None:
    ch = Channel(2)
    assert await ch.put(b"1") and await ch.put(b"2")
    third = asyncio.create_task(ch.put(b"3"))
    await settle()
    assert not third.done(), "a full channel must hold the writer back"
    assert await ch.get() == b"1"
    assert await asyncio.wait_for(third, 1.0) is True
    assert [await ch.get(), await ch.get()] == [b"2", b"3"]


async def test_get_waits_for_a_frame() -> None:
    ch = Channel(1)
    getter = asyncio.create_task(ch.get())
    await settle()
    assert not getter.done()
    await ch.put(b"x")
    assert await asyncio.wait_for(getter, 1.0) == b"x"


async def test_close_with_a_last_frame_bypasses_the_bound() -> None:
    ch = Channel(1)
    await ch.put(b"data")
    await asyncio.wait_for(ch.close(b"why"), 1.0)  # must not wait for room
    assert ch.closed
    assert await drain_all(ch) == [b"data", b"why", None]
    assert await ch.get() is None, "a closed, empty channel keeps returning None"


async def test_close_without_a_frame_drains_then_ends() -> None:
    ch = Channel(3)
    await ch.put(b"1")
    await ch.put(b"2")
    await ch.close()
    assert await drain_all(ch) == [b"1", b"2", None]


async def test_put_after_close_drops_the_frame() -> None:
    ch = Channel(2)
    await ch.close()
    assert await ch.put(b"late") is False
    assert await ch.get() is None


async def test_close_releases_a_blocked_writer() -> None:
    ch = Channel(1)
    await ch.put(b"1")
    blocked = asyncio.create_task(ch.put(b"2"))
    await settle()
    await ch.close(b"last")
    assert await asyncio.wait_for(blocked, 1.0) is False
    assert await drain_all(ch) == [b"1", b"last", None]


async def test_close_releases_a_waiting_reader() -> None:
    ch = Channel(1)
    getter = asyncio.create_task(ch.get())
    await settle()
    await ch.close()
    assert await asyncio.wait_for(getter, 1.0) is None


async def test_only_the_first_close_frame_counts() -> None:
    ch = Channel(1)
    await ch.close(b"first")
    await ch.close(b"second")
    assert await drain_all(ch) == [b"first", None]


# -- close_frame ---------------------------------------------------------------------


def test_close_frame_is_a_serialized_frame() -> None:
    frame = pb.Frame.FromString(close_frame(pb.Close.ABORTED, "router disabled"))
    assert frame.WhichOneof("kind") == "close"
    assert (frame.close.reason, frame.close.detail) == (pb.Close.ABORTED, "router disabled")


# -- Splice.pump ---------------------------------------------------------------------


async def test_splice_starts_with_empty_channels_and_counters() -> None:
    s = make_splice(depth=3)
    assert (s.bytes_from_initiator, s.bytes_from_destination, s.frames) == (0, 0, 0)
    assert not s.joined.done()
    assert not s.to_destination.closed and not s.to_initiator.closed
    assert s.to_destination is not s.to_initiator


async def test_pump_forwards_frames_until_eof_and_counts_them() -> None:
    s = make_splice()
    frames = [data(b"A-ASSOCIATE-RQ", 0), data(b"x" * 1000, 1), data(b"", 2)]
    read, _ = reader([*frames, grpc.aio.EOF])
    await asyncio.wait_for(s.pump(read, s.to_destination, from_initiator=True), 1.0)
    assert await drain_all(s.to_destination) == [*frames, None]
    assert s.bytes_from_initiator == sum(map(len, frames))
    assert s.bytes_from_destination == 0
    assert s.frames == 3


async def test_pump_from_destination_counts_on_its_side() -> None:
    s = make_splice()
    frames = [data(b"A-ASSOCIATE-AC", 0), data(b"y" * 10, 1)]
    read, _ = reader([*frames, grpc.aio.EOF])
    await s.pump(read, s.to_initiator, from_initiator=False)
    assert await drain_all(s.to_initiator) == [*frames, None]
    assert (s.bytes_from_initiator, s.bytes_from_destination, s.frames) == (0, sum(map(len, frames)), 2)


async def test_pump_treats_none_as_the_end() -> None:
    s = make_splice()
    read, _ = reader([b"f", None])
    await s.pump(read, s.to_destination, from_initiator=True)
    assert await drain_all(s.to_destination) == [b"f", None]


@pytest.mark.parametrize(("from_initiator", "lost_site"), [(True, "hospital-a"), (False, "hospital-b")])
async def test_read_failure_tells_the_partner_why(from_initiator: bool, lost_site: str) -> None:
    s = make_splice()
    outbound = s.to_destination if from_initiator else s.to_initiator
    read, _ = reader([b"one", ConnectionResetError("stream reset")])
    await asyncio.wait_for(s.pump(read, outbound, from_initiator=from_initiator), 1.0)  # does not raise
    got = await drain_all(outbound)
    assert got[0] == b"one" and got[-1] is None and len(got) == 3
    assert isinstance(got[1], bytes)
    close = pb.Frame.FromString(got[1]).close
    assert close.reason == pb.Close.ABORTED
    assert close.detail == f"the link to {lost_site} was lost"
    assert s.frames == 1


async def test_grpc_error_on_read_also_closes_with_aborted() -> None:
    s = make_splice()
    error = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    read, _ = reader([error])
    await s.pump(read, s.to_initiator, from_initiator=False)
    first, end = await drain_all(s.to_initiator)
    assert end is None and first is not None
    assert pb.Frame.FromString(first).close.detail == "the link to hospital-b was lost"


async def test_cancelled_pump_closes_the_partner_and_reraises() -> None:
    s = make_splice()
    never = asyncio.get_running_loop().create_future()

    async def read() -> object:
        return await never

    pump = asyncio.create_task(s.pump(read, s.to_destination, from_initiator=True))
    await settle()
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump
    first, end = await drain_all(s.to_destination)
    assert end is None and first is not None
    close = pb.Frame.FromString(first).close
    assert (close.reason, close.detail) == (pb.Close.ABORTED, "the link to hospital-a was lost")


async def test_pump_stops_reading_when_the_partner_is_gone() -> None:
    s = make_splice()
    await s.to_destination.close()
    read, calls = reader([b"1", b"2", b"3", grpc.aio.EOF])
    await asyncio.wait_for(s.pump(read, s.to_destination, from_initiator=True), 1.0)
    assert calls[0] == 1, "after the first refused put the pump must stop reading"


async def test_slow_receiver_stops_the_senders_reads() -> None:
    s = make_splice(depth=2)
    read, calls = reader([bytes([i]) for i in range(100)])
    pump = asyncio.create_task(s.pump(read, s.to_destination, from_initiator=True))
    await settle(50)
    # `depth` frames queued and one more read, waiting for room.
    assert calls[0] == 3 and s.frames == 3
    assert await s.to_destination.get() == b"\x00"
    await settle(50)
    assert calls[0] == 4
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump


# -- Splice.drain and both directions ------------------------------------------------


async def test_drain_writes_in_order_until_closed() -> None:
    s = make_splice()
    written: list[bytes] = []

    async def write(frame: bytes) -> None:
        written.append(frame)

    drain = asyncio.create_task(s.drain(s.to_initiator, write))
    await s.to_initiator.put(b"1")
    await s.to_initiator.put(b"2")
    await s.to_initiator.close(close_frame(pb.Close.PEER_CLOSED, "bye"))
    await asyncio.wait_for(drain, 1.0)
    assert written[:2] == [b"1", b"2"]
    assert pb.Frame.FromString(written[2]).close.reason == pb.Close.PEER_CLOSED
    assert len(written) == 3


async def test_a_spliced_association_relays_both_ways() -> None:
    s = make_splice(depth=1)
    up = [data(b"rq", 0), data(b"p-data" * 100, 1), data(b"release-rq", 2)]
    down = [data(b"ac", 0), data(b"release-rp", 1)]
    initiator_read, _ = reader([*up, grpc.aio.EOF])
    destination_read, _ = reader([*down, grpc.aio.EOF])
    to_initiator: list[bytes] = []
    to_destination: list[bytes] = []

    async def write_initiator(frame: bytes) -> None:
        to_initiator.append(frame)

    async def write_destination(frame: bytes) -> None:
        await asyncio.sleep(0)  # a slower receiver
        to_destination.append(frame)

    await asyncio.wait_for(
        asyncio.gather(
            s.pump(initiator_read, s.to_destination, from_initiator=True),
            s.pump(destination_read, s.to_initiator, from_initiator=False),
            s.drain(s.to_destination, write_destination),
            s.drain(s.to_initiator, write_initiator),
        ),
        2.0,
    )
    assert to_destination == up and to_initiator == down
    assert s.bytes_from_initiator == sum(map(len, up))
    assert s.bytes_from_destination == sum(map(len, down))
    assert s.frames == len(up) + len(down)
