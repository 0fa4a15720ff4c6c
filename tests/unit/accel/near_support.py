"""What the near-side transfer's unit tests share: a NearTransfer on a real spool, spooled instances, waiting."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from relay_router.accel import records
from relay_router.accel.capabilities import CapabilityCache
from relay_router.accel.spool import Spool
from relay_router.accel.transfer import NearTransfer
from relay_router.seal import FrameSealer
from relay_router.wire.features import Features

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


class RecordingChannel:
    """What NearTransfer's send loop uses of a RecordChannel; every record kept in order. `blob_stream`: the
    far router answered FEATURES with streamed blobs (else whole blobs only)."""

    def __init__(self, association_id: str, secret: bytes, transcript: bytes, *, blob_stream: bool) -> None:
        self.association_id = association_id
        self.blob_ordinal = 0
        self.codec = SimpleNamespace(
            sealer=FrameSealer(secret, transcript, association_id, initiator=True),
            features=Features(spill=True, accel=True),
            compressor=None,
        )
        self.sent = bytearray()
        self.closed = False
        self.blob_stream = blob_stream
        self.blob_notes: list[tuple[str, bool, bytes]] = []
        self.heard = asyncio.Event()
        self.heard.set()  # the far router's first records have arrived
        self.blobs_opened: set[str] = set()

    async def send(self, data: bytes, *, flush: bool = False, new_instance: bool = False) -> None:
        self.sent += data

    async def close(self, reason: object = None) -> None:
        self.closed = True

    def partial(self) -> bool:
        return False  # every record is "sent" at once

    def records(self) -> list[records.Record]:
        return records.RecordReader(records.NEAR_TO_FAR).feed(bytes(self.sent))


def near_transfer(
    tmp_path: Path, store: object, *, threshold: int, part_bytes: int, parallel: int
) -> tuple[NearTransfer, Spool]:
    """A near transfer towards ORTHANC_B at hospital-b, spilling through `store` (a BlobTransport)."""
    spool = Spool(tmp_path / "spool", max_bytes=256 << 20)
    config = SimpleNamespace(
        accelerate=SimpleNamespace(bucket_bytes=4 << 20),
        dicom=SimpleNamespace(
            spill_threshold_bytes=threshold, spill_part_bytes=part_bytes, spill_parallel=parallel, compression_level=3
        ),
    )
    transfer = NearTransfer(
        config,  # type: ignore[arg-type]
        SimpleNamespace(),  # type: ignore[arg-type]
        spool,
        CapabilityCache(tmp_path / "caps.json", 3600),
        local_ae="ORTHANC_B",
        route=SimpleNamespace(site="hospital-b", ae_title="ORTHANC_B"),  # type: ignore[arg-type]
        blobs=store,  # type: ignore[arg-type]
    )
    return transfer, spool


def spool_instance(spool: Spool, number: int, size: int) -> str:
    """A committed CT instance of `size` random bytes; its entry id."""
    writer = spool.writer(
        "ORTHANC_B", sop_class_uid=CT, sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{number}", transfer_syntax=EXPLICIT
    )
    writer.write(os.urandom(size))
    return writer.commit().id


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Wait for `condition` (generous: the suite runs 3 workers on 2 cores in CI)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def run_send(transfer: NearTransfer, channel: object) -> tuple[asyncio.Task[None], asyncio.Event]:
    """The transfer's send loop on `channel` (a fake RecordChannel), and the event that ends it."""
    done = asyncio.Event()
    receiving = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
    return asyncio.get_running_loop().create_task(transfer._send(channel, done, receiving)), done  # type: ignore[arg-type]
