"""DICOM Upper Layer PDU constants, the fixed-size PDUs, and the error type.

Everything here is pure code over bytes (sans-IO). References are to DICOM PS3.8
(Network Communication Support for Message Exchange):

* 9.3.1  general PDU structure: a 6-byte header (type, reserved, 4-byte big-endian
  PDU-length counting the bytes after the header); reserved fields are sent as 0
  and never tested on receipt.
* 9.3.4  A-ASSOCIATE-RJ (Table 9-21), 9.3.6 A-RELEASE-RQ, 9.3.7 A-RELEASE-RP,
  9.3.8 A-ABORT (Table 9-26): all four have the fixed PDU-length 4.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "HEADER_LENGTH",
    "FIXED_PDU_LENGTH",
    "PduType",
    "PduError",
    "RejectResult",
    "RejectSource",
    "RejectReasonUser",
    "RejectReasonAcse",
    "RejectReasonPresentation",
    "AbortSource",
    "AbortReason",
    "REASON_NO_REASON",
    "REASON_APPLICATION_CONTEXT_NOT_SUPPORTED",
    "REASON_CALLING_AE_NOT_RECOGNIZED",
    "REASON_CALLED_AE_NOT_RECOGNIZED",
    "REASON_PROTOCOL_VERSION_NOT_SUPPORTED",
    "REASON_TEMPORARY_CONGESTION",
    "REASON_LOCAL_LIMIT_EXCEEDED",
    "a_associate_rj",
    "a_abort",
    "a_release_rq",
    "a_release_rp",
    "parse_reject",
    "parse_abort",
    "pdu_header",
]

HEADER_LENGTH = 6
"""Bytes of the common PDU header: type, reserved, 4-byte PDU-length (PS3.8 9.3.1)."""

FIXED_PDU_LENGTH = 4
"""PDU-length of A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT (PS3.8 9.3.4, 9.3.6-9.3.8)."""


class PduType(IntEnum):
    """PDU-type byte values (PS3.8 9.3.1, items a-g)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07

    @property
    def label(self) -> str:
        """The name PS3.8 uses, e.g. ``A-ASSOCIATE-RQ``."""
        return _LABELS[self]


_LABELS = {
    PduType.ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    PduType.ASSOCIATE_AC: "A-ASSOCIATE-AC",
    PduType.ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    PduType.P_DATA_TF: "P-DATA-TF",
    PduType.RELEASE_RQ: "A-RELEASE-RQ",
    PduType.RELEASE_RP: "A-RELEASE-RP",
    PduType.ABORT: "A-ABORT",
}


class AbortSource(IntEnum):
    """A-ABORT Source field (PS3.8 9.3.8, Table 9-26); 1 is reserved."""

    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag. when the source is the service-provider (PS3.8 9.3.8); 3 is reserved."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PARAMETER = 4
    UNEXPECTED_PARAMETER = 5
    INVALID_PARAMETER_VALUE = 6


