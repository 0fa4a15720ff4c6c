"""relay_router.spill: sealed blob parts round-trip; tampering, truncation and store failures are caught."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason, RelayError
from relay_demo.datasets import generate_ct_series
from relay_router import spill
from relay_router.seal import FrameSealer
from relay_router.spill import SpillFailed, SpillReceiver, SpillSender, SpillState, SpillUnavailable
from relay_router.wire.flags import PartFlag

AID = os.urandom(16).hex()


@dataclass
class FakeFramer:
    dataset_bytes: int = 0
    datasets_completed: int = 0


class MemoryTransport:
    """Blob parts in a dict; URLs are the keys."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.released: list[str] = []
        self.fail_slot = False
        self.fail_put_after: int | None = None
        self.puts = 0
        self.sizes: dict[tuple[str, int, bool], int] = {}  # what each slot request said

    async def slot(
        self, association_id: str, blob_id: str, part: int, *, download: bool, size: int = 0
    ) -> tuple[str, str]:
        self.sizes[(blob_id, part, download)] = size
        if self.fail_slot:
            raise SpillUnavailable("down")
        blob_id = blob_id or "ab" * 16
        return blob_id, f"{association_id}/{blob_id}/{part}"

    async def put(self, url: str, data: bytes) -> None:
        self.puts += 1
        if self.fail_put_after is not None and self.puts > self.fail_put_after:
            raise SpillUnavailable("store stopped")
        self.blobs[url] = data

    async def get(self, url: str) -> bytes:
        if url not in self.blobs:
            raise SpillUnavailable("no such blob")
        return self.blobs[url]

    async def release(self, association_id: str, blob_id: str) -> None:
        self.released.append(blob_id)


def sealers() -> tuple[FrameSealer, FrameSealer]:
    secret, transcript = os.urandom(32), os.urandom(32)
    return FrameSealer(secret, transcript, AID, initiator=True), FrameSealer(secret, transcript, AID, initiator=False)


class Wire:
    """The association stream as seen by SpillSender: blob notices get consecutive sequence numbers."""

    def __init__(self, seq: int = 5) -> None:
        self.seq = seq
        self.frames: list[pb.Data] = []

    async def announce(self, build: Callable[[int], pb.Data]) -> None:
        self.frames.append(build(self.seq))
        self.seq += 1


def sender(
    transport: MemoryTransport,
    sealer: FrameSealer,
    framer: FakeFramer,
    level: int | None = None,
    wire: Wire | None = None,
    shuffle: bool = False,
    state: SpillState | None = None,
) -> SpillSender:
    out = SpillSender(
        transport,  # type: ignore[arg-type]
        AID,
        sealer,
        framer,  # type: ignore[arg-type]
        threshold=1000,
        part_bytes=64 * 1024,
        parallel=3,
        compression_level=lambda: level,
        announce=(wire or Wire()).announce,
        shuffle=lambda: shuffle,
        state=state,
    )
    return out


async def send_dataset(out: SpillSender, framer: FakeFramer, chunks: list[bytes]) -> tuple[bytes, list[pb.Data]]:
    """(bytes sent inline, blob notices sent) for one data set offered in ``chunks``."""
    wire = Wire()
    out._announce = wire.announce  # one wire per data set in these tests
    inline = bytearray()
    for i, chunk in enumerate(chunks):
        framer.dataset_bytes += len(chunk)
        if i == len(chunks) - 1:
            framer.datasets_completed += 1
            framer.dataset_bytes = 0
        inline += await out.offer(chunk, True)
    return bytes(inline), wire.frames


async def deliver(receiver: SpillReceiver, rx: FrameSealer, frames: list[pb.Data], out: list[bytes]) -> None:
    """What RelayedAssociation does with the notices (all arrived): accept each, deliver the blob they open."""
    blobs = []
    for frame in frames:
        blob, began, _ = receiver.accept(frame, rx.open(frame.payload, frame.seq, frame.flags))
        if began:
            blobs.append(blob)

    async def sink(plain: bytes) -> bool:
        out.append(plain)
        return True

    for blob in blobs:
        await receiver.deliver(blob, sink)


async def receive(receiver: SpillReceiver, rx: FrameSealer, frames: list[pb.Data]) -> bytes:
    out: list[bytes] = []
    await deliver(receiver, rx, frames, out)
    return b"".join(out)


