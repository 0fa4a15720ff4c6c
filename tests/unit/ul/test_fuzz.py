"""Property tests (hypothesis): split invariance, and hostile bytes never escape as other exceptions."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_router.ul import (
    AssociateInfo,
    AssociateRequested,
    ControlPdu,
    PDataBytes,
    PduError,
    PduFramer,
    Phase,
    ProtocolViolation,
    RelayConnection,
    Send,
    Side,
    parse_associate,
)
from relay_router.ul.connection import Action
from relay_router.ul.framer import FramerEvent
from tests.unit.ul import builders as B
from tests.unit.ul import fixtures as F
from tests.unit.ul.scenarios import EXCHANGE

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL = [F.ASSOCIATE_RQ, F.ASSOCIATE_AC, F.ASSOCIATE_RJ, F.RELEASE_RQ, F.RELEASE_RP, F.ABORT_PROVIDER_UNEXPECTED]


@st.composite
def pdata_stream(draw: st.DrawFn) -> bytes:
    """Valid P-DATA-TF PDUs: DIMSE-like messages (command fragments, then data set fragments, one context)
    cut into PDVs and packed into PDUs at random, with control PDUs in between."""
    pdvs: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        pcid = draw(st.integers(0, 127)) * 2 + 1
        for kind in (1, 0) if draw(st.booleans()) else (1,):
            sizes = draw(st.lists(st.integers(0, 300), min_size=1, max_size=4))
            for i, size in enumerate(sizes):
                last = 2 if i == len(sizes) - 1 else 0
                pdvs.append(B.pdv(pcid, kind | last, bytes([i & 0xFF]) * size))
    out = b""
    i = 0
    while i < len(pdvs):
        n = draw(st.integers(1, 3))
        out += B.p_data(*pdvs[i : i + n])
        i += n
        if draw(st.integers(0, 4)) == 0:
            out += draw(st.sampled_from(CONTROL))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def normalize(events: list[FramerEvent]) -> list[FramerEvent]:
    out: list[FramerEvent] = []
    for ev in events:
        if isinstance(ev, PDataBytes) and out and isinstance(out[-1], PDataBytes):
            out[-1] = PDataBytes(out[-1].data + ev.data)
        elif not (isinstance(ev, PDataBytes) and not ev.data):
            out.append(ev)
    return out


def run_framer(chunks: list[bytes]) -> tuple[list[FramerEvent], str | None, PduFramer]:
    framer = PduFramer()
    events: list[FramerEvent] = []
    for chunk in chunks:
        try:
            events += framer.feed(chunk)
        except PduError as exc:
            return normalize(events + exc.events), exc.detail, framer
    return normalize(events), None, framer


@FUZZ
@given(pdata_stream(), st.lists(st.integers(0, 1 << 16), max_size=20))
def test_framer_split_invariance(stream: bytes, cuts: list[int]) -> None:
    whole, error, framer = run_framer([stream])
    assert error is None and framer.at_pdu_boundary
    assert b"".join(e.data for e in whole) == stream
    pieces, error2, framer2 = run_framer(split(stream, cuts))
    assert pieces == whole and error2 is None
    assert (framer2.pdus, framer2.messages_completed) == (framer.pdus, framer.messages_completed)


@FUZZ
@given(pdata_stream(), st.integers(0, 1 << 16), st.integers(0, 255), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_framer_split_invariance_on_corrupted_streams(stream: bytes, where: int, value: int, cuts: list[int]) -> None:
    """Even a broken stream yields the same events, and fails at the same point, however it is split."""
    corrupted = bytearray(stream)
    corrupted[where % len(corrupted)] = value
    assert run_framer([bytes(corrupted)])[:2] == run_framer(split(bytes(corrupted), cuts))[:2]


def connection_run(chunks: list[tuple[Side, bytes]]) -> tuple[dict[Side, bytes], list[Action]]:
    conn = RelayConnection(Side.LOCAL)
    out = {Side.LOCAL: b"", Side.REMOTE: b""}
    events: list[Action] = []
    for side, chunk in chunks:
        pending = conn.receive(side, chunk)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Send):
                out[action.to] += action.data
            else:
                events.append(action)
                if isinstance(action, AssociateRequested):
                    pending += conn.accept_request(called="ALIAS_B")
    assert conn.phase is Phase.CLOSED
    return out, events


@FUZZ
@given(st.lists(st.lists(st.integers(0, 1 << 14), max_size=6), min_size=len(EXCHANGE), max_size=len(EXCHANGE)))
def test_connection_split_invariance(cuts: list[list[int]]) -> None:
    whole = connection_run(list(EXCHANGE))
    pieces = connection_run(
        [(side, piece) for (side, data), c in zip(EXCHANGE, cuts, strict=True) for piece in split(data, c)]
    )
    assert pieces == whole
    assert not any(isinstance(e, ProtocolViolation) for e in whole[1])


LIMIT = 4096


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=12))
def test_arbitrary_bytes_only_raise_pdu_error_and_stay_bounded(chunks: list[bytes]) -> None:
    framer = PduFramer(max_control_length=LIMIT)
    for chunk in chunks:
        try:
            framer.feed(chunk)
        except PduError:
            assert framer.failed is not None
            return
        assert framer.buffered <= LIMIT + 6


@FUZZ
@given(
    st.sampled_from([b"\x01", b"\x02", b"\x04", b"\x05", b"\x07", b""]),
    st.binary(max_size=2000),
    st.lists(st.integers(0, 2000), max_size=6),
)
def test_arbitrary_bytes_into_connection_give_actions_only(first: bytes, tail: bytes, cuts: list[int]) -> None:
    for requestor in (Side.LOCAL, Side.REMOTE):
        conn = RelayConnection(requestor, max_control_length=LIMIT)
        for side in (requestor, requestor.other):
            for chunk in split(first + tail, cuts):
                for action in conn.receive(side, chunk):
                    if isinstance(action, AssociateRequested):
                        conn.accept_request()
                assert conn.framer(side).buffered <= LIMIT + 6
            conn.peer_closed(side)
        assert conn.phase is Phase.CLOSED


VALID_ASSOCIATE = [
    F.ASSOCIATE_RQ,
    F.ASSOCIATE_AC,
    B.associate_rq(extended=True),
    B.associate_ac(B.associate_rq(contexts=[(B.VERIFICATION, [B.IMPLICIT_LE])] * 3)),
]


@FUZZ
@given(
    st.sampled_from(VALID_ASSOCIATE),
    st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_associate_pdus_parse_or_raise_pdu_error(pdu: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(pdu)
    for where, value in edits:
        data[where % len(data)] = value
    try:
        info = parse_associate(bytes(data))
    except PduError as exc:
        assert exc.detail
    else:
        assert isinstance(info, AssociateInfo)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_exchange_gives_actions_only(edits: list[tuple[int, int]]) -> None:
    stream = bytearray(EXCHANGE[0][1] + EXCHANGE[2][1] + EXCHANGE[4][1] + EXCHANGE[6][1])
    for where, value in edits:
        stream[where % len(stream)] = value
    conn = RelayConnection(Side.LOCAL, max_control_length=LIMIT)
    for action in conn.receive(Side.LOCAL, bytes(stream)):
        if isinstance(action, AssociateRequested):
            conn.accept_request()
            conn.receive(Side.REMOTE, EXCHANGE[1][1])
    conn.peer_closed(Side.LOCAL)
    assert conn.phase is Phase.CLOSED


def test_control_pdu_event_types() -> None:
    events, error, _ = run_framer([b"".join(CONTROL)])
    assert error is None
    assert [e.pdu_type for e in events if isinstance(e, ControlPdu)] == [1, 2, 3, 5, 6, 7]
