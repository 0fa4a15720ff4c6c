"""DimseSender: fragmentation to the peer's Maximum Length (PS3.8 9.3.5, D.1, Annex E), checked with pynetdicom."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import P_DATA_TF

from relay_router.dimse import (
    DEFAULT_FRAGMENT,
    MAX_FRAGMENT,
    DimseError,
    DimseSender,
    Violation,
    c_echo_rq,
    c_store_rq,
    encode_command,
)
from relay_router.ul import PduFramer
from tests.unit.ul import builders as B

CT = B.CT_STORAGE


def headers(pdu: bytes) -> tuple[int, int, int, int, int]:
    """(PDU type, PDU-length, PDV item length, context ID, control header) of a one-PDV PDU."""
    return pdu[0], int.from_bytes(pdu[2:6], "big"), int.from_bytes(pdu[6:10], "big"), pdu[10], pdu[11]


def pynetdicom_decodes(pdus: list[bytes]) -> DIMSEMessage:
    """The reference decoder: pynetdicom's P_DATA_TF and DIMSEMessage.decode_msg."""
    message = DIMSEMessage()
    done = False
    for raw in pdus:
        assert not done, "PDUs after the message ended"
        pdu = P_DATA_TF()
        pdu.decode(raw)
        done = message.decode_msg(pdu.to_primitive())
    assert done
    return message


@pytest.mark.parametrize("max_pdu", [7, 100, 16384])
def test_fragments_respect_the_maximum_and_carry_the_right_bits(max_pdu: int) -> None:
    body = bytes(range(256)) * 20
    pdus = list(DimseSender(max_pdu).message(3, c_store_rq(2, CT, "1.2.3"), body))
    controls = []
    for pdu in pdus:
        ptype, length, item, context, control = headers(pdu)
        assert (ptype, context) == (0x04, 3)
        assert length == len(pdu) - 6 == item + 4 <= max_pdu
        controls.append(control)
    n_command = sum(1 for c in controls if c & 1)
    assert controls == [1] * (n_command - 1) + [3] + [0] * (len(controls) - n_command - 1) + [2]
    message = pynetdicom_decodes(pdus)
    assert message.command_set.AffectedSOPInstanceUID == "1.2.3"
    assert message.data_set.getvalue() == body


def test_pynetdicom_reads_our_echo() -> None:
    message = pynetdicom_decodes(list(DimseSender(16384).message(1, c_echo_rq(12))))
    assert type(message).__name__ == "C_ECHO_RQ" and message.command_set.MessageID == 12


def test_unlimited_maximum_uses_bounded_fragments() -> None:
    body = b"\x01" * (DEFAULT_FRAGMENT * 2 + 10)
    pdus = list(DimseSender(0).dataset(1, iter([body[:5], body[5:]])))
    assert [headers(p)[2] - 2 for p in pdus] == [DEFAULT_FRAGMENT, DEFAULT_FRAGMENT, 10]
    huge = DimseSender(0xFFFFFFFF)
    assert huge.fragment_size == MAX_FRAGMENT


def test_a_file_is_read_in_fragment_sized_pieces(tmp_path: Path) -> None:
    path = tmp_path / "ds.bin"
    body = bytes(range(256)) * 1000
    path.write_bytes(body)
    pdus = list(DimseSender(4096).dataset(5, path))
    assert all(len(p) <= 4096 + 6 for p in pdus)
    assert b"".join(p[12:] for p in pdus) == body
    assert [p[11] for p in pdus] == [0] * (len(pdus) - 1) + [2]
    skipped = list(DimseSender(4096).dataset(5, path, offset=1000))
    assert b"".join(p[12:] for p in skipped) == body[1000:]


def test_exact_multiple_of_the_fragment_size_ends_with_a_full_last_fragment() -> None:
    sender = DimseSender(106)  # fragments of 100 bytes
    pdus = list(sender.dataset(1, [b"a" * 150, b"b" * 50]))
    assert [(headers(p)[2] - 2, p[11]) for p in pdus] == [(100, 0), (100, 2)]


def test_empty_data_set_is_one_empty_last_fragment() -> None:
    assert list(DimseSender(0).dataset(1, [])) == [B.p_data(B.pdv(1, 2, b""))]


def test_group_length_is_recomputed() -> None:
    command = c_echo_rq(1)
    command.CommandGroupLength = 9999
    encoded = encode_command(command)
    assert int.from_bytes(encoded[8:12], "little") == len(encoded) - 12
    assert command.CommandGroupLength == 9999  # the caller's Dataset is left alone


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: DimseSender(6), "no room for a fragment"),
        (lambda: DimseSender(-1), "not a 32-bit value"),
        (lambda: list(DimseSender(0).message(2, c_echo_rq(1))), "not an odd integer"),
        (lambda: list(DimseSender(0).message(1, c_echo_rq(1), b"x")), "denies a data set"),
        (lambda: list(DimseSender(0).message(1, c_store_rq(1, CT, "1.2"))), "announces a data set"),
    ],
)
def test_bad_arguments_are_dimse_errors(call: object, words: str) -> None:
    with pytest.raises(DimseError, match=words) as caught:
        call()  # type: ignore[operator]
    assert caught.value.violation is Violation.BAD_ARGUMENT


def test_output_is_accepted_by_the_upper_layer_framer_at_its_maximum() -> None:
    framer = PduFramer(max_pdata_length=512)
    pdus = list(DimseSender(512).message(1, c_store_rq(1, CT, "1.2"), bytes(5000)))
    framer.feed(b"".join(pdus))
    assert framer.messages_completed == (1, 1) and framer.at_pdu_boundary
