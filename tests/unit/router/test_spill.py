"""relay_router.spill: sealed blob parts round-trip; tampering, truncation and store failures are caught."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_router import spill
from relay_router.seal import FrameSealer
from relay_router.spill import SpillFailed, SpillReceiver, SpillSender, SpillUnavailable

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

    async def slot(self, association_id: str, blob_id: str, part: int, *, download: bool) -> tuple[str, str]:
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


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "_down_until", 0.0)


def sender(
    transport: MemoryTransport, sealer: FrameSealer, framer: FakeFramer, level: int | None = None
) -> SpillSender:
    return SpillSender(
        transport,
        AID,
        sealer,
        framer,
        threshold=1000,
        part_bytes=64 * 1024,
        parallel=3,  # type: ignore[arg-type]
        compression_level=lambda: level,
    )


async def send_dataset(
    out: SpillSender, framer: FakeFramer, chunks: list[bytes], seq: int = 5
) -> tuple[bytes, pb.Data | None]:
    inline = bytearray()
    ref = None
    for i, chunk in enumerate(chunks):
        framer.dataset_bytes += len(chunk)
        if i == len(chunks) - 1:
            framer.datasets_completed += 1
            framer.dataset_bytes = 0
        sent, ref = await out.offer(chunk, seq, True)
        inline += sent
    return bytes(inline), ref


async def receive(receiver: SpillReceiver, tx_sealer: FrameSealer, rx_sealer: FrameSealer, ref: pb.Data) -> bytes:
    manifest = rx_sealer.open(ref.payload, ref.seq, ref.flags)
    return b"".join([part async for part in receiver.fetch(ref, manifest)])


@pytest.mark.parametrize("level", [None, 3])
async def test_round_trip(level: int | None) -> None:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(1000) + bytes(50_000) for _ in range(7)]
    inline, ref = await send_dataset(sender(transport, tx, framer, level), framer, chunks)
    assert inline == b"" and ref is not None and ref.seq == 5
    assert len(transport.blobs) == 6  # 357 kB in 64 KiB parts
    got = await receive(SpillReceiver(transport, AID, rx, parallel=2), tx, rx, ref)  # type: ignore[arg-type]
    assert got == b"".join(chunks)
    assert transport.released == [ref.blob.blob_id]


async def test_below_threshold_stays_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer()
    out = sender(transport, tx, framer)
    framer.dataset_bytes = 400
    assert await out.offer(b"x" * 400, 5, True) == (b"", None)  # held back while the data set may grow
    inline, ref = await send_dataset(out, framer, [b"y" * 500])
    assert inline == b"x" * 400 + b"y" * 500 and ref is None and not transport.blobs


async def test_head_of_a_big_data_set_goes_into_the_blob() -> None:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer()
    chunks = [os.urandom(300) for _ in range(3)] + [os.urandom(70_000), os.urandom(100)]
    inline, ref = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert inline == b"" and ref is not None
    assert await receive(SpillReceiver(transport, AID, rx, parallel=2), tx, rx, ref) == b"".join(chunks)  # type: ignore[arg-type]


async def test_store_down_falls_back_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_slot = True
    out = sender(transport, tx, framer)
    chunks = [os.urandom(40_000) for _ in range(4)]
    inline, ref = await send_dataset(out, framer, chunks)
    assert inline == b"".join(chunks) and ref is None and out.disabled
    assert spill.STATS.fallbacks >= 1


async def test_store_fails_before_any_part_is_stored_falls_back_inline() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_put_after = 0
    chunks = [os.urandom(40_000) for _ in range(5)]
    inline, ref = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert inline == b"".join(chunks) and ref is None


async def test_store_fails_mid_blob_aborts() -> None:
    tx, _ = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    transport.fail_put_after = 2
    with pytest.raises(SpillFailed, match="middle of a blob"):
        await send_dataset(sender(transport, tx, framer), framer, [os.urandom(60_000) for _ in range(10)])


async def sent_blob() -> tuple[MemoryTransport, FrameSealer, FrameSealer, pb.Data]:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    _, ref = await send_dataset(sender(transport, tx, framer), framer, [os.urandom(60_000) for _ in range(4)])
    assert ref is not None
    return transport, tx, rx, ref


@pytest.mark.parametrize("damage", ["flip", "truncate_part", "drop_last", "swap", "flags"])
async def test_damaged_blob_is_refused_before_the_damaged_bytes(damage: str) -> None:
    transport, tx, rx, ref = await sent_blob()
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
    receiver = SpillReceiver(transport, AID, rx, parallel=2)  # type: ignore[arg-type]
    manifest = rx.open(ref.payload, ref.seq, ref.flags)
    delivered = []
    with pytest.raises(SpillFailed):
        async for part in receiver.fetch(ref, manifest):
            delivered.append(part)
    good = 0 if damage == "swap" else 1
    assert len(delivered) <= (3 if damage == "drop_last" else good)
    assert not transport.released


async def test_reference_must_match_manifest() -> None:
    transport, _, rx, ref = await sent_blob()
    manifest = rx.open(ref.payload, ref.seq, ref.flags)
    ref.blob.blob_id = "cd" * 16
    with pytest.raises(SpillFailed, match="does not match"):
        async for _ in SpillReceiver(transport, AID, rx, parallel=2).fetch(ref, manifest):  # type: ignore[arg-type]
            pass


def test_part_nonces_never_meet_frame_nonces() -> None:
    assert spill.part_seq(0, 0) >= 1 << 63
    assert spill.part_seq(5, 1) != spill.part_seq(6, 1) != spill.part_seq(5, 2)
    with pytest.raises(SpillFailed):
        spill.part_seq(1 << 42, 0)


async def test_a_part_deleted_before_it_was_fetched_fails_with_a_clear_message() -> None:
    tx, rx = sealers()
    transport, framer = MemoryTransport(), FakeFramer(dataset_bytes=2000)
    chunks = [os.urandom(60_000) for _ in range(4)]
    _, ref = await send_dataset(sender(transport, tx, framer), framer, chunks)
    assert ref is not None
    gone = f"{AID}/{ref.blob.blob_id}/1"
    del transport.blobs[gone]

    async def get(url: str) -> bytes:
        if url == gone:
            raise spill.BlobGone("the store has no such part (HTTP 404 Not Found)")
        return transport.blobs[url]

    transport.get = get  # type: ignore[method-assign]
    delivered: list[bytes] = []
    with pytest.raises(SpillFailed) as failure:
        manifest = rx.open(ref.payload, ref.seq, ref.flags)
        async for part in SpillReceiver(transport, AID, rx, parallel=2).fetch(ref, manifest):  # type: ignore[arg-type]
            delivered.append(part)
    assert str(failure.value) == (
        f"blob {ref.blob.blob_id} part 1 is gone from the store (deleted before it was fetched): "
        "the store has no such part (HTTP 404 Not Found)"
    )
    assert b"".join(delivered) == b"".join(chunks)[: 64 * 1024], "only part 0, authenticated, came out"
    assert transport.released == []