@pytest.mark.parametrize("level", [None, 3])
async def test_round_trip(level: int | None) -> None:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(1000) + bytes(50_000) for _ in range(7)]
    inline, frames = await send_dataset(sender(transport, tx, framer, level), framer, chunks)
    assert inline == b"" and frames and [f.seq for f in frames] == list(range(5, 5 + len(frames)))
    assert all(f.flags == spill.FLAG_BLOB | 0x2 and f.blob.blob_id == "ab" * 16 for f in frames)
    assert len(transport.blobs) == 6  # 357 kB in 64 KiB parts
    got = await receive(SpillReceiver(transport, AID, rx, parallel=2), rx, frames)  # type: ignore[arg-type]
    assert got == b"".join(chunks)
    assert transport.released == ["ab" * 16]


@pytest.mark.parametrize("level", [None, 3])
async def test_every_upload_slot_is_asked_for_with_the_stored_size_of_its_part(level: int | None) -> None:
    """Issue 17: the bridge binds a presigned PUT to the length the router states, so the router asks
    for each part's slot only once the part's stored (compressed, sealed) bytes exist."""
    tx, _rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(1000) + bytes(50_000) for _ in range(7)]
    await send_dataset(sender(transport, tx, framer, level), framer, chunks)
    uploads = {(blob, part): size for (blob, part, download), size in transport.sizes.items() if not download}
    assert sorted(part for _, part in uploads) == list(range(6))
    assert ("", 0) in uploads  # part 0's request creates the blob
    for url, stored in transport.blobs.items():
        part = int(url.rsplit("/", 1)[1])
        size = uploads[("", 0)] if part == 0 else uploads[("ab" * 16, part)]
        assert size == len(stored) > 0, (part, size, len(stored))


async def test_shuffled_parts_of_16_bit_pixels_round_trip_smaller() -> None:
    tx, rx = sealers()
    pixels = generate_ct_series(1)[0].PixelData  # 512 KiB of 16-bit CT
    chunks = [pixels[i : i + 65536] for i in range(0, len(pixels), 65536)]
    stored = {}
    for shuffle in (False, True):
        transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
        _, frames = await send_dataset(sender(transport, tx, framer, 3, shuffle=shuffle), framer, chunks)
        stored[shuffle] = sum(len(b) for b in transport.blobs.values())
        assert any(b[0] & spill.FLAG_PART_SHUFFLED for b in transport.blobs.values()) is shuffle
        got = await receive(SpillReceiver(transport, AID, rx, parallel=2), rx, frames)  # type: ignore[arg-type]
        assert got == pixels
    assert stored[True] < 0.9 * stored[False], stored


async def test_parts_are_announced_while_the_data_set_still_arrives() -> None:
    """Pipelining: PARTS notices go out before the data set ends; the receiver delivers announced parts at once."""
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    wire = Wire()
    out = sender(transport, tx, framer, wire=wire)
    chunks = [os.urandom(64 * 1024) for _ in range(6)]
    for chunk in chunks[:5]:
        framer.dataset_bytes += len(chunk)
        assert await out.offer(chunk, True) == b""
        await asyncio.sleep(0)  # let the uploads finish, as the next read from the device would
    early = list(wire.frames)
    assert early, "no notice before the end of the data set"
    receiver = SpillReceiver(transport, AID, rx, parallel=2)  # type: ignore[arg-type]
    blob, began, ended = receiver.accept(early[0], rx.open(early[0].payload, early[0].seq, early[0].flags))
    assert began and not ended
    for frame in early[1:]:
        receiver.accept(frame, rx.open(frame.payload, frame.seq, frame.flags))
    got: list[bytes] = []

    async def sink(plain: bytes) -> bool:
        got.append(plain)
        return True

    delivery = asyncio.create_task(receiver.deliver(blob, sink))
    for _ in range(20):
        await asyncio.sleep(0)
    assert 1 <= len(got) <= blob.announced < 6, "announced parts are delivered before the blob ends"
    assert b"".join(got) == b"".join(chunks)[: len(got) * 64 * 1024]
    framer.dataset_bytes, framer.datasets_completed = 0, 1
    assert await out.offer(chunks[5], True) == b""
    for frame in wire.frames[len(early) :]:
        receiver.accept(frame, rx.open(frame.payload, frame.seq, frame.flags))
    await delivery
    assert b"".join(got) == b"".join(chunks) and transport.released == ["ab" * 16]


