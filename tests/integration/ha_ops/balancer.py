"""A small TCP load balancer for the drain test: each new connection goes to the first replica whose
gRPC health service says SERVING (what a load balancer with gRPC health checks does).

Bytes are forwarded untouched (TLS end to end between router and replica). It runs on its own
thread with its own event loop; `stop()` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"


class HealthCheckedBalancer:
    def __init__(self, backends: list[int], ca_file: Path) -> None:
        self.backends = backends
        self.ca = ca_file.read_bytes()
        self.port = 0
        self.chosen: list[int] = []  # the backend port of every connection, in order
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> HealthCheckedBalancer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, HOST, 0), self.loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _serving(self, port: int) -> bool:
        credentials = grpc.ssl_channel_credentials(self.ca)
        options = [("grpc.ssl_target_name_override", "localhost")]
        try:
            async with grpc.aio.secure_channel(f"{HOST}:{port}", credentials, options=options) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.backends:
            if await self._serving(port):
                break
        else:
            writer.close()
            return
        self.chosen.append(port)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
