"""The bridge's blob RPCs over real gRPC: session and association checks, forged and expired URLs refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_bridge.config import BridgeConfig, ServerSection, SpillSection, StorageSection
from relay_bridge.server import RelayServicer, start
from relay_bridge.sessions import RouterSession
from relay_common.config import AuditSection

AID = "c" * 32


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[tuple[RelayServicer, pb_grpc.RelayStub, Path]]:
    blobs = tmp_path / "blobs"
    config = BridgeConfig(
        server=ServerSection(insecure=True, listen="127.0.0.1:0"),
        storage=StorageSection(database=tmp_path / "bridge.sqlite3"),
        spill=SpillSection(store=blobs.as_uri()),
        audit=AuditSection(file=tmp_path / "audit.jsonl"),
    )
    server, port, servicer = await start(config, insecure=True)
    servicer.audit_path = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, pb_grpc.RelayStub(channel), blobs
    finally:
        await channel.close()
        await server.stop(None)
        assert servicer.blobs is not None
        await servicer.blobs.close()


def session(servicer: RelayServicer, name: str, *associations: str) -> tuple[tuple[str, str], ...]:
    s = RouterSession(name, f"token-{name}", "127.0.0.1", associations=set(associations))
    servicer.sessions[name] = s
    return (("relay-session", s.token),)


async def denied(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_member_round_trip_and_release(bridge: tuple[RelayServicer, pb_grpc.RelayStub, Path]) -> None:
    servicer, stub, blobs = bridge
    a = session(servicer, "site-a", AID)
    b = session(servicer, "site-b", AID)
    slot = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID, part=0), metadata=a)
    assert slot.url.startswith("file+presigned:///spill/") and slot.expires_unix > time.time()
    await stub.PutBlobPart(pb.BlobPart(url=slot.url, data=b"sealed"), metadata=a)
    get = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID, blob_id=slot.blob_id, download=True), metadata=b)
    assert (await stub.GetBlobPart(pb.BlobPart(url=get.url), metadata=b)).data == b"sealed"
    await stub.ReleaseBlob(pb.BlobSlotRequest(association_id=AID, blob_id=slot.blob_id), metadata=b)
    assert not [p for p in blobs.rglob("*") if p.is_file()]


async def test_refusals(bridge: tuple[RelayServicer, pb_grpc.RelayStub, Path]) -> None:
    servicer, stub, _ = bridge
    a = session(servicer, "site-a", AID)
    outsider = session(servicer, "site-x")
    slot = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID), metadata=a)
    await stub.PutBlobPart(pb.BlobPart(url=slot.url, data=b"sealed"), metadata=a)
    get = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID, blob_id=slot.blob_id, download=True), metadata=a)
    # No session, or not an end of the association.
    assert await denied(stub.BlobSlot(pb.BlobSlotRequest(association_id=AID))) == grpc.StatusCode.UNAUTHENTICATED
    request = pb.BlobSlotRequest(association_id=AID, blob_id=slot.blob_id, download=True)
    assert await denied(stub.BlobSlot(request, metadata=outsider)) == grpc.StatusCode.PERMISSION_DENIED
    # A valid URL in the hands of another router.
    assert (
        await denied(stub.GetBlobPart(pb.BlobPart(url=get.url), metadata=outsider)) == grpc.StatusCode.PERMISSION_DENIED
    )
    # Forged: another part, a made-up signature; wrong method.
    forged = get.url.replace("/000000?", "/000001?")
    assert await denied(stub.GetBlobPart(pb.BlobPart(url=forged), metadata=a)) == grpc.StatusCode.PERMISSION_DENIED
    made_up = get.url.rsplit("sig=", 1)[0] + "sig=" + "A" * 43
    assert await denied(stub.GetBlobPart(pb.BlobPart(url=made_up), metadata=a)) == grpc.StatusCode.PERMISSION_DENIED
    wrong = pb.BlobPart(url=slot.url, data=b"")
    assert await denied(stub.GetBlobPart(wrong, metadata=a)) == grpc.StatusCode.PERMISSION_DENIED
    # Expired: the store's clock moves past the URL's validity.
    assert servicer.blobs is not None
    servicer.blobs.store._clock = lambda: time.time() + 10_000  # type: ignore[attr-defined]
    assert await denied(stub.GetBlobPart(pb.BlobPart(url=get.url), metadata=a)) == grpc.StatusCode.PERMISSION_DENIED
    alerts = (servicer.audit_path).read_text().count('"blob_refused"')  # type: ignore[attr-defined]
    assert alerts >= 5


async def test_a_router_moved_off_a_draining_replica_finishes_its_running_associations_blobs_there(
    bridge: tuple[RelayServicer, pb_grpc.RelayStub, Path],
) -> None:
    """relay_bridge.lifecycle: the moved session serves the blob RPCs of its running associations, and
    nothing else: not another association, not a new Associate, not once the association has ended."""
    servicer, stub, _ = bridge
    a = session(servicer, "site-a", AID)
    moved = servicer.sessions.pop("site-a")
    moved.end()
    # Before the drain keeps it: an ended session is no session.
    assert await denied(stub.BlobSlot(pb.BlobSlotRequest(association_id=AID), metadata=a)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    servicer.sessions.keep_moved(moved)
    slot = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID), metadata=a)
    await stub.PutBlobPart(pb.BlobPart(url=slot.url, data=b"sealed"), metadata=a)
    get = await stub.BlobSlot(pb.BlobSlotRequest(association_id=AID, blob_id=slot.blob_id, download=True), metadata=a)
    assert (await stub.GetBlobPart(pb.BlobPart(url=get.url), metadata=a)).data == b"sealed"
    other = pb.BlobSlotRequest(association_id="d" * 32)
    assert await denied(stub.BlobSlot(other, metadata=a)) == grpc.StatusCode.PERMISSION_DENIED
    call = stub.Associate(metadata=a)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the refusal may end the call before the write lands
        await call.write(pb.Frame(join=pb.Join(association_id=AID)))
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, "a moved session opens and joins nothing"
    moved.associations.discard(AID)  # the association ends: the session is gone
    assert await denied(stub.GetBlobPart(pb.BlobPart(url=get.url), metadata=a)) == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.sessions.moved == []
