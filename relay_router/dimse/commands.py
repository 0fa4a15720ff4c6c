"""Typed builders and parsers for the command sets the accelerated routes need (PS3.7 9.3, 10.3).

Built through pynetdicom's DIMSE primitives (``pynetdicom.dimse_primitives``), which
validate UIDs, AE titles and message IDs, and its message classes
(``pynetdicom.dimse_messages``), which turn a primitive into a command set: no second
command codec here. The results are pydicom Datasets for
:class:`~relay_router.dimse.sender.DimseSender`.

Statuses are those of PS3.4 (C-STORE B.2.3, C-MOVE C.4.2.1.5, Storage Commitment J.3)
and PS3.7 Annex C.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import dimse_messages as messages
from pynetdicom import dimse_primitives as primitives
from pynetdicom.dsutils import encode

from relay_router.dimse.errors import DimseError, Violation
from relay_router.ul.aetitle import encode_ae_title

__all__ = [
    "CommandField",
    "Status",
    "Priority",
    "StoreRequest",
    "MessageIdAllocator",
    "c_echo_rq",
    "c_echo_rsp",
    "c_store_rq",
    "c_store_rsp",
    "c_move_rsp",
    "n_event_report_rq",
    "n_action_rsp",
    "parse_c_store_rq",
    "commitment_event_information",
    "encode_dataset",
    "STORAGE_COMMITMENT_PUSH",
    "STORAGE_COMMITMENT_PUSH_INSTANCE",
]

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class (PS3.4 J.3)."""
STORAGE_COMMITMENT_PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance (PS3.4 J.3)."""
VERIFICATION = "1.2.840.10008.1.1"

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 characters
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


class CommandField(IntEnum):
    """Command Field (0000,0100) values used here (PS3.7 E.1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130


class Status(IntEnum):
    """DIMSE statuses the routers answer with (PS3.7 C, PS3.4 B.2.3, C.4.2.1.5)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # C-STORE refused: SOP class not supported (PS3.7 Annex C)
    OUT_OF_RESOURCES = 0xA700  # C-STORE refused: out of resources (PS3.4 B.2.3)
    MOVE_SUBOPS_OUT_OF_RESOURCES = 0xA702  # C-MOVE: unable to perform sub-operations (PS3.4 C.4.2.1.5)
    CANNOT_UNDERSTAND = 0xC000  # C-STORE error (PS3.4 B.2.3)
    SUBOPS_FAILURES = 0xB000  # C-MOVE warning: one or more sub-operations failed


class Priority(IntEnum):
    """Priority (0000,0700) (PS3.7 9.3.1.1)."""

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


@dataclass(frozen=True)
class StoreRequest:
    """What the routers need from a C-STORE-RQ (PS3.7 9.3.1.1)."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae: str | None
    move_originator_message_id: int | None


class MessageIdAllocator:
    """Message IDs (0000,0110) unique among the outstanding operations of an association (PS3.7 E.1).

    IDs run 1..65535 and wrap; an ID still in use is skipped. ``release`` it when
    the final response arrived.
    """

    def __init__(self, start: int = 1) -> None:
        self._next = start if 1 <= start <= 0xFFFF else 1
        self._outstanding: set[int] = set()

    def allocate(self) -> int:
        if len(self._outstanding) >= 0xFFFF:
            raise DimseError("all 65535 message IDs are outstanding", Violation.BAD_ARGUMENT)
        while True:
            message_id = self._next
            self._next = message_id + 1 if message_id < 0xFFFF else 1
            if message_id not in self._outstanding:
                self._outstanding.add(message_id)
                return message_id

    def release(self, message_id: int) -> None:
        self._outstanding.discard(message_id)

    @property
    def outstanding(self) -> frozenset[int]:
        return frozenset(self._outstanding)


def _uid_ok(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def _command(message: messages.DIMSEMessage, primitive: object, what: str) -> Dataset:
    try:
        message.primitive_to_message(primitive)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise DimseError(f"cannot build {what}: {exc}", Violation.BAD_ARGUMENT) from None
    return message.command_set


def _set(primitive: object, what: str, **values: object) -> None:
    """Set primitive parameters; pynetdicom's setters validate them (UIDs, AE titles, IDs)."""
    for name, value in values.items():
        if name.endswith("UID") and value is not None and not _uid_ok(value):
            # pynetdicom only warns about a non-conformant UID; we never send one
            raise DimseError(f"cannot build {what}: {name} {value!r} is not a UID (PS3.5 9.1)", Violation.BAD_ARGUMENT)
        if isinstance(value, IntEnum):
            value = int(value)  # a plain int in the Dataset, whatever enum the caller used
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(primitive, name, value)
        except (ValueError, TypeError) as exc:
            raise DimseError(f"cannot build {what}: {name} {value!r}: {exc}", Violation.BAD_ARGUMENT) from None
        if value is not None and getattr(primitive, name) is None:
            raise DimseError(f"cannot build {what}: {name} {value!r} is not valid", Violation.BAD_ARGUMENT)


def c_echo_rq(message_id: int) -> Dataset:
    """C-ECHO-RQ (PS3.7 9.3.5.1)."""
    prim = primitives.C_ECHO()
    _set(prim, "C-ECHO-RQ", MessageID=message_id, AffectedSOPClassUID=VERIFICATION)
    return _command(messages.C_ECHO_RQ(), prim, "C-ECHO-RQ")


def c_echo_rsp(message_id: int, status: int = Status.SUCCESS) -> Dataset:
    """C-ECHO-RSP answering ``message_id`` (PS3.7 9.3.5.2)."""
    prim = primitives.C_ECHO()
    _set(prim, "C-ECHO-RSP", MessageIDBeingRespondedTo=message_id, AffectedSOPClassUID=VERIFICATION, Status=status)
    return _command(messages.C_ECHO_RSP(), prim, "C-ECHO-RSP")


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    priority: int = Priority.MEDIUM,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
) -> Dataset:
    """C-STORE-RQ announcing a data set (PS3.7 9.3.1.1); the Move Originator pair for C-MOVE sub-operations."""
    if priority not in (0, 1, 2):
        raise DimseError(f"cannot build C-STORE-RQ: priority {priority} is not 0, 1 or 2", Violation.BAD_ARGUMENT)
    if (move_originator_ae is None) != (move_originator_message_id is None):
        raise DimseError(
            "cannot build C-STORE-RQ: Move Originator AE Title and Message ID go together (PS3.7 9.3.1.1)",
            Violation.BAD_ARGUMENT,
        )
    prim = primitives.C_STORE()
    _set(
        prim,
        "C-STORE-RQ",
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        AffectedSOPInstanceUID=sop_instance_uid,
        Priority=priority,
        MoveOriginatorApplicationEntityTitle=move_originator_ae,
        MoveOriginatorMessageID=move_originator_message_id,
    )
    command = _command(messages.C_STORE_RQ(), prim, "C-STORE-RQ")
    command.CommandDataSetType = 0x0001  # the data set follows (PS3.7 E.1); a US, so the group length holds
    return command


def c_store_rsp(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, *, error_comment: str | None = None
) -> Dataset:
    """C-STORE-RSP answering ``message_id`` (PS3.7 9.3.1.2)."""
    prim = primitives.C_STORE()
    _set(
        prim,
        "C-STORE-RSP",
        MessageIDBeingRespondedTo=message_id,
        AffectedSOPClassUID=sop_class_uid,
        AffectedSOPInstanceUID=sop_instance_uid,
        Status=status,
    )
    command = _command(messages.C_STORE_RSP(), prim, "C-STORE-RSP")
    if error_comment:
        command.ErrorComment = error_comment[:64]  # LO, 64 characters (PS3.7 Annex C)
    return command


def c_move_rsp(
    message_id: int,
    sop_class_uid: str,
    status: int,
    *,
    completed: int = 0,
    failed: int = 0,
    warning: int = 0,
    remaining: int | None = None,
) -> Dataset:
    """C-MOVE-RSP with sub-operation counts (PS3.7 9.3.4.2, PS3.4 C.4.2).

    ``remaining`` goes in pending responses; a final response leaves it out.
    """
    for name, count in (("completed", completed), ("failed", failed), ("warning", warning), ("remaining", remaining)):
        if count is not None and not 0 <= count <= 0xFFFF:
            raise DimseError(f"cannot build C-MOVE-RSP: {name} count {count} is not a US", Violation.BAD_ARGUMENT)
    prim = primitives.C_MOVE()
    _set(
        prim,
        "C-MOVE-RSP",
        MessageIDBeingRespondedTo=message_id,
        AffectedSOPClassUID=sop_class_uid,
        Status=status,
        NumberOfRemainingSuboperations=remaining,
        NumberOfCompletedSuboperations=completed,
        NumberOfFailedSuboperations=failed,
        NumberOfWarningSuboperations=warning,
    )
    return _command(messages.C_MOVE_RSP(), prim, "C-MOVE-RSP")


def n_event_report_rq(message_id: int, event_type_id: int) -> Dataset:
    """N-EVENT-REPORT-RQ of Storage Commitment (PS3.7 10.3.1.1, PS3.4 J.3.3).

    ``event_type_id`` 1: all instances committed; 2: failures exist. The Event
    Information (see :func:`commitment_event_information`) follows as the data set.
    """
    if event_type_id not in (1, 2):
        raise DimseError(
            f"cannot build N-EVENT-REPORT-RQ: Storage Commitment event type {event_type_id} is not 1 or 2 "
            "(PS3.4 J.3.3)",
            Violation.BAD_ARGUMENT,
        )
    prim = primitives.N_EVENT_REPORT()
    _set(
        prim,
        "N-EVENT-REPORT-RQ",
        MessageID=message_id,
        AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH,
        AffectedSOPInstanceUID=STORAGE_COMMITMENT_PUSH_INSTANCE,
        EventTypeID=event_type_id,
    )
    command = _command(messages.N_EVENT_REPORT_RQ(), prim, "N-EVENT-REPORT-RQ")
    command.CommandDataSetType = 0x0001
    return command


def n_action_rsp(message_id: int, status: int = Status.SUCCESS, *, action_type_id: int = 1) -> Dataset:
    """N-ACTION-RSP to a Storage Commitment request (PS3.7 10.3.4.2, PS3.4 J.3.2): no Action Reply."""
    prim = primitives.N_ACTION()
    _set(
        prim,
        "N-ACTION-RSP",
        MessageIDBeingRespondedTo=message_id,
        AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH,
        AffectedSOPInstanceUID=STORAGE_COMMITMENT_PUSH_INSTANCE,
        ActionTypeID=action_type_id,
        Status=status,
    )
    return _command(messages.N_ACTION_RSP(), prim, "N-ACTION-RSP")


def encode_dataset(dataset: Dataset, transfer_syntax: str) -> bytes:
    """Encode a (small) data set in a presentation context's uncompressed transfer syntax."""
    implicit = transfer_syntax == _IMPLICIT_LE
    little = transfer_syntax != _EXPLICIT_BE
    encoded = encode(dataset, implicit, little, transfer_syntax == _DEFLATED)
    if encoded is None:
        raise DimseError(f"cannot encode the data set in transfer syntax {transfer_syntax}", Violation.BAD_ARGUMENT)
    return encoded


def commitment_event_information(
    transaction_uid: str,
    committed: Iterable[tuple[str, str]],
    failed: Iterable[tuple[str, str, int]] = (),
) -> Dataset:
    """Storage Commitment Event Information (PS3.4 J.3.3).

    ``committed``: (SOP Class UID, SOP Instance UID); ``failed``: the same plus a
    Failure Reason (0x0110 processing failure, 0x0112 no such object instance, ...).
    """
    info = Dataset()
    info.TransactionUID = transaction_uid
    done = Sequence()
    for sop_class, sop_instance in committed:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        done.append(item)
    lost = Sequence()
    for sop_class, sop_instance, reason in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.FailureReason = reason
        lost.append(item)
    if done:
        info.ReferencedSOPSequence = done
    if lost:
        info.FailedSOPSequence = lost
    return info


def parse_c_store_rq(command: Dataset) -> StoreRequest:
    """The fields of a received C-STORE-RQ (PS3.7 9.3.1.1), validated through pynetdicom's C_STORE.

    Raises DimseError when it is not a C-STORE-RQ or a required field is missing or invalid.
    """
    field = command.get("CommandField")
    if field is None or int(field) != CommandField.C_STORE_RQ:
        raise DimseError(f"Command Field {field} is not C-STORE-RQ (0x0001)", Violation.BAD_COMMAND_FIELD)
    message = messages.C_STORE_RQ()
    message.command_set = command
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prim = message.message_to_primitive()
    except (ValueError, TypeError, AttributeError) as exc:
        raise DimseError(f"C-STORE-RQ has an invalid field: {exc}", Violation.BAD_COMMAND_FIELD) from None
    assert isinstance(prim, primitives.C_STORE)
    missing = [
        name
        for name, value in (
            ("Message ID", prim.MessageID),
            ("Affected SOP Class UID", prim.AffectedSOPClassUID),
            ("Affected SOP Instance UID", prim.AffectedSOPInstanceUID),
        )
        if value is None
    ]
    if missing:
        raise DimseError(f"C-STORE-RQ lacks {', '.join(missing)} (PS3.7 9.3.1.1)", Violation.BAD_COMMAND_FIELD)
    for name, uid in (
        ("Affected SOP Class UID", prim.AffectedSOPClassUID),
        ("Affected SOP Instance UID", prim.AffectedSOPInstanceUID),
    ):
        if not _uid_ok(str(uid)):
            raise DimseError(
                f"C-STORE-RQ {name} {str(uid)[:80]!r} is not a UID (PS3.5 9.1)", Violation.BAD_COMMAND_FIELD
            )
    originator = command.get(0x00001030)  # the element (a keyword would give its value)
    if originator is not None and originator.value not in (None, ""):
        try:
            if not isinstance(originator.value, str):  # a backslash makes pydicom read several values
                raise ValueError("it holds several values")
            encode_ae_title(originator.value.strip(" "))
        except ValueError as exc:
            raise DimseError(
                f"C-STORE-RQ Move Originator AE Title is not a valid AE title: {exc}"[:200],
                Violation.BAD_COMMAND_FIELD,
            ) from None
    return StoreRequest(
        message_id=int(prim.MessageID),  # type: ignore[arg-type]
        sop_class_uid=str(prim.AffectedSOPClassUID),
        sop_instance_uid=str(prim.AffectedSOPInstanceUID),
        priority=int(prim.Priority),
        move_originator_ae=prim.MoveOriginatorApplicationEntityTitle or None,
        move_originator_message_id=prim.MoveOriginatorMessageID,
    )
