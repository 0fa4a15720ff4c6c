"""What one router tells the other through the bridge when an association ends or is refused.

`Close` and `Refused` cross the bridge, which must not learn what the ends of the
encryption know: a device's A-ASSOCIATE-RJ reason, abort sources, spill errors
(an errno, a store's answer) or A-ASSOCIATE bytes. So a router sends a code from
the fixed vocabulary (`relay_common.errors.Reason` as `Close.Code`, `Refused.Reason`)
and at most one of the fixed texts below; the human text stays in its own log.
The receiving router turns the code back into a local message, and ignores any
text that is not one of the fixed ones (an older or hostile sender's).
"""

from __future__ import annotations

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import REFUSED_REASON_NAMES, Reason
from relay_common.validate import printable
from relay_router.routing import AUTHENTICATION_FAILED

# The fixed texts a Close or Refused may carry (RelayError.remote_detail / Reject.public_detail).
URL_REFUSED = "SECURITY: the bridge handed out a spill URL this router does not open"
FETCH_FAILED = "a part of a spilled data set could not be fetched (details in this router's log)"
PART_GONE = "a part of a spilled data set was gone from the store (details in this router's log)"
STORE_FAILED = "the blob store failed in the middle of a blob (details in this router's log)"
PEER_NOT_APPROVED = "the calling site is not approved at the called router (its operator runs `relay-router peers`)"
FIXED_DETAILS = frozenset(
    {URL_REFUSED, FETCH_FAILED, PART_GONE, STORE_FAILED, AUTHENTICATION_FAILED, PEER_NOT_APPROVED}
)

# What the other router's code means here, for this router's log and status.
CLOSE_MESSAGES: dict[Reason, str] = {
    Reason.OTHER: "the remote router ended the association",
    Reason.PROTOCOL: "the remote side broke the DICOM Upper Layer protocol",
    Reason.LINK_LOST: "the remote router lost its link to the bridge",
    Reason.PEER_ABORTED: "the remote device or router aborted",
    Reason.IDLE: "the remote router's idle timeout",
    Reason.SPILL: "the remote router could not store or fetch a spilled data set",
    Reason.SHUTDOWN: "the remote router is shutting down",
    Reason.SECURITY: "the remote router detected a security failure",
    Reason.DEVICE_REJECTED: "the called device rejected the association",
    Reason.DEVICE_UNREACHABLE: "the remote router could not reach its device",
    Reason.TIMEOUT: "a timeout at the remote router",
    Reason.OVERLOADED: "the remote router is at a limit",
    Reason.SERVICE_NOT_GRANTED: "no requested service is granted by the remote site",
    Reason.REQUEST_TOO_LARGE: "the A-ASSOCIATE-RQ was too large for the remote router",
}
REFUSED_MESSAGES: dict[int, str] = {
    pb.Refused.UNKNOWN_DEVICE: "the remote site has no such shared device",
    pb.Refused.NOT_PERMITTED: "the remote site does not permit this association",
    pb.Refused.SITE_OFFLINE: "the remote site is offline",
    pb.Refused.DEVICE_UNREACHABLE: "the remote router could not reach its device",
    pb.Refused.TIMEOUT: "the remote router did not answer in time",
    pb.Refused.OVERLOADED: "a limit was reached at the remote router or the bridge",
    pb.Refused.SERVICE_NOT_GRANTED: "no requested service is granted by the remote site",
    pb.Refused.DRAINING: "the bridge replica is restarting",
}
REFUSED_DETAIL_MAX = 200  # characters of the bridge's own refusal text kept in the log


def close_code(reason: Reason | None) -> pb.Close.Code:
    """The `Close.Code` for a reason (CODE_OTHER for one the wire does not name)."""
    if reason is None:
        return pb.Close.CODE_UNSPECIFIED
    try:
        return pb.Close.Code.Value(f"CODE_{reason.name}")  # type: ignore[return-value]  # the stub types it int
    except ValueError:
        return pb.Close.CODE_OTHER


def close_frame(reason: pb.Close.Reason, code: Reason | None, remote_detail: str) -> pb.Frame:
    """The Close to send: the reason, the code and a fixed text only (anything else is dropped)."""
    detail = remote_detail if remote_detail in FIXED_DETAILS else ""
    return pb.Frame(close=pb.Close(reason=reason, code=close_code(code), detail=detail))


def received_close(close: pb.Close) -> str:
    """This router's message for the other router's Close (from its code; text only if a fixed one)."""
    try:
        reason: Reason | None = Reason[pb.Close.Code.Name(close.code).removeprefix("CODE_")]
    except (ValueError, KeyError):  # unspecified, or a value this version does not know
        reason = None
    message = CLOSE_MESSAGES.get(reason, "") if reason is not None else ""
    if not message:
        message = {
            pb.Close.PEER_CLOSED: "the remote side closed",
            pb.Close.SHUTDOWN: CLOSE_MESSAGES[Reason.SHUTDOWN],
        }.get(close.reason, CLOSE_MESSAGES[Reason.OTHER])
    if close.detail in FIXED_DETAILS:
        message = f"{message}: {close.detail}"
    elif close.detail and close.code == pb.Close.CODE_UNSPECIFIED:
        # No code: the bridge closed the stream itself (its own text, e.g. the other router signed
        # off), or an older router. Shown escaped and bounded, marked as the bridge's word.
        return f"stream closed ({printable(close.detail, REFUSED_DETAIL_MAX)}, says the bridge)"
    return f"remote router: {message}"


def received_refusal(refused: pb.Refused, default_detail: str | None = None) -> tuple[Reason, str]:
    """The reason and this router's message for a Refused (from the other router or the bridge).

    The reason comes from the code, never the text. A text is kept only escaped and bounded:
    the bridge explains its own refusals (an invalid calling AE title), a router sends only
    fixed texts."""
    try:
        name = pb.Refused.Reason.Name(refused.reason)
    except ValueError:
        name = ""
    reason = REFUSED_REASON_NAMES.get(name, Reason.OTHER)
    message = REFUSED_MESSAGES.get(refused.reason) or default_detail or f"refused (reason {refused.reason})"
    if refused.detail:
        message = f"{message}: {printable(refused.detail, REFUSED_DETAIL_MAX)}"
    return reason, message