class PduError(Exception):
    """A received byte stream violates PS3.8.

    ``detail`` says exactly what is wrong (for logs and audit). ``abort_reason`` is
    the A-ABORT Reason/Diag. (PS3.8 9.3.8) a service-provider should send for it.
    ``events`` carries what a framer decoded from the same ``feed`` call before the
    error (empty unless raised by :class:`~relay_router.ul.framer.PduFramer`).
    """

    def __init__(
        self,
        detail: str,
        *,
        abort_reason: int = AbortReason.INVALID_PARAMETER_VALUE,
        events: list[Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.abort_reason = int(abort_reason)
        self.events: list[Any] = events if events is not None else []


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4, Table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 9.3.4, Table 9-21)."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReasonUser(IntEnum):
    """Reason/Diag. for source 1, DICOM UL service-user (4-6 and 8-10 are reserved)."""

    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class RejectReasonAcse(IntEnum):
    """Reason/Diag. for source 2, DICOM UL service-provider (ACSE related function)."""

    NO_REASON_GIVEN = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class RejectReasonPresentation(IntEnum):
    """Reason/Diag. for source 3, DICOM UL service-provider (Presentation related); 0, 3-7 reserved."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


# Flat names, as used in the lead's examples (values per PS3.8 Table 9-21).
REASON_NO_REASON = 1  # source 1 or 2
REASON_APPLICATION_CONTEXT_NOT_SUPPORTED = 2  # source 1
REASON_CALLING_AE_NOT_RECOGNIZED = 3  # source 1
REASON_CALLED_AE_NOT_RECOGNIZED = 7  # source 1
REASON_PROTOCOL_VERSION_NOT_SUPPORTED = 2  # source 2
REASON_TEMPORARY_CONGESTION = 1  # source 3
REASON_LOCAL_LIMIT_EXCEEDED = 2  # source 3

_REJECT_REASONS: dict[int, frozenset[int]] = {
    RejectSource.SERVICE_USER: frozenset(int(r) for r in RejectReasonUser),
    RejectSource.SERVICE_PROVIDER_ACSE: frozenset(int(r) for r in RejectReasonAcse),
    RejectSource.SERVICE_PROVIDER_PRESENTATION: frozenset(int(r) for r in RejectReasonPresentation),
}

_RELEASE_RQ = bytes((PduType.RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0))
_RELEASE_RP = bytes((PduType.RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def pdu_header(pdu: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return ``(pdu_type, pdu_length)`` from the first 6 bytes (PS3.8 9.3.1).

    Raises :class:`PduError` if fewer than 6 bytes are given. The type is not checked.
    """
    if len(pdu) < HEADER_LENGTH:
        raise PduError(f"PDU header needs {HEADER_LENGTH} bytes, got {len(pdu)} (PS3.8 9.3.1)")
    return pdu[0], int.from_bytes(pdu[2:6], "big")


def _fixed_pdu(pdu: bytes | bytearray | memoryview, expected: PduType, section: str) -> memoryview:
    """Check a fixed-size PDU (header + 4 bytes) and return a view of its 4 body bytes."""
    ptype, length = pdu_header(pdu)
    if ptype != expected:
        raise PduError(
            f"expected an {expected.label} PDU (type 0x{int(expected):02X}), got type 0x{ptype:02X}",
            abort_reason=AbortReason.UNEXPECTED_PDU,
        )
    if length != FIXED_PDU_LENGTH:
        raise PduError(f"{expected.label} PDU-length is {length}, PS3.8 {section} fixes it at 4")
    if len(pdu) != HEADER_LENGTH + FIXED_PDU_LENGTH:
        raise PduError(f"{expected.label} PDU is {len(pdu)} bytes, expected 10 (PS3.8 {section})")
    return memoryview(pdu)[HEADER_LENGTH:]


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, Table 9-21).

    ``reason`` must be one of the non-reserved values defined for ``source``
    (see :class:`RejectReasonUser`, :class:`RejectReasonAcse`,
    :class:`RejectReasonPresentation`); otherwise ``ValueError``.
    """
    if result not in (RejectResult.PERMANENT, RejectResult.TRANSIENT):
        raise ValueError(f"A-ASSOCIATE-RJ result {result} is not 1 (permanent) or 2 (transient)")
    allowed = _REJECT_REASONS.get(source)
    if allowed is None:
        raise ValueError(f"A-ASSOCIATE-RJ source {source} is not 1, 2 or 3")
    if reason not in allowed:
        raise ValueError(f"A-ASSOCIATE-RJ reason {reason} is not defined for source {source}: {sorted(allowed)}")
    return bytes((PduType.ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason))


def a_abort(source: int = AbortSource.SERVICE_PROVIDER, reason: int = AbortReason.NOT_SPECIFIED) -> bytes:
    """Encode an A-ABORT PDU (PS3.8 9.3.8, Table 9-26).

    ``source`` 0 is the service-user (then ``reason`` must be 0: it is not
    significant), 2 the service-provider, with ``reason`` one of :class:`AbortReason`.
    """
    if source == AbortSource.SERVICE_USER:
        if reason != 0:
            raise ValueError("A-ABORT reason must be 0 when the source is the service-user (PS3.8 9.3.8)")
    elif source == AbortSource.SERVICE_PROVIDER:
        if reason not in {int(r) for r in AbortReason}:
            raise ValueError(f"A-ABORT reason {reason} is not defined (PS3.8 9.3.8: 0-2, 4-6)")
    else:
        raise ValueError(f"A-ABORT source {source} is not 0 (service-user) or 2 (service-provider)")
    return bytes((PduType.ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


def a_release_rq() -> bytes:
    """Encode an A-RELEASE-RQ PDU (PS3.8 9.3.6)."""
    return _RELEASE_RQ


def a_release_rp() -> bytes:
    """Encode an A-RELEASE-RP PDU (PS3.8 9.3.7)."""
    return _RELEASE_RP


def parse_reject(pdu: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Decode an A-ASSOCIATE-RJ PDU into ``(result, source, reason)`` (PS3.8 9.3.4).

    Result and source must hold defined values (else :class:`PduError`); the
    reason is returned as received, since Table 9-21 reserves several values.
    """
    body = _fixed_pdu(pdu, PduType.ASSOCIATE_RJ, "9.3.4")
    result, source, reason = body[1], body[2], body[3]
    if result not in (1, 2):
        raise PduError(f"A-ASSOCIATE-RJ result {result} is not 1 or 2 (PS3.8 9.3.4)")
    if source not in (1, 2, 3):
        raise PduError(f"A-ASSOCIATE-RJ source {source} is not 1, 2 or 3 (PS3.8 9.3.4)")
    return result, source, reason


def parse_abort(pdu: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Decode an A-ABORT PDU into ``(source, reason)`` (PS3.8 9.3.8).

    Values are returned as received: an abort ends the association whatever it says,
    and PS3.8 says the reason is not tested when the source is the service-user.
    """
    body = _fixed_pdu(pdu, PduType.ABORT, "9.3.8")
    return body[2], body[3]
