"""The far router's side of an accelerated transfer: instances into its spool, outcomes back.

`inbound.py` hands over an association whose Open carried `accel1` for a `[[shared]]` device with
`accelerate = true`, once the handshake verified. `FarSession` answers the HELLO (the device's
capabilities, learned by `capabilities.probe` and narrowed to what the calling site was granted),
writes each INSTANCE into the spool as a whole Part 10 file (the spool checks that its file meta
names the declared UIDs), answers STORED once it is committed (fsync), REFUSED when it cannot take it
(0xA700 spool full: the near router retries later; 0x0122 a SOP class not granted or not accepted:
permanent), and passes on every final delivery outcome. Outcomes are kept in an `OutcomeBook`
(relay_router.accel.outcome_book, an owner-only append-only file) until the near router acknowledges
them, so one that happens while no stream is open is sent on the next one.

A BLOB record (an instance the near router put in the blob store, docs/cloudstore.md) is fetched
with relay_router.spill_receive's `IncomingBlob` (parts checked and opened with this stream's key, the
manifest's digest and length verified) into a spool writer while later records keep arriving, at most
`MAX_BLOB_FETCHES` at a time; STORED follows the commit as for inline instances. A blob that cannot be
fetched or fails verification is REFUSED as a transient failure (0x0110): the near router uploads it
again later and parks it in its dead-letter state after `[accelerate] max_attempts`. A security failure
(a URL outside `spill_endpoints`, a part that fails authentication, a blob longer than announced) also
writes an `accel_transfer` audit alert, the event router A writes when its upload URL is refused.
A near router that asked in its HELLO (and this router answered FEATURES) announces a blob as soon as its
first part is stored (BLOB_OPEN, then BLOB_PARTS as more are): the fetch starts then and follows the
upload, and the BLOB record that closes it brings the manifest (checked as above). Such a fetch waits for
its slot in its own task, not in the record reader: the BLOB_PARTS and BLOB records of the fetches holding
the slots must still be read (at most MAX_OPEN_BLOBS blobs may be open at once).

For a device with `patient_identity` as well, each instance's patient identity is coerced into this
site's domain on its way into the spool (relay_router.identity.instances): the same decision, audit and
metrics as the transparent route's identity filter. An instance that cannot be coerced safely is
refused permanently (0xC000, dead-lettered at the near router with the reason), never stored unrelabelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from relay_common.audit import AuditLog
from relay_router import services
from relay_router.accel import records
from relay_router.accel.capabilities import CapabilityCache, DeviceCapabilities, probe
from relay_router.accel.moves import MoveKey, MoveRegistry, PartnerSenders
from relay_router.accel.outcome_book import OutcomeBook
from relay_router.accel.spool import Spool, SpoolEntry, SpoolError, SpoolFull, SpoolWriter
from relay_router.accel.transfer import RecordChannel, TransferError
from relay_router.config import SharedDevice
from relay_router.dimse import Status
from relay_router.identity.instances import InstanceCoercion
from relay_router.identity.stream import HeadError
from relay_router.identity.wiring import IdentityRoute
from relay_router.spill_receive import IncomingBlob, SpillReceiver
from relay_router.spill_store import BlobTransport, SpillFailed, SpillStats, blob_alert

log = logging.getLogger("relay_router.accel")
# A near router may ask for fresh capabilities on every stream; the device is probed at most this often.
MIN_PROBE_INTERVAL_S = 60.0
# Commits (fsync) running at once: the next instance is received while earlier ones reach the disk, and
# the file system commits concurrent syncs together. Each holds one instance: up to the journal's record
# limit (2 MiB) in memory, a larger one as its own open file (relay_router.accel.spool_writer).
PARALLEL_COMMITS = 8
# Blobs fetched at once per session; the next BLOB record waits (and so does the stream: backpressure).
MAX_BLOB_FETCHES = 2
# Blobs announced by BLOB_OPEN and not yet closed by their BLOB record; a near router keeps one open at a time.
MAX_OPEN_BLOBS = 8
PROCESSING_FAILURE = 0x0110  # PS3.7 C: what a blob that could not be fetched or verified is refused with


class _OpenBlob:
    """A blob announced by BLOB_OPEN: its fetch (None if the instance was refused) until its BLOB record."""

    def __init__(self, header: records.BlobOpen, blob: IncomingBlob | None) -> None:
        self.header = header
        self.blob = blob


def _not_coerced(exc: HeadError) -> tuple[int, bool, str]:
    """The refusal of an instance whose patient identity cannot be coerced: permanent (it never will be)."""
    return Status.CANNOT_UNDERSTAND, True, f"patient identity not coerced: {exc}"


def _claimable() -> None:
    """SpoolWriter.commit's `visible` callback: the session wakes the delivery pool itself (on_commit)."""


