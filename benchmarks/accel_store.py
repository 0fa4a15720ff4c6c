"""The near router's per-C-STORE cost: DCMTK storescu into the accelerated acceptor and its spool.

The acceptor (relay_router.accel.acceptor.StorageAcceptor) runs here exactly as in the router,
with the same negotiation (relay_router.accel.negotiation.answer) and a real spool, on an event
loop of its own; storescu sends the files over 127.0.0.1 on one association. What is timed:

* storescu's wall time for all the files: what the sending device sees (its "completion");
* each spool commit (SpoolWriter.commit, in the worker thread the acceptor hands it to);
* with ``profile=True``, cProfile of the event loop's thread (DIMSE, framing, the spool writes)
  and of the commit threads, for the "where do the milliseconds go" breakdown.

Used by ``python -m benchmarks.accel_spool`` (stage "store"); on its own:

    python -m benchmarks.accel_store --count 200 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import run
from protos.relay.v1 import relay_pb2 as pb
from relay_router.accel import records
from relay_router.accel import spool as spool_module
from relay_router.accel.acceptor import MAX_PDU, StorageAcceptor
from relay_router.accel.capabilities import EXPLICIT_LE, IMPLICIT_LE, DeviceCapabilities
from relay_router.accel.negotiation import answer
from relay_router.accel.spool import EntryState, Spool
from relay_router.accel.transfer import RecordChannel
from relay_router.outcome import Outcome
from relay_router.seal import FrameSealer
from relay_router.ul import ControlPdu, PduFramer, PduType
from relay_router.ul.associate import parse_associate
from relay_router.wire.codec import FrameCodec
from relay_router.wire.features import Features

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ROUTE = "DEST"


class SerializingStream:
    """Where the transfer's frames go: serialized, as grpc.aio does on the event loop, then dropped."""

    def __init__(self) -> None:
        self.wire_bytes = 0

    async def send(self, frame: pb.Frame) -> None:
        self.wire_bytes += len(frame.SerializeToString())


class AcceptorServer:
    """A listening socket whose associations are answered by StorageAcceptor into `spool`."""

    def __init__(self, spool: Spool, *, profile: bool, transfer: bool = False) -> None:
        self.spool = spool
        self.transfer = transfer
        self.forwarded = 0
        self.frames_sent = 0
        self._transfer_task: asyncio.Task[None] | None = None
        self.capabilities = DeviceCapabilities({CT_IMAGE_STORAGE: (EXPLICIT_LE, IMPLICIT_LE)}, time.time())
        self.commit_s: list[float] = []
        self.loop_profile = cProfile.Profile() if profile else None
        self.commit_profile = cProfile.Profile() if profile else None
        self._profile_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-acceptor", daemon=True)
        self.port = 0
        self._instrument()

    def _instrument(self) -> None:
        """Time every commit (and profile it) in the thread that runs it."""
        original = spool_module.SpoolWriter.commit
        server = self

        def commit(writer: spool_module.SpoolWriter, *args: Any) -> spool_module.SpoolEntry:
            started = time.perf_counter()
            if server.commit_profile is not None:
                with server._profile_lock:  # cProfile objects are not thread-safe
                    server.commit_profile.enable()
                    try:
                        entry = original(writer, *args)
                    finally:
                        server.commit_profile.disable()
            else:
                entry = original(writer, *args)
            server.commit_s.append(time.perf_counter() - started)
            return entry

        self._original_commit = original
        spool_module.SpoolWriter.commit = commit  # type: ignore[method-assign]

    def __enter__(self) -> AcceptorServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        spool_module.SpoolWriter.commit = self._original_commit  # type: ignore[method-assign]
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(10)

    def _stop(self) -> None:
        if self._transfer_task is not None:
            self._transfer_task.cancel()
        self._loop.call_soon(self._loop.stop)  # after the cancellation ran

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self._wake = asyncio.Event()
        if self.transfer:
            self._transfer_task = self._loop.create_task(self._transfer())
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        if self.loop_profile is not None:
            self.loop_profile.enable()
        try:
            self._loop.run_forever()
        finally:
            if self.loop_profile is not None:
                self.loop_profile.disable()

    def _forward(self) -> None:
        """With `transfer`: the near router's transfer of each committed instance, on the same event loop as
        the acceptor (relay_router.accel.transfer): claim it, read its file, frame it as records through a
        real RecordChannel (compressed with zstd, sealed with AES-GCM, serialized as a gRPC message would be),
        then forwarded, delivered, removed. The far router's part (the WAN, its spool, the destination) is left
        out: what is measured is what the transfer takes from the acceptor's event loop."""
        if self.transfer:  # later on the loop, as the transfer task runs once woken (not inside the commit)
            self._loop.call_soon(self._wake.set)

    def _channel(self) -> RecordChannel:
        secret, transcript = os.urandom(32), os.urandom(32)
        sealer = FrameSealer(secret, transcript, uuid.uuid4().hex, initiator=True)
        features = Features(compress=True, shuffle=True, accel=True)
        codec = FrameCodec(sealer, initiator=True, features=features, compression_level=3, accept_blobs=False)
        return RecordChannel(SerializingStream(), codec, records.FAR_TO_NEAR, frame_bytes=256 * 1024)  # type: ignore[arg-type]

    async def _transfer(self) -> None:
        channel = self._channel()
        while True:
            await self._wake.wait()
            self._wake.clear()
            sent = 0
            while (entry := self.spool.claim(ROUTE, time.time())) is not None:
                # As NearTransfer._send_inline: a held (journaled, in memory) instance from memory, else its file.
                held = self.spool.held(entry.id) if hasattr(self.spool, "held") else None
                path = self.spool.path(entry.id) if held is None else None
                size = len(held) if held is not None else path.stat().st_size  # type: ignore[union-attr]
                header = records.InstanceHeader(
                    entry.id, entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax, size
                )
                try:
                    await channel.send(records.instance(header), new_instance=True)
                except TypeError:  # the baseline: RecordChannel.send before new_instance
                    await channel.send(records.instance(header))
                if held is not None:
                    await channel.send(records.chunks(bytes(held)))
                else:
                    assert path is not None
                    with path.open("rb") as source:
                        while chunk := await asyncio.to_thread(source.read, 256 * 1024):
                            await channel.send(records.chunks(chunk))
                self.spool.set_state(entry.id, EntryState.FORWARDED)
                self.spool.set_state(entry.id, EntryState.DELIVERED)
                self.spool.remove(entry.id)
                self.forwarded += 1
                sent += 1
                if sent >= 64:  # a bucket (4 MiB of these instances): flushed, as NearTransfer does
                    break
            if sent:
                await channel.send(b"", flush=True)
                self.frames_sent = channel.bytes_sent
                self._wake.set()  # look again: more may have been committed meanwhile

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = PduFramer()
        rq: bytes | None = None
        while rq is None:
            data = await reader.read(65536)
            if not data:
                return
            for event in framer.feed(data):
                if isinstance(event, ControlPdu) and event.pdu_type == PduType.ASSOCIATE_RQ:
                    rq = event.data
        info = parse_associate(rq)
        negotiated = answer(rq, info, self.capabilities, granted=None, max_pdu_length=MAX_PDU)
        outcome = Outcome("bench", "outbound", "bench", calling_ae=info.calling_ae, called_ae=info.called_ae)
        acceptor = StorageAcceptor(
            reader,
            writer,
            outcome,
            info,
            negotiated,
            spool=self.spool,
            route=ROUTE,
            on_commit=self._forward,
            idle_timeout_s=60,
        )
        await acceptor.run()


