"""The CPU floor that gRPC itself sets: a bare grpc.aio stream forwarding bytes through a middle process.

Three processes, shaped like the relay (both ends are clients of the middle, as both
routers are clients of the bridge):

    sender --TLS stream--> middle (forwards raw bytes, bounded queue of 4) --TLS stream--> receiver

The middle registers its method without (de)serializers and pumps messages from one call
to the other through a bounded queue, as `relay_bridge/splice.py` does. Messages have the
size of the relay's frames (`--frame-bytes` plaintext + 16-byte GCM tag + protobuf framing).
Variants, each a step closer to the relay:

- `bytes`:    pre-built messages, no serializers: gRPC + TLS + asyncio and nothing else;
- `protobuf`: ends build and parse `relay.v1.Frame` messages, as the routers' stubs do;
- `sealed`:   ends also seal and open each payload with the relay's own FrameSealer (AES-256-GCM).

The DICOM sockets of the routers (storescu in, storescp out) are not part of it: the
difference between the `sealed` row and the routers in `make bench-quick` is what the
relay's own code costs on top of gRPC, sealing and protobuf.

CPU seconds (user + system, all threads) per GB of plaintext are read from /proc for
each process around every round; wall-clock MB/s is reported beside them but is noisy on
a shared machine.

    python -m benchmarks.grpc_floor                          # all variants, 256 KiB frames
    python -m benchmarks.grpc_floor --frame-bytes 1048576 --variants bytes
    python -m benchmarks.grpc_floor --option grpc.optimization_target=throughput --tag throughput
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio

from benchmarks.common import CpuMeter, summary, write_results

METHOD = "/floor.v1.Floor/Stream"
TAG_BYTES = 16  # AES-GCM tag the sealed payload carries
VARIANTS = ("bytes", "protobuf", "sealed")
# The relay's own channel and server options (relay_router/tunnel.py, relay_bridge/server.py).
RELAY_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 20 * 1024 * 1024),
    ("grpc.max_send_message_length", 20 * 1024 * 1024),
    ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
]
ROLES = ("middle", "sender", "receiver")
REPLY = bytes(200)  # the size of a sealed C-STORE-RSP frame


def parse_options(pairs: list[str]) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return options


# -- the three roles ---------------------------------------------------------------------------


async def middle(port_file: Path, options: list[tuple[str, int | str]], tls: Path | None) -> None:
    """Pair one sender call with one receiver call and forward raw messages, like the bridge's splice."""
    # Inbound queue of each role, at most 4 messages (the bridge's frame_queue_depth).
    queues: dict[str, asyncio.Queue[bytes | None]] = {r: asyncio.Queue(maxsize=4) for r in ("sender", "receiver")}
    finished: list[str] = []
    done = asyncio.Event()

    async def stream(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        role = dict(context.invocation_metadata() or ()).get("floor-role", "")
        partner = "receiver" if role == "sender" else "sender"
        await context.read()  # the hello, which opened the call

        async def pump() -> None:
            while (message := await context.read()) is not grpc.aio.EOF:
                await queues[partner].put(message)
            await queues[partner].put(None)

        reading = asyncio.create_task(pump())
        while (message := await queues[role].get()) is not None:
            await context.write(message)
        await reading
        finished.append(role)
        if len(finished) == 2:
            done.set()

    handler = grpc.method_handlers_generic_handler(
        "floor.v1.Floor", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([handler])
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        pair = [((tls / "server.key").read_bytes(), (tls / "server.pem").read_bytes())]
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
    await server.start()
    await asyncio.to_thread(port_file.write_text, str(port))
    await done.wait()
    await server.stop(1.0)


def _channel(port: int, options: list[tuple[str, int | str]], tls: Path | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls / "ca.pem").read_bytes())
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[*options, ("grpc.ssl_target_name_override", "localhost")]
    )


def _sealers() -> tuple[object, object]:
    from relay_router.seal import FrameSealer

    secret, transcript, aid = b"k" * 32, b"t" * 32, "0" * 32
    return FrameSealer(secret, transcript, aid, initiator=True), FrameSealer(secret, transcript, aid, initiator=False)