def far_route_name(device: SharedDevice) -> str:
    """The spool's route name for instances on their way into one of our [[shared]] devices: its AE title."""
    return device.ae_title


class FarSession:
    """One accelerated transfer from `from_site` into `device`."""

    def __init__(
        self,
        channel: RecordChannel,
        *,
        from_site: str,
        device: SharedDevice,
        our_ae: str,
        spool: Spool,
        capabilities: CapabilityCache,
        book: OutcomeBook,
        on_commit: object,
        moves: MoveRegistry | None = None,
        partners: PartnerSenders | None = None,
        blobs: BlobTransport | None = None,
        spill_parallel: int = 4,
        spill_stats: SpillStats | None = None,
        audit: AuditLog | None = None,
        identity: IdentityRoute | None = None,
    ) -> None:
        self.channel = channel
        self.audit = audit
        self.identity = identity  # the device's patient identity route: instances coerced before the spool
        self._coercion: InstanceCoercion | None = None  # of the inline instance being received
        # Instances by reference: only when this router agreed `spill/2` (the Confirm said so) and has a link.
        self._blobs = (
            SpillReceiver(
                blobs, channel.association_id, channel.codec.sealer, parallel=spill_parallel, stats=spill_stats
            )
            if blobs is not None and channel.codec.features.spill
            else None
        )
        self._next_ordinal = 0  # blob ordinals only grow: a part sealed for one blob never opens as another's
        self._open_blobs: dict[int, _OpenBlob] = {}  # by ordinal: announced (BLOB_OPEN), manifest not yet here
        self._fetches: set[asyncio.Task[None]] = set()
        self._fetch_slots = asyncio.Semaphore(MAX_BLOB_FETCHES)
        self.from_site = from_site
        self.device = device
        self.our_ae = our_ae
        self.spool = spool
        self.capabilities = capabilities
        self.book = book
        self._on_commit = on_commit
        self.moves = moves  # C-MOVE sub-operations are counted for the move they belong to
        self.partners = partners  # near routers whose sub-operations name their move (they may be held)
        self.granted = device.services_for(from_site)
        self._writer: SpoolWriter | None = None
        self._header: records.InstanceHeader | None = None
        self._refusal: tuple[int, bool, str] | None = None
        self.stored = 0
        self.stopping = False
        self._task: asyncio.Task[object] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._commit_slots = asyncio.Semaphore(PARALLEL_COMMITS)

    def stop(self) -> None:
        """End the session now (router shutdown): committed instances stay, the rest is sent again later."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()

    async def run(self, hello_bytes: bytes) -> None:
        self._task = asyncio.current_task()
        first = self.channel.reader.feed(hello_bytes)
        hello = first[0] if len(first) == 1 else None
        if not isinstance(hello, records.Hello):
            raise records.RecordError("the first record of an accelerated transfer is not HELLO")
        if hello.moves and self.partners is not None:  # from now on C-MOVEs to this device may be held
            self.partners.add(self.from_site, self.device.ae_title, hello.title)
        known = self.capabilities.get(self.device.ae_title)
        refresh: asyncio.Task[None] | None = None
        if self._probe_due(asked=hello.capabilities):
            if known is None:  # nothing to offer until the device has answered once
                known = await self._probe()
            else:  # offer what is known now; the fresh answer follows on this stream
                refresh = asyncio.create_task(self._refresh())
        if hello.blob_stream:  # a near router that does not ask would not understand the answer
            await self.channel.send(records.features(blob_stream=self._blobs is not None))
        if known is not None:
            await self.channel.send(records.capabilities(known.narrowed(self.granted).contexts))
        for outcome in self.book.pending(self.from_site):
            await self.channel.send(outcome)
        await self.channel.send(b"", flush=True)
        try:
            while (received := await self.channel.receive()) is not None:
                for record in received:
                    await self._apply(record)
                await self.channel.send(b"", flush=True)
        finally:
            if refresh is not None:
                refresh.cancel()
            if self._writer is not None:
                self._writer.abort()  # never acknowledged: the near router sends it again
            for fetch in self._fetches:
                fetch.cancel()  # its writer is aborted; the near router uploads it again on its next stream
            await asyncio.gather(*self._fetches, return_exceptions=True)
            await asyncio.gather(*self._commits, return_exceptions=True)  # committed ones stay: delivered

    async def report(self, entry: SpoolEntry, status: int, error: str) -> None:
        """A final outcome of an instance this site sent (called for live sessions; the book has it already)."""
        origin = entry.meta.get("origin_id", "")
        with contextlib.suppress(TransferError):
            await self.channel.send(records.outcome(origin, entry.sop_instance_uid, status, error))
            self.channel.flush_soon()  # outcomes of parallel deliveries share a frame

    def _probe_due(self, *, asked: bool) -> bool:
        """Stale, or the near router asked (at most once a MIN_PROBE_INTERVAL_S: it may ask on every stream)."""
        name = self.device.ae_title
        known = self.capabilities.get(name)
        recent = known is not None and time.time() - known.learned <= MIN_PROBE_INTERVAL_S
        return self.capabilities.stale(name) or (asked and not recent)

    async def _probe(self) -> DeviceCapabilities | None:
        name = self.device.ae_title
        try:
            learned = await asyncio.to_thread(
                probe, self.device.ae_title, self.device.host, self.device.port, calling_ae=self.our_ae
            )
        except OSError as exc:
            log.warning("cannot learn what %s accepts: %s (keeping what was known)", name, exc)
        else:
            self.capabilities.put(name, learned)
            log.info("%s accepts %d SOP classes (capability probe)", name, len(learned.contexts))
        return self.capabilities.get(name)

    async def _refresh(self) -> None:
        learned = await self._probe()
        if learned is not None:
            with contextlib.suppress(TransferError):
                await self.channel.send(records.capabilities(learned.narrowed(self.granted).contexts), flush=True)

    async def _apply(self, record: records.Record) -> None:
        if isinstance(record, records.Ack):
            self.book.forget(self.from_site, record.ids)
        elif isinstance(record, records.InstanceHeader):
            self._begin(record)
        elif isinstance(record, records.BlobHeader):
            if record.ordinal in self._open_blobs:
                self._close_blob(record)
            else:
                await self._begin_blob(record)
        elif isinstance(record, records.BlobOpen):
            await self._begin_blob(record)
        elif isinstance(record, records.BlobParts):
            self._blob_parts(record)
        elif isinstance(record, records.Chunk):
            if self._coercion is None:
                self._write(record.data)
            else:
                await self._write_coerced(record.data, last=record.last)
            if record.last:
                await self._complete()
        elif isinstance(record, records.Hello):
            raise records.RecordError("a second HELLO record")

    def _begin(self, header: records.InstanceHeader) -> None:
        self._header = header
        self._writer, self._refusal = self._admit(header)
        self._coercion = self._coercer(header) if self._writer is not None else None

    def _coercer(self, header: records.InstanceHeader) -> InstanceCoercion | None:
        if self.identity is None:
            return None
        return InstanceCoercion(
            self.identity,
            header.transfer_syntax,
            sop_instance_uid=header.sop_instance,
            association_id=self.channel.association_id,
        )

    async def _write_coerced(self, data: bytes, *, last: bool) -> None:
        """An inline instance's bytes through its identity coercion; refused if it cannot be coerced."""
        coercion = self._coercion
        if coercion is None or self._writer is None:
            return
        try:
            out = await coercion.feed(data)
            if last:
                out += await coercion.end()
        except HeadError as exc:
            self._writer.abort()
            self._writer, self._coercion = None, None
            self._refusal = _not_coerced(exc)
            return
        self._write(out)

    def _admit(self, header: records.InstanceHeader) -> tuple[SpoolWriter | None, tuple[int, bool, str] | None]:
        """A spool writer for the instance, or why it is refused."""
        known = self.capabilities.get(self.device.ae_title)
        if not services.granted(header.sop_class, self.granted):
            return None, (Status.SOP_CLASS_NOT_SUPPORTED, True, f"{header.sop_class} is not granted")
        if known is not None and known.choose(header.sop_class, (header.transfer_syntax,)) is None:
            detail = f"{self.device.ae_title} does not accept {header.sop_class} in {header.transfer_syntax}"
            return None, (Status.SOP_CLASS_NOT_SUPPORTED, True, detail)
        meta = {"origin_site": self.from_site, "origin_id": header.id}
        move = self._move(header)
        if move is not None:  # delivered with the Move Originator pair, counted for the held final response
            meta["move_originator_ae"], meta["move_originator_id"] = move.originator, str(move.message_id)
            if self.moves is not None:
                self.moves.arrived(move, header.sop_instance, self.device.ae_title)
        try:
            writer = self.spool.writer(
                far_route_name(self.device),
                sop_class_uid=header.sop_class,
                sop_instance_uid=header.sop_instance,
                transfer_syntax=header.transfer_syntax,
                meta=meta,
                part10=True,
            )
        except SpoolError as exc:
            return None, (Status.CANNOT_UNDERSTAND, True, str(exc))
        return writer, None

    async def _begin_blob(self, header: records.BlobHeader | records.BlobOpen) -> None:
        """An instance by reference: fetched by a task of its own (at most MAX_BLOB_FETCHES), then committed.
        A BLOB record brings the whole manifest; a BLOB_OPEN one only the blob, its parts and manifest follow."""
        instance = header.instance
        opening = isinstance(header, records.BlobOpen)
        if self._blobs is None:  # not agreed: a broken peer; refused (retried, then dead) rather than looping
            await self._refuse(instance, (PROCESSING_FAILURE, False, "this transfer did not agree to spill"))
            return
        if header.ordinal < self._next_ordinal:  # the record is sealed, so only a broken or hostile peer
            raise records.RecordError(f"SECURITY: blob {header.blob_id} reuses ordinal {header.ordinal}", security=True)
        if opening and len(self._open_blobs) >= MAX_OPEN_BLOBS:
            raise records.RecordError(f"more than {MAX_OPEN_BLOBS} blobs announced without their manifest")
        self._next_ordinal = header.ordinal + 1
        writer, refusal = self._admit(instance)
        if writer is None:
            if isinstance(header, records.BlobOpen):  # its parts and manifest still come: ignored
                self._open_blobs[header.ordinal] = _OpenBlob(header, None)
            await self._refuse(instance, refusal)
            return
        blob = IncomingBlob(self._blobs, header.blob_id, header.ordinal)
        if isinstance(header, records.BlobOpen):
            self._open_blobs[header.ordinal] = _OpenBlob(header, blob)
            task = asyncio.create_task(self._fetch(instance, blob, writer, wait_for_slot=True))
        else:
            blob.finish(header.parts, instance.length, header.digest)
            await self._fetch_slots.acquire()  # the next BLOB record waits, and the stream with it: backpressure
            task = asyncio.create_task(self._fetch(instance, blob, writer))
        self._fetches.add(task)
        task.add_done_callback(self._fetched)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        self._fetches.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so instead of losing it
            log.error("fetching a blob from %s failed", self.from_site, exc_info=task.exception())

    def _open_blob(self, ordinal: int, blob_id: str, what: str) -> _OpenBlob:
        opened = self._open_blobs.get(ordinal)
        if opened is None or opened.header.blob_id != blob_id:
            raise records.RecordError(
                f"SECURITY: {what} for blob {blob_id} (ordinal {ordinal}), not open", security=True
            )
        return opened

    def _blob_parts(self, record: records.BlobParts) -> None:
        """More parts of an open blob are stored: its fetch may go on."""
        opened = self._open_blob(record.ordinal, record.blob_id, "BLOB_PARTS")
        if record.parts > records.max_parts(opened.header.instance.length):
            raise records.RecordError(f"BLOB_PARTS: {record.parts} parts for {opened.header.instance.length} bytes")
        if opened.blob is not None and opened.blob.end is None:
            try:
                opened.blob.announce(record.parts)
            except SpillFailed as exc:  # a count that went down
                raise records.RecordError(f"SECURITY: {exc}", security=True) from None

    def _close_blob(self, header: records.BlobHeader) -> None:
        """The manifest of an open blob: the fetch checks the parts against it at the end."""
        opened = self._open_blob(header.ordinal, header.blob_id, "BLOB")
        if opened.header.instance != header.instance:
            raise records.RecordError(f"SECURITY: blob {header.blob_id} changed its instance", security=True)
        del self._open_blobs[header.ordinal]
        if opened.blob is not None and opened.blob.end is None:
            try:
                opened.blob.finish(header.parts, header.instance.length, header.digest)
            except SpillFailed as exc:  # fewer parts than announced
                raise records.RecordError(f"SECURITY: {exc}", security=True) from None

    async def _fetch(
        self, instance: records.InstanceHeader, blob: IncomingBlob, writer: SpoolWriter, *, wait_for_slot: bool = False
    ) -> None:
        committing = False
        holds_slot = not wait_for_slot
        try:
            if wait_for_slot:
                await self._fetch_slots.acquire()
                holds_slot = True
            assert self._blobs is not None
            coercion = self._coercer(instance)
            written = 0
            try:
                async for plain in blob.plaintext():  # each part authenticated; length and digest at the end
                    written += len(plain)
                    if written > instance.length:
                        raise blob_alert(f"blob {blob.blob_id} is longer than its {instance.length} bytes")
                    writer.write(plain if coercion is None else await coercion.feed(plain))
                if coercion is not None:
                    writer.write(await coercion.end())
            except HeadError as exc:
                await self._refuse(instance, _not_coerced(exc))
                return
            except SpillFailed as exc:
                self._blobs.stats.receive_failures += 1
                log.log(
                    logging.ERROR if exc.security else logging.WARNING,
                    "blob of %s from %s rejected: %s",
                    instance.sop_instance,
                    self.from_site,
                    exc,
                )
                if exc.security:
                    self._alert(str(exc))
                await self._refuse(instance, (PROCESSING_FAILURE, False, f"blob not delivered: {exc.detail}"))
                return
            except SpoolFull as exc:
                await self._refuse(instance, (Status.OUT_OF_RESOURCES, False, str(exc)))
                return
            except (SpoolError, OSError) as exc:
                await self._refuse(instance, (Status.OUT_OF_RESOURCES, False, f"spool write failed: {exc}"))
                return
            await self._commit_slots.acquire()
            committing = True
            await self._commit(instance, writer)  # releases the slot; STORED once durable
        except TransferError as exc:  # the stream broke: the near router sends it again
            log.info("blob of %s not acknowledged: %s", instance.sop_instance, exc)
        finally:
            if not committing:
                writer.abort()
            if holds_slot:
                self._fetch_slots.release()

    def _alert(self, detail: str) -> None:
        """A security failure of this transfer in the audit trail, shaped as router A's (NearTransfer's)."""
        if self.audit is None:
            return
        self.audit.event(
            "accel_transfer",
            "alert",
            site=self.from_site,
            called_ae=self.device.ae_title,
            local_ae=self.device.ae_title,
            detail=detail,
            association=self.channel.association_id,
        )

    def _write(self, data: bytes) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(data)
        except SpoolFull as exc:
            self._writer = None  # write() aborted it
            self._refusal = (Status.OUT_OF_RESOURCES, False, str(exc))
        except (SpoolError, OSError) as exc:
            self._writer.abort()
            self._writer = None
            self._refusal = (Status.OUT_OF_RESOURCES, False, f"spool write failed: {exc}")

    async def _complete(self) -> None:
        header, writer, self._writer = self._header, self._writer, None
        assert header is not None
        if writer is None:
            await self._refuse(header, self._refusal)
            return
        await self._commit_slots.acquire()
        task = asyncio.create_task(self._commit(header, writer))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, header: records.InstanceHeader, writer: SpoolWriter) -> None:
        """Commit one instance (fsync) while the next is received; STORED once it is durable."""
        try:
            try:
                # Held in memory until delivered (or PUBLISH_DELAY_S old): a small instance never costs a file.
                await asyncio.to_thread(writer.commit, _claimable)
            except SpoolError as exc:  # not a Part 10 file naming the declared UIDs: never deliverable
                await self._refuse(header, (Status.CANNOT_UNDERSTAND, True, str(exc)))
                return
            except OSError as exc:
                await self._refuse(header, (Status.OUT_OF_RESOURCES, False, f"spool commit failed: {exc}"))
                return
            self.stored += 1
            if callable(self._on_commit):
                self._on_commit()
            await self.channel.send(records.stored(header.id, header.sop_instance))
            self.channel.flush_soon()  # the STOREDs of commits finishing together share a frame
        except TransferError as exc:  # the stream broke: the near router sends it again (a harmless duplicate)
            log.info("STORED for %s not sent: %s", header.sop_instance, exc)
        finally:
            self._commit_slots.release()

    def _move(self, header: records.InstanceHeader) -> MoveKey | None:
        if header.move_originator_ae is None or header.move_originator_id is None:
            return None
        return MoveKey(self.from_site, header.move_originator_ae, header.move_originator_id)

    async def _refuse(self, header: records.InstanceHeader, why: tuple[int, bool, str] | None) -> None:
        status, permanent, error = why or (Status.CANNOT_UNDERSTAND, True, "refused")
        move = self._move(header)
        if permanent and move is not None and self.moves is not None:  # final: a failed sub-operation
            self.moves.finished(move, header.sop_instance, status, self.device.ae_title)
        log.warning("refused %s from %s with 0x%04X: %s", header.sop_instance, self.from_site, status, error)
        await self.channel.send(
            records.refused(header.id, header.sop_instance, status, permanent=permanent, error=error), flush=True
        )
