"""Streamed blobs on accelerated routes: the far router fetches a big instance while it is still uploading.

The near router's real send loop (NearTransfer) and BlobUpload run over an in-memory store whose part
writes are let through one at a time; the records it writes are decoded as the far router decodes them,
and the far side's IncomingBlob (the one relay_router.accel.receive uses) follows BLOB_OPEN / BLOB_PARTS
and reads the parts stored so far before the upload has finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay_router.accel import records
from relay_router.accel.spool import EntryState
from relay_router.accel.transfer import TransferError
from relay_router.seal import FrameSealer
from relay_router.spill_receive import IncomingBlob, SpillReceiver
from tests.unit.accel.near_support import CT, EXPLICIT, RecordingChannel, near_transfer, run_send, spool_instance, until
from tests.unit.router.test_spill import MemoryTransport

THRESHOLD = 256 * 1024
PART = 64 * 1024
AID = os.urandom(16).hex()
SECRET, TRANSCRIPT = os.urandom(32), os.urandom(32)


class GatedStore(MemoryTransport):
    """The blob store; each part write waits for a ticket (`allow(n)`): a slow uplink, part by part."""

    def __init__(self) -> None:
        super().__init__()
        self.tickets = asyncio.Semaphore(0)
        self.stored_parts = 0

    def allow(self, parts: int) -> None:
        for _ in range(parts):
            self.tickets.release()

    async def put(self, url: str, data: bytes) -> None:
        await self.tickets.acquire()
        await super().put(url, data)
        self.stored_parts += 1


def _of(channel: RecordingChannel, kind: type) -> list[records.Record]:
    return [r for r in channel.records() if isinstance(r, kind)]


async def test_the_far_router_reads_a_blob_while_it_is_still_uploading(tmp_path: Path) -> None:
    store = GatedStore()
    transfer, spool = near_transfer(tmp_path, store, threshold=THRESHOLD, part_bytes=PART, parallel=4)
    big = spool_instance(spool, 1, 6 * PART)
    body = spool.path(big).read_bytes()  # with its Part 10 header: 7 parts of at most 64 KiB
    parts = -(-len(body) // PART)
    channel = RecordingChannel(AID, SECRET, TRANSCRIPT, blob_stream=True)
    task, done = await run_send(transfer, channel)
    try:
        store.allow(2)
        await until(lambda: _of(channel, records.BlobOpen) and _of(channel, records.BlobParts), "BLOB_OPEN")
        (opened,) = _of(channel, records.BlobOpen)
        assert isinstance(opened, records.BlobOpen)
        assert opened.instance.id == big and opened.instance.length == len(body)
        assert not _of(channel, records.BlobHeader), "no manifest before the upload has finished"

        # The far side: fetch what has been announced, while the rest is still held at the near router.
        receiver = SpillReceiver(
            store,  # type: ignore[arg-type]
            AID,
            FrameSealer(SECRET, TRANSCRIPT, AID, initiator=False),
            parallel=2,
        )
        blob = IncomingBlob(receiver, opened.blob_id, opened.ordinal)
        got = bytearray()

        async def fetch() -> None:
            async for plain in blob.plaintext():
                got.extend(plain)

        fetching = asyncio.get_running_loop().create_task(fetch())
        announced = 0

        def follow() -> None:
            nonlocal announced
            counts = []
            for record in _of(channel, records.BlobParts):
                assert isinstance(record, records.BlobParts)
                assert record.blob_id == opened.blob_id and record.ordinal == opened.ordinal
                counts.append(record.parts)
            assert counts == sorted(counts), "part counts only grow"
            announced = counts[-1]
            blob.announce(announced)

        follow()
        await until(lambda: len(got) >= PART, "the far router's first part")
        assert store.stored_parts < parts, "the far router read a part before the upload had finished"

        store.allow(parts - 2)
        await until(lambda: _of(channel, records.BlobHeader), "the BLOB record (manifest)")
        follow()
        (manifest,) = _of(channel, records.BlobHeader)
        assert isinstance(manifest, records.BlobHeader)
        assert (manifest.blob_id, manifest.ordinal, manifest.instance) == (
            opened.blob_id,
            opened.ordinal,
            opened.instance,
        )
        assert manifest.parts == parts and announced <= parts
        blob.finish(manifest.parts, manifest.instance.length, manifest.digest)
        await asyncio.wait_for(fetching, 5)
        assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest(), "the far router got the instance"
        kinds = [type(r) for r in channel.records()]
        assert kinds.index(records.BlobOpen) < kinds.index(records.BlobParts) < kinds.index(records.BlobHeader)
        assert transfer.counts["by_reference"] == 1
    finally:
        done.set()
        transfer.wake()
        await asyncio.wait_for(task, 5)


async def test_an_upload_failing_after_its_blob_open_ends_the_stream(tmp_path: Path) -> None:
    store = GatedStore()
    store.fail_put_after = 2  # the store stops after two parts: the far router has begun fetching
    transfer, spool = near_transfer(tmp_path, store, threshold=THRESHOLD, part_bytes=PART, parallel=4)
    big = spool_instance(spool, 1, 6 * PART)
    channel = RecordingChannel(AID, SECRET, TRANSCRIPT, blob_stream=True)
    task, done = await run_send(transfer, channel)
    store.allow(10)
    with pytest.raises(TransferError, match="after the far router began it"):
        await asyncio.wait_for(task, 5)
    assert _of(channel, records.BlobOpen), "the blob had been announced"
    assert not _of(channel, records.BlobHeader) and not _of(channel, records.InstanceHeader), (
        "neither a manifest nor the same instance inline on this stream (the far router is fetching it)"
    )
    assert transfer.spill.paused, "the next stream sends it inline"
    transfer._requeue()
    assert spool.get(big).state is EntryState.RECEIVED, "sent again on the next stream"
    done.set()


def test_stream_records_round_trip_and_are_bounded() -> None:
    header = records.InstanceHeader("e1", CT, "1.2.3.4", EXPLICIT, 10 * PART)
    opened = records.BlobOpen(header, "ab" * 16, 7)
    reader = records.RecordReader(records.NEAR_TO_FAR)
    got = reader.feed(
        records.hello(capabilities=False, blob_stream=True)
        + records.blob_open(opened)
        + records.blob_parts(7, "ab" * 16, 3)
    )
    assert got == [records.Hello(False, True, None, True), opened, records.BlobParts(7, "ab" * 16, 3)]
    assert records.RecordReader(records.NEAR_TO_FAR).feed(records.hello(capabilities=False)) == [
        records.Hello(False, True, None, False)
    ], "a HELLO without the key (an older near router) does not ask for FEATURES"
    assert records.RecordReader(records.FAR_TO_NEAR).feed(records.features(blob_stream=True)) == [
        records.Features(True)
    ]
    for bad in (
        records.blob_parts(7, "not-a-blob-id", 1),
        records.blob_parts(-1, "ab" * 16, 1),
        records._json(records.RecordType.BLOB_PARTS, {"ordinal": 1, "blob_id": "ab" * 16, "parts": -2}),
    ):
        with pytest.raises(records.RecordError):
            records.RecordReader(records.NEAR_TO_FAR).feed(bad)
    with pytest.raises(records.RecordError, match="not expected in this direction"):
        records.RecordReader(records.FAR_TO_NEAR).feed(records.blob_open(opened))
    with pytest.raises(records.RecordError, match="not expected in this direction"):
        records.RecordReader(records.NEAR_TO_FAR).feed(records.features(blob_stream=True))


async def test_an_upload_hands_its_slot_on_and_at_most_one_more_runs_beside_it() -> None:
    """ConcurrentUploads.release: the next upload starts while a released one finishes, never two beyond."""
    from relay_router.accel.uploads import ConcurrentUploads

    started: list[str] = []
    tasks: dict[str, asyncio.Task[object] | None] = {}
    gate = asyncio.Event()

    async def upload(header: records.InstanceHeader) -> records.BlobHeader | None:
        started.append(header.id)
        tasks[header.id] = asyncio.current_task()
        await gate.wait()
        return None

    uploads = ConcurrentUploads(upload, limit=1, waiting=3, on_done=lambda: None)
    for n in range(3):
        header = records.InstanceHeader(f"e{n}", CT, f"1.2.3.{n}", EXPLICIT, 1)
        uploads.submit(SimpleNamespace(id=f"e{n}"), header)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert started == ["e0"], "one at a time"
    uploads.release(tasks["e0"])
    await asyncio.sleep(0.01)
    assert started == ["e0", "e1"], "the next starts once the first handed its slot on"
    uploads.release(tasks["e1"])
    await asyncio.sleep(0.01)
    assert started == ["e0", "e1"], "at most one more beside a released upload"
    gate.set()
    await until(lambda: started == ["e0", "e1", "e2"], "the third upload, once one has ended")
    await uploads.close()


# -- the far router's side (FarSession): an open blob fetched as it is announced, and hostile records ---------


async def test_the_far_router_follows_an_open_blob_and_stores_it_only_after_its_manifest(tmp_path: Path) -> None:
    from tests.unit.accel.test_spill_records import ENTRY, _far_blob, _finish, _upload

    near, far, transport, channel, session, spool, data, instance = _far_blob(tmp_path)
    upload = await _upload(transport, near, data, ordinal=0)
    assert upload.parts >= 3
    await session._apply(records.BlobOpen(instance, upload.blob_id, 0))
    await session._apply(records.BlobParts(0, upload.blob_id, 1))
    await session._apply(records.BlobParts(0, upload.blob_id, upload.parts - 1))
    await asyncio.sleep(0.05)
    assert channel.answers() == [] and spool.entries() == [], "nothing stored before the manifest"
    with pytest.raises(records.RecordError, match="SECURITY"):  # a count that goes down
        await session._apply(records.BlobParts(0, upload.blob_id, 1))
    await session._apply(records.BlobHeader(instance, upload.blob_id, 0, upload.parts, upload.digest()))
    await asyncio.wait_for(_finish(session), 5)
    assert channel.answers() == [records.Stored(ENTRY, instance.sop_instance)]
    (entry,) = spool.entries()
    assert spool.path(entry.id).read_bytes() == data, "the spooled file is the near router's, byte for byte"
    spool.close()


async def test_the_far_router_refuses_records_that_do_not_match_an_open_blob(tmp_path: Path) -> None:
    from relay_router.accel.receive import MAX_OPEN_BLOBS
    from tests.unit.accel.test_spill_records import ENTRY, FakeChannel, _part10, _sealers, _session

    _, far = _sealers()
    session, spool = _session(tmp_path, FakeChannel(far), MemoryTransport())
    data, ds = _part10(tmp_path)
    instance = records.InstanceHeader(ENTRY, str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, len(data))
    blob_id = "cd" * 16
    try:
        with pytest.raises(records.RecordError, match="SECURITY: BLOB_PARTS for blob .* not open"):
            await session._apply(records.BlobParts(0, blob_id, 1))
        await session._apply(records.BlobOpen(instance, blob_id, 0))
        with pytest.raises(records.RecordError, match="not open"):  # the right ordinal, another blob id
            await session._apply(records.BlobParts(0, "ef" * 16, 1))
        with pytest.raises(records.RecordError, match="BLOB_PARTS: .* parts for"):
            await session._apply(records.BlobParts(0, blob_id, records.max_parts(len(data)) + 1))
        other = records.InstanceHeader(ENTRY, instance.sop_class, "1.2.3.4", EXPLICIT, len(data))
        with pytest.raises(records.RecordError, match="changed its instance"):
            await session._apply(records.BlobHeader(other, blob_id, 0, 1, bytes(32)))
        for ordinal in range(1, MAX_OPEN_BLOBS):
            await session._apply(records.BlobOpen(instance, blob_id, ordinal))
        with pytest.raises(records.RecordError, match="blobs announced without their manifest"):
            await session._apply(records.BlobOpen(instance, blob_id, MAX_OPEN_BLOBS))
    finally:
        for fetch in session._fetches:
            fetch.cancel()
        await asyncio.gather(*session._fetches, return_exceptions=True)
        spool.close()
