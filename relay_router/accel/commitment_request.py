"""Storage commitment requests and answers (PS3.4 Annex J), sans-IO: what relay_router.accel.commitment keeps.

Parsing and validation of an N-ACTION's Action Information (bounded, every UID checked), the
N-ACTION-RSP statuses and Failure Reasons the router uses, a pending request as stored on disk, and
the Event Information of the N-EVENT-REPORT.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from relay_router.accel.spool_format import UID_PATTERN, SpoolEntry
from relay_router.dimse import commitment_event_information

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TRANSFER_SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE)  # what the router accepts on a commitment context
MAX_REQUEST_BYTES = 8 * 1024 * 1024  # an N-ACTION data set larger than this is refused unread
_STATUS_IN_ERROR = re.compile(r"0x([0-9A-Fa-f]{4})")


class Failure(IntEnum):
    """Failure Reason (0008,1197) values of PS3.4 J.3.3 (and PS3.7 Annex C)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    RESOURCE_LIMITATION = 0x0213


class ActionStatus(IntEnum):
    """N-ACTION-RSP statuses the router answers a commitment request with (PS3.7 C, 10.1.4.1.10)."""

    SUCCESS = 0x0000
    INVALID_ATTRIBUTE_VALUE = 0x0106
    MISSING_ATTRIBUTE = 0x0120
    NO_SUCH_ACTION = 0x0123
    RESOURCE_LIMITATION = 0x0213


class CommitmentRefused(Exception):
    """A commitment request the router does not take: `status` goes into the N-ACTION-RSP."""

    def __init__(self, status: ActionStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def failure_reason(entry: SpoolEntry) -> int:
    """The Failure Reason of a DEAD entry, from the destination's status recorded in its last error."""
    match = _STATUS_IN_ERROR.search(entry.last_error)
    status = int(match.group(1), 16) if match else None
    if status == Failure.SOP_CLASS_NOT_SUPPORTED:
        return Failure.SOP_CLASS_NOT_SUPPORTED
    if status is not None and status & 0xFF00 == 0xA700:
        return Failure.RESOURCE_LIMITATION
    return Failure.PROCESSING_FAILURE


def decode_request(data: bytes, transfer_syntax: str) -> Dataset:
    """The N-ACTION's Action Information in the context's (uncompressed, little endian) transfer syntax."""
    try:
        info = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE, True)
        info.walk(lambda dataset, element: None)  # pydicom decodes lazily: every element now, errors here
        return info
    except Exception as exc:  # pydicom raises many types on garbage
        raise CommitmentRefused(ActionStatus.INVALID_ATTRIBUTE_VALUE, f"undecodable Action Information: {exc}") from exc


def parse_request(info: Dataset, max_instances: int) -> tuple[str, list[tuple[str, str]]]:
    """Transaction UID and (SOP Class UID, SOP Instance UID) pairs of a Storage Commitment request (J.3.2)."""
    try:
        transaction = str(info.get("TransactionUID", "") or "")
        items = info.get("ReferencedSOPSequence")
    except Exception as exc:
        raise CommitmentRefused(ActionStatus.INVALID_ATTRIBUTE_VALUE, f"unreadable Action Information: {exc}") from exc
    if not transaction:
        raise CommitmentRefused(ActionStatus.MISSING_ATTRIBUTE, "Transaction UID (0008,1195) is missing")
    if not UID_PATTERN.match(transaction) or len(transaction) > 64:
        raise CommitmentRefused(ActionStatus.INVALID_ATTRIBUTE_VALUE, f"Transaction UID {transaction[:70]!r} is no UID")
    if not items:
        raise CommitmentRefused(ActionStatus.MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) missing or empty")
    if len(items) > max_instances:
        raise CommitmentRefused(
            ActionStatus.RESOURCE_LIMITATION,
            f"{len(items)} instances in one request; at most {max_instances} (commitment_max_instances)",
        )
    pairs: list[tuple[str, str]] = []
    for number, item in enumerate(items, 1):
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        for name, value in (("Referenced SOP Class UID", sop_class), ("Referenced SOP Instance UID", sop_instance)):
            if not value or len(value) > 64 or not UID_PATTERN.match(value):
                raise CommitmentRefused(
                    ActionStatus.INVALID_ATTRIBUTE_VALUE, f"item {number}: {name} {value[:70]!r} is no UID"
                )
        pairs.append((sop_class, sop_instance))
    return transaction, pairs


@dataclass
class PendingRequest:
    """One accepted commitment request, waiting for its instances' outcomes (stored as JSON)."""

    transaction_uid: str
    route: str  # the accelerated title the request was sent to (the spool's route name)
    requester: str  # the calling AE title
    created: float
    instances: list[tuple[str, str]]
    seen: list[str] = field(default_factory=list)  # instances found in the spool at some time
    attempts: int = 0  # role-reversal associations tried
    next_attempt: float = 0.0
    last_error: str = ""

    @property
    def key(self) -> str:
        digest = hashlib.sha256(f"{self.route}\0{self.requester}\0{self.transaction_uid}".encode()).hexdigest()
        return digest[:32]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PendingRequest:
        data = json.loads(text)
        return cls(
            transaction_uid=str(data["transaction_uid"]),
            route=str(data["route"]),
            requester=str(data["requester"]),
            created=float(data["created"]),
            instances=[(str(c), str(i)) for c, i in data["instances"]],
            seen=[str(s) for s in data.get("seen", [])],
            attempts=int(data.get("attempts", 0)),
            next_attempt=float(data.get("next_attempt", 0.0)),
            last_error=str(data.get("last_error", "")),
        )


@dataclass(frozen=True)
class Answer:
    """What the N-EVENT-REPORT says: event type 1 (all committed) or 2 (failures exist)."""

    committed: list[tuple[str, str]]
    failed: list[tuple[str, str, int]]

    @property
    def event_type(self) -> int:
        return 2 if self.failed else 1

    def event_information(self, transaction_uid: str) -> Dataset:
        return commitment_event_information(transaction_uid, self.committed, self.failed)
