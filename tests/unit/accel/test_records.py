"""The accelerated record stream (relay_router.accel.records): round trips, any split, hostile input."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_router.accel import records
from relay_router.accel.records import RecordError, RecordReader, RecordType

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.1"
EXPLICIT = "1.2.840.10008.1.2.1"
ENTRY = "0005f1a2b3c4d5e6-0123456789ab"


def _near_stream(payload: bytes) -> bytes:
    header = records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, len(payload))
    return records.hello(capabilities=True) + records.instance(header) + records.chunks(payload) + records.ack([ENTRY])


def _feed_split(reader: RecordReader, data: bytes, cuts: list[int]) -> list[records.Record]:
    out: list[records.Record] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        out += reader.feed(data[start:cut])
        start = max(start, cut)
    return out


@given(payload=st.binary(min_size=1, max_size=3 * records.MAX_CHUNK // 1000), cuts=st.lists(st.integers(0, 10**6)))
def test_near_to_far_stream_round_trips_however_it_is_split(payload: bytes, cuts: list[int]) -> None:
    got = _feed_split(RecordReader(records.NEAR_TO_FAR), _near_stream(payload), cuts)
    assert isinstance(got[0], records.Hello) and got[0].capabilities
    assert got[1] == records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, len(payload))
    chunks = [r for r in got if isinstance(r, records.Chunk)]
    assert b"".join(c.data for c in chunks) == payload
    assert [c.last for c in chunks].count(True) == 1 and chunks[-1].last
    assert got[-1] == records.Ack((ENTRY,))


def test_a_large_instance_is_cut_into_bounded_chunks() -> None:
    payload = os.urandom(records.MAX_CHUNK * 2 + 5)
    got = RecordReader(records.NEAR_TO_FAR).feed(_near_stream(payload))
    sizes = [len(r.data) for r in got if isinstance(r, records.Chunk)]
    assert max(sizes) <= records.MAX_CHUNK and sum(sizes) == len(payload)


def test_far_to_near_records_round_trip() -> None:
    data = (
        records.capabilities({CT: [EXPLICIT, "1.2.840.10008.1.2"]})
        + records.stored(ENTRY, UID)
        + records.refused(ENTRY, UID, 0xA700, permanent=False, error="spool full\x1b[31m")
        + records.outcome(ENTRY, UID, 0x0122, "SOP class not supported")
    )
    caps, stored, refused, outcome = RecordReader(records.FAR_TO_NEAR).feed(data)
    assert caps == records.Capabilities({CT: (EXPLICIT, "1.2.840.10008.1.2")})
    assert stored == records.Stored(ENTRY, UID)
    assert refused == records.Refused(ENTRY, UID, 0xA700, False, "spool full?[31m")  # control characters escaped
    assert outcome == records.Outcome(ENTRY, UID, 0x0122, "SOP class not supported")


def _raw(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("stream", "accept", "message"),
    [
        (_raw(0x7F, b"{}"), records.NEAR_TO_FAR, "unknown record type"),
        (records.stored(ENTRY, UID), records.NEAR_TO_FAR, "not expected in this direction"),
        (records.hello(capabilities=False), records.FAR_TO_NEAR, "not expected in this direction"),
        (_raw(RecordType.HELLO, b"x" * (records.MAX_HEADER + 1)), records.NEAR_TO_FAR, "exceeds"),
        (_raw(RecordType.HELLO, b"not json"), records.NEAR_TO_FAR, "not JSON"),
        (_raw(RecordType.HELLO, b'{"version": 99}'), records.NEAR_TO_FAR, "version"),
        (_raw(RecordType.CHUNK, b"abc"), records.NEAR_TO_FAR, "where 0 were announced"),
        (
            _raw(
                RecordType.INSTANCE,
                json.dumps(
                    {"id": ENTRY, "sop_class": "1.2.x", "sop_instance": UID, "transfer_syntax": EXPLICIT, "length": 3}
                ).encode(),
            ),
            records.NEAR_TO_FAR,
            "is not a UID",
        ),
        (
            _raw(
                RecordType.INSTANCE,
                json.dumps(
                    {"id": "../../etc", "sop_class": CT, "sop_instance": UID, "transfer_syntax": EXPLICIT, "length": 3}
                ).encode(),
            ),
            records.NEAR_TO_FAR,
            "not a spool entry id",
        ),
        (
            _raw(
                RecordType.INSTANCE,
                json.dumps(
                    {"id": ENTRY, "sop_class": CT, "sop_instance": UID, "transfer_syntax": EXPLICIT, "length": 10**12}
                ).encode(),
            ),
            records.NEAR_TO_FAR,
            "out of range",
        ),
        (
            records.instance(records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, 4)) + records.ack([]),
            records.NEAR_TO_FAR,
            "inside an instance",
        ),
        (
            records.instance(records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, 2)) + _raw(RecordType.CHUNK, b"abc"),
            records.NEAR_TO_FAR,
            "where 2 were announced",
        ),
        (
            _raw(RecordType.OUTCOME, json.dumps({"id": ENTRY, "sop_instance": UID, "status": 70000}).encode()),
            records.FAR_TO_NEAR,
            "not a DIMSE status",
        ),
        (
            _raw(RecordType.CAPABILITIES, json.dumps({"contexts": {CT: ["x"] * 40}}).encode()),
            records.FAR_TO_NEAR,
            "bad transfer syntax list",
        ),
    ],
)
def test_hostile_streams_are_refused_with_a_reason(stream: bytes, accept: tuple[RecordType, ...], message: str) -> None:
    reader = RecordReader(accept)
    with pytest.raises(RecordError, match=message):
        reader.feed(stream)
    with pytest.raises(RecordError):  # poisoned: nothing after a violation is read
        reader.feed(records.ack([]))


def test_accel1_is_agreed_only_when_offered_and_accepted() -> None:
    from relay_router.wire.features import ACCEL, Features

    offered = Features.offer(compression=True, accel=True)
    assert ACCEL in offered.names() and ACCEL not in Features.offer(compression=True).names()
    assert Features.answer(offered.names(), compression=True, accel=True).accel
    assert not Features.answer(offered.names(), compression=True, accel=False).accel  # device not accelerated
    assert not Features.answer(Features.offer(compression=True).names(), compression=True, accel=True).accel
    assert Features.agreed(offered, [ACCEL, "zstd"]).accel and not Features.agreed(offered, ["zstd"]).accel
