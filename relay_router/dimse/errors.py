"""The one error type of the DIMSE layer (PS3.7 messages over PS3.8 P-DATA)."""

from __future__ import annotations

from enum import StrEnum

from relay_common.errors import Reason, RelayError
from relay_router.ul.pdu import AbortReason

__all__ = ["DimseError", "Violation"]


class Violation(StrEnum):
    """What exactly a peer got wrong: callers and tests branch on this, never on the text."""

    NOT_PDATA = "not_pdata"  # a PDU other than P-DATA-TF in the P-DATA stream (PS3.8 9.3.5)
    MALFORMED_PDV = "malformed_pdv"  # PDV item lengths that do not fit their PDU (PS3.8 9.3.5.1)
    PDU_TOO_LARGE = "pdu_too_large"  # P-DATA-TF longer than the maximum we announced (PS3.8 D.1)
    UNKNOWN_CONTEXT = "unknown_context"  # context ID not among the accepted ones (PS3.8 9.3.5.1)
    DATASET_WITHOUT_COMMAND = "dataset_without_command"  # PS3.7 6.3.1, PS3.8 E.2
    COMMAND_AFTER_DATASET = "command_after_dataset"  # a command fragment while a data set is open
    INTERLEAVED = "interleaved"  # a fragment on another context before the message ended (PS3.8 E.1)
    UNDECODABLE_COMMAND = "undecodable_command"  # not a PS3.7 command set in Implicit VR LE
    COMMAND_TOO_LARGE = "command_too_large"  # beyond our bound: a command set is a few hundred bytes
    BAD_COMMAND_FIELD = "bad_command_field"  # a required command element missing or invalid (PS3.7 9.3, 10.3)
    BAD_ARGUMENT = "bad_argument"  # a value we are asked to send is out of range (local error)


class DimseError(RelayError):
    """A DIMSE message stream (or a message we were asked to build) violates PS3.7/PS3.8.

    ``violation`` names the rule; ``abort_reason`` is the A-ABORT Reason/Diag. a
    service-provider sends for it (PS3.8 9.3.8; a message that cannot be assembled has no
    DIMSE answer, only the A-P-ABORT of PS3.8 7.4); ``context_id`` is the
    presentation context concerned, when known. ``reason`` is always ``Reason.PROTOCOL``.
    """

    reason = Reason.PROTOCOL

    def __init__(
        self,
        detail: str,
        violation: Violation,
        *,
        abort_reason: int = AbortReason.INVALID_PARAMETER_VALUE,
        context_id: int | None = None,
    ) -> None:
        super().__init__(detail, reason=Reason.PROTOCOL)
        self.violation = violation
        self.abort_reason = int(abort_reason)
        self.context_id = context_id
