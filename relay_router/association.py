"""Drives one relayed association: a local DICOM socket on one side, an association stream on the other.

The protocol decisions live in the sans-IO `RelayConnection` (relay_router.ul);
this module only moves bytes and carries out the actions it returns. Two
tasks pump the two directions; a watchdog aborts an association that has been
silent for longer than the idle timeout. Writes wait for the socket to drain
and frames wait for gRPC flow control, so a slow peer slows its sender instead
of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_router.compress import FEATURE as COMPRESSION
from relay_router.compress import FLAG_SHUFFLED, DecompressionError, FrameCompressor, FrameDecompressor
from relay_router.compress import SHUFFLE_FEATURE as SHUFFLE
from relay_router.config import DicomSection
from relay_router.outcome import Outcome
from relay_router.pace import FEATURE as PACE
from relay_router.pace import FLAG_BURST, FLAG_PACE, ArrivalMeter, PaceError, PathPace, decode_report, encode_report
from relay_router.seal import (
    FLAG_COMPRESSED,
    FLAG_SEALED,
    FrameSealer,
    HandshakeError,
    PublicIdentity,
    TamperError,
    verify_confirmation,
)
from relay_router.spill import FEATURE as SPILL
from relay_router.spill import FLAG_BLOB, BlobTransport, IncomingBlob, SpillFailed, SpillReceiver, SpillSender
from relay_router.studytap import StudyTap
from relay_router.tunnel import AssociationStream
from relay_router.ul import (
    Aborted,
    Action,
    Established,
    PduType,
    ProtocolViolation,
    Rejected,
    RejectResult,
    RejectSource,
    RelayConnection,
    Released,
    Send,
    Side,
    a_abort,
    a_associate_rj,
)
from relay_router.ul.connection import Phase

log = logging.getLogger("relay_router.association")
CLOSE_GRACE_S = 5.0
SLOW_PATH_BYTES_PER_S = 12_500_000  # below 100 Mbit/s, spilled parts are uploaded one after another

# How a bridge refusal is told to the local device (PS3.8 Table 9-21).
PERMANENT_REFUSALS = {pb.Refused.UNKNOWN_DEVICE, pb.Refused.NOT_PERMITTED}


def rejection_for(reason: int) -> bytes:
    if reason in PERMANENT_REFUSALS:
        return a_associate_rj(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)  # called AE not recognised
    if reason == pb.Refused.OVERLOADED:
        return a_associate_rj(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 2)
    return a_associate_rj(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1)


class RelayedAssociation:
    def __init__(
        self,
        connection: RelayConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream: AssociationStream,
        outcome: Outcome,
        *,
        dicom: DicomSection,
        sealer: FrameSealer,
        initiator: bool,
        confirm_from: tuple[PublicIdentity, str] | None = None,
        compression_agreed: bool = False,
        shuffle_agreed: bool = False,
        blobs: BlobTransport | None = None,
        spill_agreed: bool = False,
        pace: PathPace | None = None,
        pace_agreed: bool = False,
    ) -> None:
        self.conn = connection
        self.reader, self.writer, self.stream = reader, writer, stream
        self.outcome = outcome
        self.frame_bytes = dicom.frame_bytes
        self.idle_timeout_s = dicom.idle_timeout_s
        # Frame 0 of the initiator's direction (the A-ASSOCIATE-RQ) travels inside Open.
        self._send_seq = 1 if initiator else 0
        self._receive_seq = 0 if initiator else 1
        self.sealer = sealer
        # Initiator side: (responder identity, site) whose Confirm must verify before any data is accepted.
        self._confirm_from = confirm_from
        # Compression: the initiator learns from the Confirm whether the destination accepted it.
        self._compression_level = dicom.compression_level if dicom.compression else None
        self._compressor = (
            FrameCompressor(dicom.compression_level, shuffle=shuffle_agreed) if compression_agreed else None
        )
        self._shuffle_agreed = shuffle_agreed and compression_agreed
        self._decompressor = FrameDecompressor() if self._compressor else None
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_reason: int | None = None
        now = time.monotonic()
        self._last_activity = now
        self._last_from = {Side.LOCAL: now, Side.REMOTE: now}
        self.dimse_timeout_s = dicom.dimse_timeout_s
        self._extra = {"assoc": outcome.association_id}
        # Cloud spill (relay_router.spill): receiving always works with a bridge link; sending once agreed.
        self._spill_in = (
            SpillReceiver(blobs, outcome.association_id, sealer, parallel=dicom.spill_parallel) if blobs else None
        )
        self._spill_out = (
            SpillSender(
                blobs,
                outcome.association_id,
                sealer,
                connection.framer(Side.LOCAL),
                threshold=dicom.spill_threshold_bytes,
                part_bytes=dicom.spill_part_bytes,
                parallel=dicom.spill_parallel,
                compression_level=lambda: self._compression_level if self._compressor else None,
                announce=self._announce_blob,
                shuffle=lambda: self._shuffle_agreed,
            )
            if blobs and dicom.spill_threshold_bytes
            else None
        )
        self._spill_agreed = spill_agreed
        self._spill_parallel = dicom.spill_parallel
        self._blob_task: asyncio.Task[str | None] | None = None  # fetching the blob being received
        # Frame pacing (relay_router.pace): frames sized to the path, from the receiver's rate reports.
        self._pace = pace or PathPace()
        self._pace_agreed = pace_agreed
        self._frame_time_s = dicom.frame_time_ms / 1000
        self._meter = ArrivalMeter()
        self._read_was_full = False  # the last read from the device filled its frame: more data is waiting
        self._burst = False  # the frame being sent was already waiting when the previous one was sent
        self._pace_report: asyncio.Task[None] | None = None
        # Audit: the studies this association carries (a copy of the bytes; never changes the relay).
        self.tap = StudyTap(local_is_requestor=outcome.direction == "outbound")

    # -- carrying out actions ---------------------------------------------
    async def apply(self, actions: list[Action]) -> None:
        to_local: list[bytes] = []
        to_remote: list[bytes] = []
        for action in actions:
            if isinstance(action, Send):
                (to_local if action.to is Side.LOCAL else to_remote).append(action.data)
                self.tap.relayed(action.to is Side.REMOTE, action.data)
            else:
                self._note(action)
        if to_local:
            payload = to_local[0] if len(to_local) == 1 else b"".join(to_local)
            self.outcome.bytes_to_local += len(payload)
            self.writer.write(payload)
        if to_remote:
            await self.send_data(to_remote[0] if len(to_remote) == 1 else b"".join(to_remote))
        if to_local:
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
        if self.conn.phase is Phase.CLOSED:
            self._closed.set()

    def _note(self, action: Action) -> None:
        out = self.outcome
        if isinstance(action, Established):
            self.tap.established(action.info)
            out.result = "established"
            out.established = time.time()
            log.info("association %s -> %s established", out.calling_ae, out.called_ae, extra=self._extra)
        elif isinstance(action, Released):
            out.result = "released"
        elif isinstance(action, Rejected):
            out.result, out.detail = (
                "rejected",
                f"result {action.result}, source {action.source}, reason {action.reason}",
            )
            log.info("association rejected by the called device: %s", out.detail, extra=self._extra)
        elif isinstance(action, Aborted):
            if out.result != "aborted":
                out.result = "aborted"
                out.detail = (
                    out.detail
                    or f"A-ABORT from the {action.by.name.lower()} side "
                    f"(source {action.source}, reason {action.reason})"
                )
            log.info("association aborted: %s", out.detail, extra=self._extra)
        elif isinstance(action, ProtocolViolation):
            out.result, out.detail = (
                "aborted",
                f"protocol error from the {action.side.name.lower()} side: {action.detail}",
            )
            log.warning("%s; sent A-ABORT", out.detail, extra=self._extra)

    async def send_data(self, payload: bytes) -> None:
        async with self._send_lock:
            spill = self._spill_out
            if spill is None or not self._spill_agreed or spill.disabled and not spill.active:
                return await self._send_inline(payload)
            self.outcome.bytes_to_remote += len(payload)  # counted here, whichever way the bytes go
            if not spill.active:
                spill.parallel = self._spill_uploads()
            try:
                inline = await spill.offer(payload, self.conn.phase is Phase.ESTABLISHED)
            except SpillFailed as exc:
                spill.disabled = True
                self._spill_abort = asyncio.get_running_loop().create_task(self.abort(str(exc)))
                return None
            step = self._frame_limit()
            for start in range(0, len(inline), step):
                await self._send_inline(inline[start : start + step], counted=True)
                self._burst = True  # the rest of what was held back follows at once
            return None

    async def _announce_blob(self, build: Callable[[int], pb.Data]) -> None:
        """Send a blob notice of the spill (called by SpillSender.offer, under the send lock)."""
        frame = build(self._send_seq)
        self._send_seq += 1
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
            await self.stream.send(pb.Frame(data=frame))

    async def _send_inline(self, payload: bytes, *, counted: bool = False) -> None:
        flags = FLAG_SEALED | (FLAG_BURST if self._burst and self._pace_agreed else 0)
        data = payload
        if self._compressor is not None:
            data, packed = self._compressor.pack(payload)
            flags |= packed
        sealed = self.sealer.seal(data, self._send_seq, flags)
        frame = pb.Frame(data=pb.Data(payload=sealed, seq=self._send_seq, flags=flags))
        self._send_seq += 1
        if not counted:
            self.outcome.bytes_to_remote += len(payload)
        try:
            await self.stream.send(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as exc:
            log.debug("could not send a frame: %s", exc, extra=self._extra)

    def _spill_uploads(self) -> int:
        """Parts to upload at once: several on a fast path, one after another on a slow one.

        Parallel uploads share the sender's uplink, so on a slow path the first part (which the
        receiver waits for) would be stored only when most of the blob is: measured on 24 Mbit/s,
        19 MB images took twice their link time. In order, the receiver fetches part k while part
        k+1 uploads.
        """
        rate = self._pace.rate if self._pace_agreed else None
        if rate is not None and rate < SLOW_PATH_BYTES_PER_S:
            return 1
        return self._spill_parallel

    def _frame_limit(self) -> int:
        if not self._pace_agreed:
            return self.frame_bytes
        packer = self._compressor
        expansion = packer.bytes_in / packer.bytes_out if packer is not None and packer.bytes_out else 1.0
        return self._pace.frame_bytes(self.frame_bytes, self._frame_time_s, expansion)

    async def _send_pace_report(self, rate: int) -> None:
        async with self._send_lock:
            flags, seq = FLAG_SEALED | FLAG_PACE, self._send_seq
            sealed = self.sealer.seal(encode_report(rate), seq, flags)
            frame = pb.Frame(data=pb.Data(payload=sealed, seq=seq, flags=flags))
            self._send_seq += 1
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                await self.stream.send(frame)
        log.debug("told the sending router: %.0f bytes/s arrive", rate, extra=self._extra)

    def _measure_arrival(self, data: pb.Data) -> None:
        rate = self._meter.observe(len(data.payload), bool(data.flags & FLAG_BURST))
        if rate is not None and (self._pace_report is None or self._pace_report.done()):
            self._pace_report = asyncio.get_running_loop().create_task(self._send_pace_report(rate))

    # -- pumps ---------------------------------------------------------------
    async def _pump_local(self) -> None:
        while not self._closed.is_set():
            limit = self._frame_limit()
            try:
                data = await self.reader.read(limit)
            except ConnectionError:
                data = b""
            self._stamp(Side.LOCAL)
            self._burst, self._read_was_full = self._read_was_full, len(data) >= limit
            if not data:
                await self.apply(self.conn.peer_closed(Side.LOCAL))
                return
            await self.apply(self.conn.receive(Side.LOCAL, data))

    async def _pump_remote(self) -> None:
        while not self._closed.is_set():
            try:
                frame = await self.stream.receive()
            except grpc.aio.AioRpcError as exc:
                self.outcome.detail = self.outcome.detail or f"link to the bridge lost ({exc.code().name})"
                frame = None
            self._stamp(Side.REMOTE)
            if frame is None:
                self.outcome.detail = self.outcome.detail or "the bridge ended the association stream"
                await self.apply(self.conn.peer_closed(Side.REMOTE))
                return
            kind = frame.WhichOneof("kind")
            if kind == "confirm" and self._confirm_from is not None:
                identity, site = self._confirm_from
                try:
                    verify_confirmation(identity, self.sealer, frame.confirm.signature, site)
                except HandshakeError as exc:
                    await self.abort(f"SECURITY: {exc}")
                    return
                self._confirm_from = None
                if COMPRESSION in frame.confirm.features and self._compression_level:
                    self._shuffle_agreed = SHUFFLE in frame.confirm.features
                    self._compressor = FrameCompressor(self._compression_level, shuffle=self._shuffle_agreed)
                    self._decompressor = FrameDecompressor()
                self._spill_agreed = SPILL in frame.confirm.features
                self._pace_agreed = PACE in frame.confirm.features
            elif kind == "data":
                if self._confirm_from is not None:
                    await self.abort("SECURITY: data arrived before the destination confirmed the handshake")
                    return
                if self._pace_agreed and not frame.data.flags & FLAG_PACE:
                    self._measure_arrival(frame.data)
                payload, problem = self._open_data(frame.data)
                if problem:
                    await self.abort(problem)
                    return
                if frame.data.flags & FLAG_PACE:
                    try:
                        self._pace.update(decode_report(payload))
                    except PaceError as exc:
                        await self.abort(f"the other router sent a bad pace report: {exc}")
                        return
                    continue
                if frame.data.HasField("blob"):
                    problem = await self._receive_blob(frame.data, payload)
                    if problem:
                        await self.abort(problem)
                        return
                    continue
                if self._blob_task is not None:
                    # Bytes of a blob are still being fetched; inline bytes now would overtake them.
                    await self.abort("the other router sent inline data in the middle of a spilled data set")
                    return
                await self.apply(self.conn.receive(Side.REMOTE, payload))
            elif kind == "close":
                if self.conn.phase is not Phase.CLOSED:
                    self.outcome.detail = (
                        self.outcome.detail
                        or f"remote router: {frame.close.detail or pb.Close.Reason.Name(frame.close.reason)}"
                    )
                await self.apply(self.conn.peer_closed(Side.REMOTE))
                return
            elif kind == "refused":
                await self.refuse(frame.refused)
                return
            else:
                await self.abort(f"unexpected {kind} frame in an established association stream")
                return

    def _open_data(self, data: pb.Data) -> tuple[bytes, str | None]:
        """The plaintext of a Data frame, or the reason to abort (a security alert)."""
        if data.seq != self._receive_seq:
            return (
                b"",
                f"SECURITY: frame {data.seq} where {self._receive_seq} was expected (lost, replayed or reordered)",
            )
        self._receive_seq += 1
        allowed = FLAG_SEALED | (FLAG_COMPRESSED if self._decompressor is not None else 0)
        if self._shuffle_agreed:
            allowed |= FLAG_SHUFFLED
        if self._pace_agreed:
            allowed |= FLAG_BURST
            if data.flags & FLAG_PACE:
                allowed = FLAG_SEALED | FLAG_PACE  # a pace report is neither compressed nor part of a burst
        if data.HasField("blob") and self._spill_in is not None and data.flags == FLAG_SEALED | FLAG_BLOB:
            allowed = data.flags
        elif data.HasField("blob") or data.flags & FLAG_BLOB:
            return b"", "SECURITY: a blob reference this router did not agree to or cannot fetch"
        if not data.flags & FLAG_SEALED or data.flags & ~allowed:
            return b"", f"SECURITY: frame flags {data.flags:#x}; only sealed frames (and agreed compression) accepted"
        try:
            plain = self.sealer.open(data.payload, data.seq, data.flags)
        except TamperError as exc:
            return b"", f"SECURITY: {exc}"
        if data.flags & FLAG_COMPRESSED:
            assert self._decompressor is not None
            try:
                plain = self._decompressor.unpack(plain, data.flags)
            except DecompressionError as exc:
                return b"", f"the other router sent a bad compressed frame: {exc}"
        return plain, None

    async def _receive_blob(self, data: pb.Data, notice: bytes) -> str | None:
        """A blob notice: begin fetching the blob, or wait for its end; the reason to abort, if any.

        The blob's parts are fetched and fed to the connection by a task while its notices keep
        arriving (pipelined with the sender's uploads); the END notice waits for that task, so no
        later frame overtakes the blob's bytes. Each part is authenticated before its bytes are
        fed, so the device sees an authentic prefix of the sender's bytes, then A-ABORT if a
        later part fails: the same as an inline association whose link breaks (docs/cloudstore.md).
        """
        assert self._spill_in is not None
        try:
            blob, began, ended = self._spill_in.accept(data, notice)
        except SpillFailed as exc:
            return str(exc)
        if began:
            self._blob_task = asyncio.get_running_loop().create_task(self._deliver_blob(blob))
        if ended and self._blob_task is not None:
            task, self._blob_task = self._blob_task, None
            return await task
        return None

    async def _deliver_blob(self, blob: IncomingBlob) -> str | None:
        """Fetch a blob and feed it to the connection; aborts the association itself if the blob fails."""
        assert self._spill_in is not None

        async def sink(plain: bytes) -> bool:
            self._stamp(Side.REMOTE)
            await self.apply(self.conn.receive(Side.REMOTE, plain))
            return not self._closed.is_set()

        delivery = asyncio.ensure_future(self._spill_in.deliver(blob, sink))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({delivery, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (delivery, closed):
                task.cancel()
            results = await asyncio.gather(delivery, closed, return_exceptions=True)
        if isinstance(results[0], SpillFailed):
            if not self._closed.is_set():
                await self.abort(str(results[0]))
            return str(results[0])
        return None

    async def abort(self, reason: str, *, close_reason: int = pb.Close.ABORTED) -> None:
        """Abort both ways for a reason found by this router (not a DICOM peer)."""
        self.outcome.result, self.outcome.detail = "aborted", reason
        self._close_reason = close_reason
        log.warning("aborting association: %s", reason, extra=self._extra)
        if self.conn.phase is Phase.AWAIT_AC and self.conn.requestor is Side.LOCAL:
            # Our device is still waiting for its answer: a transient refusal tells it to retry.
            self.writer.write(a_associate_rj(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1))
        else:
            await self.apply(self.conn.abort())  # A-ABORT to every side already involved
        self._closed.set()

    async def refuse(self, refused: pb.Refused) -> None:
        """The destination router refused after the bridge had accepted (e.g. device unreachable)."""
        self.outcome.result = "refused"
        self.outcome.detail = refused.detail or pb.Refused.Reason.Name(refused.reason)
        log.info("association refused: %s", self.outcome.detail, extra=self._extra)
        if self.conn.phase is Phase.AWAIT_AC:
            self.writer.write(rejection_for(refused.reason))
        elif self.conn.phase is not Phase.CLOSED:
            self.writer.write(a_abort(2, 0))
        self._closed.set()

    def _stamp(self, side: Side) -> None:
        self._last_activity = self._last_from[side] = time.monotonic()

    async def _watch_idle(self) -> None:
        """Abort a silent association (idle timeout) or one whose acceptor stopped answering (DIMSE timeout)."""
        limits = [t for t in (self.idle_timeout_s, self.dimse_timeout_s) if t > 0]
        while limits and not self._closed.is_set():
            await asyncio.sleep(min(5.0, min(limits) / 2))
            now = time.monotonic()
            if self.idle_timeout_s and now - self._last_activity > self.idle_timeout_s:
                await self.abort(f"no traffic for {self.idle_timeout_s:g} s (idle timeout)")
            asked, answered = self._last_from[self.conn.requestor], self._last_from[self.conn.requestor.other]
            if self.dimse_timeout_s and asked > answered and now - asked > self.dimse_timeout_s:
                await self.abort(
                    f"the called device sent nothing for {self.dimse_timeout_s:g} s after a request (DIMSE timeout)"
                )

    async def run(self, initial: list[Action] | None = None) -> Outcome:
        if initial:
            await self.apply(initial)
        tasks = [
            asyncio.create_task(self._pump_local()),
            asyncio.create_task(self._pump_remote()),
            asyncio.create_task(self._watch_idle()),
        ]
        try:
            await self._closed.wait()
        finally:
            await self._shut(tasks)
        return self.outcome

    async def _shut(self, tasks: list[asyncio.Task[None]]) -> None:
        if self._spill_out is not None and self._spill_out.active:
            await self._spill_out.discard()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await asyncio.wait_for(self.writer.drain(), CLOSE_GRACE_S)
        self.writer.close()
        reason = self._close_reason or (
            pb.Close.PEER_CLOSED if self.outcome.result in ("released", "established") else pb.Close.ABORTED
        )
        async with self._send_lock:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                await self.stream.send(pb.Frame(close=pb.Close(reason=reason, detail=self.outcome.detail)))
        await self.stream.finish()
        # Let the remote pump see the partner's close, then stop whatever is left.
        _, pending = await asyncio.wait(tasks[1:2], timeout=CLOSE_GRACE_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.stream.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self.outcome.ended = time.time()
        self.outcome.studies, self.outcome.queries = self.tap.summary(), self.tap.queries
        if self.outcome.result == "established":
            self.outcome.result = "closed"
        log.info(
            "association %s: %s; %d bytes out, %d bytes in, %.2f s",
            self.outcome.result,
            self.outcome.detail or "ok",
            self.outcome.bytes_to_remote,
            self.outcome.bytes_to_local,
            self.outcome.ended - self.outcome.started,
            extra=self._extra,
        )


__all__ = ["Outcome", "RelayedAssociation", "rejection_for", "PduType"]
