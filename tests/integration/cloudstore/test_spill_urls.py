"""Presigned URLs of the file:// store that expire before use, over real gRPC.

The router's own spill code (SpillSender, SpillReceiver, BlobTransport) talks to the bridge's
servicer over a gRPC channel on 127.0.0.1; the file store's clock is moved past the URL's
validity between the moment the bridge signed a URL and the moment the router uses it (a
router stalled longer than ``url_ttl_s``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_bridge.config import BridgeConfig, ServerSection, SpillSection, StorageSection
from relay_bridge.server import RelayServicer, start
from relay_bridge.sessions import RouterSession
from relay_common.audit import read_events
from relay_common.config import AuditSection
from relay_router.seal import FrameSealer
from relay_router.spill import BlobTransport, BridgeBlobTransport, SpillFailed, SpillReceiver, SpillSender

pytestmark = pytest.mark.timeout(60)
AID = os.urandom(16).hex()


@dataclass
class Framer:
    dataset_bytes: int = 0
    datasets_completed: int = 0


@dataclass
class Bridge:
    servicer: RelayServicer
    stub: pb_grpc.RelayStub
    blobs: Path
    audit: Path

    def transport(self, name: str, cls: type[BridgeBlobTransport] = BridgeBlobTransport) -> BridgeBlobTransport:
        session = RouterSession(name, f"token-{name}", "127.0.0.1", associations={AID})
        self.servicer.sessions[name] = session
        md = (("relay-session", session.token),)
        # The blob API of relay_router.tunnel.BridgeLink, on this test's channel and session.
        link = SimpleNamespace(
            blob_slot=lambda request, timeout_s: self.stub.BlobSlot(request, metadata=md, timeout=timeout_s),
            put_blob_part=lambda part, timeout_s: self.stub.PutBlobPart(part, metadata=md, timeout=timeout_s),
            get_blob_part=lambda part, timeout_s: self.stub.GetBlobPart(part, metadata=md, timeout=timeout_s),
            release_blob=lambda request, timeout_s: self.stub.ReleaseBlob(request, metadata=md, timeout=timeout_s),
        )
        return cls(link)

    def expire_urls(self) -> None:
        assert self.servicer.blobs is not None
        self.servicer.blobs.store._clock = lambda: time.time() + 3600  # type: ignore[attr-defined]


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    config = BridgeConfig(
        server=ServerSection(insecure=True, listen="127.0.0.1:0"),
        storage=StorageSection(database=tmp_path / "bridge.sqlite3"),
        spill=SpillSection(store=(tmp_path / "blobs").as_uri(), url_ttl_s=60),
        audit=AuditSection(file=tmp_path / "audit.jsonl"),
    )
    server, port, servicer = await start(config, insecure=True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Bridge(servicer, pb_grpc.RelayStub(channel), tmp_path / "blobs", tmp_path / "audit.jsonl")
    finally:
        await channel.close()
        await server.stop(None)
        assert servicer.blobs is not None
        await servicer.blobs.close()


def sealers() -> tuple[FrameSealer, FrameSealer]:
    secret, transcript = os.urandom(32), os.urandom(32)
    return FrameSealer(secret, transcript, AID, initiator=True), FrameSealer(secret, transcript, AID, initiator=False)


async def spill_one(transport: BlobTransport, sealer: FrameSealer, data: list[bytes]) -> tuple[bytes, list[pb.Data]]:
    """(inline bytes, blob notices) for one data set offered in ``data``."""
    framer = Framer(dataset_bytes=1)
    frames: list[pb.Data] = []

    async def announce(build: Callable[[int], pb.Data]) -> None:
        frames.append(build(7 + len(frames)))

    sender = SpillSender(
        transport,
        AID,
        sealer,
        framer,  # type: ignore[arg-type]
        threshold=1000,
        part_bytes=64 * 1024,
        parallel=2,
        compression_level=lambda: None,
        announce=announce,
    )
    inline = b""
    for i, chunk in enumerate(data):
        framer.dataset_bytes += len(chunk)
        if i == len(data) - 1:
            framer.datasets_completed, framer.dataset_bytes = 1, 0
        inline += await sender.offer(chunk, True)
    return inline, frames


def refusals(bridge: Bridge) -> list[str]:
    return [str(e.get("detail")) for e in read_events(bridge.audit) if e["event"] == "blob_refused"]


async def test_an_expired_download_url_aborts_before_any_byte_is_delivered(bridge: Bridge) -> None:
    tx, rx = sealers()
    data = [os.urandom(50_000) for _ in range(4)]
    inline, frames = await spill_one(bridge.transport("site-a"), tx, data)
    assert inline == b"" and frames

    class Stalled(BridgeBlobTransport):
        async def get(self, url: str) -> bytes:
            bridge.expire_urls()  # the receiver stalled past url_ttl_s after the bridge signed the URL
            return await super().get(url)

    receiver = SpillReceiver(bridge.transport("site-b", Stalled), AID, rx, parallel=1)
    blobs = [receiver.accept(f, rx.open(f.payload, f.seq, f.flags))[0] for f in frames]
    delivered: list[bytes] = []

    async def sink(plain: bytes) -> bool:
        delivered.append(plain)
        return True

    with pytest.raises(SpillFailed) as failure:
        await receiver.deliver(blobs[0], sink)
    assert delivered == []
    message = str(failure.value)
    blob = frames[0].blob.blob_id
    assert message.startswith(f"blob {blob} part 0 could not be fetched: fetching a part failed: PERMISSION_DENIED ")
    assert re.search(rf"GET 'spill/{AID}/{blob}/000000' expired 35[34]\d s ago$", message), message
    assert any("expired" in detail for detail in refusals(bridge))


async def test_an_expired_upload_url_sends_the_data_set_inline(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    tx, _ = sealers()

    class Stalled(BridgeBlobTransport):
        async def put(self, url: str, data: bytes) -> None:
            bridge.expire_urls()
            await super().put(url, data)

    data = [os.urandom(50_000) for _ in range(4)]
    inline, frames = await spill_one(bridge.transport("site-a", Stalled), tx, data)
    assert not frames and inline == b"".join(data), "nothing was stored: every byte goes inline"
    warning = next(r.getMessage() for r in caplog.records if r.name == "relay_router.spill")
    assert warning.startswith("blob store unavailable, sending 200000 bytes inline (spill paused for 60 s): ")
    assert "PERMISSION_DENIED" in warning and "expired" in warning
    assert not [p for p in bridge.blobs.rglob("*") if p.is_file()]