async def test_below_threshold_stays_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer()
    out = sender(transport, tx, framer)
    framer.dataset_bytes = 400
    assert await out.offer(b"x" * 400, True) == b""  # held back while the data set may grow
    inline, frames = await send_dataset(out, framer, [b"y" * 500])
    assert inline == b"x" * 400 + b"y" * 500 and not frames and not transport.blobs


async def test_head_of_a_big_data_set_goes_into_the_blob() -> None:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer()
    chunks = [os.urandom(300) for _ in range(3)] + [os.urandom(70_000), os.urandom(100)]
    inline, frames = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert inline == b"" and frames
    assert await receive(SpillReceiver(transport, AID, rx, parallel=2), rx, frames) == b"".join(chunks)  # type: ignore[arg-type]


async def test_store_down_falls_back_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_slot = True
    state = SpillState()
    out = sender(transport, tx, framer, state=state)
    chunks = [os.urandom(40_000) for _ in range(4)]
    inline, frames = await send_dataset(out, framer, chunks)
    assert inline == b"".join(chunks) and not frames and out.disabled
    assert state.stats.fallbacks == 1 and state.paused


async def test_a_paused_router_sends_inline_without_asking_the_store() -> None:
    """The pause after a store failure holds for every association of the router that shares the state."""
    tx, _ = sealers()
    state = SpillState()
    state.pause()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(40_000) for _ in range(4)]
    inline, frames = await send_dataset(sender(transport, tx, framer, state=state), framer, chunks)
    assert inline == b"".join(chunks) and not frames and not transport.blobs
    other = SpillState()  # another router process (or a test) is not paused
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    _, frames = await send_dataset(sender(transport, tx, framer, state=other), framer, chunks)
    assert frames and other.stats.blobs_sent == 1 and state.stats.blobs_sent == 0


async def test_counters_follow_a_blob_through_sender_and_receiver() -> None:
    tx, rx = sealers()
    state, received = SpillState(), SpillState()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(60_000) for _ in range(4)]
    _, frames = await send_dataset(sender(transport, tx, framer, state=state), framer, chunks)
    receiver = SpillReceiver(transport, AID, rx, parallel=2, stats=received.stats)  # type: ignore[arg-type]
    assert await receive(receiver, rx, frames) == b"".join(chunks)
    assert state.stats.blobs_sent == received.stats.blobs_received == 1
    assert state.stats.bytes_spilled == received.stats.bytes_received == 240_000
    assert state.stats.parts_sent == received.stats.parts_received == 4
    assert state.stats.stored_bytes_sent == received.stats.stored_bytes_received > 240_000


async def test_store_fails_before_any_part_is_stored_falls_back_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_put_after = 0
    chunks = [os.urandom(40_000) for _ in range(5)]
    inline, frames = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert inline == b"".join(chunks) and not frames


async def test_store_fails_mid_blob_aborts() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_put_after = 2
    with pytest.raises(SpillFailed, match="middle of a blob"):
        await send_dataset(sender(transport, tx, framer), framer, [os.urandom(60_000) for _ in range(10)])


async def sent_blob(chunks: list[bytes] | None = None) -> tuple[MemoryTransport, FrameSealer, list[pb.Data]]:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = chunks or [os.urandom(60_000) for _ in range(4)]
    _, frames = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert frames
    return transport, rx, frames


