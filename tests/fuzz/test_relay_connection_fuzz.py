"""Stateful fuzzing of the router's framing: a RelayConnection driven from both sides at once.

tests/unit/ul/test_fuzz.py checks split invariance and that hostile bytes into one side give actions
only. This adds what it does not cover: both sides speaking in any order, the driver's decisions
(accept with rewritten titles, reject), transport closes and local aborts at any moment, and
invariants checked after every step:

* only the documented action types come out, and Sends name a side and carry bytes;
* nothing of the requestor's reaches the acceptor before the driver accepted the A-ASSOCIATE-RQ (the
  acceptor may only get an A-ABORT answering bytes it sent itself), and the first thing it gets after
  the acceptance is that request with the called title rewritten;
* once CLOSED, the connection stays CLOSED and sends nothing more (PS3.8 Sta13), whatever it is fed;
* buffering is bounded by the control-PDU limit on both sides;
* the byte counters agree with the Sends; AssociateRequested and Established happen at most once;
* no exception escapes `receive`, `peer_closed` or `abort`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relay_router.ul import (
    Aborted,
    AssociateRequested,
    Established,
    PduType,
    Phase,
    ProtocolViolation,
    Rejected,
    RelayConnection,
    Released,
    Send,
    Side,
    a_abort,
    a_release_rp,
    a_release_rq,
    parse_associate,
)
from tests.unit.ul import builders as B

LIMIT = 4096
DOCUMENTED = (Send, AssociateRequested, Established, Rejected, Released, Aborted, ProtocolViolation)
RQ = B.associate_rq(called="ROUTER_ALIAS", calling="WS", contexts=[(B.VERIFICATION, [B.IMPLICIT_LE])] * 2)
AC = B.associate_ac(RQ)
VALID = [
    RQ,
    AC,
    B.associate_rq(extended=True),
    bytes.fromhex("0300000000040001 0101".replace(" ", "")),  # A-ASSOCIATE-RJ
    b"".join(B.echo_rq()),
    b"".join(B.echo_rsp()),
    b"".join(B.store_rq(600, context_id=3, max_pdu=256)),
    a_release_rq(),
    a_release_rp(),
    a_abort(0, 0),
    a_abort(2, 2),
]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """A valid PDU, a mutated or truncated one, a run of them, or plain noise."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.sampled_from(VALID))
    if kind == 1:
        data = bytearray(draw(st.sampled_from(VALID)))
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == 2:
        data = draw(st.sampled_from(VALID))
        a = draw(st.integers(0, len(data)))
        return data[a : draw(st.integers(a, len(data)))]
    if kind == 3:
        return b"".join(draw(st.lists(st.sampled_from(VALID), min_size=2, max_size=4)))
    # Noise that starts like a PDU header, with a length that may be huge.
    return (
        bytes([draw(st.integers(0, 9)), 0])
        + draw(st.integers(0, 0xFFFFFFFF)).to_bytes(4, "big")
        + draw(st.binary(max_size=64))
    )


class RelayConnectionMachine(RuleBasedStateMachine):
    conn: RelayConnection

    @initialize(requestor=st.sampled_from(list(Side)))
    def start(self, requestor: Side) -> None:
        self.conn = RelayConnection(requestor, max_control_length=LIMIT)
        self.requestor = requestor
        self.accepted = False
        self.sent = {side: 0 for side in Side}
        self.to_acceptor: list[bytes] = []
        self.requests = 0
        self.acceptor_spoke = False
        self.established = 0

    def _carry_out(self, actions: Sequence[object], was_closed: bool) -> None:
        for action in actions:
            assert isinstance(action, DOCUMENTED), f"undocumented action {action!r}"
            if isinstance(action, Send):
                assert action.to in (Side.LOCAL, Side.REMOTE) and isinstance(action.data, bytes) and action.data
                assert not was_closed, f"sent {action.data[:8]!r} to {action.to} after CLOSED"
                self.sent[action.to] += len(action.data)
                if action.to is self.requestor.other:
                    if not self.accepted:  # only an A-ABORT answering the acceptor's own bytes
                        assert self.acceptor_spoke and action.data[0] == PduType.ABORT and len(action.data) == 10, (
                            "bytes of the requestor reached the acceptor before the driver accepted the request"
                        )
                    else:
                        self.to_acceptor.append(action.data)
            elif isinstance(action, AssociateRequested):
                self.requests += 1
            elif isinstance(action, Established):
                self.established += 1
        if was_closed:
            assert self.conn.phase is Phase.CLOSED, "a CLOSED connection came back to life"

    @rule(side=st.sampled_from(list(Side)), data=hostile_bytes(), cuts=st.lists(st.integers(0, 600), max_size=3))
    def feed(self, side: Side, data: bytes, cuts: list[int]) -> None:
        if side is self.requestor.other and data:
            self.acceptor_spoke = True
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        for a, b in zip(bounds, bounds[1:], strict=False):
            was_closed = self.conn.phase is Phase.CLOSED
            self._carry_out(self.conn.receive(side, data[a:b]), was_closed)

    @precondition(lambda self: self.conn.phase is Phase.AWAIT_RQ_DECISION)
    @rule(called=st.sampled_from([None, "PACS_B", "X" * 16]))
    def accept(self, called: str | None) -> None:
        self.accepted = True
        self._carry_out(self.conn.accept_request(called=called), False)
        assert self.conn.phase is Phase.AWAIT_AC
        first = self.to_acceptor[0]
        assert first[0] == PduType.ASSOCIATE_RQ
        if called is not None:
            assert parse_associate(first).called_ae == called

    @precondition(lambda self: self.conn.phase is Phase.AWAIT_RQ_DECISION)
    @rule(rj=st.sampled_from([(1, 1, 7), (2, 3, 1), (2, 3, 2), (1, 2, 2)]))
    def reject(self, rj: tuple[int, int, int]) -> None:
        actions = self.conn.reject_request(*rj)
        self._carry_out(actions, False)
        assert self.conn.phase is Phase.CLOSED
        assert [a for a in actions if isinstance(a, Send)] == [Send(self.requestor, B.pdu(3, bytes([0, *rj])))]

    @rule(side=st.sampled_from(list(Side)))
    def close(self, side: Side) -> None:
        was_closed = self.conn.phase is Phase.CLOSED
        self._carry_out(self.conn.peer_closed(side), was_closed)
        assert self.conn.phase is Phase.CLOSED

    @rule()
    def local_abort(self) -> None:
        was_closed = self.conn.phase is Phase.CLOSED
        actions = self.conn.abort()
        self._carry_out(actions, was_closed)
        assert all(isinstance(a, Send) and a.data == a_abort(2, 0) for a in actions)
        assert self.conn.phase is Phase.CLOSED

    @invariant()
    def bounded_and_counted(self) -> None:
        if not hasattr(self, "conn"):
            return
        for side in Side:
            assert self.conn.framer(side).buffered <= LIMIT + 6
            assert self.conn.bytes_sent[side] == self.sent[side]
        assert self.requests <= 1 and self.established <= 1
        if self.established:
            assert self.accepted


RelayConnectionMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRelayConnectionFuzz = RelayConnectionMachine.TestCase