async def _lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def sender(
    port: int, variant: str, frame_bytes: int, reply_every: int, options: list[tuple[str, int | str]], tls: Path | None
) -> None:
    from protos.relay.v1 import relay_pb2 as pb

    plain = os.urandom(frame_bytes)
    raw = os.urandom(frame_bytes + TAG_BYTES + 12)  # the size of a serialized relay frame
    seal = _sealers()[0] if variant == "sealed" else None
    serializer = None if variant == "bytes" else pb.Frame.SerializeToString
    async with _channel(port, options, tls) as channel:
        call = channel.stream_stream(METHOD, request_serializer=serializer, response_deserializer=None)(
            metadata=(("floor-role", "sender"),)
        )
        await call.write(b"S" if serializer is None else pb.Frame(join=pb.Join(association_id="S")))
        lines = await _lines()
        seq = 0
        while line := await lines.readline():
            for _ in range(int(line)):
                if variant == "bytes":
                    await call.write(raw)
                else:
                    payload = seal.seal(plain, seq, 2) if seal is not None else raw[: frame_bytes + TAG_BYTES]  # type: ignore[attr-defined]
                    await call.write(pb.Frame(data=pb.Data(payload=payload, seq=seq, flags=2)))
                seq += 1
                if reply_every and seq % reply_every == 0:
                    await call.read()  # like storescu waiting for each C-STORE-RSP
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # EOF once the middle ends the call
            pass


async def receiver(
    port: int, variant: str, reply_every: int, options: list[tuple[str, int | str]], tls: Path | None
) -> None:
    from protos.relay.v1 import relay_pb2 as pb

    opener = _sealers()[1] if variant == "sealed" else None
    deserializer = None if variant == "bytes" else pb.Frame.FromString
    async with _channel(port, options, tls) as channel:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=deserializer)(
            metadata=(("floor-role", "receiver"),)
        )
        await call.write(b"R")
        lines = await _lines()
        seq = 0
        while line := await lines.readline():
            received = 0
            for _ in range(int(line)):
                message = await call.read()
                if variant == "bytes":
                    received += len(message)
                else:
                    data = message.data
                    payload = opener.open(data.payload, data.seq, data.flags) if opener is not None else data.payload  # type: ignore[attr-defined]
                    received += len(payload) - (0 if opener is not None else TAG_BYTES)
                seq += 1
                if reply_every and seq % reply_every == 0:
                    await call.write(REPLY)
            print(f"done {received}", flush=True)
        await call.done_writing()


def role_main(args: argparse.Namespace) -> int:
    if args.malloc == "relay":
        from relay_common.allocator import keep_frame_buffers

        keep_frame_buffers()  # as the relay's daemons do, so that the floor is gRPC's and not malloc's
    options = [*RELAY_OPTIONS, *parse_options(args.option)]
    tls = None if args.insecure else args.tls
    if args.role == "middle":
        asyncio.run(middle(args.port_file, options, tls))
    elif args.role == "sender":
        asyncio.run(sender(args.port, args.variant, args.frame_bytes, args.reply_every, options, tls))
    else:
        asyncio.run(receiver(args.port, args.variant, args.reply_every, options, tls))
    return 0


# -- orchestration ------------------------------------------------------------------------------


