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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from cloudstore import BlobStore, BlobStoreError, open_store
from cloudstore.base import PresignedURLError
from cloudstore.lifecycle import sweep
from protos.relay.v1 import relay_pb2 as pb
from relay_bridge.cluster.tickets import ticket_holder
from relay_bridge.config import BridgeConfig
from relay_bridge.db.backend import is_postgres_url
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


@dataclass(frozen=True)
class BlobQuota:
    """What one association may hold in the store at once ([spill] max_*; checked before a URL is signed)."""

    max_blobs: int = 64
    max_parts_per_blob: int = 2048
    max_part_bytes: int = 9 * 1024 * 1024
    max_bytes: int = 16 * 1024**3


@dataclass
class Usage:
    """What one association holds in the store now (granted, not yet released): a blob released after
    delivery frees its share, so a long association may move any amount, a few blobs at a time."""

    blobs: set[str] = field(default_factory=set)
    parts: dict[tuple[str, int], int] = field(default_factory=dict)  # (blob id, part) -> bytes charged
    bytes: int = 0

    def forget(self, blob_id: str) -> None:
        self.blobs.discard(blob_id)
        for key in [k for k in self.parts if k[0] == blob_id]:
            self.bytes -= self.parts.pop(key)


class BlobBroker:
    """Issues presigned URLs and serves the file:// store; one per bridge."""

    def __init__(
        self,
        store: BlobStore,
        *,
        url_ttl_s: float,
        ttl_s: float,
        sweep_interval_s: float,
        quota: BlobQuota = BlobQuota(),
    ) -> None:
        self.store = store
        self.url_ttl_s = url_ttl_s
        self.ttl_s = ttl_s
        self.sweep_interval_s = sweep_interval_s
        self.quota = quota
        self.usage: dict[str, Usage] = {}
        # Associations that ended, with when their last URL expires: what a URL still valid after the
        # end stored is deleted then (a store's presigned URL cannot be revoked).
        self._ended: dict[str, float] = {}
        self._late_release: asyncio.Task[None] | None = None
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
            # Replicas share the key (and the directory): a URL one issued is honoured by another.
            key = spill.signing_key()
            if key is not None:
                options["signing_key"] = key
            elif is_postgres_url(config.storage.database):
                log.warning(
                    "spill: the file:// store signs URLs with a key of this process only; with several replicas"
                    " set [spill] signing_key_file (the same key and a shared directory on each), or use S3/GCS"
                )
        try:
            store = open_store(url, **options)
        except (BlobStoreError, ValueError, ImportError, OSError) as exc:
            log.error("spill disabled: cannot open the blob store %s: %s", url, exc)
            return None
        log.info("spill blob store: %s", store.url)
        if not store.bounds_uploads:
            log.warning("the blob store %s cannot bind an upload URL to its length; part sizes are unbounded", url)
        quota = BlobQuota(
            spill.max_blobs_per_association,
            spill.max_parts_per_blob,
            spill.max_part_bytes,
            spill.max_bytes_per_association,
        )
        return cls(
            store, url_ttl_s=spill.url_ttl_s, ttl_s=spill.ttl_s, sweep_interval_s=spill.sweep_interval_s, quota=quota
        )

    @property
    def served_bytes(self) -> int:
        return sum(self.served.values())

    @property
    def served_by_bridge(self) -> bool:
        return self.store.scheme == "file"

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())
        self._late_release = asyncio.create_task(self._release_late_forever())

    async def close(self) -> None:
        for task in (self._sweeper, self._late_release):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.store.close()

    def association_ended(self, association_id: str) -> None:
        """Forget the association's quota; delete its blobs now, and again once its URLs have expired."""
        self.usage.pop(association_id, None)
        self._ended[association_id] = time.monotonic() + self.url_ttl_s + 1

    async def _release_late_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.url_ttl_s))
            await self.release_late()

    async def release_late(self, now: float | None = None) -> int:
        """Delete what URLs of ended associations stored after the end (once those URLs expired)."""
        now = time.monotonic() if now is None else now
        due = [aid for aid, expiry in self._ended.items() if expiry <= now]
        deleted = 0
        for aid in due:
            del self._ended[aid]
            found = await self.release(aid)
            if found:
                log.warning("deleted %d blob parts stored for association %s after it ended", found, aid)
            deleted += found
        return deleted

    def _grant(self, association_id: str, blob_id: str, part: int, size: int) -> None:
        """Count a PUT slot against the association's quota, or refuse it naming the limit."""
        quota = self.quota
        usage = self.usage.setdefault(association_id, Usage())
        if part >= quota.max_parts_per_blob:
            raise BlobRefused(f"part {part} is beyond the limit of {quota.max_parts_per_blob} parts per blob")
        if blob_id not in usage.blobs and len(usage.blobs) >= quota.max_blobs:
            raise BlobRefused(f"the association already has {quota.max_blobs} blobs (max_blobs_per_association)")
        if size > quota.max_part_bytes:
            raise BlobRefused(f"a part of {size} bytes exceeds max_part_bytes ({quota.max_part_bytes})")
        charge = size or quota.max_part_bytes  # an unstated size is charged at the most a part may be
        if (blob_id, part) not in usage.parts and usage.bytes + charge > quota.max_bytes:
            raise BlobRefused(f"the association would exceed {quota.max_bytes} bytes (max_bytes_per_association)")
        if (blob_id, part) not in usage.parts:
            usage.parts[(blob_id, part)] = charge
            usage.bytes += charge
        usage.blobs.add(blob_id)

    async def _sweep_forever(self) -> None:
        while True:
            report = await sweep(self.store, PREFIX, self.ttl_s)
            if report.errors:
                log.warning("orphan sweep: %s", report.errors[0])
            await asyncio.sleep(self.sweep_interval_s)

    async def slot(
        self, association_id: str, blob_id: str, part: int, *, download: bool, size: int = 0
    ) -> tuple[str, str, int]:
        """(blob id, presigned URL, expiry) for one part; the caller checked association membership.

        A PUT is counted against the association's quota first; with `size`, the URL is signed for
        exactly that many bytes, and without it (older routers) the file:// store's for at most
        `max_part_bytes`."""
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
            self._grant(association_id, blob_id, part, size)
            url = await self.store.presign_put(key, ttl, content_length=size or None)
        self.slots["get" if download else "put"] += 1
        return blob_id, url, int(time.time()) + ttl

    def _verified_key(self, url: str, method: str, associations: set[str], size: int | None = None) -> str:
        if not self.served_by_bridge:
            raise BlobRefused("this bridge's blob store is reached directly, not through the bridge")
        try:
            if size is None:
                key = self.store.verify_presigned(url, method)  # type: ignore[attr-defined]
            else:
                key = self.store.verify_presigned_upload(url, size)  # type: ignore[attr-defined]
        except PresignedURLError as exc:
            raise BlobRefused(str(exc)) from None
        if association_of(key) not in associations:
            raise BlobRefused("the blob belongs to another association")
        return key

    async def put_part(self, url: str, data: bytes, associations: set[str]) -> None:
        if len(data) > self.quota.max_part_bytes:
            raise BlobRefused(f"a part of {len(data)} bytes exceeds max_part_bytes ({self.quota.max_part_bytes})")
        key = self._verified_key(url, "PUT", associations, len(data))
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
        usage = self.usage.get(association_id)
        if usage is not None and blob_id:
            usage.forget(blob_id)
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
        # A router moved off this draining replica still fetches and stores the parts of the
        # associations it runs here with their session (relay_bridge.lifecycle); each RPC checks
        # that the blob is one of the session's running associations.
        session = await ticket_holder(self.state, context) or await self.state.sessions.authenticate_caller(
            context, moved_ok=True
        )
        if self.state.blobs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this bridge has no spill blob store")
        if association_id:
            await require_association(context, session, association_id)
        return session

    def _broker(self) -> BlobBroker:
        assert self.state.blobs is not None  # _caller refused the call otherwise
        return self.state.blobs

    async def _refused(
        self,
        context: grpc.aio.ServicerContext,
        session: RouterSession,
        exc: BlobRefused,
        code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
    ) -> None:
        """A forged, expired or foreign URL, or a quota exceeded: a security alert (rate-limited audit)."""
        limiter = self.state.refusal_audits
        log.warning("blob request of router %s refused: %s", session.name, exc)
        if limiter.allow(f"blob_refused:{session.name}"):
            self.state.audit.event(
                "blob_refused",
                "alert",
                router=session.name,
                detail=str(exc),
                suppressed=limiter.suppressed(f"blob_refused:{session.name}"),
            )
        await context.abort(code, str(exc))

    async def BlobSlot(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobSlotResponse:
        session = await self._caller(context, request.association_id)
        try:
            blob_id, url, expires = await self._broker().slot(
                request.association_id, request.blob_id, request.part, download=request.download, size=request.size
            )
        except BlobRefused as exc:
            await self._refused(context, session, exc, grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise AssertionError("context.abort() raises") from exc
        except Exception as exc:  # a store failure: the router falls back to inline frames
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
            raise AssertionError("context.abort() raises") from exc
        return pb.BlobSlotResponse(blob_id=blob_id, url=url, expires_unix=expires)

    async def PutBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        session = await self._caller(context)
        try:
            await self._broker().put_part(request.url, request.data, session.associations)
        except BlobRefused as exc:
            await self._refused(context, session, exc)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
        return pb.BlobPartAck()

    async def GetBlobPart(self, request: pb.BlobPart, context: grpc.aio.ServicerContext) -> pb.BlobPart:
        session = await self._caller(context)
        try:
            data = await self._broker().get_part(request.url, session.associations)
        except BlobRefused as exc:
            await self._refused(context, session, exc)
            raise AssertionError("context.abort() raises") from exc
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"blob store: {exc}")
            raise AssertionError("context.abort() raises") from exc
        return pb.BlobPart(data=data)

    async def ReleaseBlob(self, request: pb.BlobSlotRequest, context: grpc.aio.ServicerContext) -> pb.BlobPartAck:
        await self._caller(context, request.association_id)
        try:
            await self._broker().release(request.association_id, request.blob_id)
        except BlobRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return pb.BlobPartAck()
