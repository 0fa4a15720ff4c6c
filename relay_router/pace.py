"""Frame pacing: frames sized to the path's speed, learned from the receiving router.

The bridge forwards whole gRPC messages, so each frame is stored and forwarded
once at the bridge: every burst of data (a C-STORE, say) reaches the far router
one largest-frame-time later than it would through a packet-forwarding path
(docs/benchmarks.md measures it: 91 ms per C-STORE with 256 KiB frames on a
24 Mbit/s link). Small frames remove that wait but cost CPU per frame, which
matters on a fast LAN. So the sender sizes frames to a time on the wire
(`[dicom] frame_time_ms`, default 5 ms), between `MIN_FRAME_BYTES` and
`[dicom] frame_bytes`.

Only the receiver can see the path's speed: frames the sender wrote back to back
(`FLAG_BURST`: the sender's previous read filled its frame, so this data was
already waiting) arrive spaced by the bottleneck's rate. The receiver measures
that spacing (`ArrivalMeter`) and reports the rate in a sealed `FLAG_PACE` frame
(8 bytes, authenticated like every frame, so the bridge can neither forge nor
alter it); the sender keeps the latest rate per remote site (`PathPace`), so the
next association to that site starts with the right frame size.

Pacing is negotiated per association (feature "pace"); a router that does not
offer it gets fixed `frame_bytes` frames and no pace reports.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable

from relay_router.wire.features import PACE
from relay_router.wire.flags import FrameFlag

FEATURE = PACE  # the feature name (relay_router.wire.features)

# Registered in relay_router.wire.flags (every frame flag is there); these names stay for existing callers.
FLAG_PACE = FrameFlag.PACE  # the payload is a pace report: the rate this router receives at, bytes per second
FLAG_BURST = FrameFlag.BURST  # the sender had this frame's data waiting when it sent the previous frame

MIN_FRAME_BYTES = 16 * 1024
# Before the first report: small enough that a typical image (0.1-0.5 MB) still goes in several frames,
# which is what the receiver needs to measure anything; a fast path grows past it within a few frames.
INITIAL_FRAME_BYTES = 64 * 1024
MIN_SAMPLES = 6  # back-to-back frames needed before a rate is reported
WINDOW = 32  # ... and the most that count (about the last 32 frames)
REPORT_EVERY_S = 0.25  # at most this often
REPORT_CHANGE = 0.25  # and only when the rate moved by more than this fraction
_RATE = struct.Struct("!Q")
MAX_RATE = 1 << 40  # bytes per second: anything above is nonsense


class PaceError(ValueError):
    pass


def encode_report(rate: float) -> bytes:
    return _RATE.pack(max(1, min(int(rate), MAX_RATE)))


def decode_report(payload: bytes) -> int:
    if len(payload) != _RATE.size:
        raise PaceError(f"a pace report has {len(payload)} bytes, expected {_RATE.size}")
    (rate,) = _RATE.unpack(payload)
    if not 0 < rate <= MAX_RATE:
        raise PaceError(f"a pace report gives {rate} bytes per second")
    return rate


class PathPace:
    """What this router knows about the speed of its path to one remote site (shared by its associations)."""

    def __init__(self) -> None:
        self.rate: int | None = None  # bytes per second, as last reported by the receiving router
        self.updated: float | None = None

    def update(self, rate: int) -> None:
        self.rate, self.updated = rate, time.monotonic()

    def frame_bytes(self, largest: int, frame_time_s: float, expansion: float = 1.0) -> int:
        """Plaintext bytes to read for the next frame.

        `expansion` is plaintext per wire byte (the compression ratio): a frame that compresses 2x may
        carry twice the plaintext for the same time on the wire.
        """
        if frame_time_s <= 0:
            return largest
        if self.rate is None:
            return min(INITIAL_FRAME_BYTES, largest)
        wanted = int(self.rate * frame_time_s * max(expansion, 1.0))
        return max(min(MIN_FRAME_BYTES, largest), min(wanted, largest))


class ArrivalMeter:
    """Measures the rate at which back-to-back frames arrive; says when a new rate is worth reporting."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self._last_arrival: float | None = None
        self._reported: float | None = None
        self._reported_at = float("-inf")

    def observe(self, wire_bytes: int, burst: bool) -> int | None:
        """Record one arriving frame; returns a rate (bytes per second) to report, or None."""
        now = self._clock()
        if burst and self._last_arrival is not None:
            self._samples.append((wire_bytes, now - self._last_arrival))
        self._last_arrival = now
        if len(self._samples) < MIN_SAMPLES or now - self._reported_at < REPORT_EVERY_S:
            return None
        seconds = sum(gap for _, gap in self._samples)
        if seconds <= 0:
            return None
        rate = sum(size for size, _ in self._samples) / seconds
        if self._reported is not None and abs(rate / self._reported - 1) <= REPORT_CHANGE:
            return None
        self._reported, self._reported_at = rate, now
        return int(rate)
