"""A big spill upload does not hold back the small instances queued behind it (relay_router.accel.uploads).

The near router's send loop starts each upload beside itself and goes on with the next instance; the BLOB
record follows once the blob is stored. These tests drive the real NearTransfer send loop with a real spool
and the shared BlobUpload over an in-memory store whose writes can be held, and read back the records the
far router would decode.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay_router.accel import records
from relay_router.accel.spool import EntryState
from relay_router.accel.transfer import MAX_UPLOADS
from relay_router.accel.uploads import ConcurrentUploads
from tests.unit.accel.near_support import CT, EXPLICIT, RecordingChannel, near_transfer, run_send, spool_instance, until
from tests.unit.router.test_spill import MemoryTransport

THRESHOLD = 256 * 1024
AID = os.urandom(16).hex()


class HeldStore(MemoryTransport):
    """The blob store, with every part write held until `open_` is set (a slow uplink), or failing."""

    def __init__(self) -> None:
        super().__init__()
        self.open_ = asyncio.Event()
        self.waiting = 0

    async def put(self, url: str, data: bytes) -> None:
        self.waiting += 1
        try:
            await self.open_.wait()
        finally:
            self.waiting -= 1
        await super().put(url, data)


async def test_small_instances_go_out_while_a_big_upload_is_held(tmp_path: Path) -> None:
    store = HeldStore()
    transfer, spool = near_transfer(tmp_path, store, threshold=THRESHOLD, part_bytes=64 * 1024, parallel=2)
    big = spool_instance(spool, 1, 4 * THRESHOLD)  # the oldest: claimed first
    small = [spool_instance(spool, n, 20_000) for n in range(2, 7)]
    channel = RecordingChannel(AID, os.urandom(32), os.urandom(32), blob_stream=False)
    task, done = await run_send(transfer, channel)
    try:

        def sent() -> list[str]:
            return [r.id for r in channel.records() if isinstance(r, records.InstanceHeader)]

        await until(lambda: len(sent()) == 5, "the five small instances")
        assert sent() == small, "the small instances crossed, in order, while the big one was still uploading"
        assert store.waiting, "the big upload is still held"
        assert not any(isinstance(r, records.BlobHeader) for r in channel.records())

        store.open_.set()
        await until(lambda: any(isinstance(r, records.BlobHeader) for r in channel.records()), "the BLOB record")
        (blob,) = [r for r in channel.records() if isinstance(r, records.BlobHeader)]
        assert blob.instance.id == big and blob.instance.length == spool.path(big).stat().st_size
        assert transfer.counts["by_reference"] == 1 and transfer.counts["sent"] == 6
    finally:
        done.set()
        transfer.wake()
        await asyncio.wait_for(task, 5)
    # Records decode in order: the BLOB record did not land inside a small instance's CHUNKs (the reader
    # would have refused an INSTANCE whose CHUNKs were cut short).
    assert channel.closed


async def test_a_failed_upload_goes_inline_and_a_stream_end_cancels_uploads_and_requeues(tmp_path: Path) -> None:
    store = HeldStore()
    store.fail_slot = True
    transfer, spool = near_transfer(tmp_path, store, threshold=THRESHOLD, part_bytes=64 * 1024, parallel=2)
    big = spool_instance(spool, 1, 2 * THRESHOLD)
    channel = RecordingChannel(AID, os.urandom(32), os.urandom(32), blob_stream=False)
    task, done = await run_send(transfer, channel)
    await until(lambda: any(isinstance(r, records.InstanceHeader) for r in channel.records()), "the inline instance")
    (header,) = [r for r in channel.records() if isinstance(r, records.InstanceHeader)]
    assert header.id == big

    def body() -> bytes:  # the CHUNKs follow the header over several reads of the spooled file
        return b"".join(r.data for r in channel.records() if isinstance(r, records.Chunk))

    await until(lambda: len(body()) >= header.length, "the instance's last CHUNK")
    assert body() == spool.path(big).read_bytes(), "the instance went inline, whole"
    assert transfer.spill.paused
    done.set()
    transfer.wake()
    await asyncio.wait_for(task, 5)

    # A second stream: an upload held when the stream ends is cancelled, and its entry sent again later.
    store2 = HeldStore()
    transfer2, spool2 = near_transfer(tmp_path / "2", store2, threshold=THRESHOLD, part_bytes=64 * 1024, parallel=2)
    held = spool_instance(spool2, 9, 2 * THRESHOLD)
    channel2 = RecordingChannel(AID, os.urandom(32), os.urandom(32), blob_stream=False)
    task2, done2 = await run_send(transfer2, channel2)
    await until(lambda: store2.waiting, "the upload to start")
    done2.set()
    transfer2.wake()
    await asyncio.wait_for(task2, 5)
    await asyncio.sleep(0)  # the part writes' cancellation lands
    assert store2.waiting == 0, "no upload outlives its stream"
    transfer2._requeue()
    assert spool2.get(held).state is EntryState.RECEIVED


async def test_uploads_are_bounded() -> None:
    started: list[str] = []
    gate = asyncio.Event()

    async def upload(header: records.InstanceHeader) -> records.BlobHeader | None:
        started.append(header.id)
        await gate.wait()
        return None

    uploads = ConcurrentUploads(upload, limit=MAX_UPLOADS, waiting=3, on_done=lambda: None)
    for n in range(MAX_UPLOADS + 3):
        header = records.InstanceHeader(f"e{n}", CT, f"1.2.3.{n}", EXPLICIT, 1)
        uploads.submit(SimpleNamespace(id=f"e{n}"), header)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert len(started) == MAX_UPLOADS and uploads.full and uploads.queued == 3
    gate.set()
    await until(lambda: len(started) == MAX_UPLOADS + 3, "every upload")
    ended: list[str] = []
    await until(lambda: ended.extend(f.entry.id for f in uploads.finished()) or len(ended) == MAX_UPLOADS + 3, "ends")
    assert sorted(ended) == sorted(started) and uploads.pending == 0
    await uploads.close()
    with pytest.raises(ValueError):
        ConcurrentUploads(upload, limit=0, waiting=1, on_done=lambda: None)


async def test_uploads_are_handed_back_in_the_order_they_started_whatever_order_they_end_in() -> None:
    """Each upload took the stream's next blob ordinal when it started, and the far router refuses a BLOB
    record whose ordinal is below one it has seen (a replay): a big upload that ends first must wait."""
    gates = {f"e{n}": asyncio.Event() for n in range(3)}

    async def upload(header: records.InstanceHeader) -> records.BlobHeader | None:
        await gates[header.id].wait()
        return None

    uploads = ConcurrentUploads(upload, limit=3, waiting=3, on_done=lambda: None)
    for n in range(3):
        header = records.InstanceHeader(f"e{n}", CT, f"1.2.3.{n}", EXPLICIT, 1)
        uploads.submit(SimpleNamespace(id=f"e{n}"), header)  # type: ignore[arg-type]
    gates["e2"].set()
    gates["e1"].set()
    await asyncio.sleep(0.05)
    assert uploads.finished() == [], "e1 and e2 ended, but e0, started before them, is still running"
    assert uploads.pending == 3
    gates["e0"].set()
    await until(lambda: uploads.pending == 3 and not uploads.running, "e0 to end")
    assert [f.entry.id for f in uploads.finished()] == ["e0", "e1", "e2"]
    assert uploads.pending == 0
    await uploads.close()
