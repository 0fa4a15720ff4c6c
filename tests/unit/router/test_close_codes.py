"""Close and Refused carry a code and at most a fixed text; the receiver maps the code back to a message."""

from __future__ import annotations

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.close_codes import (
    CLOSE_MESSAGES,
    FIXED_DETAILS,
    STORE_FAILED,
    close_code,
    close_frame,
    received_close,
    received_refusal,
)


@pytest.mark.parametrize("reason", list(CLOSE_MESSAGES))
def test_every_close_message_has_a_wire_code_that_maps_back(reason: Reason) -> None:
    code = close_code(reason)
    assert code != pb.Close.CODE_UNSPECIFIED
    assert received_close(pb.Close(reason=pb.Close.ABORTED, code=code)) == f"remote router: {CLOSE_MESSAGES[reason]}"


def test_a_reason_without_a_code_is_other() -> None:
    assert close_code(Reason.UNKNOWN_CALLED_AE) == pb.Close.CODE_OTHER


def test_free_text_never_leaves_in_a_close() -> None:
    rj = "result 1, source 1, reason 7; A-ASSOCIATE bytes 'CALLING_WS\x1b'"
    frame = close_frame(pb.Close.ABORTED, Reason.DEVICE_REJECTED, rj)
    assert frame.close == pb.Close(reason=pb.Close.ABORTED, code=pb.Close.CODE_DEVICE_REJECTED)
    kept = close_frame(pb.Close.ABORTED, Reason.SPILL, STORE_FAILED)
    assert kept.close.detail == STORE_FAILED and STORE_FAILED in FIXED_DETAILS


def test_a_received_close_ignores_text_outside_the_vocabulary_and_unknown_codes() -> None:
    hostile = pb.Close(reason=pb.Close.ABORTED, code=9999, detail="\x1b[2Jconnection refused (errno 111)")
    assert received_close(hostile) == "remote router: the remote router ended the association"
    spill = pb.Close(reason=pb.Close.ABORTED, code=pb.Close.CODE_SPILL, detail=STORE_FAILED)
    assert received_close(spill) == f"remote router: {CLOSE_MESSAGES[Reason.SPILL]}: {STORE_FAILED}"
    assert received_close(pb.Close(reason=pb.Close.SHUTDOWN)) == "remote router: the remote router is shutting down"
    bridge = pb.Close(reason=pb.Close.ABORTED, detail="router site-b\x1b disconnected")
    assert received_close(bridge) == "stream closed (router site-b\\x1b disconnected, says the bridge)"


def test_a_received_refusal_takes_the_reason_from_the_code_and_escapes_bounded_text() -> None:
    reason, message = received_refusal(pb.Refused(reason=pb.Refused.OVERLOADED, detail="x\x1b" + "y" * 5000))
    assert reason is Reason.OVERLOADED
    assert message.startswith("a limit was reached at the remote router or the bridge: x\\x1b")
    assert "\x1b" not in message and len(message) < 320
    reason, message = received_refusal(pb.Refused(reason=77))
    assert (reason, message) == (Reason.OTHER, "refused (reason 77)")
