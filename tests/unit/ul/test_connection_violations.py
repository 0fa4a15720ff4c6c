"""RelayConnection violations, aborts, transport closes and truncation (PS3.8 9.2 AA-* actions)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay_router.ul import (
    Aborted,
    AssociateRequested,
    Established,
    Phase,
    ProtocolViolation,
    Rejected,
    RelayConnection,
    Released,
    Send,
    Side,
    a_abort,
    a_associate_rj,
    a_release_rp,
    a_release_rq,
)
from relay_router.ul.connection import Action
from tests.unit.ul import builders as B
from tests.unit.ul import fixtures as F
from tests.unit.ul.scenarios import AC, ECHO_RQ, ECHO_RSP, EXCHANGE, RQ, L, R

APP = B.item(0x10, B.uid(B.APP_CONTEXT))
PC = B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x30, B.uid(B.VERIFICATION)) + B.item(0x40, B.uid(B.IMPLICIT_LE)))
AC_PC = B.item(0x21, b"\x01\x00\x00\x00" + B.item(0x40, B.uid(B.IMPLICIT_LE)))


def at(phase: Phase, requestor: Side = L) -> RelayConnection:
    """A connection driven to ``phase`` with valid traffic."""
    conn = RelayConnection(requestor)
    acceptor = requestor.other
    if phase is Phase.AWAIT_RQ:
        return conn
    conn.receive(requestor, RQ)
    if phase is Phase.AWAIT_RQ_DECISION:
        return conn
    conn.accept_request()
    if phase is Phase.AWAIT_AC:
        return conn
    conn.receive(acceptor, AC)
    if phase is Phase.ESTABLISHED:
        return conn
    conn.receive(requestor, a_release_rq())
    if phase is Phase.RELEASING:
        return conn
    conn.receive(acceptor, a_release_rp())
    assert conn.phase is Phase.CLOSED
    return conn


def violation(actions: list[Action], side: Side, message: str, reason: int, to: tuple[Side, ...]) -> None:
    assert isinstance(actions[0], ProtocolViolation), actions
    assert actions[0].side is side
    assert message in actions[0].detail, actions[0].detail
    assert actions[1:] == [Send(s, a_abort(2, reason)) for s in to]


# (phase, requestor, sender, bytes, detail, A-ABORT reason, sides aborted)
CASES = [
    (Phase.AWAIT_RQ, L, L, F.HTTP_REQUEST, "PDU type 0x47 is not defined (PS3.8 9.3)", 1, (L,)),
    (Phase.AWAIT_RQ, L, L, b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00", "PDU type 0x08 is not defined", 1, (L,)),
    (Phase.AWAIT_RQ, L, L, ECHO_RQ, "unexpected P-DATA-TF from LOCAL (requestor) in phase AWAIT_RQ", 2, (L,)),
    (Phase.AWAIT_RQ, L, L, AC, "unexpected A-ASSOCIATE-AC from LOCAL", 2, (L,)),
    (Phase.AWAIT_RQ, L, L, a_release_rq(), "unexpected A-RELEASE-RQ", 2, (L,)),
    (Phase.AWAIT_RQ, L, L, a_associate_rj(1, 1, 1), "unexpected A-ASSOCIATE-RJ", 2, (L,)),
    (
        Phase.AWAIT_RQ,
        L,
        L,
        B.associate_raw(1, APP + PC + B.item(0x50, B.item(0x51, bytes(4), length=9))),
        "A-ASSOCIATE-RQ sub-item 0x51 length 9 exceeds its item",
        6,
        (L,),
    ),
    (
        Phase.AWAIT_RQ,
        L,
        L,
        B.associate_raw(1, APP + PC + B.item(0x50, b"", length=300)),
        "A-ASSOCIATE-RQ item 0x50 length 300 exceeds its PDU",
        6,
        (L,),
    ),
    (Phase.AWAIT_RQ, L, R, RQ, "unexpected A-ASSOCIATE-RQ from REMOTE (acceptor)", 2, (L, R)),
    (Phase.AWAIT_RQ, R, L, RQ, "unexpected A-ASSOCIATE-RQ from LOCAL (acceptor)", 2, (L, R)),
    (Phase.AWAIT_RQ, R, R, ECHO_RQ, "unexpected P-DATA-TF", 2, (R,)),
    (Phase.AWAIT_RQ_DECISION, L, L, RQ, "unexpected A-ASSOCIATE-RQ from LOCAL", 2, (L,)),
    (Phase.AWAIT_RQ_DECISION, L, L, ECHO_RQ, "unexpected P-DATA-TF", 2, (L,)),
    (Phase.AWAIT_RQ_DECISION, R, R, ECHO_RQ, "unexpected P-DATA-TF", 2, (R,)),
    (Phase.AWAIT_AC, L, L, AC, "unexpected A-ASSOCIATE-AC from LOCAL (requestor)", 2, (L, R)),
    (Phase.AWAIT_AC, L, L, RQ, "unexpected A-ASSOCIATE-RQ from LOCAL", 2, (L, R)),
    (Phase.AWAIT_AC, L, L, ECHO_RQ, "unexpected P-DATA-TF from LOCAL (requestor) in phase AWAIT_AC", 2, (L, R)),
    (Phase.AWAIT_AC, L, R, ECHO_RSP, "unexpected P-DATA-TF from REMOTE (acceptor)", 2, (L, R)),
    (Phase.AWAIT_AC, R, L, ECHO_RSP, "unexpected P-DATA-TF from LOCAL (acceptor)", 2, (L, R)),
    (
        Phase.AWAIT_AC,
        L,
        R,
        B.associate_ac(RQ, [(1, 0, B.IMPLICIT_LE), (7, 0, B.IMPLICIT_LE)]),
        "answers presentation context 7",
        6,
        (L, R),
    ),
    (
        Phase.AWAIT_AC,
        L,
        R,
        B.associate_raw(2, APP + AC_PC + B.item(0x50, B.item(0x51, bytes(4), length=9))),
        "A-ASSOCIATE-AC sub-item 0x51 length 9 exceeds its item",
        6,
        (L, R),
    ),
    (Phase.AWAIT_AC, L, R, B.pdu(0x03, bytes.fromhex("00090101")), "A-ASSOCIATE-RJ result 9", 6, (L, R)),
    (Phase.ESTABLISHED, L, L, RQ, "unexpected A-ASSOCIATE-RQ from LOCAL (requestor) in phase ESTABLISHED", 2, (L, R)),
    (Phase.ESTABLISHED, L, R, AC, "unexpected A-ASSOCIATE-AC", 2, (L, R)),
    (Phase.ESTABLISHED, L, L, a_release_rp(), "unexpected A-RELEASE-RP", 2, (L, R)),
    (
        Phase.ESTABLISHED,
        L,
        L,
        B.p_data(B.pdv(1, 3, bytes(40_000))),
        "P-DATA-TF PDU-length 40006 exceeds the negotiated maximum of 32768",
        6,
        (L, R),
    ),
    (
        Phase.ESTABLISHED,
        L,
        R,
        B.p_data(B.pdv(1, 3, bytes(20_000))),
        "P-DATA-TF PDU-length 20006 exceeds the negotiated maximum of 16384",
        6,
        (L, R),
    ),
    (Phase.ESTABLISHED, L, L, B.p_data(B.pdv(2, 3, b"x")), "PDV presentation context ID 2", 6, (L, R)),
    (Phase.ESTABLISHED, L, L, B.pdu(0x05, bytes(8)), "A-RELEASE-RQ PDU-length is 8", 6, (L, R)),
    (Phase.RELEASING, L, L, ECHO_RQ, "P-DATA-TF from LOCAL after its own A-RELEASE-RQ", 2, (L, R)),
    (Phase.RELEASING, L, L, a_release_rq(), "second A-RELEASE-RQ from LOCAL", 2, (L, R)),
    (Phase.RELEASING, L, L, a_release_rp(), "A-RELEASE-RP from LOCAL, which received no A-RELEASE-RQ", 2, (L, R)),
    (Phase.RELEASING, R, R, a_release_rp(), "A-RELEASE-RP from REMOTE, which received no A-RELEASE-RQ", 2, (L, R)),
]


@pytest.mark.parametrize(("phase", "requestor", "sender", "data", "message", "reason", "to"), CASES)
def test_violation(
    phase: Phase, requestor: Side, sender: Side, data: bytes, message: str, reason: int, to: tuple[Side, ...]
) -> None:
    conn = at(phase, requestor)
    actions = conn.receive(sender, data)
    if data[0] == 0x04 and phase is Phase.ESTABLISHED and "PDV" in message:
        # The P-DATA-TF header was valid and streamed on before its PDV header was checked. The
        # A-ABORT then cannot be parsed by that peer: the driver's transport close ends it.
        assert actions.pop(0) == Send(sender.other, data[:6])
    violation(actions, sender, message, reason, to)
    assert conn.phase is Phase.CLOSED


def test_anything_after_closed_is_a_violation_without_sends() -> None:
    for closed in (at(Phase.CLOSED), RelayConnection(L)):
        if closed.phase is not Phase.CLOSED:
            closed.receive(L, F.HTTP_REQUEST)
        (only,) = closed.receive(R, ECHO_RSP)
        assert isinstance(only, ProtocolViolation) and "after the association closed" in only.detail
        assert closed.receive(L, b"") == []


def test_events_before_a_violation_in_the_same_receive_are_processed() -> None:
    conn = at(Phase.ESTABLISHED)
    actions = conn.receive(L, ECHO_RQ + b"\x09garbage")
    assert actions[0] == Send(R, ECHO_RQ)
    violation(actions[1:], L, "PDU type 0x09", 1, (L, R))


def test_bytes_after_an_abort_in_the_same_receive_are_ignored() -> None:
    conn = at(Phase.ESTABLISHED)
    assert conn.receive(L, a_abort(0, 0) + b"\x09garbage") == [Send(R, a_abort(0, 0)), Aborted(L, 0, 0)]


@pytest.mark.parametrize("phase", [p for p in Phase if p is not Phase.CLOSED])
@pytest.mark.parametrize("requestor", [L, R])
@pytest.mark.parametrize("by", [L, R])
def test_abort_from_either_side_at_any_time(phase: Phase, requestor: Side, by: Side) -> None:
    conn = at(phase, requestor)
    actions = conn.receive(by, a_abort(0, 0))
    other_involved = by is requestor.other or phase not in (Phase.AWAIT_RQ, Phase.AWAIT_RQ_DECISION)
    expected: list[Action] = [Send(by.other, a_abort(0, 0))] if other_involved else []
    assert actions == [*expected, Aborted(by, 0, 0)]
    assert conn.phase is Phase.CLOSED


def test_64k_associate_rq_within_and_beyond_the_limit() -> None:
    limit = 64 * 1024 - 6
    conn = RelayConnection(L, max_control_length=limit)
    (req,) = conn.receive(L, B.big_rq(64 * 1024))
    assert isinstance(req, AssociateRequested) and len(req.info.presentation_contexts) == 127
    conn = RelayConnection(L, max_control_length=limit)
    actions = conn.receive(L, B.big_rq(64 * 1024 + 1)[:6])  # refused from its header: nothing buffered
    violation(actions, L, "A-ASSOCIATE-RQ PDU-length 65531 exceeds the limit of 65530 bytes", 6, (L,))
    assert conn.framer(L).buffered == 0


# ----------------------------------------------------------------------------- peer_closed


def test_peer_closed_when_closed_does_nothing() -> None:
    assert at(Phase.CLOSED).peer_closed(L) == []


def test_acceptor_gone_before_ac_gives_transient_reject() -> None:
    conn = at(Phase.AWAIT_AC, L)  # router A: the remote site went away
    assert conn.peer_closed(R, "tunnel reset") == [Send(L, a_associate_rj(2, 3, 1)), Rejected(2, 3, 1)]
    assert conn.phase is Phase.CLOSED
    conn = at(Phase.AWAIT_AC, R)  # router B: the local archive refused or dropped the connection
    assert conn.peer_closed(L) == [Send(R, a_associate_rj(2, 3, 1)), Rejected(2, 3, 1)]
    conn = at(Phase.AWAIT_RQ_DECISION, L)
    assert conn.peer_closed(R) == [Send(L, a_associate_rj(2, 3, 1)), Rejected(2, 3, 1)]


@pytest.mark.parametrize("phase", [Phase.AWAIT_AC, Phase.ESTABLISHED, Phase.RELEASING])
@pytest.mark.parametrize("requestor", [L, R])
@pytest.mark.parametrize("side", [L, R])
def test_peer_closed_aborts_the_other_side(phase: Phase, requestor: Side, side: Side) -> None:
    conn = at(phase, requestor)
    actions = conn.peer_closed(side, "connection reset")
    if phase is Phase.AWAIT_AC and side is requestor.other:
        assert actions == [Send(requestor, a_associate_rj(2, 3, 1)), Rejected(2, 3, 1)]
    else:
        assert actions == [
            Send(side.other, a_abort(2, 0)),
            Aborted(side, 2, 0, f"{side.name} closed its transport: connection reset"),
        ]
    assert conn.phase is Phase.CLOSED
    assert conn.peer_closed(side.other) == []


def test_requestor_gone_before_the_acceptor_is_involved() -> None:
    conn = at(Phase.AWAIT_RQ_DECISION, L)
    assert conn.peer_closed(L) == [Aborted(L, 2, 0, "LOCAL closed its transport")]
    assert conn.accept_request() == []  # the driver's late decision is a no-op
    assert RelayConnection(L).peer_closed(L) == [Aborted(L, 2, 0, "LOCAL closed its transport")]


def test_close_mid_pdu_is_a_violation() -> None:
    conn = at(Phase.ESTABLISHED)
    assert conn.receive(L, ECHO_RQ[:30]) == [Send(R, ECHO_RQ[:30])]
    actions = conn.peer_closed(L)
    assert isinstance(actions[0], ProtocolViolation)
    assert "LOCAL closed its transport in the middle of a PDU" in actions[0].detail
    assert actions[1:] == [Send(R, a_abort(2, 0)), Aborted(L, 2, 0, "LOCAL closed its transport")]


# ----------------------------------------------------------------------------- truncation at every offset


def pdu_boundaries(data: bytes) -> set[int]:
    pos, out = 0, {0}
    while pos < len(data):
        pos += 6 + int.from_bytes(data[pos + 2 : pos + 6], "big")
        out.add(pos)
    return out


def _replay(upto: int, cut: int, feed: Callable[[RelayConnection, Side, bytes], list[Action]]) -> RelayConnection:
    conn = RelayConnection(L)
    for i, (side, data) in enumerate(EXCHANGE[: upto + 1]):
        chunk = data if i < upto else data[:cut]
        for action in feed(conn, side, chunk):
            assert not isinstance(action, ProtocolViolation), action
            if isinstance(action, AssociateRequested):
                conn.accept_request(called="ALIAS")
    return conn


def test_valid_exchange_end_to_end() -> None:
    conn = _replay(len(EXCHANGE) - 1, len(EXCHANGE[-1][1]), lambda c, s, d: c.receive(s, d))
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("step", range(len(EXCHANGE)))
def test_truncation_at_every_offset(step: int) -> None:
    side, data = EXCHANGE[step]
    for cut in range(len(data)):
        conn = _replay(step, cut, lambda c, s, d: c.receive(s, d))
        before = conn.phase
        for closer in (side, side.other):
            probe = _replay(step, cut, lambda c, s, d: c.receive(s, d)) if closer is not side else conn
            actions = probe.peer_closed(closer)
            assert probe.phase is Phase.CLOSED
            sends = [a for a in actions if isinstance(a, Send)]
            assert all(s.to is not closer for s in sends)  # never write to a transport that is gone
            outcome = [a for a in actions if isinstance(a, (Aborted, Rejected, Released, Established))]
            assert len(outcome) == 1, actions
            mid_pdu = closer is side and cut not in pdu_boundaries(data)
            assert any(isinstance(a, ProtocolViolation) for a in actions) == mid_pdu
            if before is Phase.AWAIT_AC and closer is R:
                assert outcome == [Rejected(2, 3, 1)] and sends == [Send(L, a_associate_rj(2, 3, 1))]
            else:
                assert isinstance(outcome[0], Aborted) and outcome[0].by is closer


def test_truncated_exchange_replayed_bytewise_matches() -> None:
    """Feeding the exchange one byte at a time gives the same sends and events as whole feeds."""

    def collect(bytewise: bool) -> tuple[dict[Side, bytes], list[Action]]:
        conn = RelayConnection(L)
        out = {L: b"", R: b""}
        events: list[Action] = []
        for side, data in EXCHANGE:
            pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
            for piece in pieces:
                pending = conn.receive(side, piece)
                while pending:
                    action = pending.pop(0)
                    if isinstance(action, Send):
                        out[action.to] += action.data
                    else:
                        events.append(action)
                        if isinstance(action, AssociateRequested):
                            pending += conn.accept_request(calling="SITEA")
        return out, events

    whole, bytewise = collect(False), collect(True)
    assert whole == bytewise
    assert [type(e) for e in whole[1]] == [AssociateRequested, Established, Released]
