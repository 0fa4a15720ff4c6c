"""Cloud spill, router side: the blob store as the spill code sees it, its errors and this router's spill state.

`BlobTransport` is what SpillSender and SpillReceiver need from a store: presigned URLs from
the bridge (`slot`), and part bytes moved by HTTP or, for the bridge's own file:// store,
through its PutBlobPart/GetBlobPart RPCs. `BridgeBlobTransport` is the real one, over
`relay_router.tunnel.BridgeLink`'s public blob API; tests pass in-memory ones.

`SpillState` is owned by the RouterService: the counters relay_router.metrics exports, and the
pause after the store failed (spill then stops for `BACKOFF_S` for every association of the
router).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason, RelayError

# What a spill failure says in Close.detail (RelayError.remote_detail; it crosses the bridge): fixed
# texts, never a URL, an errno or bytes of a response. The specific reason stays in this router's log.
from relay_router.close_codes import FETCH_FAILED as FETCH_FAILED  # re-exported for spill*.py
from relay_router.close_codes import PART_GONE as PART_GONE
from relay_router.close_codes import STORE_FAILED as STORE_FAILED
from relay_router.close_codes import URL_REFUSED
from relay_router.egress import MAX_STORED_PART, EgressError, HttpClient, ProxySettings, UrlPolicy, UrlRefused
from relay_router.wire.flags import PartFlag

BACKOFF_S = 60.0
MAX_DOWNLOADS = 16  # parts held by all receiving associations of a router together (~16 x 8 MiB)
HTTP_TIMEOUT_S = 60.0
PART_SEQ_BASE = 1 << 63  # part nonces never meet frame nonces (frame sequence numbers stay far below)
MAX_PART_INDEX = 1 << 20
MAX_BLOBS = 1 << 42  # blobs per direction of one association
KIND_PARTS = 1  # notice: parts 0 .. count-1 of the blob are stored
KIND_END = 2  # notice: the blob is complete (its manifest)
PARTS_NOTICE = struct.Struct(">B32sQI")  # kind, blob id, blob ordinal, parts stored
END_NOTICE = struct.Struct(">B32sQIQ32s")  # kind, blob id, blob ordinal, parts, plaintext length, SHA-256 of the parts
# Part header bits (registered in relay_router.wire.flags); the names stay for existing callers.
FLAG_PART = PartFlag.PART
FLAG_LAST = PartFlag.LAST
FLAG_PART_SHUFFLED = PartFlag.SHUFFLED


class SpillUnavailable(RelayError):
    """The blob store (or the bridge's broker) cannot be used now: send inline."""

    reason = Reason.SPILL


class BlobGone(SpillUnavailable):
    """A part that was stored is not in the store any more (deleted early, or expired by the store)."""


class SpillFailed(RelayError):
    """A blob could not be completed after parts were stored, or a received blob is bad: abort.

    `security` is set when a received blob or notice fails authentication or contradicts itself.
    """

    reason = Reason.SPILL


def blob_alert(detail: str) -> SpillFailed:
    """A received blob that was tampered with, truncated, replayed or reordered (a security alert)."""
    return SpillFailed(f"SECURITY: {detail}", security=True)


def part_seq(ordinal: int, part: int) -> int:
    """The nonce sequence of part ``part`` of the ``ordinal``-th blob of a direction (never a frame's)."""
    if ordinal >= MAX_BLOBS or part >= MAX_PART_INDEX:
        raise SpillFailed("blob too large, or too many blobs in one association, for part nonces")
    return PART_SEQ_BASE | (ordinal << 20) | part


@dataclass
class SpillStats:
    """This router's spill counters (exported by relay_router.metrics); they only grow."""

    blobs_sent: int = 0  # data sets spilled (blob complete, reference sent)
    bytes_spilled: int = 0  # plaintext bytes of those blobs
    parts_sent: int = 0  # parts stored
    stored_bytes_sent: int = 0  # bytes uploaded (sealed, maybe compressed)
    blobs_received: int = 0  # blobs fetched, verified and delivered
    bytes_received: int = 0  # plaintext bytes delivered from blobs
    parts_received: int = 0  # parts fetched and verified
    stored_bytes_received: int = 0  # bytes downloaded
    fallbacks: int = 0  # data sets sent inline because the store could not be used
    send_failures: int = 0  # blobs abandoned after parts were stored (association aborted)
    receive_failures: int = 0  # blobs that could not be fetched or verified (association aborted)


@dataclass
class SpillState:
    """One router's spill state, shared by its associations: counters, and the pause after a store failure."""

    stats: SpillStats = field(default_factory=SpillStats)
    down_until: float = 0.0  # time.monotonic() before which no association starts a blob

    @property
    def paused(self) -> bool:
        return time.monotonic() < self.down_until

    def pause(self) -> None:
        self.down_until = time.monotonic() + BACKOFF_S


class BlobTransport(Protocol):
    """Moves blob parts: URLs from the bridge, bytes by HTTP or through the bridge. Raises SpillUnavailable."""

    async def slot(
        self, association_id: str, blob_id: str, part: int, *, download: bool, size: int = 0
    ) -> tuple[str, str]:
        """(blob id, URL) for one part; an empty ``blob_id`` asks the bridge for a new blob. ``size``:
        an upload's exact stored length, which the bridge binds the URL to and charges to the quota."""
        ...

    async def put(self, url: str, data: bytes) -> None: ...

    async def get(self, url: str) -> bytes:
        """The stored part; BlobGone if the store no longer has it."""
        ...

    async def release(self, association_id: str, blob_id: str) -> None:
        """Tell the bridge a delivered blob may be deleted (best effort)."""
        ...


class BlobLink(Protocol):
    """The bridge's blob RPCs, as relay_router.tunnel.BridgeLink offers them (gRPC errors or LinkDown)."""

    async def blob_slot(self, request: pb.BlobSlotRequest, *, timeout_s: float) -> pb.BlobSlotResponse: ...

    async def put_blob_part(self, part: pb.BlobPart, *, timeout_s: float) -> None: ...

    async def get_blob_part(self, part: pb.BlobPart, *, timeout_s: float) -> pb.BlobPart: ...

    async def release_blob(self, request: pb.BlobSlotRequest, *, timeout_s: float) -> None: ...


class BridgeBlobTransport:
    """The router's BlobTransport: URLs the bridge signs, bytes by HTTP or the bridge's blob RPCs.

    One per router. Every URL from the bridge is checked against this router's `UrlPolicy` before
    anything is sent (relay_router.egress): the bridge's own ``file+presigned`` capabilities go
    through its RPCs, http(s) URLs only under a configured endpoint, through the proxy unless
    no_proxy exempts the store. ``download_slots`` bounds the parts held in memory by all of the
    router's receiving associations together (a peer cannot make it hold more).
    """

    def __init__(
        self,
        link: BlobLink,
        *,
        policy: UrlPolicy | None = None,
        proxies: ProxySettings | None = None,
        max_downloads: int = MAX_DOWNLOADS,
    ) -> None:
        self.link = link
        # BridgeLink carries the router's configuration; test links without one get the strict default.
        self.policy = policy or getattr(link, "spill_policy", None) or UrlPolicy()
        self.proxies = proxies or getattr(link, "proxies", None) or ProxySettings.resolve("", None)
        # Kept-alive connections to the store, shared by all of the router's transfers (thread-safe).
        self.http = HttpClient(self.proxies)
        self.download_slots = asyncio.Semaphore(max_downloads)
        # `[dicom] spill = false`: the feature is neither offered nor accepted (relay_router.wire.features);
        # refusing upload slots here as well keeps this router from spilling whatever a peer answers.
        self.enabled: bool = getattr(link, "spill_enabled", True)

    async def slot(
        self, association_id: str, blob_id: str, part: int, *, download: bool, size: int = 0
    ) -> tuple[str, str]:
        if not self.enabled and not download:
            raise SpillUnavailable("spill is off on this router ([dicom] spill = false)")
        request = pb.BlobSlotRequest(
            association_id=association_id, blob_id=blob_id, part=part, download=download, size=size
        )
        try:
            answer = await self.link.blob_slot(request, timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc.code().name} {exc.details()}") from None
        except Exception as exc:  # LinkDown and the like
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc}") from None
        self._check(answer.url)  # before anything is sent to it
        return answer.blob_id, answer.url

    def _check(self, url: str) -> str:
        """The URL's kind ("presigned" or "http"); refused, before anything is sent to it, outside the policy."""
        try:
            return self.policy.check(url)
        except UrlRefused as exc:
            scheme = url.split(":", 1)[0].lower()
            if not self.policy.endpoints and scheme in ("http", "https"):
                # No endpoint configured (e.g. a configuration from before endpoints existed): the
                # store may be honest, but this router does not open it. The sender goes inline.
                raise SpillUnavailable(f"refused {exc.detail}") from None
            raise SpillFailed(f"SECURITY: refused {exc.detail}", security=True, remote_detail=URL_REFUSED) from None

    async def put(self, url: str, data: bytes) -> None:
        if self._check(url) == "http":
            await asyncio.to_thread(_http, self.http, "PUT", url, data)
            return
        try:
            await self.link.put_blob_part(pb.BlobPart(url=url, data=data), timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"storing a part failed: {exc.code().name} {exc.details()}") from None
        except Exception as exc:  # LinkDown: the bridge went away
            raise SpillUnavailable(f"storing a part failed: {exc}") from None

    async def get(self, url: str) -> bytes:
        if self._check(url) == "http":
            return await asyncio.to_thread(_http, self.http, "GET", url, None)
        try:
            answer = await self.link.get_blob_part(pb.BlobPart(url=url), timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND or "no such blob" in details:
                raise BlobGone(f"the bridge's store has no such part ({details})") from None
            raise SpillUnavailable(f"fetching a part failed: {exc.code().name} {details}") from None
        except Exception as exc:  # LinkDown: the bridge went away
            raise SpillUnavailable(f"fetching a part failed: {exc}") from None
        if len(answer.data) > MAX_STORED_PART:
            raise blob_alert(f"the bridge returned a part of {len(answer.data)} bytes (at most {MAX_STORED_PART})")
        return answer.data

    async def release(self, association_id: str, blob_id: str) -> None:
        with contextlib.suppress(Exception):  # the bridge deletes the rest at the end, the sweep after a TTL
            request = pb.BlobSlotRequest(association_id=association_id, blob_id=blob_id)
            await self.link.release_blob(request, timeout_s=HTTP_TIMEOUT_S)


def _http(client: HttpClient, method: str, url: str, data: bytes | None) -> bytes:
    """One bounded request (relay_router.egress): no redirects, at most MAX_STORED_PART bytes read."""
    try:
        return client.request(method, url, data, limit=MAX_STORED_PART, timeout_s=HTTP_TIMEOUT_S)
    except EgressError as exc:
        if method == "GET" and exc.status == 404:
            raise BlobGone(f"the store has no such part (HTTP 404 {exc.phrase})") from None
        raise SpillUnavailable(exc.detail) from None
