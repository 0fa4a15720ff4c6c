"""The near router's side of accelerated transfers: the spool of one route shipped to the far router.

One `NearTransfer` per `[[remote]]` entry with `accelerate = true`. While its spool holds work (instances
due, instances forwarded whose outcome is awaited, capabilities to refresh) it keeps one relayed
association open to the far router: sealed and compressed frames through the bridge like any other
(relay_router.wire.codec), the feature `accel1`, and a record stream as payload
(relay_router.accel.records). Instances go out back to back in buckets of `[accelerate] bucket_bytes`,
with at most two buckets unacknowledged: no round trip per image. The far router acknowledges each
instance once it is durable in its own spool (STORED: FORWARDED here) and later reports the device's
answer (OUTCOME: removed here when delivered, DEAD when the device refused it), on this stream or a
later one. When the stream breaks (either router or the bridge restarts), what was in flight goes back
to RECEIVED and is sent again on the next stream: at least once; the far router may store a
duplicate, which is harmless (same SOP Instance UID).

Instances larger than `[dicom] spill_threshold_bytes` go through the bridge's blob store when both
routers agreed `spill/2` (cloud spill, docs/cloudstore.md): this router uploads the spooled file with
relay_router.spill's `BlobUpload` (parts compressed and sealed with this stream's key, exactly as a
transparent association's blobs) and sends a BLOB record naming the blob and its manifest instead of
CHUNKs. Blobs belong to the stream's association id, so the bridge deletes them when the stream ends:
an instance interrupted anywhere is uploaded again on the next stream. If the store cannot be used the
instance goes inline, and spill pauses for the router (SpillState, `BACKOFF_S`) as on transparent routes.

Streamed blobs: a far router that answers the HELLO with FEATURES {"blob_stream": true} is told of each
blob once its first part is stored (BLOB_OPEN), then of each further part (BLOB_PARTS), so it downloads
while this router uploads; the BLOB record closes the blob with its manifest. Without it a blob reached the
far router only once it was whole: its whole transfer time again at the end of a study of big instances
(4 radiographs of 19 MB at 24 Mbit/s: 14.9 s end to end against 12.0 s inline). Such blobs are cut into
`STREAM_PART_BYTES` parts, `STREAM_PARALLEL` in flight, so that the first is stored early. One upload runs
at a time (the link is saturated by one upload's parts); a streamed one hands its slot on once its BLOB_OPEN
is queued and its last part is in flight, so the next blob starts while its tail is stored (no idle link
between blobs) and BLOB_OPENs still go out in ordinal order. The far router fetches open blobs without
holding up its record reader. An upload that fails after its BLOB_OPEN ends the stream: everything in
flight is sent again on the next one (inline, since spill is then paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_common.audit import AuditLog
from relay_common.errors import Reason, RelayError
from relay_router.accel import records
from relay_router.accel.capabilities import CapabilityCache, DeviceCapabilities
from relay_router.accel.moves import move_fields, partner_originator
from relay_router.accel.spool import EntryState, Spool, SpoolEntry, SpoolError
from relay_router.accel.uploads import ConcurrentUploads
from relay_router.close_codes import close_frame, received_close, received_refusal
from relay_router.compress import FrameCompressor
from relay_router.config import RouterConfig
from relay_router.routing import Route
from relay_router.seal import AssociationContext, initiate
from relay_router.spill import BACKOFF_S, BlobTransport, BlobUpload, SpillFailed, SpillState, SpillUnavailable
from relay_router.tunnel import AssociationStream, BridgeLink, LinkDown
from relay_router.wire.codec import DataReceived, FrameCodec, FrameRejected, first_frame, handshake_message
from relay_router.wire.features import Features

log = logging.getLogger("relay_router.accel")
SEND_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError)
READ_BYTES = 256 * 1024
THREAD_MIN_BYTES = 64 * 1024  # frames from this size on are compressed and sealed in a worker thread
FLUSH_SOON_S = 0.01  # how long RecordChannel.flush_soon lets records gather before they go out
# Before a partial frame goes out, the send loop waits this long for more instances (a device sending a study
# commits one every few ms): small instances then share frames instead of one sealed frame each, which costs
# both routers CPU per frame. The first image of a study waits this long more.
LINGER_S = 0.01
IDLE_CLOSE_S = 30.0  # a stream with nothing to send or await is closed after this long
OUTCOME_POLL_S = 5.0  # with outcomes awaited and no stream: how soon to reconnect for them
# How often an idle transfer looks for `relay-router spool retry|purge` requests (a router with only near
# routes has no delivery pool, which otherwise carries them out).
REQUEST_POLL_S = 2.0
AUDIT_COUNTS = ("sent", "by_reference", "stored", "delivered", "dead", "refused")  # an accel_transfer event's
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
# Instances sent by reference whose STORED is awaited: the far router fetches a few at a time, and each
# blob counts against the association's quota in the store until the far router released it.
MAX_BLOBS_IN_FLIGHT = 4
# Uploads run beside the send loop (relay_router.accel.uploads), so small instances are not held behind a big
# one: at most this many at once, and this many more claimed instances waiting for a slot.
# One at a time: its `spill_parallel` (or STREAM_PARALLEL) parts in flight fill the uplink, and each blob's records
# then reach the far router in ordinal order, a streamed one never overlapping another's (see the docstring).
MAX_UPLOADS = 1
MAX_WAITING_UPLOADS = 4
# A streamed blob's parts: small enough that the first is stored (and the far router starts) early, few enough in
# flight that they are stored in order rather than all together near the end.
STREAM_PART_BYTES = 1024 * 1024
STREAM_PARALLEL = 4
# A new stream's first upload waits this long at most for the far router's first records (FEATURES comes first
# from a router that streams blobs; an older one sends none), so that a study's first blob is streamed too.
FEATURES_WAIT_S = 1.0


class TransferError(RelayError):
    """The accelerated transfer stream failed; what was in flight is sent again on the next one."""

    reason = Reason.LINK_LOST


def delivered(status: int) -> bool:
    """Whether a C-STORE status means the device stored the instance (PS3.4 B.2.3: success or warning)."""
    return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


class RecordChannel:
    """One accelerated association's frames: the record bytes of each direction through a FrameCodec."""

    def __init__(
        self,
        stream: AssociationStream,
        codec: FrameCodec,
        accept: tuple[records.RecordType, ...],
        *,
        frame_bytes: int,
        association_id: str = "",
    ) -> None:
        self.stream = stream
        self.codec = codec
        self.association_id = association_id  # the blobs of this stream are the bridge's keys under it
        self.blob_ordinal = 0  # blobs begun by this side: part nonces are unique per (ordinal, part)
        self.reader = records.RecordReader(accept)
        self.frame_bytes = frame_bytes
        self._pending = bytearray()
        self._send_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None  # flush_soon's
        self.bytes_sent = 0  # record bytes, before compression and sealing
        self.bytes_received = 0
        # Near side: the far router takes BLOB_OPEN/BLOB_PARTS (its FEATURES said so); their records, queued by the
        # uploads for the send loop as (entry id, opens, record); the entries whose BLOB_OPEN went out.
        self.blob_stream = False
        self.heard = asyncio.Event()  # the far router's first records arrived (FEATURES, if it sends it, among them)
        self.blob_notes: list[tuple[str, bool, bytes]] = []
        self.blobs_opened: set[str] = set()

    async def send(self, data: bytes, *, flush: bool = False, new_instance: bool = False) -> None:
        """Queue record bytes; full frames go out at once, the rest with `flush` (the end of a bucket).

        `new_instance`: `data` begins an instance; the compressor tries again from the next frame, whatever
        the previous instance was (an incompressible JPEG 2000 study must not make the next study's frames
        travel uncompressed)."""
        async with self._send_lock:
            if new_instance and self.codec.compressor is not None:
                self.codec.compressor.reset_give_up()
            self._pending += data
            while len(self._pending) >= self.frame_bytes or (flush and self._pending):
                payload = bytes(self._pending[: self.frame_bytes])
                del self._pending[: self.frame_bytes]
                # Compressing and sealing a frame (up to frame_bytes, milliseconds of CPU) runs in a worker
                # thread: zstd releases the GIL, so the event loop keeps answering the sending device's
                # C-STOREs meanwhile (the acceptor shares this loop). One frame at a time, under the send lock:
                # the codec's sequence numbers and compressor state are never touched by two threads at once.
                if len(payload) >= THREAD_MIN_BYTES:
                    frame = await asyncio.to_thread(self.codec.encode_data, payload)
                else:  # answers and a bucket's tail: cheaper here than a thread hand-off
                    frame = self.codec.encode_data(payload)
                try:
                    await self.stream.send(pb.Frame(data=frame))
                except SEND_ERRORS as exc:
                    raise TransferError(f"the link to the bridge broke while sending: {exc}") from exc
                self.bytes_sent += len(payload)

    def partial(self) -> bool:
        """Whether record bytes wait for a flush (less than a frame)."""
        return bool(self._pending)

    def flush_soon(self) -> None:
        """Flush within FLUSH_SOON_S: records queued by several tasks meanwhile (the far router's STORED and
        OUTCOME records, one per instance) share one frame instead of one sealed frame each."""
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(FLUSH_SOON_S)
        with contextlib.suppress(TransferError):  # the stream broke: its reader ends the session
            await self.send(b"", flush=True)

    async def confirmed(self) -> None:
        """Initiator: wait for the far router's Confirm (no frame may be sealed before its keys exist)."""
        while self.codec.awaiting_confirm:
            try:
                frame = await self.stream.receive()
            except grpc.aio.AioRpcError as exc:
                raise TransferError(f"the link to the bridge broke ({exc.code().name})") from exc
            if frame is None:
                raise TransferError("the far router ended the accelerated transfer before confirming it")
            kind = frame.WhichOneof("kind")
            if kind == "confirm":
                self.codec.confirm(frame.confirm)  # FrameRejected (security) if it does not verify
            elif kind == "refused":
                raise TransferError(received_refusal(frame.refused)[1], reason=Reason.SITE_OFFLINE)
            elif kind == "close":
                raise TransferError(f"closed before confirming: {received_close(frame.close)}")
            else:
                raise FrameRejected(f"SECURITY: {kind} frame before the Confirm", reason=Reason.SECURITY, security=True)

    async def receive(self) -> list[records.Record] | None:
        """The records of the next data frame; None when the other side closed."""
        while True:
            try:
                frame = await self.stream.receive()
            except grpc.aio.AioRpcError as exc:
                raise TransferError(f"the link to the bridge broke ({exc.code().name})") from exc
            if frame is None:
                return None
            kind = frame.WhichOneof("kind")
            if kind == "confirm" and self.codec.awaiting_confirm:
                self.codec.confirm(frame.confirm)  # FrameRejected (security) if it does not verify
                continue
            if kind == "close":
                log.info("accelerated transfer closed: %s", received_close(frame.close))
                return None
            if kind == "refused":
                raise TransferError(received_refusal(frame.refused)[1], reason=Reason.SITE_OFFLINE)
            if kind != "data":
                raise TransferError(f"unexpected {kind} frame in an accelerated transfer", reason=Reason.PROTOCOL)
            event = self.codec.decode(frame.data)
            if isinstance(event, DataReceived):
                self.bytes_received += len(event.payload)
                return self.reader.feed(event.payload)

    async def close(self, reason: Reason | None = None) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
        with contextlib.suppress(*SEND_ERRORS):
            end = pb.Close.PEER_CLOSED if reason is None else pb.Close.ABORTED
            await self.stream.send(close_frame(end, reason, ""))
        await self.stream.finish()


