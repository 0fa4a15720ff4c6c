"""Frame compression: round trips, skipping what does not pay, refusing bombs and garbage."""

from __future__ import annotations

import os

import pytest
import zstandard

from relay_demo.datasets import generate_ct_series
from relay_router.compress import (
    GIVE_UP_AFTER,
    MAX_FRAME_PLAINTEXT,
    SKIP_FRAMES,
    DecompressionError,
    FrameCompressor,
    FrameDecompressor,
)


def test_ct_pixels_shrink_and_round_trip() -> None:
    pixels = generate_ct_series(1)[0].PixelData
    packed, compressed = FrameCompressor().compress(pixels)
    assert compressed and len(packed) < 0.7 * len(pixels)
    assert FrameDecompressor().decompress(packed) == pixels


def test_small_payloads_are_left_alone() -> None:
    assert FrameCompressor().compress(b"\0" * 100) == (b"\0" * 100, False)


def test_incompressible_frames_go_raw_and_the_sender_backs_off() -> None:
    compressor = FrameCompressor()
    noise = [os.urandom(64 * 1024) for _ in range(GIVE_UP_AFTER)]
    assert all(compressor.compress(n) == (n, False) for n in noise)
    # Backing off: even compressible data is not tried for a while ...
    zeros = b"\0" * 65536
    for _ in range(SKIP_FRAMES):
        assert compressor.compress(zeros) == (zeros, False)
    # ... then it is again.
    assert compressor.compress(zeros)[1] is True


def test_a_decompression_bomb_is_refused_before_inflating() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (MAX_FRAME_PLAINTEXT + 1))
    with pytest.raises(DecompressionError, match="declares"):
        FrameDecompressor().decompress(bomb)


def test_a_frame_without_declared_size_is_refused() -> None:
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 1000)
    with pytest.raises(DecompressionError):
        FrameDecompressor().decompress(streamed)


def test_garbage_is_refused() -> None:
    with pytest.raises(DecompressionError, match="not a zstd frame|corrupt"):
        FrameDecompressor().decompress(b"definitely not zstd")
