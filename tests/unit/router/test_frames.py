"""relay_router.wire: the frame codec without processes.

Security properties (hypothesis): a tampered, replayed, reordered, re-flagged, truncated or
cross-association frame is rejected as a security failure, and nothing after the attack is
delivered; every flag combination the codec emits round-trips. Wire compatibility: the codec's
frames are byte for byte what routers sent before it existed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_demo.datasets import generate_ct_series
from relay_router.seal import FrameSealer
from relay_router.wire.codec import (
    BlobNotice,
    DataReceived,
    FrameCodec,
    FrameRejected,
    PaceReport,
    blob_notice_frame,
)
from relay_router.wire.features import Features
from relay_router.wire.flags import BLOB_FLAGS, DATA_FLAGS, PACE_FLAGS, FrameFlag, PartFlag

PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL = Features(compress=True, shuffle=True, spill=True, pace=True)
CT = generate_ct_series(1)[0].PixelData[:65536]  # 16-bit pixels: shuffling wins


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pair:
    """Both routers of one association: `a` initiates, `b` responds (features already agreed)."""

    a: FrameCodec
    b: FrameCodec
    sealers: tuple[FrameSealer, FrameSealer]


def pair(features: Features = ALL, *, accept_blobs: bool = True, clock: Clock | None = None, aid: str = "") -> Pair:
    aid = aid or os.urandom(16).hex()
    secret, transcript = os.urandom(32), os.urandom(32)
    tx = FrameSealer(secret, transcript, aid, initiator=True)
    rx = FrameSealer(secret, transcript, aid, initiator=False)
    kwargs = {"features": features, "compression_level": 3, "accept_blobs": accept_blobs}
    if clock is not None:
        kwargs["clock"] = clock
    return Pair(FrameCodec(tx, initiator=True, **kwargs), FrameCodec(rx, initiator=False, **kwargs), (tx, rx))


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=0, max_size=2000),  # small and random: sent plain
        st.integers(1024, 20_000).map(lambda n: bytes(n)),  # compressible
        st.integers(0, 4).map(lambda i: CT[i * 4096 : i * 4096 + 16384]),  # 16-bit pixels
    )


# -- the registry ------------------------------------------------------------------------------
def test_flag_values_are_the_wire_format() -> None:
    """Renumbering a flag would break old routers: these numbers are what they send and check."""
    assert {f.name: f.value for f in FrameFlag} == {
        "COMPRESSED": 0x1,
        "SEALED": 0x2,
        "BLOB": 0x4,
        "PACE": 0x100,
        "BURST": 0x200,
        "SHUFFLED": 0x400,
    }
    assert {f.name: f.value for f in PartFlag} == {
        "COMPRESSED": 0x1,
        "SEALED": 0x2,
        "PART": 0x8,
        "LAST": 0x10,
        "SHUFFLED": 0x20,
    }


# -- round trips -------------------------------------------------------------------------------
def _make(target: FrameFlag) -> tuple[Features, bytes, bool]:
    """Features, payload and burst that make the codec emit a data frame with flags `target`."""
    features = Features(
        compress=bool(target & FrameFlag.COMPRESSED),
        shuffle=bool(target & FrameFlag.SHUFFLED),
        pace=bool(target & FrameFlag.BURST),
    )
    payload = CT if target & FrameFlag.SHUFFLED else (bytes(range(256)) * 64 if target & FrameFlag.COMPRESSED else b"x")
    return features, payload, bool(target & FrameFlag.BURST)


@pytest.mark.parametrize("target", sorted(DATA_FLAGS), ids=lambda f: f"{int(f):#x}")
def test_every_data_flag_combination_is_emitted_and_round_trips(target: FrameFlag) -> None:
    features, payload, burst = _make(target)
    p = pair(features)
    for sender, receiver in ((p.a, p.b), (p.b, p.a)):
        frame = sender.encode_data(payload, burst=burst)
        assert frame.flags == target
        assert receiver.decode(frame) == DataReceived(payload)


def test_pace_reports_and_blob_notices_round_trip() -> None:
    p = pair()
    report = p.a.encode_pace_report(3_000_000)
    assert report.flags == PACE_FLAGS and p.b.decode(report) == PaceReport(3_000_000)
    ref = pb.BlobRef(blob_id="ab" * 16, size=10, digest=b"d" * 32)
    notice = p.a.encode_blob_notice(lambda seq: blob_notice_frame(p.sealers[0], seq, b"notice", ref))
    assert notice.flags == BLOB_FLAGS and notice.seq == 2
    assert p.b.decode(notice) == BlobNotice(b"notice", ref)


@PROPERTIES
@given(
    features=st.builds(
        Features, compress=st.booleans(), shuffle=st.booleans(), spill=st.booleans(), pace=st.booleans()
    ),
    frames=st.lists(st.tuples(payloads(), st.booleans()), min_size=1, max_size=12),
)
def test_any_sequence_of_frames_round_trips_in_both_directions(
    features: Features, frames: list[tuple[bytes, bool]]
) -> None:
    features = features & ALL  # shuffle only with compression, as agreement makes it
    p = pair(features)
    for sender, receiver in ((p.a, p.b), (p.b, p.a)):
        for payload, burst in frames:
            frame = sender.encode_data(payload, burst=burst)
            assert frame.flags in DATA_FLAGS
            assert not frame.flags & ~int(FrameFlag.SEALED | FrameFlag.BURST) or features.compress
            assert receiver.decode(pb.Data.FromString(frame.SerializeToString())) == DataReceived(payload)
    assert p.a.send_seq == p.b.receive_seq == 1 + len(frames)
    assert p.b.send_seq == p.a.receive_seq == len(frames)


# -- attacks (the bridge, or anyone on the path) -----------------------------------------------
ATTACKS = ["tamper", "replay", "reorder", "reflag", "truncate", "cross", "drop"]


@PROPERTIES
@given(
    attack=st.sampled_from(ATTACKS),
    sent=st.lists(payloads(), min_size=3, max_size=8),
    where=st.integers(1, 7),
    noise=st.integers(1, (1 << 32) - 1),
    data=st.data(),
)
def test_an_attacked_stream_is_refused_at_the_attack_and_nothing_after_it_is_delivered(
    attack: str, sent: list[bytes], where: int, noise: int, data: st.DataObject
) -> None:
    p = pair()
    frames = [p.a.encode_data(payload, burst=i % 2 == 1) for i, payload in enumerate(sent)]
    # A frame dropped at the very end is seen by the Upper Layer (no A-RELEASE), not by the codec.
    where = min(where, len(frames) - (2 if attack == "drop" else 1))
    wire = [pb.Data.FromString(f.SerializeToString()) for f in frames]
    victim = wire[where]
    if attack == "tamper":
        raw = bytearray(victim.payload)
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        victim.payload = bytes(raw)
    elif attack == "replay":
        wire.insert(where, pb.Data.FromString(wire[where - 1].SerializeToString()))
    elif attack == "reorder":
        wire[where - 1], wire[where] = wire[where], wire[where - 1]
        where -= 1
    elif attack == "reflag":
        victim.flags ^= noise
    elif attack == "truncate":
        victim.payload = victim.payload[: data.draw(st.integers(0, len(victim.payload) - 1))]
    elif attack == "cross":  # the same position in another association (other key and id)
        other = pair()
        for payload in sent[:where]:
            other.a.encode_data(payload)
        wire[where] = other.a.encode_data(sent[where])
    else:
        del wire[where]
    delivered = []
    with pytest.raises(FrameRejected) as rejected:
        for frame in wire:
            delivered.append(p.b.decode(frame))
    assert rejected.value.security and rejected.value.reason is Reason.SECURITY
    assert rejected.value.detail.startswith("SECURITY: ")  # the text routers have always logged
    assert delivered == [DataReceived(payload) for payload in sent[:where]]


def test_the_alerts_say_what_is_wrong() -> None:
    p = pair()
    first, second = p.a.encode_data(b"one"), p.a.encode_data(b"two")
    with pytest.raises(
        FrameRejected, match=r"^SECURITY: frame 2 where 1 was expected \(lost, replayed or reordered\)$"
    ):
        p.b.decode(second)
    p = pair()
    first = p.a.encode_data(b"one")
    first.payload = first.payload[:-1] + bytes([first.payload[-1] ^ 1])
    with pytest.raises(FrameRejected, match="^SECURITY: frame 1 failed authentication"):
        p.b.decode(first)
    p = pair()
    first = p.a.encode_data(b"one")
    first.flags |= 0x800
    with pytest.raises(FrameRejected, match="^SECURITY: frame flags 0x802; only sealed frames"):
        p.b.decode(first)


# -- a hostile peer router (it holds the key, so it can seal anything) -------------------------
def sealed(p: Pair, seq: int, payload: bytes, flags: int, **fields: object) -> pb.Data:
    return pb.Data(payload=p.sealers[0].seal(payload, seq, flags), seq=seq, flags=flags, **fields)


@pytest.mark.parametrize(
    ("features", "flags"),
    [
        (Features(), FrameFlag.SEALED | FrameFlag.COMPRESSED),  # compression not agreed
        (Features(compress=True), FrameFlag.SEALED | FrameFlag.COMPRESSED | FrameFlag.SHUFFLED),  # shuffle not agreed
        (Features(), FrameFlag.SEALED | FrameFlag.BURST),  # pacing not agreed
        (Features(), PACE_FLAGS),
        (ALL, PACE_FLAGS | FrameFlag.COMPRESSED),  # a pace report is never compressed
        (ALL, PACE_FLAGS | FrameFlag.BURST),
        (ALL, FrameFlag.COMPRESSED),  # not sealed
        (ALL, FrameFlag(0)),
        (ALL, FrameFlag.SEALED | 0x8000),  # a bit nobody defined
    ],
    ids=repr,
)
def test_flags_that_were_not_agreed_are_refused_even_when_authentic(features: Features, flags: int) -> None:
    p = pair(features)
    with pytest.raises(FrameRejected, match="^SECURITY: frame flags") as rejected:
        p.b.decode(sealed(p, 1, b"x" * 100, flags))
    assert rejected.value.security


def test_a_blob_reference_is_refused_by_a_router_that_cannot_fetch_blobs() -> None:
    p = pair(accept_blobs=False)
    ref = pb.BlobRef(blob_id="ab" * 16)
    with pytest.raises(FrameRejected, match="blob reference this router did not agree to") as rejected:
        p.b.decode(sealed(p, 1, b"notice", BLOB_FLAGS, blob=ref))
    assert rejected.value.security
    p = pair()
    with pytest.raises(FrameRejected, match="blob reference"):  # the flag without a reference, or with others
        p.b.decode(sealed(p, 1, b"notice", BLOB_FLAGS))
    p = pair()
    with pytest.raises(FrameRejected, match="blob reference"):
        p.b.decode(sealed(p, 1, b"notice", BLOB_FLAGS | FrameFlag.COMPRESSED, blob=ref))


def test_authentic_but_bad_content_is_a_protocol_error_not_an_alert() -> None:
    p = pair()
    with pytest.raises(FrameRejected, match="bad pace report: a pace report has 3 bytes") as rejected:
        p.b.decode(sealed(p, 1, b"abc", PACE_FLAGS))
    assert not rejected.value.security and rejected.value.reason is Reason.PROTOCOL
    p = pair()
    with pytest.raises(FrameRejected, match="bad pace report: a pace report gives 0 bytes") as rejected:
        p.b.decode(sealed(p, 1, struct.pack("!Q", 0), PACE_FLAGS))
    p = pair()
    with pytest.raises(FrameRejected, match="bad compressed frame: not a zstd frame") as rejected:
        p.b.decode(sealed(p, 1, b"not zstd at all", FrameFlag.SEALED | FrameFlag.COMPRESSED))
    assert not rejected.value.security


# -- wire compatibility with routers from before the codec ------------------------------------
def test_frames_are_byte_identical_to_what_routers_sent_before_the_codec() -> None:
    p = pair(Features(spill=True, pace=True))
    tx = p.sealers[0]
    # Before: pb.Data(payload=sealer.seal(data, seq, flags), seq=seq, flags=flags), flags as plain ints.
    assert p.a.encode_data(b"abc", burst=True) == pb.Data(payload=tx.seal(b"abc", 1, 0x202), seq=1, flags=0x202)
    assert p.a.encode_pace_report(1000) == pb.Data(
        payload=tx.seal(struct.pack("!Q", 1000), 2, 0x102), seq=2, flags=0x102
    )
    ref = pb.BlobRef(blob_id="ab" * 16)
    notice = p.a.encode_blob_notice(lambda seq: blob_notice_frame(tx, seq, b"n", ref))
    assert (
        notice.SerializeToString()
        == pb.Data(payload=tx.seal(b"n", 3, 0x6), seq=3, flags=0x6, blob=ref).SerializeToString()
    )


# -- pacing: the receiver's meter lives in the codec ------------------------------------------
def test_burst_frames_produce_one_rate_report_for_the_other_router() -> None:
    clock = Clock()
    p = pair(Features(pace=True), clock=clock)
    rates = []
    for _ in range(12):
        clock.now += 0.01
        p.b.decode(p.a.encode_data(b"y" * 10_000, burst=True))
        rate = p.b.take_rate_to_report()
        if rate is not None:
            rates.append(rate)
    assert len(rates) == 1 and 900_000 < rates[0] < 1_100_000  # about 10 kB per 10 ms
    assert p.b.take_rate_to_report() is None
    unpaced = pair(Features(), clock=clock)
    for _ in range(12):
        clock.now += 0.01
        unpaced.b.decode(unpaced.a.encode_data(b"y" * 10_000, burst=True))
    assert unpaced.b.take_rate_to_report() is None


def test_a_blob_notice_must_be_built_at_the_sequence_number_it_is_given() -> None:
    p = pair()
    ref = pb.BlobRef(blob_id="ab" * 16)
    with pytest.raises(ValueError, match="sequence number"):
        p.a.encode_blob_notice(lambda seq: blob_notice_frame(p.sealers[0], seq + 1, b"n", ref))
    assert p.a.send_seq == 1


def test_the_codec_does_no_io() -> None:
    """Sans-IO like relay_router.ul: importing the codec loads no asyncio, grpc or socket."""
    code = "import sys, relay_router.wire.codec; print(sorted({'asyncio', 'grpc', 'socket'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
