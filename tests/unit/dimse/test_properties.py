"""Property tests (hypothesis): split and fragment invariance, bounded memory, hostile PDVs."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_router.dimse import (
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseError,
    DimseEvent,
    DimseReceiver,
    DimseSender,
    c_echo_rq,
    c_store_rq,
)
from tests.unit.ul import builders as B

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CT = B.CT_STORAGE
CONTEXTS = {1: (B.VERIFICATION, B.IMPLICIT_LE), 3: (CT, B.EXPLICIT_LE), 5: (CT, B.IMPLICIT_LE)}


def messages_of(events: list[DimseEvent]) -> list[tuple[int, int, str, bytes | None]]:
    """(context, command field, SOP instance, data set) per message: what a user of the layer sees."""
    out: list[tuple[int, int, str, bytes | None]] = []
    body = bytearray()
    for event in events:
        if isinstance(event, CommandReceived):
            uid = str(event.command.get("AffectedSOPInstanceUID", ""))
            out.append((event.context_id, event.command_field, uid, None))
            body.clear()
        elif isinstance(event, DatasetChunk):
            body += event.data
        else:
            context, field, uid, _ = out[-1]
            out[-1] = (context, field, uid, bytes(body))
    return out


@st.composite
def conversation(draw: st.DrawFn) -> list[tuple[int, object, bytes | None]]:
    """A few messages: echoes on context 1, stores (with data sets of 0-3000 bytes) on 3 or 5."""
    out: list[tuple[int, object, bytes | None]] = []
    for n in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            out.append((1, c_echo_rq(n + 1), None))
        else:
            body = draw(st.binary(max_size=3000))
            out.append((draw(st.sampled_from([3, 5])), c_store_rq(n + 1, CT, f"1.2.3.{n}"), body))
    return out


def splits(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in points + [len(data)]:
        yield data[start:point]
        start = point


@PROPERTY
@given(conversation(), st.sampled_from([0, 7, 8, 50, 1000, 16384]), st.lists(st.integers(0, 1 << 20), max_size=30))
def test_any_split_and_any_maximum_give_the_same_messages(
    messages: list[tuple[int, object, bytes | None]], max_pdu: int, cuts: list[int]
) -> None:
    sender = DimseSender(max_pdu)
    stream = b"".join(pdu for cx, cmd, body in messages for pdu in sender.message(cx, cmd, body))  # type: ignore[arg-type]
    receiver = DimseReceiver(CONTEXTS, max_pdu_length=max_pdu)
    events: list[DimseEvent] = []
    for piece in splits(stream, cuts):
        events += receiver.feed(piece)
    assert receiver.idle
    expected = [
        (cx, int(cmd.CommandField), str(cmd.get("AffectedSOPInstanceUID", "")), body)  # type: ignore[attr-defined]
        for cx, cmd, body in messages
    ]
    assert messages_of(events) == expected


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)), max_size=12),
    st.lists(st.integers(0, 600), max_size=8),
    st.binary(max_size=64),
)
def test_hostile_pdv_headers_only_ever_raise_dimse_error(
    pdvs: list[tuple[int, int, bytes]], lengths: list[int], tail: bytes
) -> None:
    """Random context IDs, control bytes, fragments and item lengths (often lying): DimseError or events."""
    items = []
    for i, (context, control, fragment) in enumerate(pdvs):
        lie = lengths[i] if i < len(lengths) and lengths[i] % 3 == 0 else None
        items.append(B.pdv(context, control, fragment, length=lie))
    stream = B.p_data(*items) if items else b""
    receiver = DimseReceiver(CONTEXTS, max_command_length=256)
    try:
        receiver.feed(stream + tail)
    except DimseError as exc:
        assert exc.reason == "protocol" and exc.violation and exc.detail


@PROPERTY
@given(st.binary(min_size=1, max_size=400))
def test_random_command_bytes_only_ever_raise_dimse_error(command: bytes) -> None:
    receiver = DimseReceiver(CONTEXTS)
    try:
        receiver.feed(B.p_data(B.pdv(1, 3, command)))
    except DimseError as exc:
        assert exc.violation


def test_fifty_megabytes_stream_through_in_bounded_chunks() -> None:
    """A 50 MB data set: no event holds more than one feed's bytes, nothing accumulates."""
    size, piece = 50 * 1024 * 1024, 64 * 1024
    block = bytes(range(256)) * (piece // 256)

    def source() -> Iterator[bytes]:
        for _ in range(size // piece):
            yield block

    sender = DimseSender(16384)
    receiver = DimseReceiver(CONTEXTS, max_pdu_length=16384)
    total, biggest_chunk, biggest_feed, completes = 0, 0, 0, 0
    batch: list[bytes] = []
    for pdu in sender.message(3, c_store_rq(1, CT, "1.2.3"), source()):
        batch.append(pdu)
        if len(batch) == 16:  # feeds of about 256 KiB, as a socket read would give
            data = b"".join(batch)
            batch.clear()
            biggest_feed = max(biggest_feed, len(data))
            for event in receiver.feed(data):
                if isinstance(event, DatasetChunk):
                    total += len(event.data)
                    biggest_chunk = max(biggest_chunk, len(event.data))
                completes += isinstance(event, DatasetComplete)
    for event in receiver.feed(b"".join(batch)):
        if isinstance(event, DatasetChunk):
            total += len(event.data)
            biggest_chunk = max(biggest_chunk, len(event.data))
        completes += isinstance(event, DatasetComplete)
    assert total == size and completes == 1
    assert biggest_chunk <= 16384 - 6  # one PDV fragment at most: never the data set
    assert biggest_feed <= 16 * (16384 + 6)  # the sender built whole PDUs of the negotiated size, no more
