"""DimseReceiver: assembling messages from P-DATA-TF PDUs (PS3.7 6.3.1, PS3.8 9.3.5, Annex E)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from relay_router.dimse import (
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseError,
    DimseEvent,
    DimseReceiver,
    DimseSender,
    Violation,
    c_echo_rq,
    c_store_rq,
    encode_command,
    parse_c_store_rq,
)
from relay_router.ul import AbortReason, PduFramer
from relay_router.ul.framer import PDataBytes
from tests.unit.ul import builders as B

CT = B.CT_STORAGE
CONTEXTS = {1: (B.VERIFICATION, B.IMPLICIT_LE), 3: (CT, B.EXPLICIT_LE)}


def receiver(**kwargs: int) -> DimseReceiver:
    return DimseReceiver(CONTEXTS, **kwargs)


def dataset_of(events: list[DimseEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DatasetChunk))


def kinds(events: list[DimseEvent]) -> list[str]:
    return [type(e).__name__ for e in events if not isinstance(e, DatasetChunk)]


def test_pynetdicom_echo_is_one_command_without_data_set() -> None:
    events = receiver().feed(b"".join(B.echo_rq(context_id=1, message_id=9)))
    assert kinds(events) == ["CommandReceived"]
    (event,) = events
    assert isinstance(event, CommandReceived)
    assert event.context_id == 1 and not event.has_dataset
    assert event.command_field == 0x0030 and event.command.MessageID == 9


@pytest.mark.parametrize("max_pdu", [0, 16384, 200])
def test_pynetdicom_store_gives_command_then_the_exact_data_set(max_pdu: int) -> None:
    rx = receiver()
    events: list[DimseEvent] = []
    for pdu in B.store_rq(5000, context_id=3, message_id=4, max_pdu=max_pdu):
        events += rx.feed(pdu)
    assert kinds(events) == ["CommandReceived", "DatasetComplete"]
    command = events[0]
    assert isinstance(command, CommandReceived) and command.has_dataset
    request = parse_c_store_rq(command.command)
    assert (request.message_id, request.sop_class_uid, request.sop_instance_uid) == (4, CT, "1.2.3.4.5.6.7")
    assert dataset_of(events) == B.dataset_bytes(5000)
    complete = events[-1]
    assert isinstance(complete, DatasetComplete) and complete.length == len(B.dataset_bytes(5000))
    assert rx.idle and rx.messages == 1


def test_pdv_items_one_by_one() -> None:
    rx = receiver()
    encoded = encode_command(c_store_rq(2, CT, "1.2.3"))
    assert rx.receive_pdv(3, 0x01, encoded[:10]) == []
    (command,) = rx.receive_pdv(3, 0x03, encoded[10:])
    assert isinstance(command, CommandReceived) and command.command.AffectedSOPInstanceUID == "1.2.3"
    assert rx.receive_pdv(3, 0x00, b"abcd") == [DatasetChunk(3, b"abcd")]
    assert rx.receive_pdv(3, 0x02, b"ef") == [DatasetChunk(3, b"ef"), DatasetComplete(3, 6)]


def test_control_bits_2_to_7_are_not_tested() -> None:
    """PS3.8 E.2: the receiver never checks the reserved bits."""
    rx = receiver()
    events = rx.feed(B.p_data(B.pdv(1, 0xFF, encode_command(c_echo_rq(1)))))
    assert kinds(events) == ["CommandReceived"]


def test_several_pdvs_in_one_pdu_and_messages_back_to_back() -> None:
    store = encode_command(c_store_rq(2, CT, "1.2.3"))
    stream = B.p_data(B.pdv(3, 1, store[:20]), B.pdv(3, 3, store[20:]), B.pdv(3, 0, b"xy"), B.pdv(3, 2, b"z"))
    stream += B.p_data(B.pdv(1, 3, encode_command(c_echo_rq(5))))
    events = receiver().feed(stream)
    assert kinds(events) == ["CommandReceived", "DatasetComplete", "CommandReceived"]
    assert dataset_of(events) == b"xyz"


def test_empty_last_data_fragment_ends_the_data_set() -> None:
    rx = receiver()
    rx.feed(B.p_data(B.pdv(3, 3, encode_command(c_store_rq(2, CT, "1.2.3")))))
    assert rx.feed(B.p_data(B.pdv(3, 0, b"ab"), B.pdv(3, 2, b""))) == [DatasetChunk(3, b"ab"), DatasetComplete(3, 2)]


# --------------------------------------------------------------------- violations


def store_command_pdu(context_id: int = 3) -> bytes:
    return B.p_data(B.pdv(context_id, 3, encode_command(c_store_rq(2, CT, "1.2.3"))))


def echo_command_pdu() -> bytes:
    return B.p_data(B.pdv(1, 3, encode_command(c_echo_rq(1))))


@pytest.mark.parametrize(
    ("stream", "violation", "abort_reason", "words"),
    [
        (
            B.p_data(B.pdv(3, 2, b"data")),
            Violation.DATASET_WITHOUT_COMMAND,
            AbortReason.UNEXPECTED_PARAMETER,
            "without a command set",
        ),
        (
            echo_command_pdu() + B.p_data(B.pdv(1, 2, b"data")),
            Violation.DATASET_WITHOUT_COMMAND,
            AbortReason.UNEXPECTED_PARAMETER,
            "without a command set",
        ),
        (
            store_command_pdu() + B.p_data(B.pdv(3, 0, b"da")) + echo_command_pdu(),
            Violation.INTERLEAVED,
            AbortReason.UNEXPECTED_PARAMETER,
            "context 3 is not complete",
        ),
        (
            store_command_pdu() + B.p_data(B.pdv(3, 1, b"cmd")),
            Violation.COMMAND_AFTER_DATASET,
            AbortReason.UNEXPECTED_PARAMETER,
            "while its data set is not complete",
        ),
        (
            B.p_data(B.pdv(5, 3, encode_command(c_echo_rq(1)))),
            Violation.UNKNOWN_CONTEXT,
            AbortReason.INVALID_PARAMETER_VALUE,
            "context 5, which is not among the accepted ones [1, 3]",
        ),
        (
            B.p_data(B.pdv(1, 3, encode_command(c_echo_rq(1))[:-3])),
            Violation.UNDECODABLE_COMMAND,
            AbortReason.INVALID_PARAMETER_VALUE,
            "does not match the",
        ),
        (
            B.p_data(B.pdv(1, 3, b"\x00\x00\x00\x00\x04\x00\x00\x00\xff\xff")),
            Violation.UNDECODABLE_COMMAND,
            AbortReason.INVALID_PARAMETER_VALUE,
            "does not decode",
        ),
        (
            B.p_data(B.pdv(1, 3, b"\x08\x00\x18\x00\x02\x00\x00\x001\x00")),
            Violation.UNDECODABLE_COMMAND,
            AbortReason.INVALID_PARAMETER_VALUE,
            "group 0000",
        ),
        (
            B.p_data(B.pdv(1, 3, b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00")),
            Violation.BAD_COMMAND_FIELD,
            AbortReason.INVALID_PARAMETER_VALUE,
            "lacks",
        ),
        (
            B.p_data(B.pdv(1, 1, bytes(300)), B.pdv(1, 3, bytes(300))),
            Violation.COMMAND_TOO_LARGE,
            AbortReason.INVALID_PARAMETER_VALUE,
            "exceeds 512 bytes",
        ),
        (B.pdu(0x05, bytes(4)), Violation.NOT_PDATA, AbortReason.UNEXPECTED_PDU, "0x05"),
        (
            B.p_data(B.pdv(1, 3, b"abc", length=50)),
            Violation.MALFORMED_PDV,
            AbortReason.INVALID_PARAMETER_VALUE,
            "does not fit",
        ),
        (
            B.p_data(B.pdv(1, 3, b"abc"), b"\x00\x00"),
            Violation.MALFORMED_PDV,
            AbortReason.INVALID_PARAMETER_VALUE,
            "too few for another PDV",
        ),
        (
            B.p_data(b"\x00\x00\x00\x01\x01"),
            Violation.MALFORMED_PDV,
            AbortReason.INVALID_PARAMETER_VALUE,
            "cannot hold a PDV item",
        ),
        (
            B.p_data(B.pdv(1, 3, bytes(2000))),
            Violation.PDU_TOO_LARGE,
            AbortReason.INVALID_PARAMETER_VALUE,
            "exceeds the announced maximum of 1024",
        ),
    ],
)
def test_violations_raise_dimse_error_with_the_rule_broken(
    stream: bytes, violation: Violation, abort_reason: int, words: str
) -> None:
    rx = receiver(max_command_length=512, max_pdu_length=1024)
    with pytest.raises(DimseError) as caught:
        rx.feed(stream)
    assert caught.value.violation is violation
    assert caught.value.abort_reason == abort_reason
    assert caught.value.reason == "protocol"
    assert words in caught.value.detail
    with pytest.raises(DimseError, match="already failed"):  # poisoned, like the Upper Layer framer
        rx.feed(echo_command_pdu())


def test_sender_output_passes_the_upper_layer_framer_and_reaches_the_receiver() -> None:
    """ul/ below, dimse/ above: the framer's PDataBytes feed the receiver directly."""
    framer = PduFramer(max_pdata_length=1000)
    rx = receiver(max_pdu_length=1000)
    body = bytes(range(256)) * 40
    pdus = list(DimseSender(1000).message(3, c_store_rq(2, CT, "1.2.3"), [body]))
    events: list[DimseEvent] = []
    for event in framer.feed(b"".join(pdus)):
        assert isinstance(event, PDataBytes)
        events += rx.feed(event.data)
    assert framer.messages_completed == (1, 1)
    assert dataset_of(events) == body


def test_command_dataset_is_a_pydicom_dataset() -> None:
    (event,) = receiver().feed(echo_command_pdu())
    assert isinstance(event, CommandReceived) and isinstance(event.command, Dataset)


def test_the_layer_is_sans_io() -> None:
    """No asyncio, grpc, socket or thread import anywhere in relay_router/dimse (STYLE.md, sans-IO)."""
    import ast
    from pathlib import Path

    import relay_router.dimse

    banned = {"asyncio", "grpc", "socket", "threading", "selectors"}
    for path in Path(relay_router.dimse.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not {n.split(".")[0] for n in names} & banned, f"{path.name} imports {names}"


def test_dimse_error_is_a_relay_error_labelled_protocol() -> None:
    from relay_common.errors import Reason, RelayError

    with pytest.raises(RelayError) as caught:
        receiver().feed(B.p_data(B.pdv(3, 2, b"x")))
    assert caught.value.reason is Reason.PROTOCOL and not caught.value.security
