"""Frame pacing: the receiver's rate measurement and the sender's frame size."""

from __future__ import annotations

import pytest

from relay_router.pace import (
    INITIAL_FRAME_BYTES,
    MIN_FRAME_BYTES,
    REPORT_EVERY_S,
    ArrivalMeter,
    PaceError,
    PathPace,
    decode_report,
    encode_report,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(meter: ArrivalMeter, clock: Clock, frames: int, size: int, rate: float, burst: bool = True) -> list[int]:
    reports = []
    for _ in range(frames):
        clock.now += size / rate
        got = meter.observe(size, burst)
        if got is not None:
            reports.append(got)
    return reports


def test_back_to_back_frames_give_the_link_rate() -> None:
    clock = Clock()
    meter = ArrivalMeter(clock)
    reports = feed(meter, clock, 20, 16384, 2.87e6)
    assert reports and abs(reports[0] / 2.87e6 - 1) < 0.01


def test_frames_after_a_pause_do_not_count() -> None:
    """A frame sent after waiting for a response (not a burst) would make the link look slow."""
    clock = Clock()
    meter = ArrivalMeter(clock)
    for _ in range(20):
        clock.now += 0.5  # one C-STORE round trip, then the next data set
        assert meter.observe(16384, burst=False) is None


def test_reports_only_changes_and_not_too_often() -> None:
    clock = Clock()
    meter = ArrivalMeter(clock)
    first = feed(meter, clock, 40, 16384, 3e6)
    assert len(first) == 1, "a steady rate is reported once"
    assert feed(meter, clock, 40, 16384, 3.3e6) == [], "a 10% change is not worth a report"
    faster = feed(meter, clock, 400, 65536, 30e6)
    assert faster and faster[-1] > 20e6, "a tenfold change is reported"


def test_no_report_more_often_than_every_quarter_second() -> None:
    clock = Clock()
    meter = ArrivalMeter(clock)
    assert feed(meter, clock, 10, 16384, 1e6)  # reported at once (the first rate)
    reported_at = clock.now
    soon = feed(meter, clock, 200, 16384, 100e6)  # 33 ms of frames a hundred times faster
    assert soon == [] and clock.now - reported_at < REPORT_EVERY_S
    clock.now = reported_at + REPORT_EVERY_S
    assert feed(meter, clock, 40, 16384, 100e6), "once the quarter second is over the new rate goes out"


def test_sender_frame_size_follows_the_rate() -> None:
    pace = PathPace()
    assert pace.frame_bytes(262144, 0.005) == INITIAL_FRAME_BYTES, "no report yet: small enough to measure"
    pace.update(3_000_000)  # 24 Mbit/s
    assert pace.frame_bytes(262144, 0.005) == MIN_FRAME_BYTES  # 15 KB wanted, 16 KiB minimum
    assert pace.frame_bytes(262144, 0.005, expansion=2.0) == 30000, "compressed frames carry more plaintext"
    pace.update(125_000_000)  # 1 Gbit/s
    assert pace.frame_bytes(262144, 0.005) == 262144
    assert pace.frame_bytes(262144, 0) == 262144, "frame_time_ms = 0: pacing off"
    assert pace.frame_bytes(8192, 0.005) == 8192, "never above frame_bytes, even below the minimum"


def test_report_encoding_round_trips_and_rejects_nonsense() -> None:
    assert decode_report(encode_report(2_870_000.7)) == 2_870_000
    with pytest.raises(PaceError, match="9 bytes"):
        decode_report(b"\0" * 9)
    with pytest.raises(PaceError, match="gives 0 bytes per second"):
        decode_report(b"\0" * 8)
