"""Fuzzing the bridge's frame handling: relay_bridge.splice.Channel and Splice.pump.

Random sequences of frames, end of stream (EOF or None), read failures, cancellation at any await,
slow or vanishing consumers, and channel depths 1-4. Invariants:

* a Channel never holds more than `depth` frames, plus the one last frame `close` may add;
* frames come out in the order they went in, then the close frame (if any), then None for ever;
  `put` after `close` is refused, and `close` never blocks;
* `pump` always leaves the partner's channel closed (the close is always delivered): after EOF with
  nothing more, after a read failure with Close(ABORTED, "the link to SITE was lost"), after
  cancellation likewise (and then re-raises CancelledError);
* no exception other than CancelledError escapes `pump`; the byte and frame counters match what was read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc.aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.splice import Channel, Splice, close_frame

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class WatchedChannel(Channel):
    """A Channel that records the most frames it ever held, before and after its close."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.most_open = 0
        self.most = 0

    def _note(self) -> None:
        held = len(self._items)
        self.most = max(self.most, held)
        if not self.closed:
            self.most_open = max(self.most_open, held)

    async def put(self, frame: bytes) -> bool:
        accepted = await super().put(frame)
        self._note()
        return accepted

    async def close(self, last: bytes | None = None) -> None:
        await super().close(last)
        self._note()


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- Channel against a model -----------------------------------------------------------------------------

channel_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("get"), st.none()),
        st.tuples(st.just("close"), st.one_of(st.none(), st.just(b"LAST"))),
    ),
    max_size=40,
)


@FUZZ
@given(depth=st.integers(1, 4), ops=channel_ops)
def test_channel_against_a_model(depth: int, ops: list[tuple[str, bytes | None]]) -> None:
    async def scenario() -> None:
        channel = WatchedChannel(depth)
        puts: list[tuple[bytes, asyncio.Task[bool]]] = []
        gets: list[asyncio.Task[bytes | None]] = []
        close_last: list[bytes | None] = []
        for op, arg in ops:
            if op == "put":
                assert isinstance(arg, bytes)
                puts.append((arg, asyncio.create_task(channel.put(arg))))
            elif op == "get":
                gets.append(asyncio.create_task(channel.get()))
            else:
                closing = asyncio.create_task(channel.close(arg))
                await settle()
                assert closing.done(), "close blocked"
                if not close_last:
                    close_last.append(arg)
            await settle()
            assert channel.most_open <= depth and channel.most <= depth + 1
        await channel.close()  # release whatever still waits
        await settle()
        leftovers = []
        while (item := await asyncio.wait_for(channel.get(), 1)) is not None:
            leftovers.append(item)
        assert all(task.done() for _, task in puts) and all(task.done() for task in gets)
        out = [task.result() for task in gets] + leftovers
        accepted = [frame for frame, task in puts if task.result()]
        last = [close_last[0]] if close_last and close_last[0] is not None else []
        items = [item for item in out if item is not None]
        # FIFO: accepted frames in order, then the close frame; None only once all of them are out.
        assert items == accepted + last
        if None in out:  # once a get has said "closed", every later one says so too
            assert all(item is None for item in out[out.index(None) :])
        assert await channel.put(b"late") is False

    asyncio.run(scenario())


# -- Splice.pump ------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


@dataclass
class Script:
    frames: list[bytes]
    end: str  # "eof", "none", "error", "rpc-error", "cancelled-read", "hang"


scripts = st.builds(
    Script,
    frames=st.lists(st.binary(min_size=0, max_size=32), max_size=12),
    end=st.sampled_from(["eof", "none", "error", "rpc-error", "cancelled-read", "hang"]),
)


def rpc_error() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")


@FUZZ
@given(
    script=scripts,
    depth=st.integers(1, 4),
    from_initiator=st.booleans(),
    consumer_delays=st.lists(st.integers(0, 3), max_size=16),
    consumer_quits_after=st.one_of(st.none(), st.integers(0, 12)),
    # From 1: a task cancelled before its first step never runs its body (asyncio), so it cannot close.
    cancel_after=st.one_of(st.none(), st.integers(1, 30)),
)
def test_pump_always_closes_the_partner(
    script: Script,
    depth: int,
    from_initiator: bool,
    consumer_delays: list[int],
    consumer_quits_after: int | None,
    cancel_after: int | None,
) -> None:
    async def scenario() -> None:
        splice = Splice("f" * 32, "site-a", "site-b", "PACS", "WS", depth=depth)
        outbound = WatchedChannel(depth)
        lost = "site-a" if from_initiator else "site-b"
        reads = iter(script.frames)
        read_count = 0

        async def read() -> object:
            nonlocal read_count
            await asyncio.sleep(0)
            try:
                frame = next(reads)
            except StopIteration:
                pass
            else:
                read_count += 1
                return frame
            if script.end == "eof":
                return grpc.aio.EOF
            if script.end == "none":
                return None
            if script.end == "error":
                raise Boom("read failed")
            if script.end == "rpc-error":
                raise rpc_error()
            if script.end == "cancelled-read":
                raise asyncio.CancelledError
            await asyncio.Event().wait()  # "hang": a stream that goes silent
            raise AssertionError("unreachable")

        received: list[bytes | None] = []

        async def consume() -> None:  # the partner's handler: drains, slowly; may go away early
            for i in range(10_000):
                if consumer_quits_after is not None and i >= consumer_quits_after:
                    await outbound.close()  # the partner is gone: its own handler closes the channel
                    return
                for _ in range(consumer_delays[i % len(consumer_delays)] if consumer_delays else 0):
                    await asyncio.sleep(0)
                item = await outbound.get()
                received.append(item)
                if item is None:
                    return

        consumer = asyncio.create_task(consume())
        pump = asyncio.create_task(splice.pump(read, outbound, from_initiator=from_initiator))
        if cancel_after is not None:
            for _ in range(cancel_after):
                await asyncio.sleep(0)
            pump.cancel()
        elif script.end == "hang":
            await settle(60)
            pump.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(pump), 5)
            outcome = "returned"
        except asyncio.CancelledError:
            outcome = "cancelled"
        except Boom as exc:  # pragma: no cover - the invariant below names it
            raise AssertionError(f"an exception escaped the pump: {exc!r}") from exc
        if outcome == "cancelled":
            assert pump.cancelled()
        assert outbound.closed, "the pump ended without closing the partner's channel"
        await asyncio.wait_for(consumer, 5)
        assert outbound.most_open <= depth and outbound.most <= depth + 1

        # What the partner saw: frames in order, then (if the stream failed) the reason, then the end.
        frames = script.frames[:read_count]
        if received and received[-1] is None:
            body = received[:-1]
            aborted = close_frame(pb.Close.ABORTED, f"the link to {lost} was lost")
            failed = outcome == "cancelled" or script.end in ("error", "rpc-error", "cancelled-read", "hang")
            if failed and body and body[-1] == aborted and (not frames or body[-1] != frames[-1]):
                body = body[:-1]
            assert body == frames[: len(body)], "frames reordered, duplicated or invented"
            if consumer_quits_after is None and not failed:
                assert body == frames, "a frame was lost before a clean end of stream"
        counted = splice.bytes_from_initiator if from_initiator else splice.bytes_from_destination
        assert counted == sum(len(f) for f in frames) and splice.frames == read_count

    asyncio.run(scenario())
