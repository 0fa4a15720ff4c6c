"""The bridge's side of the cloud spill: presigned URLs per blob part, and the file:// store served over gRPC.

The bridge holds the blob store (and its credentials); routers get short-lived
presigned URLs for the parts of blobs that belong to their own associations,
and nothing else. Keys are ``spill/<association id>/<blob id>/<part>``, so an
association's blobs can be authorised, listed and deleted by prefix.

For the file:// store, which routers cannot reach, the URLs the store signs
(``file+presigned:///...``) are capabilities for the bridge's PutBlobPart and
GetBlobPart RPCs: the bridge verifies the signature and expiry, then that the
key lies under an association of the calling router. The blob bytes still
never pass through the association's splice (nor its byte counters).

`BlobService` holds the four RPCs (BlobSlot, PutBlobPart, GetBlobPart,
ReleaseBlob); each checks its caller's session first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from cloudstore import BlobStore, BlobStoreError, open_store
from cloudstore.base import PresignedURLError
from cloudstore.lifecycle import sweep
from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.config import BridgeConfig
from relay_bridge.sessions import require_association
from relay_common.errors import RelayError

if TYPE_CHECKING:
    from relay_bridge.sessions import RouterSession
    from relay_bridge.state import BridgeState

log = logging.getLogger("relay_bridge.blobs")
PREFIX = "spill/"
BLOB_ID = re.compile(r"^[0-9a-f]{32}\Z")
MAX_PARTS = 100_000


class BlobRefused(RelayError):
    """The request is not allowed (wrong association, forged or expired URL, bad id)."""


def key_for(association_id: str, blob_id: str, part: int) -> str:
    return f"{PREFIX}{association_id}/{blob_id}/{part:06d}"


def association_of(key: str) -> str:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] + "/" != PREFIX:
        raise BlobRefused(f"key {key!r} is not a spill blob")
    return parts[1]


class BlobBroker:
    """Issues presigned URLs and serves the file:// store; one per bridge."""

    def __init__(self, store: BlobStore, *, url_ttl_s: float, ttl_s: float, sweep_interval_s: float) -> None:
        self.store = store
        self.url_ttl_s = url_ttl_s
        self.ttl_s = ttl_s
        self.sweep_interval_s = sweep_interval_s
        # Counters for relay_bridge.metrics (they only grow).
        self.slots = {"put": 0, "get": 0}  # presigned URLs issued, by method
        self.served = {"stored": 0, "fetched": 0}  # bytes moved by PutBlobPart / GetBlobPart (file:// only)
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: BridgeConfig) -> BlobBroker | None:
        spill = config.spill
        if spill.store == "off":
            return None
        url = spill.store or (config.storage.local_path.absolute().parent / "blobs").as_uri()
        options: dict[str, object] = {}
        if url.startswith("s3://"):
            if spill.endpoint_url:
                options["endpoint_url"] = spill.endpoint_url
            if spill.region:
                options["region"] = spill.region
        elif url.startswith("gs://"):
            if spill.endpoint_url:  # a private or emulated JSON API endpoint; credentials: ADC, on the bridge
                options["endpoint_url"] = spill.endpoint_url
        elif url.startswith("file:"):
            options["fsync"] = False  # spill blobs are transient; the sender re-sends nothing anyway
        try:
            store = open_store(url, **options)
        except (BlobStoreError, ValueError, ImportError, OSError) as exc:
            log.error("spill disabled: cannot open the blob store %s: %s", url, exc)
            return None
        log.info("spill blob store: %s", store.url)
        return cls(store, url_ttl_s=spill.url_ttl_s, ttl_s=spill.ttl_s, sweep_interval_s=spill.sweep_interval_s)

    @property
    def served_bytes(self) -> int:
        return sum(self.served.values())

    @property
    def served_by_bridge(self) -> bool:
        return self.store.scheme == "file"

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.store.close()

    async def _sweep_forever(self) -> None:
        while True:
            report = await sweep(self.store, PREFIX, self.ttl_s)
            if report.errors:
                log.warning("orphan sweep: %s", report.errors[0])
            await asyncio.sleep(self.sweep_interval_s)

    async def slot(self, association_id: str, blob_id: str, part: int, *, download: bool) -> tuple[str, str, int]:
        """(blob id, presigned URL, expiry) for one part; the caller checked association membership."""
        if not blob_id:
            if download:
                raise BlobRefused("a download needs a blob id")
            blob_id = secrets.token_hex(16)
        if not BLOB_ID.match(blob_id) or not 0 <= part < MAX_PARTS:
            raise BlobRefused("bad blob id or part number")
        key = key_for(association_id, blob_id, part)
        ttl = int(self.url_ttl_s)
        if download:
            url = await self.store.presign_get(key, ttl)
        else:
            url = await self.store.presign_put(key, ttl)
        self.slots["get" if download else "put"] += 1
        return blob_id, url, int(time.time()) + ttl

    def _verified_key(self, url: str, method: str, associations: set[str]) -> str:
        if not self.served_by_bridge:
            raise BlobRefused("this bridge's blob store is reached directly, not through the bridge")
        try:
            key = self.store.verify_presigned(url, method)  # type: ignore[attr-defined]
        except PresignedURLError as exc:
            raise BlobRefused(str(exc)) from None
        if association_of(key) not in associations:
            raise BlobRefused("the blob belongs to another association")
        return key

    async def put_part(self, url: str, data: bytes, associations: set[str]) -> None:
        key = self._verified_key(url, "PUT", associations)
        await self.store.put_bytes(key, data)
        self.served["stored"] += len(data)

    async def get_part(self, url: str, associations: set[str]) -> bytes:
        key = self._verified_key(url, "GET", associations)
        data = await self.store.get_bytes(key)
        self.served["fetched"] += len(data)
        return data

    async def release(self, association_id: str, blob_id: str = "") -> int:
        """Delete one blob (or, without blob id, every blob of the association); returns parts deleted."""
        if blob_id and not BLOB_ID.match(blob_id):
            raise BlobRefused("bad blob id")
        prefix = f"{PREFIX}{association_id}/" + (f"{blob_id}/" if blob_id else "")
        try:
            infos = await self.store.list(prefix)
            await asyncio.gather(*(self.store.delete(info.key) for info in infos))
        except BlobStoreError as exc:
            log.warning("could not delete blobs under %s (the sweep will): %s", prefix, exc)
            return 0
        return len(infos)


