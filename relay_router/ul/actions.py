"""Actions a :class:`~relay_router.ul.connection.RelayConnection` returns to its driver."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from relay_router.ul.associate import AssociateInfo

__all__ = [
    "Side",
    "Send",
    "AssociateRequested",
    "Established",
    "Rejected",
    "Released",
    "Aborted",
    "ProtocolViolation",
    "Action",
    "LocalProtocolError",
]


class Side(Enum):
    """The two byte streams of a relayed association."""

    LOCAL = "local"  # the DICOM device on this router's socket
    REMOTE = "remote"  # the tunnel to the other router

    @property
    def other(self) -> Side:
        return Side.REMOTE if self is Side.LOCAL else Side.LOCAL


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to side ``to``."""

    to: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class AssociateRequested:
    """The requestor's A-ASSOCIATE-RQ arrived (not forwarded): call accept_request or reject_request."""

    info: AssociateInfo


@dataclass(frozen=True, slots=True)
class Established:
    """The A-ASSOCIATE-AC was forwarded; ``info`` is the AC (original titles, abstract syntaxes filled in)."""

    info: AssociateInfo


@dataclass(frozen=True, slots=True)
class Rejected:
    """The association was rejected (A-ASSOCIATE-RJ, PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class Released:
    """Every A-RELEASE-RQ has been answered by an A-RELEASE-RP (PS3.8 7.2)."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The association was aborted by ``by`` (an A-ABORT PDU, or its transport closing)."""

    by: Side
    source: int
    reason: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """``side`` broke PS3.8; ``detail`` says how."""

    side: Side
    detail: str


Action = Send | AssociateRequested | Established | Rejected | Released | Aborted | ProtocolViolation


class LocalProtocolError(RuntimeError):
    """The driver called a method that the current phase does not allow."""
