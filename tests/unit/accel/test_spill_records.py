"""Instances by reference on accelerated transfers: the BLOB record and the shared blob upload/fetch code.

The near router uploads with relay_router.spill.BlobUpload and sends a BLOB record; the far router fetches
with relay_router.spill_receive.IncomingBlob. Both are the transparent spill's code: these tests check the
record's bounds and that a blob round-trips, and that one altered, truncated or swapped in the store
never yields a byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from relay_demo.datasets import generate_ct_series, write_series
from relay_router.accel import records
from relay_router.accel.capabilities import CapabilityCache
from relay_router.accel.receive import FarSession, OutcomeBook
from relay_router.accel.records import RecordError, RecordReader, RecordType
from relay_router.accel.spool import Spool
from relay_router.config import SharedDevice
from relay_router.seal import FrameSealer
from relay_router.spill import BlobUpload, IncomingBlob, SpillFailed, SpillReceiver, SpillStats
from relay_router.wire.features import Features
from tests.unit.router.test_spill import MemoryTransport

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.1"
EXPLICIT = "1.2.840.10008.1.2.1"
ENTRY = "0005f1a2b3c4d5e6-0123456789ab"
AID = os.urandom(16).hex()
PART = 64 * 1024


def _blob_header(length: int = 3 * PART, **changes: object) -> records.BlobHeader:
    instance = records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, length)
    fields: dict[str, object] = {"blob_id": "ab" * 16, "ordinal": 0, "parts": 3, "digest": bytes(range(32))}
    fields.update(changes)
    return records.BlobHeader(instance, **fields)  # type: ignore[arg-type]


def test_a_blob_record_round_trips_between_instances() -> None:
    header = _blob_header()
    inline = records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, 3)
    data = records.blob(header) + records.instance(inline) + records.chunks(b"abc") + records.blob(header)
    got = RecordReader(records.NEAR_TO_FAR).feed(data)
    assert got[0] == header and got[-1] == header
    assert got[1] == inline and isinstance(got[2], records.Chunk) and got[2].last


def test_a_blob_record_of_a_move_sub_operation_keeps_its_move_originator_pair() -> None:
    """A big image of a held C-MOVE travels by reference: router A must still count it for its move."""
    instance = records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, 3 * PART, "WS_A", 7)
    header = records.BlobHeader(instance, "ab" * 16, 0, 3, bytes(range(32)))
    (got,) = RecordReader(records.NEAR_TO_FAR).feed(records.blob(header))
    assert isinstance(got, records.BlobHeader)
    assert (got.instance.move_originator_ae, got.instance.move_originator_id) == ("WS_A", 7)


def _raw_blob(**changes: object) -> bytes:
    body: dict[str, object] = {
        "id": ENTRY,
        "sop_class": CT,
        "sop_instance": UID,
        "transfer_syntax": EXPLICIT,
        "length": 3 * PART,
        "blob_id": "ab" * 16,
        "ordinal": 0,
        "parts": 3,
        "digest": "00" * 32,
    }
    body.update(changes)
    raw = json.dumps(body).encode()
    return bytes([RecordType.BLOB]) + len(raw).to_bytes(4, "big") + raw


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"blob_id": "../../etc/passwd"}, "blob id"),
        ({"blob_id": "AB" * 16}, "blob id"),  # the bridge issues lower-case hex only
        ({"digest": "00" * 31}, "digest"),
        ({"digest": 5}, "digest"),
        ({"parts": 0}, "parts"),
        ({"parts": 5}, "parts"),  # 3 x 64 KiB cannot be more than 4 parts of the smallest part size
        ({"ordinal": -1}, "ordinal"),
        ({"ordinal": 1 << 42}, "ordinal"),
        ({"length": 0}, "length"),
        ({"sop_instance": "1.2.x"}, "UID"),
        ({"id": "a/b"}, "spool entry id"),
        ({"move_originator_ae": "WS_A"}, "move_originator_id"),  # the pair, both or neither
        ({"move_originator_ae": "A\\B", "move_originator_id": 7}, "move_originator_ae"),
    ],
)
def test_a_hostile_blob_record_is_refused_naming_the_field(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(RecordError, match=complaint):
        RecordReader(records.NEAR_TO_FAR).feed(_raw_blob(**changes))


def test_the_near_router_never_accepts_a_blob_record() -> None:
    with pytest.raises(RecordError, match="not expected"):
        RecordReader(records.FAR_TO_NEAR).feed(_raw_blob())


def _sealers() -> tuple[FrameSealer, FrameSealer]:
    secret, transcript = os.urandom(32), os.urandom(32)
    return FrameSealer(secret, transcript, AID, initiator=True), FrameSealer(secret, transcript, AID, initiator=False)


async def _upload(transport: MemoryTransport, sealer: FrameSealer, data: bytes, ordinal: int = 0) -> BlobUpload:
    upload = BlobUpload(transport, AID, sealer, ordinal=ordinal, parallel=2, stats=SpillStats())  # type: ignore[arg-type]
    for start in range(0, len(data), PART):
        await upload.harvest()
        await upload.add(data[start : start + PART], last=start + PART >= len(data))
    await upload.wait_all()
    return upload


async def _fetch(transport: MemoryTransport, sealer: FrameSealer, header: records.BlobHeader) -> bytes:
    receiver = SpillReceiver(transport, AID, sealer, parallel=2)  # type: ignore[arg-type]
    blob = IncomingBlob(receiver, header.blob_id, header.ordinal)
    blob.finish(header.parts, header.instance.length, header.digest)
    return b"".join([plain async for plain in blob.plaintext()])


def _reference(upload: BlobUpload) -> records.BlobHeader:
    instance = records.InstanceHeader(ENTRY, CT, UID, EXPLICIT, upload.plain_len)
    return records.BlobHeader(instance, upload.blob_id, upload.ordinal, upload.parts, upload.digest())


async def test_an_instance_uploaded_by_the_near_router_is_fetched_verified_and_released() -> None:
    near, far = _sealers()
    transport = MemoryTransport()
    data = os.urandom(3 * PART + 17)
    upload = await _upload(transport, near, data)
    assert upload.parts == 4 and upload.plain_len == len(data)
    assert all(data[:64] not in stored for stored in transport.blobs.values()), "parts are stored sealed"
    header = _reference(upload)
    # The reference crosses the bridge in a sealed frame, so its record form is what the far router decodes.
    (decoded,) = RecordReader(records.NEAR_TO_FAR).feed(records.blob(header))
    assert decoded == header
    assert await _fetch(transport, far, decoded) == data
    assert transport.released == [upload.blob_id], "the blob is deleted once the far router verified it"


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "drop"])
async def test_a_blob_tampered_with_in_the_store_yields_no_byte(damage: str) -> None:
    near, far = _sealers()
    transport = MemoryTransport()
    upload = await _upload(transport, near, os.urandom(3 * PART))
    urls = sorted(transport.blobs)
    if damage == "flip":
        part = bytearray(transport.blobs[urls[1]])
        part[40] ^= 1
        transport.blobs[urls[1]] = bytes(part)
    elif damage == "truncate":
        transport.blobs[urls[2]] = transport.blobs[urls[2]][:-10]
    elif damage == "swap":
        transport.blobs[urls[0]], transport.blobs[urls[1]] = transport.blobs[urls[1]], transport.blobs[urls[0]]
    else:
        del transport.blobs[urls[2]]
    with pytest.raises(SpillFailed) as caught:
        await _fetch(transport, far, _reference(upload))
    assert damage == "drop" or caught.value.security, "tampering is a security alert"
    assert transport.released == [], "a blob that failed is not released as delivered"


async def test_a_blob_of_another_ordinal_does_not_open_and_a_wrong_digest_is_caught() -> None:
    """Parts are sealed under their blob's ordinal: a reference naming another ordinal (a replayed or
    reordered blob) fails authentication; a manifest whose digest is wrong fails the final check."""
    near, far = _sealers()
    transport = MemoryTransport()
    upload = await _upload(transport, near, os.urandom(2 * PART), ordinal=3)
    header = _reference(upload)
    other = records.BlobHeader(header.instance, header.blob_id, 4, header.parts, header.digest)
    with pytest.raises(SpillFailed, match="failed authentication"):
        await _fetch(transport, far, other)
    wrong = hashlib.sha256(b"something else").digest()
    with pytest.raises(SpillFailed, match="does not match its manifest"):
        await _fetch(transport, far, records.BlobHeader(header.instance, header.blob_id, 3, header.parts, wrong))


# -- the far router's session: a BLOB record into the spool ---------------------------------------


class FakeChannel:
    """What FarSession uses of a RecordChannel: the association id, the codec's sealer and features, send."""

    def __init__(self, sealer: FrameSealer, *, spill: bool = True) -> None:
        self.association_id = AID
        self.codec = SimpleNamespace(sealer=sealer, features=Features(spill=spill, accel=True))
        self.sent = bytearray()

    async def send(self, data: bytes, *, flush: bool = False) -> None:
        self.sent += data

    def flush_soon(self) -> None:
        pass  # everything sent is in `sent` already

    def answers(self) -> list[records.Record]:
        return RecordReader(records.FAR_TO_NEAR).feed(bytes(self.sent))


