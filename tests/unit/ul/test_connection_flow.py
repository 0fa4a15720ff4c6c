"""RelayConnection happy paths: echo, store and release collision through routers A and B back to back."""

from __future__ import annotations

import pytest

from relay_router.ul import (
    Aborted,
    AssociateRequested,
    Established,
    LocalProtocolError,
    Phase,
    Rejected,
    RelayConnection,
    Released,
    Send,
    Side,
    a_abort,
    a_associate_rj,
    a_release_rp,
    a_release_rq,
    parse_associate,
)
from tests.unit.ul import builders as B
from tests.unit.ul.harness import Relay

STORE_CONTEXTS = [(B.VERIFICATION, [B.IMPLICIT_LE]), (B.CT_STORAGE, [B.EXPLICIT_LE, B.IMPLICIT_LE])]


def establish(relay: Relay, contexts: list[tuple[str, list[str]]] | None = None) -> tuple[bytes, bytes]:
    """Run the association phase; return (RQ as the SCU sent it, AC as the SCP sent it)."""
    rq = B.associate_rq("PACS_B", "WORKSTATION", contexts or STORE_CONTEXTS, max_length=16384, extended=True)
    relay.scu_sends(rq)
    relay.pump()
    seen_by_scp = relay.take_scp()
    ac = B.associate_ac(seen_by_scp, max_length=32768)
    relay.scp_sends(ac)
    relay.pump()
    assert relay.take_scu()[0] == 0x02  # the SCU got its A-ASSOCIATE-AC
    return rq, ac


def test_association_titles_are_rewritten_and_restored() -> None:
    relay = Relay()
    rq = B.associate_rq("PACS_B", "WORKSTATION", STORE_CONTEXTS, extended=True)
    relay.scu_sends(rq)
    relay.pump()
    assert relay.a.phase is Phase.AWAIT_AC and relay.b.phase is Phase.AWAIT_AC
    (req_a,) = relay.events_a
    assert isinstance(req_a, AssociateRequested) and req_a.info.called_ae == "PACS_B"
    (req_b,) = relay.events_b
    assert isinstance(req_b, AssociateRequested)
    assert (req_b.info.called_ae, req_b.info.calling_ae) == ("ARCHIVE_B", "SITEA_WS1")  # router A's aliases
    at_scp = relay.take_scp()
    assert (parse_associate(at_scp).called_ae, parse_associate(at_scp).calling_ae) == ("ORTHANC", "SITEA_WS1")
    assert at_scp[42:] == rq[42:]  # everything but the titles is relayed untouched

    ac = B.associate_ac(at_scp)  # echoes ORTHANC / SITEA_WS1
    relay.scp_sends(ac)
    relay.pump()
    at_scu = relay.take_scu()
    assert at_scu[:10] + at_scu[42:] == ac[:10] + ac[42:]
    assert at_scu[10:42] == rq[10:42]  # PS3.8 Table 9-17: the AC echoes the RQ the SCU sent
    assert relay.a.phase is Phase.ESTABLISHED and relay.b.phase is Phase.ESTABLISHED
    est_a = relay.events_a[-1]
    assert isinstance(est_a, Established)
    assert (est_a.info.called_ae, est_a.info.calling_ae) == ("PACS_B", "WORKSTATION")
    assert est_a.info.abstract_syntaxes == (B.VERIFICATION, B.CT_STORAGE)
    assert relay.a.requested is not None and relay.a.requested.calling_ae == "WORKSTATION"
    assert relay.a.accepted == est_a.info


def test_echo_and_release() -> None:
    relay = Relay()
    establish(relay)
    echo_rq, echo_rsp = b"".join(B.echo_rq()), b"".join(B.echo_rsp())
    relay.scu_sends(echo_rq)
    relay.pump()
    assert relay.take_scp() == echo_rq
    relay.scp_sends(echo_rsp)
    relay.pump()
    assert relay.take_scu() == echo_rsp

    relay.scu_sends(a_release_rq())
    relay.pump()
    assert relay.take_scp() == a_release_rq()
    assert relay.a.phase is Phase.RELEASING and relay.b.phase is Phase.RELEASING
    relay.scp_sends(a_release_rp())
    relay.pump()
    assert relay.take_scu() == a_release_rp()
    assert relay.a.phase is Phase.CLOSED and relay.b.phase is Phase.CLOSED
    assert isinstance(relay.events_a[-1], Released) and isinstance(relay.events_b[-1], Released)
    assert relay.a.framer(Side.LOCAL).messages_completed == (1, 0)
    assert relay.b.framer(Side.LOCAL).messages_completed == (1, 0)
    # once released, the transports closing is uneventful
    assert relay.a.peer_closed(Side.LOCAL) == [] and relay.b.peer_closed(Side.LOCAL) == []


def test_store_streams_pdata_and_enforces_negotiated_lengths() -> None:
    relay = Relay()
    establish(relay)
    # each side sends P-DATA within the maximum the *other* side announced (PS3.8 D.1)
    assert relay.a.framer(Side.LOCAL).max_pdata_length == 32768  # SCU -> limited by the SCP's AC
    assert relay.a.framer(Side.REMOTE).max_pdata_length == 16384  # SCP -> limited by the SCU's RQ
    assert relay.b.framer(Side.REMOTE).max_pdata_length == 32768
    assert relay.b.framer(Side.LOCAL).max_pdata_length == 16384
    store = B.store_rq(300_000, context_id=3, max_pdu=32768)
    stream = b"".join(store)
    for i in range(0, len(stream), 7919):  # arbitrary TCP segmentation
        relay.scu_sends(stream[i : i + 7919])
    sends_before = relay.tunnel_sends
    relay.pump()
    assert relay.take_scp() == stream
    assert relay.tunnel_sends - sends_before == len(range(0, len(stream), 7919))  # one Send per receive
    assert relay.b.framer(Side.REMOTE).messages_completed == (1, 1)
    relay.scp_sends(b"".join(B.store_rsp(max_pdu=16384)))
    relay.pump()
    assert relay.take_scu() == b"".join(B.store_rsp())
    # titles are rewritten in place, so every byte received is relayed: counters match end to end
    assert relay.a.bytes_received[Side.LOCAL] == relay.a.bytes_sent[Side.REMOTE] == relay.b.bytes_sent[Side.LOCAL]
    assert relay.b.bytes_received[Side.LOCAL] == relay.a.bytes_sent[Side.LOCAL]


