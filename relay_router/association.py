"""Drives one relayed association: a local DICOM socket on one side, an association stream on the other.

Decisions live in sans-IO layers: `RelayConnection` (relay_router.ul) for the DICOM Upper Layer,
`FrameCodec` (relay_router.wire.codec) for the frames between the routers. This module only moves
bytes and carries out what they decide: two pumps, a watchdog for the idle timeout, all in one
`asyncio.TaskGroup`. Writes wait for the socket to drain and frames for gRPC flow control, so a slow
peer slows its sender instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc.aio

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason, RelayError
from relay_router.accel.moves import MoveWatch
from relay_router.close_codes import close_frame, received_close, received_refusal
from relay_router.config import DicomSection
from relay_router.identity.filter import Flow, IdentityFilter, IdentityFilterError
from relay_router.identity.wiring import IdentityRoute
from relay_router.outcome import Outcome, Result
from relay_router.pace import PathPace
from relay_router.seal import FrameSealer, PublicIdentity
from relay_router.spill import BlobTransport, IncomingBlob, SpillFailed, SpillReceiver, SpillSender, SpillState
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
from relay_router.wire.codec import BlobNotice, FrameCodec, FrameRejected, PaceReport
from relay_router.wire.features import Features

log = logging.getLogger("relay_router.association")
CLOSE_GRACE_S = 5.0
SLOW_PATH_BYTES_PER_S = 12_500_000  # below 100 Mbit/s, spilled parts are uploaded one after another
# A write after the bridge ended the call raises InvalidStateError ("RPC already finished"), not an RpcError.
SEND_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError)

# How a bridge refusal is told to the local device (PS3.8 Table 9-21).
PERMANENT_REFUSALS = {pb.Refused.UNKNOWN_DEVICE, pb.Refused.NOT_PERMITTED}


def rejection_for(reason: int) -> bytes:
    if reason in PERMANENT_REFUSALS:
        return a_associate_rj(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)  # called AE not recognised
    if reason == pb.Refused.SERVICE_NOT_GRANTED:  # PS3.8 Table 9-21: permanent, service-user, no-reason-given
        return a_associate_rj(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 1)
    if reason in (pb.Refused.OVERLOADED, pb.Refused.DRAINING):  # a draining bridge: as before it had its own code
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
        features: Features,
        confirm_from: tuple[PublicIdentity, str] | None = None,
        blobs: BlobTransport | None = None,
        spill: SpillState | None = None,
        pace: PathPace | None = None,
        identity: IdentityRoute | None = None,
        moves: MoveWatch | None = None,
    ) -> None:
        """`features`: what the responder agreed, or what the initiator offered (agreed once the Confirm
        from `confirm_from`, the responder's identity and site, has verified)."""
        self.conn = connection
        self.reader, self.writer, self.stream = reader, writer, stream
        self.outcome = outcome
        self.frame_bytes = dicom.frame_bytes
        self.idle_timeout_s = dicom.idle_timeout_s
        compression_level = dicom.compression_level if dicom.compression else None
        self.codec = FrameCodec(
            sealer,
            initiator=initiator,
            features=features,
            compression_level=compression_level,
            accept_blobs=blobs is not None,
            confirm_from=confirm_from,
        )
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._confirmed = asyncio.Event()  # the initiator's frame keys exist only once Confirm verified
        self._ending = asyncio.Event()  # abort or refusal under way: stop waiting for a Confirm
        if not self.codec.awaiting_confirm:
            self._confirmed.set()
        self._close_reason: pb.Close.Reason | None = None
        self._end_reason: Reason | None = None  # why the remote side went away, once known
        now = time.monotonic()
        self._last_activity = now
        self._last_from = {Side.LOCAL: now, Side.REMOTE: now}
        self.dimse_timeout_s = dicom.dimse_timeout_s
        self._extra = {"assoc": outcome.association_id}
        spill = spill or SpillState()
        # Cloud spill (relay_router.spill): receiving always works with a bridge link; sending once agreed.
        self._spill_in = (
            SpillReceiver(blobs, outcome.association_id, sealer, parallel=dicom.spill_parallel, stats=spill.stats)
            if blobs
            else None
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
                compression_level=lambda: compression_level if self.codec.compressor is not None else None,
                announce=self._announce_blob,
                shuffle=lambda: self.codec.features.shuffle,
                state=spill,
            )
            if blobs and dicom.spill_threshold_bytes
            else None
        )
        self._spill_parallel = dicom.spill_parallel
        self._blob_task: asyncio.Task[SpillFailed | None] | None = None  # fetching the blob being received
        # Frame pacing (relay_router.pace): frames sized to the path, from the receiver's rate reports.
        self._pace = pace or PathPace()
        self._frame_time_s = dicom.frame_time_ms / 1000
        self._read_was_full = False  # the last read from the device filled its frame: more data is waiting
        self._burst = False  # the frame being sent was already waiting when the previous one was sent
        self._pace_report: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None  # owns every task this driver starts (set by run)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._remote: asyncio.Task[None] | None = None  # the remote pump, which _shut lets see the partner's close
        # Audit: the studies this association carries (a copy of the bytes; never changes the relay).
        self.tap = StudyTap(local_is_requestor=outcome.direction == "outbound")
        # Patient identity routes only (relay_router.identity): coerce identifiers in the cleartext PDUs.
        self.identity: IdentityFilter | None = None
        if identity is not None:
            self.identity = IdentityFilter(
                identity.route,
                identity.resolver,
                contexts=self._accepted_contexts,
                max_pdu=self._max_pdu_towards,
                audit=identity.audit,
                association_id=outcome.association_id,
                counts=identity.counts,
            )
            self._spill_out = None  # the spill counts the device's bytes, which the filter may change
        # Accelerated retrieval (relay_router.accel.moves): a C-MOVE's final response waits for its images.
        self.moves = moves
        if moves is not None:
            moves.contexts = self._accepted_contexts
            moves.max_pdu = lambda: self._max_pdu_towards(Flow.ARRIVING)
            moves.send_local = self._send_to_local

    # Frames sent and received so far (the codec's sequence numbers): relay_router.metrics reads them.
    @property
    def frames_sent(self) -> int:
        return self.codec.send_seq

    @property
    def frames_received(self) -> int:
        return self.codec.receive_seq

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """A task in this association's TaskGroup; None (work dropped) once run() returned: none outlives it."""
        if self._group is None:
            work.close()
            return None
        task = self._group.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- carrying out actions ---------------------------------------------
    async def apply(self, actions: list[Action]) -> None:
        if self.identity is not None:
            actions = await self._coerce_identity(actions)
        if self.moves is not None:
            actions = await self._watch_moves(actions)
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

    # -- patient identity (identity routes only) ----------------------------------
    async def _coerce_identity(self, actions: list[Action]) -> list[Action]:
        """The Sends of `actions` through the identity filter; on a message it cannot coerce, abort."""
        assert self.identity is not None
        out: list[Action] = []
        for action in actions:
            if not isinstance(action, Send):
                out.append(action)
                continue
            flow = Flow.LEAVING if action.to is Side.REMOTE else Flow.ARRIVING
            try:
                sends = await self.identity.process(flow, action.data)
            except IdentityFilterError as exc:
                await self.abort(exc)
                return []
            # One Send per run of PDUs to the same side: the tap and the writers see frames, not PDUs.
            runs: list[tuple[Flow, list[bytes]]] = []
            for to, data in sends:
                if runs and runs[-1][0] is to:
                    runs[-1][1].append(data)
                else:
                    runs.append((to, [data]))
            out += [Send(Side.REMOTE if to is Flow.LEAVING else Side.LOCAL, b"".join(run)) for to, run in runs]
        return out

    async def _watch_moves(self, actions: list[Action]) -> list[Action]:
        """C-MOVE-RQs observed; a held move's final C-MOVE-RSP replaced once its images are delivered here.

        The bytes for the local device go to the watch as one piece (at the place of the first): while it
        holds a response, it writes what came before and its pending responses itself, in order."""
        assert self.moves is not None
        local = [a.data for a in actions if isinstance(a, Send) and a.to is Side.LOCAL]
        out: list[Action] = []
        for action in actions:
            if isinstance(action, Send) and action.to is Side.REMOTE:
                self.moves.leaving(action.data)
            elif isinstance(action, Send):
                if local:
                    out.append(Send(Side.LOCAL, await self.moves.arriving(b"".join(local))))
                    local = []
                continue
            out.append(action)
        return out

    async def _send_to_local(self, data: bytes) -> None:
        """Write to the local device now (the move watch, while it holds a final response)."""
        self.tap.relayed(False, data)
        self.outcome.bytes_to_local += len(data)
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def _accepted_contexts(self) -> dict[int, tuple[str, str]] | None:
        accepted = self.conn.accepted
        if accepted is None:
            return None
        return {pc.id: (pc.abstract_syntax or "", pc.transfer_syntaxes[0]) for pc in accepted.accepted_contexts}

    def _max_pdu_towards(self, flow: Flow) -> int:
        """The Maximum Length announced by the device that receives `flow` (PS3.8 D.1)."""
        local_requested = self.conn.requestor is Side.LOCAL
        towards_requestor = (flow is Flow.ARRIVING) == local_requested
        info = self.conn.requested if towards_requestor else self.conn.accepted
        return info.max_pdu_length if info is not None else 0

    def _note(self, action: Action) -> None:
        out = self.outcome
        if isinstance(action, Established):
            self.tap.established(action.info)
            out.result = Result.ESTABLISHED
            out.established = time.time()
            log.info("association %s -> %s established", out.calling_ae, out.called_ae, extra=self._extra)
        elif isinstance(action, Released):
            out.result = Result.RELEASED
        elif isinstance(action, Rejected):
            detail = f"result {action.result}, source {action.source}, reason {action.reason}"
            out.refuse(Result.REJECTED, self._end_reason or Reason.DEVICE_REJECTED, detail)
            log.info("association rejected by the called device: %s", out.detail, extra=self._extra)
        elif isinstance(action, Aborted):
            if out.result != Result.ABORTED:
                detail = (
                    out.detail
                    or f"A-ABORT from the {action.by.name.lower()} side "
                    f"(source {action.source}, reason {action.reason})"
                )
                out.refuse(Result.ABORTED, self._end_reason or Reason.PEER_ABORTED, detail)
            log.info("association aborted: %s", out.detail, extra=self._extra)
        elif isinstance(action, ProtocolViolation):
            detail = f"protocol error from the {action.side.name.lower()} side: {action.detail}"
            out.refuse(Result.ABORTED, Reason.PROTOCOL, detail)
            log.warning("%s; sent A-ABORT", out.detail, extra=self._extra)

    # -- sending -------------------------------------------------------------
    async def send_data(self, payload: bytes) -> None:
        if not self._confirmed.is_set() and not await self._until_confirmed():
            return None  # e.g. an A-ABORT from the device before the Confirm came: nothing can seal it
        async with self._send_lock:
            spill = self._spill_out
            if spill is None or not self.codec.features.spill or spill.disabled and not spill.active:
                return await self._send_inline(payload)
            self.outcome.bytes_to_remote += len(payload)  # counted here, whichever way the bytes go
            if not spill.active:
                spill.parallel = self._spill_uploads()
            try:
                inline = await spill.offer(payload, self.conn.phase is Phase.ESTABLISHED)
            except SpillFailed as exc:
                spill.disabled = True
                self._spawn(self.abort(exc))  # not here: abort sends, and we hold the send lock
                return None
            step = self._frame_limit()
            for start in range(0, len(inline), step):
                await self._send_inline(inline[start : start + step], counted=True)
                self._burst = True  # the rest of what was held back follows at once
            return None

    async def _until_confirmed(self) -> bool:
        """Wait for the destination's Confirm (True) or the end of the association (False)."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self._confirmed, self._closed, self._ending)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return self._confirmed.is_set()

    async def _send_frame(self, data: pb.Data) -> None:
        try:
            await self.stream.send(pb.Frame(data=data))
        except SEND_ERRORS as exc:
            log.debug("could not send a frame: %s", exc, extra=self._extra)

    async def _announce_blob(self, build: Callable[[int], pb.Data]) -> None:
        """Send a blob notice of the spill (called by SpillSender.offer, under the send lock)."""
        await self._send_frame(self.codec.encode_blob_notice(build))

    async def _send_inline(self, payload: bytes, *, counted: bool = False) -> None:
        data = self.codec.encode_data(payload, burst=self._burst)
        if not counted:
            self.outcome.bytes_to_remote += len(payload)
        await self._send_frame(data)

    def _spill_uploads(self) -> int:
        """Parts to upload at once: several on a fast path, one after another on a slow one.

        Parallel uploads share the sender's uplink, so on a slow path the first part (which the
        receiver waits for) would be stored only when most of the blob is: measured on 24 Mbit/s,
        19 MB images took twice their link time. In order, the receiver fetches part k while part
        k+1 uploads.
        """
        rate = self._pace.rate if self.codec.features.pace else None
        if rate is not None and rate < SLOW_PATH_BYTES_PER_S:
            return 1
        return self._spill_parallel

    def _frame_limit(self) -> int:
        if not self.codec.features.pace:
            return self.frame_bytes
        return self._pace.frame_bytes(self.frame_bytes, self._frame_time_s, self.codec.expansion)

    async def _send_pace_report(self, rate: int) -> None:
        async with self._send_lock:
            await self._send_frame(self.codec.encode_pace_report(rate))
        log.debug("told the sending router: %.0f bytes/s arrive", rate, extra=self._extra)

    def _report_arrival_rate(self) -> None:
        rate = self.codec.take_rate_to_report()
        if rate is not None and (self._pace_report is None or self._pace_report.done()):
            self._pace_report = self._spawn(self._send_pace_report(rate))

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
                self._end_reason = self._end_reason or Reason.LINK_LOST
                await self.apply(self.conn.peer_closed(Side.REMOTE))
                return
            kind = frame.WhichOneof("kind")
            if kind == "confirm" and self.codec.awaiting_confirm:
                try:
                    self.codec.confirm(frame.confirm)
                except FrameRejected as exc:
                    await self.abort(exc)
                    return
                self._confirmed.set()
            elif kind == "data":
                if not await self._receive_data(frame.data):
                    return
            elif kind == "close":
                if self.conn.phase is not Phase.CLOSED:
                    self.outcome.detail = self.outcome.detail or received_close(frame.close)
                    self._end_reason = self._end_reason or Reason.PEER_ABORTED
                await self.apply(self.conn.peer_closed(Side.REMOTE))
                return
            elif kind == "refused":
                await self.refuse(frame.refused)
                return
            else:
                unexpected = f"unexpected {kind} frame in an established association stream"
                await self.abort(RelayError(unexpected, reason=Reason.PROTOCOL))
                return

    async def _receive_data(self, data: pb.Data) -> bool:
        """Carry out one received Data frame; False once the association is being aborted."""
        try:
            event = self.codec.decode(data)
        except FrameRejected as exc:
            await self.abort(exc)
            return False
        self._report_arrival_rate()
        if isinstance(event, PaceReport):
            self._pace.update(event.rate)
            return True
        if isinstance(event, BlobNotice):
            problem = await self._receive_blob(data, event.notice)
            if problem is not None:
                await self.abort(problem)
                return False
            return True
        if self._blob_task is not None:
            # Bytes of a blob are still being fetched; inline bytes now would overtake them.
            await self.abort(FrameRejected("the other router sent inline data in the middle of a spilled data set"))
            return False
        await self.apply(self.conn.receive(Side.REMOTE, event.payload))
        return True

    async def _receive_blob(self, data: pb.Data, notice: bytes) -> SpillFailed | None:
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
            return exc
        if began:
            self._blob_task = self._spawn(self._deliver_blob(blob))
        if ended and self._blob_task is not None:
            task, self._blob_task = self._blob_task, None
            return await task
        return None

    async def _deliver_blob(self, blob: IncomingBlob) -> SpillFailed | None:
        """Fetch a blob and feed it to the connection; aborts the association itself if the blob fails."""
        assert self._spill_in is not None

        async def sink(plain: bytes) -> bool:
            self._stamp(Side.REMOTE)
            await self.apply(self.conn.receive(Side.REMOTE, plain))
            return not self._closed.is_set()

        failure = await self._spill_in.deliver_until(blob, sink, self._closed)
        if failure is not None and not self._closed.is_set():
            await self.abort(failure)
        return failure

    async def abort(self, error: RelayError | str, *, close_reason: pb.Close.Reason = pb.Close.ABORTED) -> None:
        """Abort both ways for a reason found by this router (not a DICOM peer)."""
        if isinstance(error, str):  # the service's shutdown
            error = RelayError(error, reason=Reason.SHUTDOWN if close_reason == pb.Close.SHUTDOWN else Reason.OTHER)
        self.identity = None  # the A-ABORTs go out as they are, whatever the filter holds
        self._ending.set()
        self.outcome.fail(error)
        self._close_reason = close_reason
        extra = {**self._extra, "security_alert": "frame"} if error.security else self._extra
        log.warning("aborting association: %s", error.detail, extra=extra)
        if self.conn.phase is Phase.AWAIT_AC and self.conn.requestor is Side.LOCAL:
            # Our device is still waiting for its answer: a transient refusal tells it to retry.
            self.writer.write(a_associate_rj(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1))
        else:
            await self.apply(self.conn.abort())  # A-ABORT to every side already involved
        self._closed.set()

    async def refuse(self, refused: pb.Refused) -> None:
        """The destination router refused after the bridge had accepted (e.g. device unreachable)."""
        self._ending.set()
        self.outcome.refuse(Result.REFUSED, *received_refusal(refused))
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
                idle = f"no traffic for {self.idle_timeout_s:g} s (idle timeout)"
                await self.abort(RelayError(idle, reason=Reason.IDLE))
            asked, answered = self._last_from[self.conn.requestor], self._last_from[self.conn.requestor.other]
            if self.dimse_timeout_s and asked > answered and now - asked > self.dimse_timeout_s:
                silent = (
                    f"the called device sent nothing for {self.dimse_timeout_s:g} s after a request (DIMSE timeout)"
                )
                await self.abort(RelayError(silent, reason=Reason.TIMEOUT))

    async def run(self, initial: list[Action] | None = None) -> Outcome:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    if initial:
                        await self.apply(initial)
                    self._remote = self._spawn(self._pump_remote())
                    self._spawn(self._pump_local())
                    self._spawn(self._watch_idle())
                    await self._closed.wait()
                finally:
                    await self._shut()
        except* Exception as failure:  # a bug, not a peer: this association is shut, the router keeps serving
            log.error("the association driver failed", exc_info=failure, extra=self._extra)
            if self.outcome.result not in (Result.RELEASED, Result.CLOSED, Result.ABORTED):
                self.outcome.fail(RelayError(f"internal error: {failure.exceptions[0]!r}"))
        finally:
            self._group = None
        return self.outcome

    async def _shut(self) -> None:
        if self._spill_out is not None and self._spill_out.active:
            await self._spill_out.discard()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await asyncio.wait_for(self.writer.drain(), CLOSE_GRACE_S)
        self.writer.close()
        reason = self._close_reason or (
            pb.Close.PEER_CLOSED if self.outcome.result in (Result.RELEASED, Result.ESTABLISHED) else pb.Close.ABORTED
        )
        async with self._send_lock:
            with contextlib.suppress(*SEND_ERRORS):
                await self.stream.send(close_frame(reason, self.outcome.reason, self.outcome.close_detail))
        await self.stream.finish()
        # Let the remote pump see the partner's close, then stop whatever is left.
        if self._remote is not None:
            await asyncio.wait([self._remote], timeout=CLOSE_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.moves is not None:
            self.moves.close()  # moves still held have nobody to answer any more
        self.stream.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self.outcome.ended = time.time()
        self.outcome.studies, self.outcome.queries = self.tap.summary(), self.tap.queries
        if self.outcome.result == Result.ESTABLISHED:
            self.outcome.result = Result.CLOSED
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
