"""The C-STORE fast paths (relay_router.dimse.fast) agree with the general path, or step aside for it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from relay_router.dimse import DimseReceiver, c_store_rq, c_store_rsp, decode_command, encode_command, parse_c_store_rq
from relay_router.dimse.fast import StoreResponses, parse_store_rq
from relay_router.dimse.sender import DimseSender

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

uids = st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=6).map(
    lambda parts: ".".join(["1", "2"] + [str(p) for p in parts])[:64].rstrip(".")
)


def general(encoded: bytes) -> object:
    return parse_c_store_rq(decode_command(encoded))


@given(
    message_id=st.integers(min_value=0, max_value=0xFFFF),
    sop_class=st.sampled_from([CT, MR, "1.2.3"]),
    sop_instance=uids,
    priority=st.sampled_from([0, 1, 2]),
    move=st.one_of(st.none(), st.tuples(st.sampled_from(["WS_A", "A", "MOVE SCU 16CHARS"]), st.integers(0, 0xFFFF))),
)
def test_the_fast_parse_gives_what_the_general_path_gives(
    message_id: int, sop_class: str, sop_instance: str, priority: int, move: tuple[str, int] | None
) -> None:
    command = c_store_rq(
        message_id,
        sop_class,
        sop_instance,
        priority=priority,
        move_originator_ae=None if move is None else move[0],
        move_originator_message_id=None if move is None else move[1],
    )
    encoded = encode_command(command)
    fast = parse_store_rq(encoded)
    assert fast is not None, "the common C-STORE-RQ must take the fast path"
    assert fast == general(encoded)


def element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, number, len(value)) + value


def with_group_length(body: bytes) -> bytes:
    return element(0x0000, len(body).to_bytes(4, "little")) + body


def store_rq_body(**replace: bytes) -> dict[int, bytes]:
    return {
        0x0002: b"1.2.3\0",
        0x0100: (0x0001).to_bytes(2, "little"),
        0x0110: (5).to_bytes(2, "little"),
        0x0700: (0).to_bytes(2, "little"),
        0x0800: (0x0000).to_bytes(2, "little"),
        0x1000: b"1.2.3.4\0",
        **{int(k, 16): v for k, v in replace.items()},
    }


def encode(body: dict[int, bytes], order: list[int] | None = None) -> bytes:
    return with_group_length(b"".join(element(n, body[n]) for n in (order or sorted(body))))


def test_a_hand_built_command_set_with_padding_parses_like_the_general_path() -> None:
    encoded = encode(store_rq_body())
    assert parse_store_rq(encoded) == general(encoded)
    assert parse_store_rq(encoded).sop_instance_uid == "1.2.3.4"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "why, encoded",
    [
        ("an element a C-STORE-RQ does not hold", encode({**store_rq_body(), 0x0900: b"\0\0"})),
        ("elements out of order", encode(store_rq_body(), [0x0100, 0x0002, 0x0110, 0x0700, 0x0800, 0x1000])),
        ("a group length that does not count the rest", encode(store_rq_body())[:-2]),
        ("not a C-STORE-RQ", encode(store_rq_body(**{"0100": (0x0030).to_bytes(2, "little")}))),
        ("no data set announced", encode(store_rq_body(**{"0800": (0x0101).to_bytes(2, "little")}))),
        ("a SOP Instance UID that is not a UID", encode(store_rq_body(**{"1000": b"1.2.x\0"}))),
        ("a priority outside 0-2", encode(store_rq_body(**{"0700": (3).to_bytes(2, "little")}))),
        ("a US of the wrong length", encode(store_rq_body(**{"0110": b"\x05\0\0\0"}))),
        (
            "no Message ID",
            with_group_length(b"".join(element(n, v) for n, v in sorted(store_rq_body().items()) if n != 0x0110)),
        ),
        ("a Move Originator title with a backslash", encode({**store_rq_body(), 0x1030: b"A\\B ", 0x1031: b"\1\0"})),
        ("a Move Originator title without its message ID", encode({**store_rq_body(), 0x1030: b"WS_A"})),
        ("non-ASCII bytes in a UID", encode(store_rq_body(**{"1000": "1.2.\u00e9".encode("latin-1") + b"\0"}))),
        ("a truncated element header", encode(store_rq_body()) + b"\0\0\0"),
    ],
)
def test_anything_unusual_is_left_to_the_general_path(why: str, encoded: bytes) -> None:
    assert parse_store_rq(encoded) is None, why


@given(message_id=st.integers(min_value=0, max_value=0xFFFF), sop_instance=uids, sop_class=st.sampled_from([CT, MR]))
def test_the_success_response_is_byte_identical_to_pynetdicoms(
    message_id: int, sop_instance: str, sop_class: str
) -> None:
    responses = StoreResponses()
    responses.success(1, sop_class, "1.2.3.4.5")  # the template comes from another instance
    expected = encode_command(c_store_rsp(message_id, sop_class, sop_instance, 0x0000))
    assert responses.success(message_id, sop_class, sop_instance) == expected


def test_the_receiver_hands_the_fast_fields_and_still_decodes_the_command_on_demand() -> None:
    receiver = DimseReceiver({1: (CT, EXPLICIT_LE)})
    sender = DimseSender(16384)
    command = c_store_rq(9, CT, "1.2.3.4.5.6")
    pdus = b"".join(sender.message(1, command, b"\x08\x00\x16\x00" + b"UI" + b"\x00\x00"))
    events = receiver.feed(pdus)
    first = events[0]
    assert first.store is not None and first.store.message_id == 9  # type: ignore[union-attr]
    assert first.command_field == 0x0001 and first.has_dataset  # type: ignore[union-attr]
    assert isinstance(first.command, Dataset) and first.command.MessageID == 9  # type: ignore[union-attr]
