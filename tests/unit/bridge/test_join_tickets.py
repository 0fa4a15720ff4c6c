"""The direct join at the bridge (relay_bridge.cluster.tickets): the ticket table, a ticketed Join at the origin
replica, the offer in a forwarded Open at the holding replica, and the blob calls a ticket allows.

A ticket is a capability a hostile party may replay, guess, or present for something else: each of those
is refused here, with the association service's fake calls (as test_association_service).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.cluster.forward import Forwarder, accept_forwarded
from relay_bridge.cluster.tickets import JoinTickets, replica_label, ticket_holder
from relay_bridge.server import RelayServicer
from relay_bridge.splice import Splice
from relay_common.audit import read_events
from tests.unit.bridge.test_association_service import AID, Aborted, Call, open_frame, servicer, until

__all__ = ["servicer"]  # the fixture, shared with test_association_service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_is_single_use_and_bound_to_its_association_and_site() -> None:
    tickets = JoinTickets(capacity=8, lifetime_s=10)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None and len(ticket) >= 43  # 256 random bits
    assert tickets.issue(AID, "site-b") is None  # at most one per association
    entry = tickets.redeem(ticket, "peer")
    assert entry is not None and (entry.association_id, entry.site) == (AID, "site-b")
    assert tickets.redeem(ticket, "peer") is None  # a replay
    grant = tickets.grant(ticket)
    assert grant is not None and grant.name == "site-b" and grant.associations == {AID}
    assert tickets.revoke(AID) is False  # it had been used: nothing withdrawn, but its grant ends
    assert tickets.grant(ticket) is None and grant.associations == set() and len(tickets) == 0


def test_a_ticket_expires_and_a_revoked_one_is_worth_nothing() -> None:
    clock = Clock()
    tickets = JoinTickets(capacity=8, lifetime_s=10, clock=clock)
    late = tickets.issue("a" * 32, "site-b")
    revoked = tickets.issue("b" * 32, "site-b")
    assert late is not None and revoked is not None
    assert tickets.revoke("b" * 32) is True
    assert tickets.redeem(revoked, "peer") is None
    clock.now += 10
    assert tickets.redeem(late, "peer") is None
    assert len(tickets) == 0


def test_the_table_is_bounded_and_expired_tickets_make_room() -> None:
    clock = Clock()
    tickets = JoinTickets(capacity=2, lifetime_s=10, clock=clock)
    assert tickets.issue("a" * 32, "site-b") and tickets.issue("b" * 32, "site-b")
    assert tickets.issue("c" * 32, "site-b") is None  # full: that association goes over the link
    clock.now += 11
    assert tickets.issue("c" * 32, "site-b") is not None


@pytest.mark.parametrize("guess", ["", "x", "A" * 43, "../../etc", "A" * 43 + "\n", "é" * 43])
def test_a_guessed_or_malformed_ticket_redeems_nothing(guess: str) -> None:
    tickets = JoinTickets(capacity=8, lifetime_s=10)
    tickets.issue(AID, "site-b")
    assert tickets.redeem(guess, "peer") is None and tickets.grant(guess) is None
    assert tickets.outstanding(AID)


def test_only_a_dns_label_is_offered_as_a_replica_name() -> None:
    assert replica_label("R1") == "r1" and replica_label("bridge-2") == "bridge-2"
    assert replica_label("bridge.2") is None and replica_label("r_1") is None and replica_label("r" * 64) is None


class TicketCall(Call):
    """A Join presenting a ticket (no session); `names`: its client certificate's names, if any."""

    def __init__(self, ticket: str, *frames: pb.Frame, names: list[bytes] | None = None) -> None:
        super().__init__("", *frames)
        self.ticket = ticket
        self.names = names

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("relay-join-ticket", self.ticket),)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {} if self.names is None else {"x509_common_name": self.names}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def with_tickets(servicer: RelayServicer, clock: Clock | None = None) -> JoinTickets:
    tickets = JoinTickets(capacity=8, lifetime_s=10, clock=clock or Clock())
    servicer.state.cluster = SimpleNamespace(tickets=tickets)  # type: ignore[assignment]
    return tickets


async def waiting_splice(servicer: RelayServicer, aid: str = AID, to_site: str = "site-b") -> Splice:
    splice = Splice(aid, "site-a", to_site, "PACS", "WS")
    servicer.splices[aid] = splice
    return splice


async def test_a_ticketed_join_is_accepted_once_and_spliced_here(servicer: RelayServicer) -> None:
    tickets = with_tickets(servicer)
    splice = await waiting_splice(servicer)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None
    join = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)))
    joined = asyncio.create_task(servicer.Associate(iter(()), join))  # type: ignore[arg-type]
    await until(lambda: splice.joined.done())
    assert join.written[0].accepted.association_id == AID and splice.joined_by == "direct"

    replay = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), replay)  # type: ignore[arg-type]
    assert replay.aborted == (grpc.StatusCode.UNAUTHENTICATED, "join ticket refused: unknown, used or expired")
    assert replay.inbox.qsize() == 1  # refused before anything was read

    await splice.to_destination.close()
    join.inbox.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(joined, 5)


