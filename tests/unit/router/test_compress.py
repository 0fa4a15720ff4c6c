"""Frame compression: round trips, skipping what does not pay, refusing bombs and garbage."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard

from relay_demo.datasets import generate_ct_series
from relay_router.compress import (
    FLAG_SHUFFLED,
    GIVE_UP_AFTER,
    MAX_FRAME_PLAINTEXT,
    SKIP_FRAMES,
    DecompressionError,
    FrameCompressor,
    FrameDecompressor,
    shuffle2,
    unshuffle2,
)
from relay_router.seal import FLAG_COMPRESSED


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


def test_shuffle_round_trips_any_length() -> None:
    for data in (b"", b"x", b"ab", b"abc", os.urandom(1001), os.urandom(4096)):
        assert unshuffle2(shuffle2(data)) == data
    assert shuffle2(b"aAbBcCd") == b"abcABCd"


def test_shuffled_ct_frames_are_smaller_and_round_trip() -> None:
    pixels = generate_ct_series(1)[0].PixelData
    plain, plain_flags = FrameCompressor().pack(pixels)
    shuffled, flags = FrameCompressor(shuffle=True).pack(pixels)
    assert plain_flags == FLAG_COMPRESSED and flags == FLAG_COMPRESSED | FLAG_SHUFFLED
    assert len(shuffled) < 0.9 * len(plain), (len(shuffled), len(plain))
    assert FrameDecompressor().unpack(shuffled, flags) == pixels


def test_the_sender_keeps_the_plain_form_where_it_wins() -> None:
    """8-bit data gains nothing from 2-byte planes (here it loses): the trial picks the plain form."""
    symbols = bytes(np.random.default_rng(1).choice(list(b"ACGT"), 65536))
    plain = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(symbols)
    assert len(plain) < len(zstandard.ZstdCompressor(level=3).compress(shuffle2(symbols)))
    packed, flags = FrameCompressor(shuffle=True).pack(symbols)
    assert flags == FLAG_COMPRESSED and packed == plain
    assert FrameDecompressor().unpack(packed, flags) == symbols
