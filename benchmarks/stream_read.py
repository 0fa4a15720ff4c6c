"""CPU per GB of reading a DICOM socket two ways: asyncio.StreamReader and a BufferedProtocol.

Router A reads its device through `asyncio.StreamReader` (limit 1 MiB) in frame-sized
`read()`s: every received chunk is copied into the reader's buffer (`feed_data`) and again
out of it (`read`). A `BufferedProtocol` lets the event loop `recv_into` a frame-sized
buffer and copies once, when the frame is handed on as `bytes`. A separate process sends
`--megabytes` over loopback TCP in 16 KiB writes (DCMTK's PDU size); only the reader's CPU
is counted (user + system, this process).

    python -m benchmarks.stream_read --megabytes 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

FRAME = 256 * 1024
SENDER = """
import socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
chunk = bytes(16384)
with socket.create_connection(("127.0.0.1", port)) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(total // len(chunk)):
        s.sendall(chunk)
"""


async def with_stream_reader(server: socket.socket) -> int:
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while data := await reader.read(FRAME):
            got += len(data)
        writer.close()
        done.set_result(got)

    srv = await asyncio.start_server(handle, sock=server, limit=1 << 20)
    async with srv:
        return await done


class FrameProtocol(asyncio.BufferedProtocol):
    """recv_into one frame-sized buffer; hand each read on as bytes (the one copy)."""

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.buffer = bytearray(FRAME)
        self.view = memoryview(self.buffer)
        self.got = 0
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        frame = bytes(self.view[:nbytes])  # what the driver would seal and send
        self.got += len(frame)

    def eof_received(self) -> bool:
        self.done.set_result(self.got)
        return False


async def with_buffered_protocol(server: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    srv = await loop.create_server(lambda: FrameProtocol(done), sock=server)
    async with srv:
        return await done


def measure(variant: str, total: int) -> float:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(total)])
    start = time.process_time()
    reader = with_stream_reader if variant == "StreamReader" else with_buffered_protocol
    got = asyncio.run(reader(server))
    used = time.process_time() - start
    sender.wait(timeout=60)
    if got != total // 16384 * 16384:
        raise RuntimeError(f"{variant}: read {got} bytes")
    return used / (got / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    total = int(args.megabytes * 1e6)
    results: dict[str, list[float]] = {"StreamReader": [], "BufferedProtocol": []}
    for _ in range(args.repeats):  # alternating, so that load from other tenants hits both
        for variant in results:
            results[variant].append(measure(variant, total))
    for variant, samples in results.items():
        print(
            f"{variant:<17} {statistics.median(samples):.3f} CPU s/GB "
            f"(min {min(samples):.3f}, max {max(samples):.3f}, {args.repeats} runs)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