class BlobService:
    """The blob RPCs: presigned URLs for the caller's own associations, and the file:// store's parts."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    async def _caller(self, context: grpc.aio.ServicerContext, association_id: str = "") -> RouterSession:
        session = await self.state.sessions.authenticate_caller(context)
        if self.state.blobs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this bridge has no spill blob store")
        if association_id:
            await require_association(context, session, association_id)
        return session

    def _broker(self) -> BlobBroker:
        assert self.state.blobs is not None  # _caller refused the call otherwise
        return self.state.blobs

    async def _refused(self, context: grpc.aio.ServicerContext, session: RouterSession, exc: BlobRefused) -> None:
        """A forged, expired or foreign URL: a security alert."""
        self.state.audit.event("blob_refused", "alert", router=session.name, detail=str(exc))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:  # noqa: N802
        await self._caller(context, request.association_id)
        try:
            blob_id, url, expires = await self._broker().slot(
                request.association_id, request.blob_id, request.part, download=request.download
            )
        except BlobRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a store failure: the router falls back to inline frames
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobSlotResponse(blob_id=blob_id, url=url, expires_unix=expires)

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:  # noqa: N802
        session = await self._caller(context)
        try:
            await self._broker().put_part(request.url, request.data, session.associations)
        except BlobRefused as exc:
            await self._refused(context, session, exc)
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobPartAck()

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:  # noqa: N802
        session = await self._caller(context)
        try:
            data = await self._broker().get_part(request.url, session.associations)
        except BlobRefused as exc:
            await self._refused(context, session, exc)
        except Exception as exc:  # noqa: BLE001
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobPart(data=data)

    async def ReleaseBlob(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:  # noqa: N802
        await self._caller(context, request.association_id)
        try:
            await self._broker().release(request.association_id, request.blob_id)
        except BlobRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.BlobPartAck()
