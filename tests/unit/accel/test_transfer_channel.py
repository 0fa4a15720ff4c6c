"""The accelerated transfer stream's frames (relay_router.accel.transfer.RecordChannel).

The stream stays open between studies (up to IDLE_CLOSE_S), so what the frame compressor learnt from one
instance must not decide how the next one travels: after a JPEG 2000 study (incompressible, the compressor
gives up for SKIP_FRAMES frames) a study of uncompressed pixel data must cross compressed from its first frame.
"""

from __future__ import annotations

import os

from protos.relay.v1 import relay_pb2 as pb
from relay_router.accel import records
from relay_router.accel.transfer import THREAD_MIN_BYTES, RecordChannel
from relay_router.compress import GIVE_UP_AFTER, FrameDecompressor
from relay_router.seal import FrameSealer
from relay_router.wire.codec import FrameCodec
from relay_router.wire.features import Features
from relay_router.wire.flags import FrameFlag

AID = os.urandom(16).hex()
FRAME = THREAD_MIN_BYTES  # full frames are compressed and sealed in a worker thread
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
J2K = "1.2.840.10008.1.2.4.90"


class CollectingStream:
    """What RecordChannel uses of an AssociationStream to send: every frame kept."""

    def __init__(self) -> None:
        self.frames: list[pb.Frame] = []

    async def send(self, frame: pb.Frame) -> None:
        self.frames.append(frame)


def _channel() -> tuple[RecordChannel, CollectingStream, FrameSealer]:
    secret, transcript = os.urandom(32), os.urandom(32)
    sealer = FrameSealer(secret, transcript, AID, initiator=True)
    opener = FrameSealer(secret, transcript, AID, initiator=False)
    codec = FrameCodec(
        sealer,
        initiator=True,
        features=Features(compress=True, shuffle=True, accel=True),
        compression_level=3,
        accept_blobs=False,
    )
    stream = CollectingStream()
    channel = RecordChannel(stream, codec, records.FAR_TO_NEAR, frame_bytes=FRAME)  # type: ignore[arg-type]
    return channel, stream, opener


def _header(number: int, syntax: str, length: int) -> bytes:
    uid = f"1.2.826.0.1.3680043.8.498.{number}"
    return records.instance(records.InstanceHeader(f"0005f1a2b3c4d5e6-{number:012d}", CT, uid, syntax, length))


def _pixels(length: int) -> bytes:
    """Slowly varying 16-bit samples, as uncompressed CT or radiographs: zstd shrinks them well."""
    return b"".join((1000 + (i // 64) % 200).to_bytes(2, "little") for i in range(length // 2))


async def test_an_incompressible_instance_does_not_leave_the_next_uncompressed() -> None:
    channel, stream, opener = _channel()
    noise = os.urandom(FRAME * (GIVE_UP_AFTER + 4))  # JPEG 2000: enough frames for the compressor to give up
    await channel.send(_header(1, J2K, len(noise)), new_instance=True)
    await channel.send(records.chunks(noise), flush=True)
    first = len(stream.frames)
    assert not any(f.data.flags & FrameFlag.COMPRESSED for f in stream.frames[GIVE_UP_AFTER:first])

    image = _pixels(FRAME * 8)
    await channel.send(_header(2, EXPLICIT, len(image)), new_instance=True)
    await channel.send(records.chunks(image), flush=True)
    second = stream.frames[first:]

    # All but the last, the flushed remainder of a few hundred bytes (not worth compressing: MIN_SIZE).
    uncompressed = [f.data.seq for f in second[:-1] if not f.data.flags & FrameFlag.COMPRESSED]
    assert not uncompressed, f"frames {uncompressed} of the second instance crossed uncompressed"
    wire = sum(len(f.data.payload) for f in second)
    assert wire < len(image) / 2, f"{wire} bytes on the wire for {len(image)} bytes of compressible pixels"

    # And the frames still open to the same records: nothing lost or reordered by the reset or the threads.
    decompressor, plain = FrameDecompressor(), bytearray()
    for frame in stream.frames:
        data = frame.data
        opened = opener.open(data.payload, data.seq, data.flags)
        plain += decompressor.unpack(opened, data.flags) if data.flags & FrameFlag.COMPRESSED else opened
    reader = records.RecordReader(records.NEAR_TO_FAR)
    received = reader.feed(bytes(plain))
    body = b"".join(r.data for r in received if isinstance(r, records.Chunk))
    assert body == noise + image
