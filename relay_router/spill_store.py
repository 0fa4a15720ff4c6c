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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason, RelayError
from relay_router.wire.flags import PartFlag

BACKOFF_S = 60.0
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

    async def slot(self, association_id: str, blob_id: str, part: int, *, download: bool) -> tuple[str, str]:
        """(blob id, URL) for one part; an empty ``blob_id`` asks the bridge for a new blob."""
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
    """The router's BlobTransport: URLs the bridge signs, bytes by HTTP or the bridge's blob RPCs."""

    def __init__(self, link: BlobLink) -> None:
        self.link = link

    async def slot(self, association_id: str, blob_id: str, part: int, *, download: bool) -> tuple[str, str]:
        request = pb.BlobSlotRequest(association_id=association_id, blob_id=blob_id, part=part, download=download)
        try:
            answer = await self.link.blob_slot(request, timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc.code().name} {exc.details()}") from None
        except Exception as exc:  # noqa: BLE001 - LinkDown and the like
            raise SpillUnavailable(f"the bridge gave no blob URL: {exc}") from None
        return answer.blob_id, answer.url

    async def put(self, url: str, data: bytes) -> None:
        if url.startswith(("http://", "https://")):
            await asyncio.to_thread(_http, "PUT", url, data)
            return
        try:
            await self.link.put_blob_part(pb.BlobPart(url=url, data=data), timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SpillUnavailable(f"storing a part failed: {exc.code().name} {exc.details()}") from None
        except Exception as exc:  # noqa: BLE001 - LinkDown: the bridge went away
            raise SpillUnavailable(f"storing a part failed: {exc}") from None

    async def get(self, url: str) -> bytes:
        if url.startswith(("http://", "https://")):
            return await asyncio.to_thread(_http, "GET", url, None)
        try:
            answer = await self.link.get_blob_part(pb.BlobPart(url=url), timeout_s=HTTP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND or "no such blob" in details:
                raise BlobGone(f"the bridge's store has no such part ({details})") from None
            raise SpillUnavailable(f"fetching a part failed: {exc.code().name} {details}") from None
        except Exception as exc:  # noqa: BLE001 - LinkDown: the bridge went away
            raise SpillUnavailable(f"fetching a part failed: {exc}") from None
        return answer.data

    async def release(self, association_id: str, blob_id: str) -> None:
        with contextlib.suppress(Exception):  # the bridge deletes the rest at the end, the sweep after a TTL
            request = pb.BlobSlotRequest(association_id=association_id, blob_id=blob_id)
            await self.link.release_blob(request, timeout_s=HTTP_TIMEOUT_S)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, data: bytes | None) -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        if method == "GET" and exc.code == 404:
            raise BlobGone(f"the store has no such part (HTTP 404 {exc.reason})") from None
        raise SpillUnavailable(f"{method} of a blob part failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SpillUnavailable(f"{method} of a blob part failed: {exc}") from None
