"""The router's side of the direct join (relay_router.direct_join): what a hostile bridge can and cannot make
it do, and the fallback to an ordinary Join.

The checks on the offer are pure; the join itself runs a real `BridgeLink` against an in-process TLS gRPC
server standing in for the bridge replicas behind one address, whose certificate names `localhost` and
`r1.localhost` (as `relay-bridge init --hostname` makes it) but not `r9.localhost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_common.pki import make_dev_pki
from relay_router import config as router_config
from relay_router import direct_join
from relay_router.direct_join import Offer, ReplicaChannels, base_server_name, check_offer
from relay_router.tunnel import BridgeLink

TICKET = "T" * 43


@pytest.mark.parametrize(
    "replica",
    [
        "",
        "r1.evil.example.org",  # more than one label: the bridge would choose the whole name
        "127.0.0.1",
        "r1:443",
        "-r1",
        "r1-",
        "r" * 64,
        "r1\x00",
        "r1 ",
        "ŕ1",
        "r_1",
        "*",
    ],
)
def test_a_replica_name_that_is_not_one_dns_label_is_refused(replica: str) -> None:
    assert check_offer(pb.DirectJoin(replica=replica, ticket=TICKET), "bridge.example.org") is None


@pytest.mark.parametrize("ticket", ["", "short", "T" * 65, "T" * 42 + "/", "T" * 42 + "\n"])
def test_a_ticket_that_is_not_of_the_expected_form_is_refused(ticket: str) -> None:
    assert check_offer(pb.DirectJoin(replica="r1", ticket=ticket), "bridge.example.org") is None


def test_the_server_name_is_the_label_under_our_own_bridge_name() -> None:
    offer = check_offer(pb.DirectJoin(replica="R1", ticket=TICKET), "bridge.example.org")
    assert offer == Offer("r1", "r1.bridge.example.org", TICKET)
    assert check_offer(pb.DirectJoin(replica="a" * 63, ticket=TICKET), "b.org") is not None


def test_no_direct_join_under_an_ip_address_or_a_name_that_is_not_dns() -> None:
    assert base_server_name("10.0.0.1", None) is None
    assert base_server_name("[::1]", None) is None
    assert base_server_name("10.0.0.1", "Bridge.Example.org.") == "bridge.example.org"
    assert base_server_name("bridge.example.org", None) == "bridge.example.org"
    assert base_server_name("bridge.example.org", "bad name") is None


async def test_at_most_a_few_replica_channels_are_kept() -> None:
    made: list[str] = []

    def make(name: str) -> grpc.aio.Channel:
        made.append(name)
        return grpc.aio.insecure_channel("127.0.0.1:9")  # never used: no call is made

    channels = ReplicaChannels(make)
    for i in range(direct_join.MAX_CHANNELS + 3):
        channels.stub(f"r{i}.bridge.example.org")
    channels.stub(f"r{direct_join.MAX_CHANNELS + 2}.bridge.example.org")  # cached: no new channel
    assert len(channels) == direct_join.MAX_CHANNELS
    assert len(made) == direct_join.MAX_CHANNELS + 3
    await channels.close()


class Replicas:
    """One TLS address, as replicas behind a balancer: records every Associate call (its credential and
    first frame) and blob call; a ticketed Join is answered Accepted, except the ticket "refuse"."""

    def __init__(self) -> None:
        self.sign_ons: list[pb.SignOn] = []
        self.calls: list[tuple[str, str, pb.Frame]] = []  # (session, ticket, first frame)
        self.blob_calls: list[tuple[str, str]] = []
        self.later: list[tuple[str, str, bytes]] = []  # (session, ticket, payload) of the frames after the first

    async def Control(
        self, requests: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BridgeMessage]:
        first = await context.read()
        self.sign_ons.append(first.sign_on)
        yield pb.BridgeMessage(sign_on_result=pb.SignOnResult(ok=True, session="s", site="site-b"))
        await asyncio.sleep(30)

    async def Associate(
        self, requests: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        metadata = dict(context.invocation_metadata() or ())
        ticket = str(metadata.get("relay-join-ticket", ""))
        first = await context.read()
        self.calls.append((str(metadata.get("relay-session", "")), ticket, first))
        if ticket.startswith("refuse"):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join ticket refused")
        if ticket.startswith("silent"):  # a replica that never answers
            await asyncio.sleep(30)
        if ticket:
            yield pb.Frame(accepted=pb.Accepted(association_id=first.join.association_id))
        while (frame := await context.read()) is not grpc.aio.EOF:
            self.later.append((str(metadata.get("relay-session", "")), ticket, frame.data.payload))

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:
        metadata = dict(context.invocation_metadata() or ())
        self.blob_calls.append((str(metadata.get("relay-session", "")), str(metadata.get("relay-join-ticket", ""))))
        return pb.BlobSlotResponse(blob_id="b", url=f"file+presigned:///spill/{request.association_id}/0")


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached within 5 s")


async def calls(replicas: Replicas, count: int) -> None:
    """Wait until the replicas have seen `count` Associate calls (an ordinary Join is not answered)."""
    for _ in range(200):
        if len(replicas.calls) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the replicas saw {replicas.calls}")


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[tuple[Replicas, BridgeLink]]:
    pki = make_dev_pki(tmp_path / "pki", hostnames=["localhost", "r1.localhost"], ips=["127.0.0.1"])
    replicas = Replicas()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "relay.v1.Relay",
                {
                    "Control": grpc.stream_stream_rpc_method_handler(
                        replicas.Control,
                        request_deserializer=pb.RouterMessage.FromString,
                        response_serializer=pb.BridgeMessage.SerializeToString,
                    ),
                    "Associate": grpc.stream_stream_rpc_method_handler(
                        replicas.Associate,
                        request_deserializer=pb.Frame.FromString,
                        response_serializer=pb.Frame.SerializeToString,
                    ),
                    "BlobSlot": grpc.unary_unary_rpc_method_handler(
                        replicas.BlobSlot,
                        request_deserializer=pb.BlobSlotRequest.FromString,
                        response_serializer=pb.BlobSlotResponse.SerializeToString,
                    ),
                },
            )
        ]
    )
    credentials = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    toml = tmp_path / "router.toml"
    toml.write_text(
        f'[router]\nname = "site-b"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[bridge]\naddress = "127.0.0.1:{port}"\nca_file = "{pki.ca_cert}"\nserver_name = "localhost"\n'
        'password = "a-password-long-enough"\n'
    )

    async def incoming(_: pb.IncomingAssociation) -> None:
        return None

    link = BridgeLink(router_config.load(toml), incoming)
    runner = asyncio.create_task(link.run())
    try:
        assert await link.wait_signed_on(10)
        yield replicas, link
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await link.stop()
        await server.stop(0)


async def test_the_router_joins_with_the_ticket_at_its_own_address_and_its_blob_calls_follow(
    bridge: tuple[Replicas, BridgeLink],
) -> None:
    replicas, link = bridge
    assert "relay.v1.direct-join" in replicas.sign_ons[0].protocols
    stream = await link.join("a" * 32, pb.DirectJoin(replica="r1", ticket=TICKET))  # answers at once...
    await stream.send(pb.Frame(data=pb.Data(payload=b"x", seq=0)))  # sent behind the Join, before the answer
    await until(lambda: "a" * 32 in link._routes and bool(replicas.later))
    assert replicas.later == [("", TICKET, b"x")]
    session, ticket, first = replicas.calls[-1]
    assert (session, ticket, first.join.association_id) == ("", TICKET, "a" * 32)  # the ticket, no session
    await link.blob_slot(pb.BlobSlotRequest(association_id="a" * 32), timeout_s=5)
    assert replicas.blob_calls[-1] == ("", TICKET)  # the association's blob calls carry the ticket too
    await link.blob_slot(pb.BlobSlotRequest(association_id="b" * 32), timeout_s=5)
    assert replicas.blob_calls[-1] == ("s", "")  # another association's: the session, as before
    stream.cancel()


@pytest.mark.parametrize("replica", ["r1.evil.example.org", "127.0.0.1:1", "evil/..", ""])
async def test_a_hostile_offer_gets_an_ordinary_join(bridge: tuple[Replicas, BridgeLink], replica: str) -> None:
    replicas, link = bridge
    stream = await link.join("c" * 32, pb.DirectJoin(replica=replica, ticket=TICKET))
    await calls(replicas, 1)
    assert replicas.calls[-1][:2] == ("s", "")  # through our own session
    assert len(link._replicas) == 0  # no channel was even made
    stream.cancel()


async def test_a_name_the_certificate_does_not_cover_falls_back_to_an_ordinary_join(
    bridge: tuple[Replicas, BridgeLink],
) -> None:
    replicas, link = bridge
    stream = await asyncio.wait_for(link.join("d" * 32, pb.DirectJoin(replica="r9", ticket=TICKET)), 5)
    await calls(replicas, 1)
    assert [c[:2] for c in replicas.calls] == [("s", "")]  # the TLS handshake failed: nothing reached a replica
    assert len(link._replicas) == 0  # the failed channel is dropped
    stream.cancel()
    # The next offer at that name is not tried for a while (each association would pay a failed handshake).
    second = await asyncio.wait_for(link.join("9" * 32, pb.DirectJoin(replica="r9", ticket=TICKET)), 1)
    await calls(replicas, 2)
    assert [c[:2] for c in replicas.calls] == [("s", ""), ("s", "")] and len(link._replicas) == 0
    second.cancel()


async def test_a_refused_ticket_falls_back_to_an_ordinary_join(bridge: tuple[Replicas, BridgeLink]) -> None:
    replicas, link = bridge
    stream = await link.join("e" * 32, pb.DirectJoin(replica="r1", ticket="refuse" + "x" * 40))
    await stream.send(pb.Frame(data=pb.Data(payload=b"confirm", seq=0)))  # before the refusal is known
    await stream.send(pb.Frame(data=pb.Data(payload=b"next", seq=1)))
    await calls(replicas, 2)
    assert [c[:2] for c in replicas.calls] == [("", "refuse" + "x" * 40), ("s", "")]
    await until(lambda: len(replicas.later) >= 2)
    assert replicas.later == [("s", "", b"confirm"), ("s", "", b"next")]  # sent again, in order, on the ordinary Join
    stream.cancel()


async def test_no_answer_within_the_bound_falls_back(
    bridge: tuple[Replicas, BridgeLink], monkeypatch: pytest.MonkeyPatch
) -> None:
    replicas, link = bridge
    monkeypatch.setattr(direct_join, "DIRECT_JOIN_TIMEOUT_S", 0.3)
    stream = await asyncio.wait_for(link.join("f" * 32, pb.DirectJoin(replica="r1", ticket="silent" + "x" * 40)), 5)
    await calls(replicas, 2)
    assert [c[:2] for c in replicas.calls] == [("", "silent" + "x" * 40), ("s", "")]
    stream.cancel()
