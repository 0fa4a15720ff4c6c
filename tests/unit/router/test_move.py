"""The router's side of a drain: on `Move` it signs on again at once, over a new connection.

A real `BridgeLink` against an in-process gRPC server standing in for a draining replica: the
first Control call is accepted and then told to move; the second must come from another TCP
connection (a load balancer could send it elsewhere) and without the reconnect backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_router import config as router_config
from relay_router.tunnel import BridgeLink


class MovingBridge:
    def __init__(self) -> None:
        self.peers: list[str] = []
        self.times: list[float] = []
        self.second = asyncio.Event()

    async def Control(
        self, requests: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BridgeMessage]:
        await context.read()  # the SignOn
        self.peers.append(context.peer())
        self.times.append(time.monotonic())
        yield pb.BridgeMessage(sign_on_result=pb.SignOnResult(ok=True, session="s", site="site-a"))
        if len(self.peers) == 1:
            yield pb.BridgeMessage(move=pb.Move(reason="draining"))
            return
        self.second.set()
        await asyncio.sleep(30)


async def test_move_makes_the_router_sign_on_again_at_once_over_a_new_connection(tmp_path: Path) -> None:
    bridge = MovingBridge()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "relay.v1.Relay",
        {
            "Control": grpc.stream_stream_rpc_method_handler(
                bridge.Control,
                request_deserializer=pb.RouterMessage.FromString,
                response_serializer=pb.BridgeMessage.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    toml = tmp_path / "router.toml"
    toml.write_text(
        f'[router]\nname = "site-a"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[bridge]\naddress = "127.0.0.1:{port}"\ninsecure = true\npassword = "a-password-long-enough"\n'
        "reconnect_min_s = 5.0\nreconnect_max_s = 10.0\n"  # a backoff would show
    )

    async def incoming(_: pb.IncomingAssociation) -> None:
        return None

    link = BridgeLink(router_config.load(toml), incoming)
    runner = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(bridge.second.wait(), 5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await server.stop(0)
    assert bridge.peers[0] != bridge.peers[1], "the second sign-on comes over a new connection"
    assert bridge.times[1] - bridge.times[0] < 2.0, "no reconnect backoff after Move"


class DrainingReplicaWithAnAssociation:
    """Session "s1" carries association A1, then is moved; "s2" is the router's new session. Records who
    asked for each blob slot and part: (session token, connection)."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.associated = asyncio.Event()
        self.move = asyncio.Event()
        self.blob_calls: list[tuple[str, str, str]] = []  # (rpc, session, peer)

    async def Control(
        self, requests: AsyncIterator[pb.RouterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BridgeMessage]:
        await context.read()
        n = len(self.peers)
        self.peers.append(context.peer())
        yield pb.BridgeMessage(sign_on_result=pb.SignOnResult(ok=True, session=f"s{n + 1}", site="site-a"))
        if n == 0:
            await self.move.wait()
            yield pb.BridgeMessage(move=pb.Move(reason="draining"))
            return
        await asyncio.sleep(30)

    async def Associate(
        self, requests: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Frame]:
        first = await context.read()
        yield pb.Frame(accepted=pb.Accepted(association_id=first.open.association_id))
        self.associated.set()
        await asyncio.sleep(30)  # the association runs on

    def _record(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        session = dict(context.invocation_metadata() or ()).get("relay-session", "")
        self.blob_calls.append((rpc, session, context.peer()))

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:
        self._record("slot", context)
        return pb.BlobSlotResponse(blob_id="b", url=f"file+presigned:///spill/{request.association_id}/0")

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        self._record("put", context)
        return pb.BlobPartAck()


async def test_after_a_move_a_running_associations_blob_calls_stay_on_its_connection_and_session(
    tmp_path: Path,
) -> None:
    """The draining replica knows the association and the session it was opened with, the new replica
    knows neither: the spill parts of an association that outlives the move must still go there."""
    bridge = DrainingReplicaWithAnAssociation()
    server = grpc.aio.server()
    methods = {
        "Control": grpc.stream_stream_rpc_method_handler(
            bridge.Control,
            request_deserializer=pb.RouterMessage.FromString,
            response_serializer=pb.BridgeMessage.SerializeToString,
        ),
        "Associate": grpc.stream_stream_rpc_method_handler(
            bridge.Associate, request_deserializer=pb.Frame.FromString, response_serializer=pb.Frame.SerializeToString
        ),
        "BlobSlot": grpc.unary_unary_rpc_method_handler(
            bridge.BlobSlot,
            request_deserializer=pb.BlobSlotRequest.FromString,
            response_serializer=pb.BlobSlotResponse.SerializeToString,
        ),
        "PutBlobPart": grpc.unary_unary_rpc_method_handler(
            bridge.PutBlobPart,
            request_deserializer=pb.BlobPart.FromString,
            response_serializer=pb.BlobPartAck.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("relay.v1.Relay", methods)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    toml = tmp_path / "router.toml"
    toml.write_text(
        f'[router]\nname = "site-a"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[bridge]\naddress = "127.0.0.1:{port}"\ninsecure = true\npassword = "a-password-long-enough"\n'
    )

    async def incoming(_: pb.IncomingAssociation) -> None:
        return None

    link = BridgeLink(router_config.load(toml), incoming)
    runner = asyncio.create_task(link.run())
    running, other = "1" * 32, "2" * 32
    try:
        await _signed_on_as(link, "s1")
        stream, answer = await link.open(pb.Open(association_id=running, to_site="site-b"))
        assert answer.HasField("accepted")
        bridge.move.set()
        await _signed_on_as(link, "s2")
        slot = await link.blob_slot(pb.BlobSlotRequest(association_id=running), timeout_s=5)
        await link.put_blob_part(pb.BlobPart(url=slot.url, data=b"sealed"), timeout_s=5)
        await link.blob_slot(pb.BlobSlotRequest(association_id=other), timeout_s=5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await link.stop()
        await server.stop(0)
    first, second = bridge.peers
    assert first != second
    assert bridge.blob_calls == [
        ("slot", "s1", first),
        ("put", "s1", first),
        ("slot", "s2", second),
    ], "the running association's calls on the old connection with the old session, a new one's on the new"


async def _signed_on_as(link: BridgeLink, session: str) -> None:
    for _ in range(250):  # polled: the link has no event for "signed on with this session"
        if link._session == session:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"not signed on with session {session!r}")