def run_variant(args: argparse.Namespace, variant: str, tls: Path, work: Path) -> dict[str, object]:
    """Start the three processes, send `--megabytes` per round `--repeats` times, return CPU s/GB."""
    common = ["--frame-bytes", str(args.frame_bytes), "--tls", str(tls), "--variant", variant]
    common += ["--reply-every", str(args.reply_every), "--malloc", args.malloc]
    common += [f"--option={o}" for o in args.option] + (["--insecure"] if args.insecure else [])
    me = [sys.executable, "-m", "benchmarks.grpc_floor"]
    port_file = work / f"{variant}.port"
    mid = subprocess.Popen([*me, "--role", "middle", "--port-file", str(port_file), *common])
    procs = [mid]
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or mid.poll() is not None:
                raise RuntimeError("the middle process did not start")
            time.sleep(0.05)
        port = port_file.read_text()
        rx = subprocess.Popen(
            [*me, "--role", "receiver", "--port", port, *common],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(rx)
        time.sleep(0.5)  # the receiver's call reaches the middle first
        tx = subprocess.Popen([*me, "--role", "sender", "--port", port, *common], stdin=subprocess.PIPE, text=True)
        procs.append(tx)
        meter = CpuMeter({"sender": tx.pid, "middle": mid.pid, "receiver": rx.pid})
        assert rx.stdin and rx.stdout and tx.stdin

        def round_trip(messages: int) -> float:
            rx.stdin.write(f"{messages}\n")  # type: ignore[union-attr]
            rx.stdin.flush()  # type: ignore[union-attr]
            tx.stdin.write(f"{messages}\n")  # type: ignore[union-attr]
            tx.stdin.flush()  # type: ignore[union-attr]
            t0 = time.perf_counter()
            line = rx.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("done"):
                raise RuntimeError(f"the receiver failed ({variant})")
            got = int(line.split()[1])
            if variant != "bytes" and got != messages * args.frame_bytes:
                raise RuntimeError(f"received {got} bytes, expected {messages * args.frame_bytes}")
            return time.perf_counter() - t0

        messages = max(1, int(args.megabytes * 1e6 // args.frame_bytes))
        gigabytes = messages * args.frame_bytes / 1e9
        round_trip(max(1, messages // 10))  # warm up: connections, TLS, windows
        cpu: dict[str, list[float]] = {"sender": [], "middle": [], "receiver": []}
        walls = []
        for _ in range(args.repeats):
            meter.start()
            walls.append(round_trip(messages))
            for name, used in meter.stop().items():
                cpu[name].append(used / gigabytes)
        for stream in (tx.stdin, rx.stdin):
            stream.close()
        for proc in procs[::-1]:
            # Measured already; a process slow to wind its call down is killed below.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        return {
            "cpu_s_per_gb": {name: summary(v) for name, v in cpu.items()},
            "mb_per_s": messages * args.frame_bytes / statistics.median(walls) / 1e6,
            "messages_per_round": messages,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame-bytes", type=int, default=256 * 1024, help="plaintext bytes per message")
    parser.add_argument("--megabytes", type=float, default=500.0, help="plaintext per measured round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--reply-every",
        type=int,
        default=0,
        help="the receiver answers every N messages with a 200-byte reply the sender waits for "
        "(2 is like a relayed 512x512 CT C-STORE: two 256 KiB frames, then the C-STORE-RSP); 0: stream",
    )
    parser.add_argument(
        "--malloc",
        choices=("relay", "system"),
        default="relay",
        help="relay: raise glibc's malloc thresholds as the daemons do (relay_common/allocator.py); system: defaults",
    )
    parser.add_argument("--insecure", action="store_true", help="plain HTTP/2 instead of TLS (to price TLS)")
    parser.add_argument("--option", action="append", default=[], help="extra gRPC option KEY=VALUE, both ends")
    parser.add_argument("--tag", default="")
    # Internal: the processes the orchestrator starts.
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="bytes", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return role_main(args)

    from relay_bridge.pki import make_dev_pki

    variants = [v for v in args.variants.split(",") if v]
    results = {}
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as tmp:
        work = Path(tmp)
        make_dev_pki(work / "tls", hostnames=["localhost"], ips=["127.0.0.1"])  # generated test certificates
        for variant in variants:
            results[variant] = run_variant(args, variant, work / "tls", work)
            c = results[variant]["cpu_s_per_gb"]
            print(
                f"{variant:<9} " + "  ".join(f"{n} {c[n]['median']:.2f}" for n in c) + " s/GB"  # type: ignore[index]
                f"  ({results[variant]['mb_per_s']:.0f} MB/s)",
                flush=True,
            )
    settings = f"{args.frame_bytes // 1024} KiB messages, {'plain HTTP/2' if args.insecure else 'TLS 1.3'}" + (
        f", options {' '.join(args.option)}" if args.option else ""
    )
    table = "\n".join(
        [
            f"# gRPC floor: sender -> middle -> receiver, {settings}, {args.megabytes:g} MB per round, "
            f"median of {args.repeats}",
            "",
            "CPU seconds per GB of plaintext (user + system, all threads; min-max in brackets):",
            "",
            "| variant | sender (router A's gRPC side) | middle (bridge) | receiver (router B's gRPC side) | MB/s |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {v} | "
                + " | ".join(
                    f"{r['cpu_s_per_gb'][n]['median']:.2f} ({r['cpu_s_per_gb'][n]['min']:.2f}-"  # type: ignore[index]
                    f"{r['cpu_s_per_gb'][n]['max']:.2f})"  # type: ignore[index]
                    for n in ("sender", "middle", "receiver")
                )
                + f" | {r['mb_per_s']:.0f} |"
                for v, r in results.items()
            ),
        ]
    )
    payload = {
        "settings": {
            "frame_bytes": args.frame_bytes,
            "reply_every": args.reply_every,
            "malloc": args.malloc,
            "tls": not args.insecure,
            "options": [*map(list, RELAY_OPTIONS), *args.option],
            "megabytes_per_round": args.megabytes,
            "repeats": args.repeats,
        },
        "variants": results,
        "command": "python -m benchmarks.grpc_floor " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    json_path, md_path = write_results("grpc-floor" + (f"-{args.tag}" if args.tag else ""), payload, table)
    print(table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
