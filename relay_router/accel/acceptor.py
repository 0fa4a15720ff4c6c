"""The near router accepts a storage association itself, for a `[[remote]]` entry with `accelerate = true`.

It answers as the remote device's AE title (relay_router.accel.negotiation: only the SOP classes and
transfer syntaxes the destination accepts), assembles each C-STORE with the DIMSE layer
(relay_router.dimse) on the router's Upper Layer framer, streams the data set into the spool
(relay_router.accel.spool), and only once the entry is committed (durable on disk: a journal sync,
relay_router.accel.journal) answers C-STORE-RSP 0x0000. A full spool gets 0xA700 (out of resources)
and nothing is acknowledged that is not on disk. C-ECHO is answered. The transfer to the far router
(relay_router.accel.transfer) is woken once each committed entry is written out for it, after the
answer; it does not hold up the sending device. On a Storage Commitment Push context the
N-ACTION goes to relay_router.accel.commitment (answered at once once stored), and this association
carries the N-EVENT-REPORTs that service sends the requester, each delivered only on its RSP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from typing import TYPE_CHECKING

from relay_common.errors import Reason
from relay_router.accel.commitment import MAX_REQUEST_BYTES, CommitmentRefused, decode_request
from relay_router.accel.commitment import ActionStatus as CommitmentStatus
from relay_router.accel.negotiation import STORAGE_COMMITMENT_PUSH, Negotiated
from relay_router.dimse import (
    STORAGE_COMMITMENT_PUSH_INSTANCE,
    CommandField,
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseError,
    DimseReceiver,
    DimseSender,
    Status,
    StoreRequest,
    Violation,
    c_echo_rsp,
    c_store_rsp,
    encode_dataset,
    n_action_rsp,
    n_event_report_rq,
    parse_c_store_rq,
)
from relay_router.dimse.fast import StoreResponses
from relay_router.outcome import Outcome, Result
from relay_router.studytap import Side, StudyTap, read_prefix
from relay_router.ul import AssociateInfo, ControlPdu, PDataBytes, PduError, PduFramer, PduType, a_abort, a_release_rp

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from relay_router.accel.commitment import CommitmentService
    from relay_router.accel.spool import Spool, SpoolWriter

log = logging.getLogger("relay_router.accel")
MAX_PDU = 256 * 1024  # what the router announces: large PDUs cost fewer reads
READ_BYTES = 256 * 1024
REPORT_RSP_TIMEOUT_S = 10.0  # how long a storage commitment report waits for the requester's answer


class _Store:
    """One C-STORE in progress: its request and the spool writer (None once refused)."""

    def __init__(self, request: StoreRequest, context_id: int, writer: SpoolWriter | None, status: int) -> None:
        self.request = request
        self.context_id = context_id
        self.writer = writer
        self.status = status  # the answer if the writer is gone (refused before or while writing)
        self.error = ""
        self.prefix = bytearray()  # the data set's first bytes: its study and patient, for the audit


class StorageAcceptor:
    """Drives one accepted association: reads PDUs, answers DIMSE, writes the spool."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        outcome: Outcome,
        request: AssociateInfo,
        negotiated: Negotiated,
        *,
        spool: Spool,
        route: str,
        on_commit: object,
        idle_timeout_s: float,
        commitment: CommitmentService | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.outcome = outcome
        self.request = request
        self.negotiated = negotiated
        self.spool = spool
        self.route = route
        self._on_commit = on_commit
        self.idle_timeout_s = idle_timeout_s or None
        self.framer = PduFramer(max_pdata_length=MAX_PDU)
        self.receiver = DimseReceiver(negotiated.contexts, max_pdu_length=MAX_PDU)
        self.sender = DimseSender(request.max_pdu_length)
        self.store: _Store | None = None
        # The studies and patients sent (audit field "studies"), as on a transparent route; the tap is not fed
        # the raw bytes (that framed and decoded every message a second time): _complete reads each data set's
        # first bytes with the tap's own reader and records them.
        self.tap = StudyTap(negotiated.contexts, local_is_requestor=True)
        self.stored = 0
        self.refused = 0
        self.extra = {"assoc": outcome.association_id}
        # Storage commitment (relay_router.accel.commitment): the N-ACTION being read, and what this
        # association offers the service to send N-EVENT-REPORTs on.
        self.commitment = commitment
        self.action: tuple[int, Dataset, bytearray] | None = None
        self.commitment_context = next(
            (cid for cid, (syntax, _) in negotiated.contexts.items() if syntax == STORAGE_COMMITMENT_PUSH), None
        )
        self.requester = outcome.calling_ae.strip()  # with self.route: whose reports this association takes
        self._next_message_id = 1
        self._reports: dict[int, asyncio.Future[int]] = {}  # N-EVENT-REPORT message ID -> its RSP status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._responses = StoreResponses()  # success C-STORE-RSPs from a per-SOP-class template

    def _visible(self) -> None:
        """Called by the spool (another thread) once a committed entry can be handed to the transfer."""
        callback, loop = self._on_commit, self._loop
        if callable(callback) and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the transfer finds it when it starts
                loop.call_soon_threadsafe(callback)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.writer.write(self.negotiated.ac_pdu)
        self.outcome.result = Result.ESTABLISHED
        reports = self.commitment if self.commitment_context is not None else None
        try:
            await self.writer.drain()
            if reports is not None:
                reports.attach(self)
            await self._serve()
        except (DimseError, PduError) as exc:
            detail = f"protocol error from {self.outcome.calling_ae!r}: {exc}"
            log.warning("%s; sent A-ABORT", detail, extra=self.extra)
            self.outcome.refuse(Result.ABORTED, Reason.PROTOCOL, detail)
            self.writer.write(a_abort())
        except TimeoutError:
            detail = f"no data from {self.outcome.calling_ae!r} for {self.idle_timeout_s:.0f} s (idle_timeout_s)"
            log.warning("%s; sent A-ABORT", detail, extra=self.extra)
            self.outcome.refuse(Result.ABORTED, Reason.IDLE, detail)
            self.writer.write(a_abort())
        except ConnectionError as exc:
            self.outcome.refuse(Result.ABORTED, Reason.PEER_ABORTED, f"the sending device's connection broke: {exc}")
        finally:
            if reports is not None:
                reports.detach(self)
            for waiting in self._reports.values():  # an unanswered report is not delivered: kept pending
                if not waiting.done():
                    waiting.set_exception(ConnectionError("the association ended before the N-EVENT-REPORT-RSP"))
            self.outcome.studies = self.tap.summary()
            if self.store is not None and self.store.writer is not None:
                self.store.writer.abort()  # never acknowledged: the device sends it again
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            self.writer.close()
            log.info(
                "accelerated association from %r for %r ended: %d stored in the spool, %d refused",
                self.outcome.calling_ae,
                self.outcome.called_ae,
                self.stored,
                self.refused,
                extra=self.extra,
            )

    async def _serve(self) -> None:
        while True:
            data = await asyncio.wait_for(self.reader.read(READ_BYTES), self.idle_timeout_s)
            if not data:
                self.outcome.refuse(Result.ABORTED, Reason.PEER_ABORTED, "the sending device closed the connection")
                return
            self.outcome.bytes_to_remote += len(data)
            for event in self.framer.feed(data):
                if isinstance(event, PDataBytes):
                    for dimse in self.receiver.feed(event.data):
                        await self._dimse(dimse)
                elif isinstance(event, ControlPdu):
                    if event.pdu_type == PduType.RELEASE_RQ:
                        self.writer.write(a_release_rp())
                        self.outcome.result = Result.RELEASED
                        return
                    if event.pdu_type == PduType.ABORT:
                        self.outcome.refuse(Result.ABORTED, Reason.PEER_ABORTED, "the sending device aborted")
                        return
                    raise PduError(f"unexpected {PduType(event.pdu_type).label} on an established association")

    async def _send(self, context_id: int, command: object) -> None:
        for pdu in self.sender.message(context_id, command):  # type: ignore[arg-type]
            self.writer.write(pdu)
            self.outcome.bytes_to_local += len(pdu)
        await self.writer.drain()

    async def _dimse(self, event: object) -> None:
        if isinstance(event, CommandReceived):
            if event.command_field == CommandField.C_ECHO_RQ:
                await self._send(event.context_id, c_echo_rsp(int(event.command.MessageID)))
            elif event.command_field == CommandField.C_STORE_RQ:
                self._begin(event.context_id, event.store or parse_c_store_rq(event.command))
            elif event.command_field == CommandField.N_ACTION_RQ and event.context_id == self.commitment_context:
                self.action = (event.context_id, event.command, bytearray())
                if not event.has_dataset:  # no Action Information: answered now (0x0120), nothing to wait for
                    await self._commitment_request()
            elif event.command_field == CommandField.N_EVENT_REPORT_RSP and event.context_id == self.commitment_context:
                status = int(event.command.get("Status", 0xFFFF))
                waiting = self._reports.pop(int(event.command.get("MessageIDBeingRespondedTo", 0)), None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(status)
            else:  # only Verification and Storage contexts were accepted: nothing else can be valid
                raise DimseError(
                    f"command 0x{event.command_field:04X} on an accelerated storage association",
                    Violation.BAD_COMMAND_FIELD,
                )
        elif isinstance(event, DatasetChunk):
            if self.action is not None:
                if len(self.action[2]) <= MAX_REQUEST_BYTES:  # beyond: refused once complete, not held
                    self.action[2].extend(event.data)
            else:
                self._write(event.data)
        elif isinstance(event, DatasetComplete):
            if self.action is not None:
                await self._commitment_request()
            else:
                await self._complete()

    async def _commitment_request(self) -> None:
        """N-ACTION Request Storage Commitment (PS3.4 J.3.2): kept durable, answered later by N-EVENT-REPORT."""
        assert self.action is not None and self.commitment is not None
        context_id, command, data = self.action
        self.action = None
        message_id = int(command.MessageID)
        status, problem = CommitmentStatus.SUCCESS, ""
        try:
            if int(command.get("ActionTypeID", 0)) != 1:
                raise CommitmentRefused(CommitmentStatus.NO_SUCH_ACTION, "Action Type ID is not 1 (PS3.4 J.3.2)")
            if str(command.get("RequestedSOPInstanceUID", "")) != STORAGE_COMMITMENT_PUSH_INSTANCE:
                raise CommitmentRefused(
                    CommitmentStatus.INVALID_ATTRIBUTE_VALUE,
                    f"Requested SOP Instance UID is not the well-known {STORAGE_COMMITMENT_PUSH_INSTANCE}",
                )
            if len(data) > MAX_REQUEST_BYTES:
                raise CommitmentRefused(CommitmentStatus.RESOURCE_LIMITATION, "Action Information over 8 MiB")
            info = decode_request(bytes(data), self.negotiated.contexts[context_id][1])
            self.commitment.accept(self.route, self.requester, info)
        except CommitmentRefused as exc:
            status, problem = exc.status, str(exc)
            log.warning("storage commitment request from %r refused with 0x%04X: %s", self.requester, status, problem)
        except OSError as exc:  # the request could not be made durable: refused, not promised
            status, problem = CommitmentStatus.RESOURCE_LIMITATION, f"cannot keep the request: {exc}"
            log.error("storage commitment request from %r: %s", self.requester, problem, extra=self.extra)
        await self._send(context_id, n_action_rsp(message_id, status))

    async def event_report(self, info: Dataset, event_type: int) -> None:
        """Send a Storage Commitment N-EVENT-REPORT-RQ on this association (the commitment service calls it)."""
        assert self.commitment_context is not None
        context_id = self.commitment_context
        message_id, self._next_message_id = self._next_message_id, self._next_message_id % 0xFFFF + 1
        data = encode_dataset(info, self.negotiated.contexts[context_id][1])
        answered = asyncio.get_running_loop().create_future()
        self._reports[message_id] = answered
        try:
            for pdu in self.sender.message(context_id, n_event_report_rq(message_id, event_type), data):
                self.writer.write(pdu)
                self.outcome.bytes_to_local += len(pdu)
            await self.writer.drain()
            # Delivered only once the requester answered: a report sent while it releases is lost otherwise.
            status = await asyncio.wait_for(answered, REPORT_RSP_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(f"no N-EVENT-REPORT-RSP within {REPORT_RSP_TIMEOUT_S:.0f} s") from None
        finally:
            self._reports.pop(message_id, None)
        if status != 0x0000:
            raise ConnectionError(f"{self.requester!r} answered the N-EVENT-REPORT with 0x{status:04X}")

    def _begin(self, context_id: int, request: StoreRequest) -> None:
        abstract, transfer_syntax = self.negotiated.contexts[context_id]
        if request.sop_class_uid != abstract:
            self.store = _Store(request, context_id, None, Status.CANNOT_UNDERSTAND)
            self.store.error = f"SOP class {request.sop_class_uid} sent on a context for {abstract}"
            return
        meta = {"calling_ae": self.outcome.calling_ae, "association": self.outcome.association_id}
        if request.move_originator_ae is not None:
            meta["move_originator_ae"] = request.move_originator_ae
            meta["move_originator_id"] = str(request.move_originator_message_id)
        writer = self.spool.writer(
            self.route,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            transfer_syntax=transfer_syntax,
            meta=meta,
        )
        self.store = _Store(request, context_id, writer, Status.SUCCESS)

    def _write(self, data: bytes) -> None:
        from relay_router.accel.spool import SpoolFull

        store = self.store
        if store is None:
            return
        if len(store.prefix) < self.tap.max_prefix:
            store.prefix += data[: self.tap.max_prefix - len(store.prefix)]
        if store.writer is None:
            return  # refused: the rest of the data set is read and dropped
        try:
            store.writer.write(data)
        except SpoolFull as exc:
            store.writer.abort()
            store.writer, store.status, store.error = None, Status.OUT_OF_RESOURCES, str(exc)
        except OSError as exc:  # a full disk or an I/O error: the same answer, nothing acknowledged
            store.writer.abort()
            store.writer, store.status, store.error = None, Status.OUT_OF_RESOURCES, f"spool write failed: {exc}"

    async def _complete(self) -> None:
        from relay_router.accel.spool import SpoolError

        store, self.store = self.store, None
        assert store is not None
        request = store.request
        if store.writer is not None:
            try:
                # Durable on return (a journal sync, relay_router.accel.spool); the transfer to the far router
                # is woken once the entry is written out for it, which happens after this answer.
                await asyncio.to_thread(store.writer.commit, self._visible)
            except (SpoolError, OSError) as exc:
                store.writer.abort()
                store.status, store.error = Status.OUT_OF_RESOURCES, f"spool commit failed: {exc}"
            else:
                self.stored += 1
        if store.status != Status.SUCCESS:
            self.refused += 1
            log.warning(
                "C-STORE of %s from %r refused with 0x%04X: %s",
                request.sop_instance_uid,
                self.outcome.calling_ae,
                store.status,
                store.error,
                extra=self.extra,
            )
        if store.status == Status.SUCCESS and not store.error:
            encoded = self._responses.success(request.message_id, request.sop_class_uid, request.sop_instance_uid)
            for pdu in self.sender.encoded_command(store.context_id, encoded):
                self.writer.write(pdu)
                self.outcome.bytes_to_local += len(pdu)
            await self.writer.drain()
        else:
            await self._send(store.context_id, self._store_rsp(request, store.status, store.error))
        self._audit(store)

    def _audit(self, store: _Store) -> None:
        """Record the instance's study and patient in the tap (after the answer: not on the sender's time)."""
        transfer_syntax = self.negotiated.contexts[store.context_id][1]
        try:
            with warnings.catch_warnings():  # the sender chose these bytes: no warning per bad data set
                warnings.simplefilter("ignore")
                found = read_prefix(bytes(store.prefix), transfer_syntax)
        except Exception:  # a hostile or broken data set: counted, never raised (as the tap does)
            found = None
        if found is None or not found[0]:
            self.tap.unreadable += 1
            return
        study_uid, patient_id, issuer = found
        originator = store.request.move_originator_ae or ""
        self.tap.record(Side.REQUESTOR, study_uid, patient_id, issuer, store.request.sop_class_uid, originator)

    def _store_rsp(self, request: StoreRequest, status: int, error: str) -> Dataset:
        """A C-STORE-RSP refusing the instance (a success is encoded by `self._responses`: building it through
        pynetdicom's primitive and pydicom's writer took 1-2 ms per image on the shared VM)."""
        return c_store_rsp(
            request.message_id, request.sop_class_uid, request.sop_instance_uid, status, error_comment=error or None
        )