@pytest.mark.parametrize("damage", ["flip", "truncate_part", "drop_last", "swap", "flags"])
async def test_damaged_blob_is_refused_before_the_damaged_bytes(damage: str) -> None:
    transport, rx, frames = await sent_blob()
    keys = sorted(transport.blobs)
    if damage == "flip":
        data = bytearray(transport.blobs[keys[1]])
        data[100] ^= 1
        transport.blobs[keys[1]] = bytes(data)
    elif damage == "truncate_part":
        transport.blobs[keys[1]] = transport.blobs[keys[1]][:-10]
    elif damage == "drop_last":
        del transport.blobs[keys[-1]]
    elif damage == "swap":
        transport.blobs[keys[0]], transport.blobs[keys[1]] = transport.blobs[keys[1]], transport.blobs[keys[0]]
    else:
        transport.blobs[keys[1]] = bytes([transport.blobs[keys[1]][0] | spill.FLAG_LAST]) + transport.blobs[keys[1]][1:]
    delivered: list[bytes] = []
    with pytest.raises(SpillFailed) as failed:
        await deliver(SpillReceiver(transport, AID, rx, parallel=2), rx, frames, delivered)  # type: ignore[arg-type]
    # Typed: callers read `security` and `reason`, not the text. A missing part is the store's failure.
    assert failed.value.security is (damage != "drop_last") and failed.value.reason is Reason.SPILL
    good = 0 if damage == "swap" else 1
    assert len(delivered) <= (3 if damage == "drop_last" else good)
    assert not transport.released


async def test_reference_must_match_notice() -> None:
    transport, rx, frames = await sent_blob()
    frames[0].blob.blob_id = "cd" * 16
    with pytest.raises(SpillFailed, match="does not match"):
        await receive(SpillReceiver(transport, AID, rx, parallel=2), rx, frames)  # type: ignore[arg-type]


async def test_a_replayed_or_reordered_notice_is_refused() -> None:
    transport, rx, frames = await sent_blob()
    receiver = SpillReceiver(transport, AID, rx, parallel=2)  # type: ignore[arg-type]
    await receive(receiver, rx, frames)
    with pytest.raises(SpillFailed, match="is number 0, 1 was expected"):  # the same blob again
        receiver.accept(frames[0], rx.open(frames[0].payload, frames[0].seq, frames[0].flags))


def test_part_nonces_never_meet_frame_nonces() -> None:
    assert spill.part_seq(0, 0) >= 1 << 63
    assert spill.part_seq(5, 1) != spill.part_seq(6, 1) != spill.part_seq(5, 2)
    with pytest.raises(SpillFailed):
        spill.part_seq(1 << 42, 0)


async def test_a_part_deleted_before_it_was_fetched_fails_with_a_clear_message() -> None:
    chunks = [os.urandom(60_000) for _ in range(4)]
    transport, rx, frames = await sent_blob(chunks)
    blob_id = frames[0].blob.blob_id
    gone = f"{AID}/{blob_id}/1"
    del transport.blobs[gone]

    async def get(url: str) -> bytes:
        if url == gone:
            raise spill.BlobGone("the store has no such part (HTTP 404 Not Found)")
        return transport.blobs[url]

    transport.get = get  # type: ignore[method-assign]
    delivered: list[bytes] = []
    with pytest.raises(SpillFailed) as failure:
        await deliver(SpillReceiver(transport, AID, rx, parallel=2), rx, frames, delivered)  # type: ignore[arg-type]
    assert str(failure.value) == (
        f"blob {blob_id} part 1 is gone from the store (deleted before it was fetched): "
        "the store has no such part (HTTP 404 Not Found)"
    )
    assert b"".join(delivered) == b"".join(chunks)[: 64 * 1024], "only part 0, authenticated, came out"
    assert transport.released == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.integers(0, 255))
def test_a_part_with_any_other_header_is_refused_as_an_alert(header: int) -> None:
    """The part header (relay_router.wire.flags.PartFlag) is authenticated: any change is refused."""
    tx, rx = sealers()
    receiver = SpillReceiver(MemoryTransport(), AID, rx, parallel=1)  # type: ignore[arg-type]
    flags = PartFlag.SEALED | PartFlag.PART | PartFlag.LAST
    stored = bytes([flags]) + tx.seal(b"pixels", spill.part_seq(0, 0), flags)
    assert receiver.open_part("b", 0, 0, stored) == (b"pixels", True)
    if header == flags:
        return
    with pytest.raises(SpillFailed) as refused:
        receiver.open_part("b", 0, 0, bytes([header]) + stored[1:])
    assert refused.value.security and isinstance(refused.value, RelayError)


def test_store_errors_are_typed() -> None:
    assert issubclass(spill.BlobGone, SpillUnavailable) and issubclass(SpillUnavailable, RelayError)
    assert SpillUnavailable("down").reason is Reason.SPILL and not SpillUnavailable("down").security