def test_release_collision() -> None:
    relay = Relay()
    establish(relay)
    relay.scu_sends(a_release_rq())
    relay.scp_sends(a_release_rq())  # both at once
    relay.pump()
    assert relay.take_scu() == a_release_rq() and relay.take_scp() == a_release_rq()
    assert relay.a.phase is Phase.RELEASING and relay.b.phase is Phase.RELEASING
    # PS3.8 7.2 / Sta9-Sta12: the association-requestor answers first
    relay.scu_sends(a_release_rp())
    relay.pump()
    assert relay.take_scp() == a_release_rp()
    assert relay.a.phase is Phase.RELEASING and relay.b.phase is Phase.RELEASING
    relay.scp_sends(a_release_rp())
    relay.pump()
    assert relay.take_scu() == a_release_rp()
    assert relay.a.phase is Phase.CLOSED and relay.b.phase is Phase.CLOSED
    assert [type(e) for e in relay.events_a].count(Released) == 1


def test_pdata_from_release_receiver_is_relayed() -> None:
    relay = Relay()
    establish(relay)
    relay.scu_sends(a_release_rq())
    relay.pump()
    relay.take_scp()
    late = b"".join(B.echo_rsp())
    relay.scp_sends(late + a_release_rp())  # Sta8: the RQ's receiver may still send P-DATA
    relay.pump()
    assert relay.take_scu() == late + a_release_rp()
    assert relay.a.phase is Phase.CLOSED


def test_rejection_by_scp_is_relayed() -> None:
    relay = Relay()
    relay.scu_sends(B.associate_rq())
    relay.pump()
    relay.take_scp()
    relay.scp_sends(a_associate_rj(1, 1, 7))
    relay.pump()
    assert relay.take_scu() == a_associate_rj(1, 1, 7)
    assert relay.events_a[-1] == Rejected(1, 1, 7) == relay.events_b[-1]
    assert relay.a.phase is Phase.CLOSED and relay.b.phase is Phase.CLOSED


def test_abort_by_scu_is_relayed() -> None:
    relay = Relay()
    establish(relay)
    relay.scu_sends(a_abort(0, 0))
    relay.pump()
    assert relay.take_scp() == a_abort(0, 0)
    assert relay.events_a[-1] == Aborted(Side.LOCAL, 0, 0)
    assert relay.events_b[-1] == Aborted(Side.REMOTE, 0, 0)


def test_driver_rejects_request() -> None:
    conn = RelayConnection(Side.LOCAL)
    (req,) = conn.receive(Side.LOCAL, B.associate_rq(called="NOBODY"))
    assert isinstance(req, AssociateRequested) and req.info.called_ae == "NOBODY"
    assert conn.phase is Phase.AWAIT_RQ_DECISION
    actions = conn.reject_request(1, 1, 7)
    assert actions == [Send(Side.LOCAL, a_associate_rj(1, 1, 7)), Rejected(1, 1, 7)]
    assert conn.phase is Phase.CLOSED
    assert conn.reject_request(1, 1, 7) == [] and conn.accept_request() == []  # late decisions are no-ops


def test_decisions_in_wrong_phase_and_bad_titles() -> None:
    conn = RelayConnection(Side.LOCAL)
    with pytest.raises(LocalProtocolError):
        conn.accept_request()
    with pytest.raises(LocalProtocolError):
        conn.reject_request(1, 1, 1)
    conn.receive(Side.LOCAL, B.associate_rq())
    with pytest.raises(ValueError):
        conn.accept_request(called="BAD\\TITLE")
    with pytest.raises(ValueError):
        conn.reject_request(1, 1, 4)  # reserved reason
    assert conn.phase is Phase.AWAIT_RQ_DECISION
    (send,) = conn.accept_request()
    assert isinstance(send, Send) and send.to is Side.REMOTE and send.data == B.associate_rq()
    with pytest.raises(LocalProtocolError):
        conn.accept_request()


def test_local_abort() -> None:
    conn = RelayConnection(Side.REMOTE)
    conn.receive(Side.REMOTE, B.associate_rq())
    assert conn.abort() == [Send(Side.REMOTE, a_abort(2, 0))]  # the local device is not involved yet
    assert conn.phase is Phase.CLOSED and conn.abort() == []
    conn = RelayConnection(Side.LOCAL)
    conn.receive(Side.LOCAL, B.associate_rq())
    conn.accept_request()
    assert conn.abort(2) == [Send(Side.LOCAL, a_abort(2, 2)), Send(Side.REMOTE, a_abort(2, 2))]


def test_byte_counters() -> None:
    relay = Relay()
    rq, ac = establish(relay)
    assert relay.a.bytes_received[Side.LOCAL] == len(rq)
    assert relay.b.bytes_received[Side.LOCAL] == len(ac)
    assert relay.a.bytes_sent[Side.REMOTE] == len(rq)
    assert relay.a.bytes_sent[Side.LOCAL] == relay.a.bytes_received[Side.REMOTE]