async def test_an_expired_ticket_is_refused(servicer: RelayServicer) -> None:
    clock = Clock()
    tickets = with_tickets(servicer, clock)
    splice = await waiting_splice(servicer)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None
    clock.now += 11
    call = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted is not None and call.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not splice.joined.done()


async def test_a_ticket_presented_with_another_associations_join_is_spent_on_its_own(
    servicer: RelayServicer,
) -> None:
    """The ticket names the association (it is joined when the call arrives); a Join frame naming another one
    aborts the ticket's own association before any frame of that router reaches the initiating end, and
    leaves the other untouched."""
    tickets = with_tickets(servicer)
    other = await waiting_splice(servicer, "e" * 32)
    mine = await waiting_splice(servicer)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None
    data = pb.Frame(data=pb.Data(payload=b"from the router", seq=0))
    call = TicketCall(ticket, pb.Frame(join=pb.Join(association_id="e" * 32)), data)
    joined = asyncio.create_task(servicer.Associate(iter(()), call))  # type: ignore[arg-type]
    await until(lambda: call.aborted is not None)
    assert call.aborted == (
        grpc.StatusCode.PERMISSION_DENIED,
        "a join ticket must come with the Join of its association",
    )
    assert not other.joined.done() and other.to_initiator.closed is False
    first = await asyncio.wait_for(mine.to_initiator.get(), 5)
    assert first is not None and pb.Frame.FromString(first).close.reason == pb.Close.ABORTED
    assert await asyncio.wait_for(mine.to_initiator.get(), 5) is None  # the router's data never got through
    replay = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), replay)  # type: ignore[arg-type]
    assert replay.aborted is not None and replay.aborted[0] == grpc.StatusCode.UNAUTHENTICATED  # spent
    await mine.to_destination.close()
    await asyncio.wait_for(joined, 5)


async def test_a_ticketed_call_that_ends_before_its_join_aborts_its_association(servicer: RelayServicer) -> None:
    """Joined on arrival, the call must still send its Join (within the first-message limits) first."""
    tickets = with_tickets(servicer)
    mine = await waiting_splice(servicer)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None
    call = TicketCall(ticket)
    call.inbox.put_nowait(grpc.aio.EOF)  # the router's call ends after its headers
    joined = asyncio.create_task(servicer.Associate(iter(()), call))  # type: ignore[arg-type]
    first = await asyncio.wait_for(mine.to_initiator.get(), 5)
    assert first is not None and pb.Frame.FromString(first).close.reason == pb.Close.ABORTED
    assert call.aborted == (
        grpc.StatusCode.PERMISSION_DENIED,
        "a join ticket must come with the Join of its association",
    )
    await mine.to_destination.close()
    await asyncio.wait_for(joined, 5)


async def test_a_ticket_for_another_site_joins_nothing(servicer: RelayServicer) -> None:
    tickets = with_tickets(servicer)
    splice = await waiting_splice(servicer, to_site="site-c")  # the association waits for site-c
    ticket = tickets.issue(AID, "site-b")  # a ticket issued to site-b cannot join it
    assert ticket is not None
    call = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted is not None and call.aborted[0] == grpc.StatusCode.NOT_FOUND
    assert not splice.joined.done()


async def test_with_client_certificates_the_certificate_must_name_the_tickets_site(servicer: RelayServicer) -> None:
    tickets = with_tickets(servicer)
    servicer.sessions.require_client_cert = True
    splice = await waiting_splice(servicer)
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None
    call = TicketCall(ticket, pb.Frame(join=pb.Join(association_id=AID)), names=[b"site-c"])
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted is not None and call.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not splice.joined.done() and not tickets.outstanding(AID)


async def test_a_ticket_is_no_credential_on_a_replica_without_tickets(servicer: RelayServicer) -> None:
    call = TicketCall("T" * 43, pb.Frame(join=pb.Join(association_id=AID)))
    with pytest.raises(Aborted):
        await servicer.Associate(iter(()), call)  # type: ignore[arg-type]
    assert call.aborted is not None and call.aborted[0] == grpc.StatusCode.UNAUTHENTICATED


async def test_blob_calls_with_a_ticket_reach_its_association_only_while_it_runs(servicer: RelayServicer) -> None:
    tickets = with_tickets(servicer)
    outstanding = tickets.issue("e" * 32, "site-b")
    ticket = tickets.issue(AID, "site-b")
    assert ticket is not None and outstanding is not None
    with pytest.raises(Aborted):  # not used for a Join yet: it is no credential for blobs
        await ticket_holder(servicer.state, TicketCall(ticket))  # type: ignore[arg-type]
    tickets.redeem(ticket, "peer")
    grant = await ticket_holder(servicer.state, TicketCall(ticket))  # type: ignore[arg-type]
    assert grant is not None and grant.associations == {AID}  # require_association refuses any other
    assert await ticket_holder(servicer.state, Call("token-site-b")) is None  # no ticket: the session decides
    tickets.revoke(AID)  # the association ended
    with pytest.raises(Aborted):
        await ticket_holder(servicer.state, TicketCall(ticket))  # type: ignore[arg-type]


