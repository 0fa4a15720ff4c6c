"""Frame compression (zstd), negotiated per association and skipped where it does not pay.

Each frame is compressed on its own, then sealed. A frame that does not shrink
by at least 10% travels uncompressed; after several such frames in a row (an
already-compressed transfer syntax such as JPEG 2000) the sender stops trying
for a while, so incompressible studies cost almost no CPU. Decompression is
bounded: a frame may not expand beyond `MAX_FRAME_PLAINTEXT`.
"""

from __future__ import annotations

import zstandard

FEATURE = "zstd"
MAX_FRAME_PLAINTEXT = 8 * 1024 * 1024
MIN_SIZE = 1024  # smaller payloads (command sets, echo) are not worth a compressor call
WORTH = 0.9  # keep the compressed form only below this fraction of the original
GIVE_UP_AFTER = 4  # consecutive frames that did not pay ...
SKIP_FRAMES = 64  # ... make the sender skip this many before trying again


class DecompressionError(Exception):
    pass


class FrameCompressor:
    def __init__(self, level: int = 3) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._misses = 0
        self._skip = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, payload: bytes) -> tuple[bytes, bool]:
        """(data, compressed?) for one frame payload."""
        if len(payload) < MIN_SIZE:
            return payload, False
        if self._skip:
            self._skip -= 1
            return payload, False
        packed = self._compressor.compress(payload)
        if len(packed) < len(payload) * WORTH:
            self._misses = 0
            self.bytes_in += len(payload)
            self.bytes_out += len(packed)
            return packed, True
        self._misses += 1
        if self._misses >= GIVE_UP_AFTER:
            self._misses, self._skip = 0, SKIP_FRAMES
        return payload, False


class FrameDecompressor:
    def __init__(self) -> None:
        self._decompressor = zstandard.ZstdDecompressor()

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
