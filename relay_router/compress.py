"""Frame compression (zstd), negotiated per association and skipped where it does not pay.

Each frame is compressed on its own, then sealed. A frame that does not shrink
by at least 10% travels uncompressed; after several such frames in a row (an
already-compressed transfer syntax such as JPEG 2000) the sender stops trying
for a while, so incompressible studies cost almost no CPU. Decompression is
bounded: a frame may not expand beyond `MAX_FRAME_PLAINTEXT`.

Byte-plane shuffling (feature "zstd-shuffle2", flag `FLAG_SHUFFLED`): most
uncompressed pixel data is 16 bits per sample, little endian. Grouping the low
bytes of a frame before its high bytes (the filter blosc and HDF5 call
"shuffle") lets zstd see the slowly varying high bytes as long runs: measured
on the generated CT, 1.99x becomes 2.42x, and zstd runs faster on the
rearranged bytes. Frames of other data may do better unshuffled, so the sender
tries both forms now and then (`TRIAL_EVERY`) and keeps the better one.
"""

from __future__ import annotations

import zstandard

from relay_router.wire.features import COMPRESSION, SHUFFLE
from relay_router.wire.flags import FrameFlag

FEATURE, SHUFFLE_FEATURE = COMPRESSION, SHUFFLE  # feature names (relay_router.wire.features)

# Registered in relay_router.wire.flags (every frame flag is there); these names stay for existing callers.
FLAG_COMPRESSED = FrameFlag.COMPRESSED
FLAG_SHUFFLED = FrameFlag.SHUFFLED  # with FLAG_COMPRESSED: unshuffle the decompressed bytes (2-byte planes)
TRIAL_EVERY = 32  # frames between comparisons of the shuffled and the plain form
MAX_FRAME_PLAINTEXT = 8 * 1024 * 1024
MIN_SIZE = 1024  # smaller payloads (command sets, echo) are not worth a compressor call
WORTH = 0.9  # keep the compressed form only below this fraction of the original
GIVE_UP_AFTER = 4  # consecutive frames that did not pay ...
SKIP_FRAMES = 64  # ... make the sender skip this many before trying again


class DecompressionError(Exception):
    pass


def shuffle2(data: bytes) -> bytes:
    """Even-offset bytes, then odd-offset bytes (an odd last byte stays last)."""
    even = len(data) & ~1
    return data[0:even:2] + data[1:even:2] + data[even:]


def unshuffle2(data: bytes) -> bytes:
    half = len(data) // 2
    out = bytearray(len(data))
    out[0 : 2 * half : 2] = data[:half]
    out[1 : 2 * half : 2] = data[half : 2 * half]
    out[2 * half :] = data[2 * half :]
    return bytes(out)


class FrameCompressor:
    def __init__(self, level: int = 3, *, shuffle: bool = False) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._misses = 0
        self._skip = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._shuffle = shuffle  # agreed with the other router
        self._shuffled = shuffle  # the form that won the last trial
        self._until_trial = 0

    def pack(self, payload: bytes) -> tuple[bytes, FrameFlag]:
        """(data, flags) for one frame: 0, FLAG_COMPRESSED, or FLAG_COMPRESSED | FLAG_SHUFFLED."""
        if not self._shuffle:
            data, was_packed = self.compress(payload)
            return data, FLAG_COMPRESSED if was_packed else FrameFlag(0)
        if len(payload) < MIN_SIZE or self._skip:
            return self.compress(payload)[0], FrameFlag(0)  # counts the skip
        if self._until_trial <= 0:
            self._until_trial = TRIAL_EVERY
            plain = self._compressor.compress(payload)
            shuffled = self._compressor.compress(shuffle2(payload))
            self._shuffled = len(shuffled) < len(plain)
            packed = shuffled if self._shuffled else plain
        else:
            self._until_trial -= 1
            packed = self._compressor.compress(shuffle2(payload) if self._shuffled else payload)
        if not self._paid(len(payload), len(packed)):
            return payload, FrameFlag(0)
        return packed, FLAG_COMPRESSED | (FLAG_SHUFFLED if self._shuffled else FrameFlag(0))

    def reset_give_up(self) -> None:
        """Try compression again from the next frame: a new instance (another study, maybe another transfer
        syntax) on a long-lived stream must not inherit the previous one's "does not pay" verdict."""
        self._misses = self._skip = 0

    def _paid(self, size: int, packed: int) -> bool:
        if packed < size * WORTH:
            self._misses = 0
            self.bytes_in += size
            self.bytes_out += packed
            return True
        self._misses += 1
        if self._misses >= GIVE_UP_AFTER:
            self._misses, self._skip = 0, SKIP_FRAMES
        return False

    def compress(self, payload: bytes) -> tuple[bytes, bool]:
        """(data, compressed?) for one frame payload."""
        if len(payload) < MIN_SIZE:
            return payload, False
        if self._skip:
            self._skip -= 1
            return payload, False
        packed = self._compressor.compress(payload)
        if self._paid(len(payload), len(packed)):
            return packed, True
        return payload, False


class FrameDecompressor:
    def __init__(self) -> None:
        self._decompressor = zstandard.ZstdDecompressor()

    def unpack(self, data: bytes, flags: int) -> bytes:
        """The plaintext of a frame sent with `flags` (FLAG_COMPRESSED set; FLAG_SHUFFLED maybe)."""
        plain = self.decompress(data)
        return unshuffle2(plain) if flags & FLAG_SHUFFLED else plain

    def decompress(self, data: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"not a zstd frame: {exc}") from exc
        if size < 0 or size > MAX_FRAME_PLAINTEXT:
            raise DecompressionError(f"a compressed frame declares {size} bytes (limit {MAX_FRAME_PLAINTEXT})")
        try:
            return self._decompressor.decompress(data, max_output_size=MAX_FRAME_PLAINTEXT)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"corrupt compressed frame: {exc}") from exc