def forwarded_open(ticket: str = "T" * 43, replica: str = "r1") -> pb.Open:
    op = open_frame().open
    op.direct_join.CopyFrom(pb.DirectJoin(replica=replica, ticket=ticket))
    return op


async def test_the_holding_replica_offers_the_join_and_lets_go_at_the_origins_end_mark(
    servicer: RelayServicer, tmp_path: Path
) -> None:
    servicer.sessions["site-b"].direct_join = True
    link = Call("")  # stands in for the link from the origin replica
    await_end = asyncio.create_task(accept_forwarded(servicer.associations, "site-a", forwarded_open(), link))  # type: ignore[arg-type]
    notice = await asyncio.wait_for(servicer.sessions["site-b"].outbox.get(), 5)
    assert notice is not None and notice.incoming.direct_join == pb.DirectJoin(replica="r1", ticket="T" * 43)
    link.inbox.put_nowait(grpc.aio.EOF)  # router B joined at r1: the origin ends the link
    await asyncio.wait_for(await_end, 5)
    assert link.written == [] and not servicer.splices  # nothing to refuse, nothing left
    assert not servicer.sessions["site-b"].associations
    events = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]
    assert events == []  # the origin audits it: it ran there


async def test_the_holding_replica_still_splices_a_router_that_joins_it_the_ordinary_way(
    servicer: RelayServicer,
) -> None:
    servicer.sessions["site-b"].direct_join = True
    link = Call("")
    forwarded = asyncio.create_task(accept_forwarded(servicer.associations, "site-a", forwarded_open(), link))  # type: ignore[arg-type]
    await until(lambda: AID in servicer.splices)
    join = Call("token-site-b", pb.Frame(join=pb.Join(association_id=AID)))
    joined = asyncio.create_task(servicer.Associate(iter(()), join))  # type: ignore[arg-type]
    await until(lambda: bool(link.written))
    assert link.written[0].HasField("accepted")
    data = pb.Frame(data=pb.Data(payload=b"sealed", seq=0))
    link.inbox.put_nowait(data.SerializeToString())  # the read started early hands this frame on
    await until(lambda: bool(join.written))
    assert [f.data.payload for f in join.written] == [b"sealed"]
    link.inbox.put_nowait(grpc.aio.EOF)
    join.inbox.put_nowait(grpc.aio.EOF)
    await asyncio.wait_for(asyncio.gather(forwarded, joined), 5)


@pytest.mark.parametrize(
    ("direct_join", "offer"),
    [(False, forwarded_open()), (True, forwarded_open(replica="r1.evil.org")), (True, forwarded_open(ticket="x"))],
)
async def test_no_offer_reaches_a_router_that_cannot_use_it_or_when_it_is_malformed(
    servicer: RelayServicer, direct_join: bool, offer: pb.Open
) -> None:
    servicer.sessions["site-b"].direct_join = direct_join
    link = Call("")
    await accept_forwarded(servicer.associations, "site-a", offer, link)  # type: ignore[arg-type]
    notice = servicer.sessions["site-b"].outbox.get_nowait()
    assert notice is not None and not notice.incoming.HasField("direct_join")
    assert [f.refused.reason for f in link.written] == [pb.Refused.TIMEOUT]  # nobody joined (join_timeout_s 0.2)


async def test_the_origin_replaces_a_routers_offer_with_its_own() -> None:
    forwarder = Forwarder(grpc.ssl_channel_credentials(), "r1", max_frame_bytes=1 << 20, join_timeout_s=10)
    hostile = forwarded_open(ticket="R" * 43, replica="evil")  # a router put an offer in its own Open
    assert not forwarder._offering(hostile).HasField("direct_join")  # direct join off: dropped
    forwarder.join_label, forwarder.tickets = "r1", JoinTickets(capacity=1, lifetime_s=10)
    offered = forwarder._offering(hostile)
    assert offered.direct_join.replica == "r1" and offered.direct_join.ticket != "R" * 43
    assert forwarder.tickets.outstanding(AID)
    other = open_frame(aid="f" * 32).open
    assert not forwarder._offering(other).HasField("direct_join")  # the table is full: over the link


class CutLink(Call):
    """A link from the origin that is cut (the origin replica died) while the destination has not joined."""

    async def read(self) -> object:
        await asyncio.sleep(0.05)
        raise ConnectionError("the link was cut")


async def test_a_cut_link_is_no_direct_join_the_association_failed_here(
    servicer: RelayServicer, tmp_path: Path
) -> None:
    servicer.sessions["site-b"].direct_join = True
    link = CutLink("")
    await asyncio.wait_for(accept_forwarded(servicer.associations, "site-a", forwarded_open(), link), 5)  # type: ignore[arg-type]
    assert link.written == [] and not servicer.splices
    events = [e for e in read_events(tmp_path / "audit.jsonl") if e["event"] == "association"]
    assert [(e["outcome"], e["association"]) for e in events] == [("failure", AID)]  # audited here, not handed off