def store_run(
    files: list[Path], root: Path, *, journal: bool | None, profile: bool = False, transfer: bool = False
) -> dict[str, object]:
    """storescu sends `files` on one association into a fresh spool; seconds and commit latencies.

    journal=None: the spool's constructor as it was before the journal (run against the previous code)."""
    spool = Spool(root, max_bytes=1 << 34) if journal is None else Spool(root, max_bytes=1 << 34, journal=journal)
    try:
        with AcceptorServer(spool, profile=profile, transfer=transfer) as server:
            started = time.perf_counter()
            run(["storescu", "-aec", "ACCELDEST", "-aet", "BENCHSCU", "127.0.0.1", str(server.port), *map(str, files)])
            wall = time.perf_counter() - started
            time.sleep(0.5)  # the last instances' transfer
        stored = len(spool.entries()) + server.forwarded
        if stored != len(files):
            raise RuntimeError(f"the spool holds {stored} of {len(files)} instances")
        result: dict[str, object] = {"seconds": wall, "commit_s": server.commit_s}
        if profile:
            result["profile"] = {
                "event loop": _top(server.loop_profile),
                "commit threads": _top(server.commit_profile),
            }
        return result
    finally:
        spool.close()


def _top(profile: cProfile.Profile | None, lines: int = 25) -> str:
    out = io.StringIO()
    if profile is not None:
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(lines)
        stats.sort_stats("cumulative").print_stats(r"relay_router|pydicom/filewriter|pynetdicom", lines)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    from relay_demo.datasets import generate_ct_series, write_series

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--classic", action="store_true", help="the per-file fsync spool (no journal)")
    parser.add_argument("--baseline", action="store_true", help="the code on PYTHONPATH predates the journal")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--files", type=Path, help="a directory of Part 10 files to send (else generated)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument(
        "--transfer", action="store_true", help="also the near transfer (spool, records, zstd, AES-GCM), on the loop"
    )
    args = parser.parse_args(argv)
    journal = None if args.baseline else not args.classic
    with tempfile.TemporaryDirectory(prefix="bench-accel-store-") as tmp:
        if args.files is not None:
            files = sorted(args.files.iterdir())
        else:
            files = write_series(generate_ct_series(args.count, rows=160, cols=160, seed=7), Path(tmp) / "small")
        result = store_run(files, Path(tmp) / "spool", journal=journal, profile=args.profile, transfer=args.transfer)
    if args.json:
        print(json.dumps({"seconds": result["seconds"], "commit_s": result["commit_s"]}))
        return 0
    commits = sorted(result["commit_s"])  # type: ignore[arg-type]
    print(
        f"storescu {result['seconds']:.2f} s for {args.count}: {result['seconds'] / args.count * 1000:.2f} ms each; "
        f"commit median {commits[len(commits) // 2] * 1000:.2f} ms, "
        f"p90 {commits[int(len(commits) * 0.9)] * 1000:.2f} ms"
    )
    for name, text in dict(result.get("profile", {})).items():  # type: ignore[call-overload]
        print(f"\n== {name} ==\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
