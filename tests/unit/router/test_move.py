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