def _session(tmp_path: Path, channel: FakeChannel, transport: MemoryTransport | None) -> tuple[FarSession, Spool]:
    spool = Spool(tmp_path / "spool", max_bytes=64 << 20)
    device = SharedDevice("ORTHANC_B", "127.0.0.1", 104, share_with=["hospital-a"], accelerate=True)
    session = FarSession(
        channel,  # type: ignore[arg-type]
        from_site="hospital-a",
        device=device,
        our_ae="ROUTER_B",
        spool=spool,
        capabilities=CapabilityCache(tmp_path / "caps.json", 3600),
        book=OutcomeBook(tmp_path / "outcomes.json"),
        on_commit=None,
        blobs=transport,  # type: ignore[arg-type]
    )
    return session, spool


def _part10(tmp_path: Path) -> tuple[bytes, pydicom.Dataset]:
    (path,) = write_series(generate_ct_series(1, rows=256, cols=256, seed=5), tmp_path / "ct")
    return path.read_bytes(), pydicom.dcmread(path, stop_before_pixels=True)


def _far_blob(
    tmp_path: Path,
) -> tuple[FrameSealer, FrameSealer, MemoryTransport, FakeChannel, FarSession, Spool, bytes, records.InstanceHeader]:
    """Both routers' sealers, the store, a far router's channel, session and spool, and one CT instance (its
    Part 10 bytes and header) for the near router to send as a blob."""
    near, far = _sealers()
    transport = MemoryTransport()
    channel = FakeChannel(far)
    session, spool = _session(tmp_path, channel, transport)
    data, ds = _part10(tmp_path)
    instance = records.InstanceHeader(ENTRY, str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, len(data))
    return near, far, transport, channel, session, spool, data, instance