@dataclass
class InFlight:
    entry: SpoolEntry
    sent: int  # bytes of the instance sent inline (0 when it went by reference)
    by_reference: bool = False


class NearTransfer:
    """Ships the spool of one accelerated route (`route_name` in the spool) to the far router."""

    def __init__(
        self,
        config: RouterConfig,
        link: BridgeLink,
        spool: Spool,
        capabilities: CapabilityCache,
        *,
        local_ae: str,
        route: Route,
        audit: AuditLog | None = None,
        blobs: BlobTransport | None = None,
        spill: SpillState | None = None,
    ) -> None:
        self.config = config
        self.blobs = blobs  # the router's blob transport (cloud spill); None: every instance inline
        self.spill = spill or SpillState()
        self.audit = audit
        self.counts: Counter[str] = Counter()  # instances since the last audit: sent, stored, delivered, dead, ...
        self._batch_started = time.monotonic()
        self.link = link
        self.spool = spool
        self.capabilities = capabilities
        self.local_ae = local_ae
        self.route = route
        self.route_name = route_name(local_ae)
        self._wake = asyncio.Event()
        # Outcomes recorded here, to acknowledge to the far router. The sending task sends them between
        # instances (an instance's records go out back to back), so the receiving task never waits to send.
        self._acks: list[str] = []
        self.in_flight: dict[str, InFlight] = {}
        self._uploads: ConcurrentUploads | None = None  # the current stream's
        self.connected = False
        self.last_error = ""
        self.sessions = 0

    def wake(self) -> None:
        """Something changed (a commit, a retry): look at the spool now."""
        self._wake.set()

    def _awaiting(self) -> bool:
        return bool(self.spool.entries(state=EntryState.FORWARDED, route=self.route_name))

    def _has_work(self) -> bool:
        return (
            bool(self.spool.due(time.time(), route=self.route_name))
            or self._awaiting()
            or self.capabilities.stale(self.local_ae)
        )

    async def run(self) -> None:
        delay = RETRY_MIN_S
        while True:
            self._apply_requests()
            if not self._has_work():
                next_due = self.spool.next_due(route=self.route_name)
                wait = self.capabilities.refresh_s if next_due is None else max(0.05, next_due - time.time())
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(wait, self.capabilities.refresh_s, REQUEST_POLL_S))
                continue
            started = self._batch_started = time.monotonic()
            try:
                await self._session()
                self.last_error = ""
            except (TransferError, LinkDown, FrameRejected, records.RecordError) as exc:
                self.last_error = str(exc)
                level = logging.ERROR if getattr(exc, "security", False) else logging.WARNING
                log.log(level, "accelerated transfer to %s/%s: %s", self.route.site, self.route.ae_title, exc)
            except Exception as exc:  # whatever broke this stream, the spool is kept and the next one tries
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("accelerated transfer to %s/%s failed", self.route.site, self.route.ae_title)
            finally:
                self.connected = False
                self._requeue()
                self._audit(time.monotonic() - self._batch_started)
            if not self.last_error or time.monotonic() - started > 60:  # a clean end, or a stream that worked a
                delay = RETRY_MIN_S  # while: the next failure waits a second again, not what old failures built up
            if self.last_error:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, RETRY_MAX_S)
            elif self._awaiting() and not self.spool.due(time.time(), route=self.route_name):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), OUTCOME_POLL_S)

    def _apply_requests(self) -> None:
        """Dead letters replayed or purged by `relay-router spool` while this router runs."""
        try:
            applied = self.spool.apply_requests()
        except OSError as exc:
            log.warning("spool requests not read: %s", exc)
            return
        if applied:
            self._wake.set()

    def _audit(self, seconds: float) -> None:
        """An `accel_transfer` event each time what was sent has all its outcomes, and when a stream ends with
        instances counted (the local association was audited when the device sent; this says when its
        instances left for the far site and what became of them)."""
        if not any(self.counts.values()):
            return
        counts, self.counts = self.counts, Counter()
        self._batch_started = time.monotonic()
        if self.audit is None:
            return
        self.audit.event(
            "accel_transfer",
            "failure" if self.last_error else "success",
            site=self.route.site,
            called_ae=self.route.ae_title,
            local_ae=self.local_ae,
            detail=self.last_error,
            seconds=round(seconds, 3),
            **{name: counts.get(name, 0) for name in AUDIT_COUNTS},
        )

    def _requeue(self) -> None:
        """What was sent without a STORED answer goes back to RECEIVED (sent again on the next stream)."""
        for entry_id in list(self.in_flight):
            with contextlib.suppress(SpoolError):
                self.spool.set_state(entry_id, EntryState.RECEIVED, error="transfer interrupted")
        self.in_flight.clear()

    async def _open(self) -> RecordChannel:
        if not self.link.connected:
            raise LinkDown("not signed on to the bridge")
        try:
            peer = self.link.peers.identity(self.route.site)
        except Exception as exc:  # UnknownPeer, HandshakeError: no accelerated transfer without the pinned key
            raise TransferError(
                f"no usable identity for site {self.route.site}: {exc}", reason=Reason.SECURITY
            ) from exc
        aid = uuid.uuid4().hex  # as for every association (the bridge and the replay record expect UUID4s)
        context = AssociationContext(aid, self.link.site, self.route.site, self.route.ae_title)
        dicom = self.config.dicom
        spill = dicom.spill and bool(dicom.spill_threshold_bytes) and self.blobs is not None
        offered = Features(compress=dicom.compression, shuffle=dicom.compression, spill=spill, accel=True)
        handshake, sealer = initiate(self.link.identity, peer, context, offered.names())
        hello = records.hello(
            capabilities=self.capabilities.stale(self.local_ae), title=self.local_ae, blob_stream=spill
        )
        opening = pb.Open(
            association_id=aid,
            to_site=self.route.site,
            called_ae_title=self.route.ae_title,
            calling_ae_title=self.local_ae,
            first_data=first_frame(sealer, hello),
            handshake=handshake_message(handshake),
            features=offered.names(),
        )
        stream, answer = await self.link.open(opening)
        if answer.HasField("refused"):
            stream.cancel()
            raise TransferError(received_refusal(answer.refused)[1], reason=Reason.SITE_OFFLINE)
        codec = FrameCodec(
            sealer,
            initiator=True,
            features=offered,
            compression_level=dicom.compression_level if dicom.compression else None,
            accept_blobs=False,
            confirm_from=(peer, self.route.site),
        )
        return RecordChannel(stream, codec, records.FAR_TO_NEAR, frame_bytes=dicom.frame_bytes, association_id=aid)

    async def _session(self) -> None:
        channel = await self._open()
        try:
            await asyncio.wait_for(channel.confirmed(), self.config.bridge.open_timeout_s)
        except TimeoutError:
            channel.stream.cancel()
            raise TransferError("the far router did not confirm the accelerated transfer in time") from None
        self.connected, self.last_error = True, ""
        self.sessions += 1
        log.info("accelerated transfer to %s/%s open", self.route.site, self.route.ae_title)
        done = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                receiving = group.create_task(self._receive(channel, done))
                group.create_task(self._send(channel, done, receiving))
        except* (TransferError, FrameRejected, records.RecordError) as failures:
            raise failures.exceptions[0] from None

    def _window_open(self, uploads: ConcurrentUploads) -> bool:
        """Whether to claim another instance: inline bytes unacknowledged below two buckets, and room to queue
        an upload (blobs are bounded by `_blob_room`, and wait in `uploads` without holding up inline ones)."""
        return (
            sum(f.sent for f in self.in_flight.values()) < 2 * self.config.accelerate.bucket_bytes and not uploads.full
        )

    def _blob_room(self, uploads: ConcurrentUploads) -> bool:
        """Whether another blob may be begun: blobs uploading or awaiting their STORED below the stream's quota."""
        begun = sum(f.by_reference for f in self.in_flight.values()) - uploads.queued
        return begun < MAX_BLOBS_IN_FLIGHT

    async def _send(self, channel: RecordChannel, done: asyncio.Event, receiving: asyncio.Task[None]) -> None:
        uploads = ConcurrentUploads(
            lambda header: self._upload(channel, header),
            limit=MAX_UPLOADS,
            waiting=MAX_WAITING_UPLOADS,
            on_done=self.wake,
            room=lambda: self._blob_room(uploads),
        )
        self._uploads = uploads
        try:
            await self._send_loop(channel, done, uploads)
        finally:
            await uploads.close()  # whatever is still uploading is sent again on the next stream
        await channel.close()
        done.set()
        receiving.cancel()

    async def _send_loop(self, channel: RecordChannel, done: asyncio.Event, uploads: ConcurrentUploads) -> None:
        bucket = self.config.accelerate.bucket_bytes
        idle_since = time.monotonic()
        lingered = False
        while not done.is_set():
            await self._send_acks(channel, flush=True)
            filled = await self._collect_uploads(channel, uploads)
            while filled < bucket and self._window_open(uploads):
                entry = self.spool.claim(self.route_name, time.time())
                if entry is None:
                    break
                filled += await self._send_instance(channel, entry, uploads)
                filled += await self._collect_uploads(channel, uploads)
            if filled:
                if not lingered and filled < bucket and channel.partial():  # more may come within LINGER_S
                    lingered = True
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), LINGER_S)
                    continue
                await channel.send(b"", flush=True)  # the end of a bucket: nothing waits in a partial frame
                lingered = False
                idle_since = time.monotonic()
                continue
            if lingered:  # lingered and nothing more came: what waits in the partial frame goes now
                await channel.send(b"", flush=True)
                lingered = False
            if self.in_flight or self._awaiting():
                idle_since = time.monotonic()
            else:
                self._audit(time.monotonic() - self._batch_started)  # everything handed over has its outcome
                if time.monotonic() - idle_since > IDLE_CLOSE_S:  # kept a while: the next study needs no handshake
                    break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._apply_requests()
            uploads.kick()  # a STORED may have freed a blob slot

    async def _collect_uploads(self, channel: RecordChannel, uploads: ConcurrentUploads) -> int:
        """Announce the blobs uploaded since the last call; send inline what could not be uploaded. Runs
        between instances, so these records never interleave with another instance's. Returns inline bytes."""
        sent = 0
        for done in uploads.finished():
            entry_id = done.entry.id
            opened = entry_id in channel.blobs_opened
            channel.blobs_opened.discard(entry_id)
            channel.blob_notes = [note for note in channel.blob_notes if note[0] != entry_id]  # the BLOB says all
            if done.reference is None and opened:  # the far router is fetching it: it cannot go inline now
                raise TransferError(f"the upload of {done.header.sop_instance} failed after the far router began it")
            if entry_id not in self.in_flight:  # answered meanwhile (refused, or a hostile far router)
                if done.reference is not None and self.blobs is not None:
                    await self.blobs.release(channel.association_id, done.reference.blob_id)
                    if opened:  # the far router forgets the open blob with its manifest
                        await channel.send(records.blob(done.reference), flush=True)
                continue
            if done.reference is None:
                sent += await self._send_inline(channel, done.entry, done.header)
                continue
            self.counts["sent"] += 1
            self.counts["by_reference"] += 1
            await self._send_acks(channel, flush=False)
            await channel.send(records.blob(done.reference), flush=True)  # the far router starts fetching at once
        if channel.blob_notes:  # BLOB_OPEN and BLOB_PARTS of the upload running now
            notes, channel.blob_notes = channel.blob_notes, []
            for entry_id, opens, note in notes:
                if opens:
                    channel.blobs_opened.add(entry_id)
                await channel.send(note)
            await channel.send(b"", flush=True)
        return sent

    async def _send_instance(self, channel: RecordChannel, entry: SpoolEntry, uploads: ConcurrentUploads) -> int:
        # A small instance just committed is still held in memory (its journal record makes it durable): sent
        # from there, its own files are never written if its outcome comes back soon (relay_router.accel.spool).
        held = self.spool.held(entry.id)
        path = self.spool.path(entry.id) if held is None else None
        try:
            size = len(held) if held is not None else path.stat().st_size  # type: ignore[union-attr]
        except OSError as exc:
            self.spool.fail(entry.id, f"spool file unreadable: {exc}", permanent=True)
            return 0
        # A C-MOVE sub-operation names its move in the far router's titles (relay_router.accel.moves).
        originator, message_id = move_fields(entry.meta)
        if originator is not None:
            originator = partner_originator(self.config, self.route.site, originator)
        header = records.InstanceHeader(
            entry.id, entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax, size, originator, message_id
        )
        if self._spills(channel, size):  # uploaded beside this loop; its BLOB record follows when it is stored
            self.in_flight[entry.id] = InFlight(entry, 0, by_reference=True)
            uploads.submit(entry, header)
            return 0
        return await self._send_inline(channel, entry, header)

    async def _send_inline(self, channel: RecordChannel, entry: SpoolEntry, header: records.InstanceHeader) -> int:
        """The instance's INSTANCE record and its CHUNKs, back to back on the stream."""
        size = header.length
        self.in_flight[entry.id] = InFlight(entry, size)
        self.counts["sent"] += 1
        held = self.spool.held(entry.id)  # (an upload that fell back has written the entry's files by now)
        path = self.spool.path(entry.id) if held is None else None
        await channel.send(records.instance(header), new_instance=True)
        if held is not None:
            await channel.send(records.chunks(bytes(held)))  # cut at MAX_CHUNK; full frames go out as they fill
            await self._send_acks(channel, flush=False)
            return size
        assert path is not None
        with path.open("rb") as source:
            while chunk := await asyncio.to_thread(source.read, READ_BYTES):
                await channel.send(records.chunks(chunk))
                if len(chunk) < READ_BYTES:  # a short read of a regular file is its end: no hand-off for b""
                    break
        await self._send_acks(channel, flush=False)
        return size

    def _spills(self, channel: RecordChannel, size: int) -> bool:
        """Whether an instance of `size` bytes goes through the blob store (both routers agreed spill)."""
        threshold = self.config.dicom.spill_threshold_bytes
        return (
            self.blobs is not None and channel.codec.features.spill and 0 < threshold < size and not self.spill.paused
        )

    async def _upload(self, channel: RecordChannel, header: records.InstanceHeader) -> records.BlobHeader | None:
        """Upload the spooled instance as one blob (relay_router.spill.BlobUpload); None: send it inline."""
        assert self.blobs is not None
        if self.spill.paused:  # another upload failed while this one waited for a slot: inline, without trying
            return None
        dicom = self.config.dicom
        level = dicom.compression_level if channel.codec.compressor is not None else None
        if not channel.heard.is_set():  # a new stream: whether the far router streams blobs is not known yet
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.heard.wait(), FEATURES_WAIT_S)
        streamed = channel.blob_stream  # the far router follows the upload (BLOB_OPEN, BLOB_PARTS)
        opened = added_all = False
        task, uploads = asyncio.current_task(), self._uploads

        def hand_on() -> None:  # the next upload may start: this one's BLOB_OPEN is queued, its last part in flight
            if streamed and opened and added_all and uploads is not None:
                uploads.release(task)

        def all_added() -> None:
            nonlocal added_all
            added_all = True
            hand_on()

        async def stored() -> None:  # more parts are stored, in order: tell the far router (via the send loop)
            nonlocal opened
            if not opened:
                opened = True
                note = records.blob_open(records.BlobOpen(header, upload.blob_id, upload.ordinal))
                channel.blob_notes.append((header.id, True, note))
                hand_on()
            elif channel.blob_notes and channel.blob_notes[-1][0] == header.id and not channel.blob_notes[-1][1]:
                channel.blob_notes.pop()  # not sent yet: the higher count replaces it
            channel.blob_notes.append(
                (header.id, False, records.blob_parts(upload.ordinal, upload.blob_id, upload.announced))
            )
            self.wake()

        upload = BlobUpload(
            self.blobs,
            channel.association_id,
            channel.codec.sealer,
            ordinal=channel.blob_ordinal,
            parallel=min(dicom.spill_parallel, STREAM_PARALLEL) if streamed else dicom.spill_parallel,
            stats=self.spill.stats,
            compressor=FrameCompressor(level, shuffle=channel.codec.features.shuffle) if level else None,
            on_stored=stored if streamed else None,
        )
        channel.blob_ordinal += 1  # used whatever happens next: no part nonce is ever sealed twice
        part_bytes = min(dicom.spill_part_bytes, STREAM_PART_BYTES) if streamed else dicom.spill_part_bytes
        try:
            return await self._store(upload, header, part_bytes, all_added)
        except (SpillUnavailable, SpillFailed, OSError) as exc:
            await upload.cancel()
            if upload.blob_id:  # the bridge deletes it with the stream anyway; free the quota now
                await self.blobs.release(channel.association_id, upload.blob_id)
            self.spill.stats.fallbacks += 1  # even after parts were stored: the instance goes inline, whole
            self._fell_back(header, exc)
            return None
        finally:
            upload.abandon()  # cancelled (the stream ended): no upload outlives it

    async def _store(
        self, upload: BlobUpload, header: records.InstanceHeader, part_bytes: int, all_added: Callable[[], None]
    ) -> records.BlobHeader:
        """Read the spooled file in parts of `part_bytes` into the upload; the reference once all are stored."""
        with self.spool.path(header.id).open("rb") as source:
            left = header.length
            while left > 0:
                part = await asyncio.to_thread(source.read, min(part_bytes, left))
                if not part:
                    raise SpillUnavailable(f"spool file of {header.sop_instance} shorter than {header.length}")
                left -= len(part)
                await upload.harvest()
                await upload.add(part, last=left == 0)
        all_added()
        await upload.wait_all()
        self.spill.stats.blobs_sent += 1
        self.spill.stats.bytes_spilled += upload.plain_len
        log.info(
            "%s: %d bytes in %d parts to blob %s",
            header.sop_instance,
            upload.plain_len,
            upload.parts,
            upload.blob_id,
            extra={"assoc": upload.association_id},
        )
        return records.BlobHeader(header, upload.blob_id, upload.ordinal, upload.parts, upload.digest())

    def _fell_back(self, header: records.InstanceHeader, exc: Exception) -> None:
        """The store could not take the instance: it goes inline, and spill pauses for the whole router."""
        # Uploads run side by side (relay_router.accel.uploads): the first failure pauses spill and says so;
        # one that was running beside it and fails the same way is the same outage (INFO), unless a security one.
        already = self.spill.paused
        self.spill.pause()
        security = getattr(exc, "security", False)
        if already and not security:
            log.info("blob store still unavailable, sending %s inline too: %s", header.sop_instance, exc)
        else:
            log.log(
                logging.ERROR if security else logging.WARNING,
                "blob store unavailable, sending %s (%d bytes) inline (spill paused for %g s): %s",
                header.sop_instance,
                header.length,
                BACKOFF_S,
                exc,
            )
        if security and self.audit is not None:  # e.g. the bridge handed out a URL outside spill_endpoints
            self.audit.event(
                "accel_transfer",
                "alert",
                site=self.route.site,
                called_ae=self.route.ae_title,
                local_ae=self.local_ae,
                detail=str(exc),
            )

    async def _send_acks(self, channel: RecordChannel, *, flush: bool) -> None:
        while self._acks:
            ids, self._acks = self._acks[: records.MAX_ACK_IDS], self._acks[records.MAX_ACK_IDS :]
            await channel.send(records.ack(ids), flush=flush)

    async def _receive(self, channel: RecordChannel, done: asyncio.Event) -> None:
        while True:
            received = await channel.receive()
            if received is None:
                if not done.is_set():
                    raise TransferError("the far router ended the accelerated transfer")
                return
            channel.heard.set()
            for record in received:
                if isinstance(record, records.Features):
                    channel.blob_stream = record.blob_stream
                    continue
                self._apply(record, self._acks)
            self.wake()

    def _apply(self, record: records.Record, acks: list[str]) -> None:
        if isinstance(record, records.Capabilities):
            self.capabilities.put(self.local_ae, DeviceCapabilities(dict(record.contexts), time.time()))
            log.info("%s/%s accepts %d SOP classes", self.route.site, self.route.ae_title, len(record.contexts))
            return
        if not isinstance(record, records.Stored | records.Refused | records.Outcome):
            return
        entry = self._entry(record.id, record.sop_instance)
        if isinstance(record, records.Outcome):
            acks.append(record.id)
        if entry is None:
            return
        if isinstance(record, records.Stored):
            self.in_flight.pop(record.id, None)
            if entry.state is EntryState.SENDING:
                self.spool.set_state(record.id, EntryState.FORWARDED)
                self.counts["stored"] += 1
        elif isinstance(record, records.Refused):
            self.in_flight.pop(record.id, None)
            error = f"refused by {self.route.site} with 0x{record.status:04X}: {record.error}"
            self.spool.fail(record.id, error, permanent=record.permanent)
            self.counts["refused"] += 1
        elif delivered(record.status):
            self.in_flight.pop(record.id, None)
            self.spool.set_state(record.id, EntryState.DELIVERED)
            self.spool.remove(record.id)
            self.counts["delivered"] += 1
        else:
            self.in_flight.pop(record.id, None)
            error = f"{self.route.ae_title} answered 0x{record.status:04X}: {record.error}"
            log.warning("instance %s is dead: %s", record.sop_instance, error)
            self.spool.fail(record.id, error, permanent=True)
            self.counts["dead"] += 1

    def _entry(self, entry_id: str, sop_instance: str) -> SpoolEntry | None:
        """The entry a far router's record names, if it is ours (a hostile one may name anything)."""
        try:
            entry = self.spool.get(entry_id)
        except SpoolError:
            return None  # delivered and removed before (a repeated outcome), or never ours
        if entry.route != self.route_name or entry.sop_instance_uid != sop_instance:
            log.warning("the far router %s named spool entry %s wrongly; ignored", self.route.site, entry_id)
            return None
        return entry


def route_name(local_ae: str) -> str:
    """The spool's route name of a `[[remote]]` entry's accelerated transfers: its local AE title (unique among
    this router's [[remote]] and [[shared]] titles, so it names the route in `relay-router spool list --route`)."""
    return local_ae


WakeFn = Callable[[], None]
