"""Every flag bit the routers put on the wire, in one registry per namespace.

`FrameFlag` is the `Data.flags` field of a frame; the flags are part of the AEAD's associated
data (relay_router.seal), so the bridge cannot change them. `PartFlag` is the one-byte header of
a stored blob part (relay_router.spill): a separate namespace, authenticated the same way with
the part's own nonce. The numeric values are the wire format: never renumber them.
"""

from __future__ import annotations

from enum import IntFlag


class FrameFlag(IntFlag):
    """`Data.flags`: what was done to a frame's payload, and what the payload is."""

    COMPRESSED = 0x1  # zstd (relay_router.compress), before sealing
    SEALED = 0x2  # AES-256-GCM with the association key (relay_router.seal); required on every frame
    BLOB = 0x4  # the payload is a sealed blob notice (PARTS or END); `Data.blob` names the blob
    PACE = 0x100  # the payload is a pace report: the rate the sending router receives at (relay_router.pace)
    BURST = 0x200  # the sender had this frame's data waiting when it sent the previous frame
    SHUFFLED = 0x400  # with COMPRESSED: unshuffle the decompressed bytes (2-byte planes)


class PartFlag(IntFlag):
    """The first byte of a stored blob part (relay_router.spill); bits 0x1 and 0x2 mean what they mean in frames."""

    COMPRESSED = 0x1
    SEALED = 0x2
    PART = 0x8  # a sealed part of a blob (always set)
    LAST = 0x10  # ... the last one
    SHUFFLED = 0x20  # with COMPRESSED: byte planes to interleave after zstd


# Every flag combination a router may emit, per kind of frame (the codec's tests round-trip each one).
DATA_FLAGS = frozenset(
    FrameFlag.SEALED | extra
    for extra in (
        FrameFlag(0),
        FrameFlag.COMPRESSED,
        FrameFlag.COMPRESSED | FrameFlag.SHUFFLED,
        FrameFlag.BURST,
        FrameFlag.BURST | FrameFlag.COMPRESSED,
        FrameFlag.BURST | FrameFlag.COMPRESSED | FrameFlag.SHUFFLED,
    )
)
PACE_FLAGS = FrameFlag.SEALED | FrameFlag.PACE
BLOB_FLAGS = FrameFlag.SEALED | FrameFlag.BLOB