async def _finish(session: FarSession) -> None:
    while session._fetches or session._commits:
        await asyncio.gather(*session._fetches, *session._commits)


async def test_the_far_router_spools_a_blob_and_answers_stored_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    near, far, transport, channel, session, spool, data, instance = _far_blob(tmp_path)

    good = await _upload(transport, near, data, ordinal=0)
    await session._apply(records.BlobHeader(instance, good.blob_id, 0, good.parts, good.digest()))
    await _finish(session)
    assert channel.answers() == [records.Stored(ENTRY, instance.sop_instance)]
    (entry,) = spool.entries()
    assert spool.path(entry.id).read_bytes() == data, "the spooled file is the near router's, byte for byte"

    channel.sent.clear()
    transport.blobs.clear()
    bad = await _upload(transport, near, data, ordinal=1)
    url = sorted(transport.blobs)[0]
    transport.blobs[url] = transport.blobs[url][:-1] + bytes([transport.blobs[url][-1] ^ 1])
    await session._apply(records.BlobHeader(instance, bad.blob_id, 1, bad.parts, bad.digest()))
    await _finish(session)
    (refused,) = channel.answers()
    assert isinstance(refused, records.Refused) and refused.status == 0x0110 and not refused.permanent
    assert "failed authentication" in refused.error
    assert len(spool.entries()) == 1, "nothing of the tampered instance is kept"
    spool.close()


async def test_a_replayed_blob_ordinal_ends_the_transfer_and_an_unagreed_blob_is_refused(tmp_path: Path) -> None:
    near, far, transport, channel, session, spool, data, instance = _far_blob(tmp_path)
    upload = await _upload(transport, near, data, ordinal=2)
    reference = records.BlobHeader(instance, upload.blob_id, 2, upload.parts, upload.digest())
    await session._apply(reference)
    await _finish(session)
    with pytest.raises(RecordError, match="SECURITY: blob .* reuses ordinal 2") as caught:
        await session._apply(reference)
    assert caught.value.security
    spool.close()

    unagreed = FakeChannel(far, spill=False)
    session, spool = _session(tmp_path / "other", unagreed, transport)
    await session._apply(reference)
    (refused,) = unagreed.answers()
    assert isinstance(refused, records.Refused) and "did not agree to spill" in refused.error
    assert spool.entries() == []
    spool.close()
