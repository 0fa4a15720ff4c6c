"""A-ASSOCIATE-RQ/AC parsing and AE title rewriting (PS3.8 9.3.2, 9.3.3, Annex D)."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ

from relay_router.ul import PduError, PduType, parse_associate, rewrite_ae_titles
from relay_router.ul.associate import (
    PresentationContext,
    ae_fields,
    encode_ae_title,
    with_abstract_syntaxes,
    with_ae_fields,
)
from tests.unit.ul import builders as B
from tests.unit.ul import fixtures as F

UID = B.uid
APP = B.item(0x10, UID(B.APP_CONTEXT))
PC_ECHO = B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x30, UID(B.VERIFICATION)) + B.item(0x40, UID(B.IMPLICIT_LE)))
USER = B.item(0x50, B.item(0x51, (16384).to_bytes(4, "big")) + B.item(0x52, UID("1.2.3.4")))


def raw_rq(*items: bytes, **kw: Any) -> bytes:
    return B.associate_raw(0x01, b"".join(items), **kw)


# ----------------------------------------------------------------------------- fixtures and pynetdicom


def test_annotated_rq_fixture() -> None:
    info = parse_associate(F.ASSOCIATE_RQ)
    assert info.pdu_type is PduType.ASSOCIATE_RQ
    assert (info.called_ae, info.calling_ae, info.protocol_version) == ("ANY-SCP", "ECHOSCU", 1)
    assert info.application_context == B.APP_CONTEXT
    assert info.presentation_contexts == (PresentationContext(1, B.VERIFICATION, (B.IMPLICIT_LE,), None),)
    assert info.max_pdu_length == 16384
    assert info.implementation_class_uid == "1.2.826.0.1.3680043.9.38110"
    assert info.implementation_version_name == "PYNETDICOM_304"
    assert info.abstract_syntaxes == (B.VERIFICATION,)


def test_annotated_ac_fixture() -> None:
    info = parse_associate(F.ASSOCIATE_AC)
    assert info.pdu_type is PduType.ASSOCIATE_AC
    assert info.presentation_contexts == (PresentationContext(1, None, (B.IMPLICIT_LE,), 0),)
    assert info.max_pdu_length == 32768
    assert info.abstract_syntaxes == ()  # the AC does not carry them...
    merged = with_abstract_syntaxes(info, parse_associate(F.ASSOCIATE_RQ))
    assert merged.abstract_syntaxes == (B.VERIFICATION,)  # ...the RQ does
    assert merged.accepted_contexts == (PresentationContext(1, B.VERIFICATION, (B.IMPLICIT_LE,), 0),)


def test_rq_with_several_contexts_and_user_info_matches_pynetdicom() -> None:
    contexts = [
        (B.VERIFICATION, [B.IMPLICIT_LE]),
        (B.CT_STORAGE, [B.JPEG_BASELINE, B.EXPLICIT_LE, B.IMPLICIT_LE]),
        (B.MR_STORAGE, [B.EXPLICIT_LE]),
        (B.CT_STORAGE, [B.IMPLICIT_LE]),
    ]
    data = B.associate_rq("ARCHIVE", "CT_SCANNER_01", contexts, max_length=65536, extended=True)
    info = parse_associate(data)
    ref = A_ASSOCIATE_RQ()
    ref.decode(data)
    assert info.called_ae == ref.called_ae_title.strip() == "ARCHIVE"
    assert info.calling_ae == ref.calling_ae_title.strip() == "CT_SCANNER_01"
    assert info.application_context == ref.application_context_name
    ref_contexts = [(c.context_id, c.abstract_syntax, tuple(c.transfer_syntax)) for c in ref.presentation_context]
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in info.presentation_contexts] == ref_contexts
    assert [c.id for c in info.presentation_contexts] == [1, 3, 5, 7]
    assert info.max_pdu_length == 65536
    assert ref.user_information is not None
    assert info.implementation_class_uid == ref.user_information.implementation_class_uid
    assert info.implementation_version_name == "RELAYTEST_1"
    assert info.abstract_syntaxes == (B.VERIFICATION, B.CT_STORAGE, B.MR_STORAGE)  # duplicates folded


def test_ac_with_rejected_contexts_matches_pynetdicom() -> None:
    rq = B.associate_rq(
        contexts=[(B.VERIFICATION, [B.IMPLICIT_LE]), (B.CT_STORAGE, [B.EXPLICIT_LE]), (B.MR_STORAGE, [B.EXPLICIT_LE])]
    )
    ac = B.associate_ac(rq, [(1, 0, B.IMPLICIT_LE), (3, 4, B.EXPLICIT_LE), (5, 3, B.EXPLICIT_LE)], max_length=0)
    info = parse_associate(ac)
    ref = A_ASSOCIATE_AC()
    ref.decode(ac)
    assert [(c.id, c.result) for c in info.presentation_contexts] == [
        (c.context_id, c.result) for c in ref.presentation_context
    ]
    assert info.max_pdu_length == 0  # 0: no maximum (PS3.8 D.1)
    merged = with_abstract_syntaxes(info, parse_associate(rq))
    assert merged.abstract_syntaxes == (B.VERIFICATION,)
    assert [c.id for c in merged.accepted_contexts] == [1]


def test_ac_for_unknown_context_is_rejected_when_merging() -> None:
    rq = B.associate_rq()
    ac = B.associate_ac(rq, [(1, 0, B.IMPLICIT_LE), (9, 0, B.IMPLICIT_LE)])
    with pytest.raises(PduError, match="context 9, which the A-ASSOCIATE-RQ did not propose"):
        with_abstract_syntaxes(parse_associate(ac), parse_associate(rq))


def test_rejected_ac_context_may_have_empty_or_missing_transfer_syntax() -> None:
    pc_rejected_empty = B.item(0x21, b"\x01\x00\x03\x00" + B.item(0x40, b""))
    pc_rejected_none = B.item(0x21, b"\x03\x00\x04\x00")
    pc_ok = B.item(0x21, b"\x05\x00\x00\x00" + B.item(0x40, UID(B.IMPLICIT_LE)))
    info = parse_associate(B.associate_raw(0x02, APP + pc_rejected_empty + pc_rejected_none + pc_ok + USER))
    assert [(c.id, c.result, c.transfer_syntaxes) for c in info.presentation_contexts] == [
        (1, 3, ()),
        (3, 4, ()),
        (5, 0, (B.IMPLICIT_LE,)),
    ]


def test_missing_max_length_means_zero_and_unknown_items_are_skipped() -> None:
    unknown_item = B.item(0x77, b"future item")
    unknown_sub = B.item(0x7F, b"future sub-item")
    user = B.item(0x50, unknown_sub + B.item(0x52, UID("1.2.3.4")) + B.item(0x55, b"V1  "))
    pc = B.item(
        0x20, b"\x01\x00\x00\x00" + unknown_sub + B.item(0x30, UID(B.VERIFICATION)) + B.item(0x40, UID(B.IMPLICIT_LE))
    )
    info = parse_associate(raw_rq(APP, unknown_item, pc, user, unknown_item))
    assert info.max_pdu_length == 0
    assert info.implementation_version_name == "V1"
    assert info.presentation_contexts[0].abstract_syntax == B.VERIFICATION


def test_uid_nul_padding_is_tolerated() -> None:
    app = B.item(0x10, UID(B.APP_CONTEXT) + b"\x00")
    assert parse_associate(raw_rq(app, PC_ECHO, USER)).application_context == B.APP_CONTEXT


def test_protocol_version_is_reported_not_tested() -> None:
    assert parse_associate(raw_rq(APP, PC_ECHO, USER, version=0x0002)).protocol_version == 2


# ----------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00\x00", "6-byte header"),
        (B.pdu(0x04, bytes(68)), "PDU type 0x04 is not an A-ASSOCIATE"),
        (B.pdu(0x01, bytes(67)), "shorter than its 68 bytes of fixed fields"),
        (raw_rq(APP, PC_ECHO, USER)[:-1], "PDU-length 166 does not match the 165 bytes"),
        # sub-item length larger than its item and than the whole PDU
        (
            raw_rq(APP, PC_ECHO, B.item(0x50, B.item(0x51, bytes(4), length=9))),
            "A-ASSOCIATE-RQ sub-item 0x51 length 9 exceeds its item",
        ),
        (
            raw_rq(APP, PC_ECHO, B.item(0x50, B.item(0x52, b"1.2", length=0xFFFF))),
            "sub-item 0x52 length 65535 exceeds its item",
        ),
        (raw_rq(APP, PC_ECHO, B.item(0x50, b"", length=0x1000)), "item 0x50 length 4096 exceeds its PDU"),
        (raw_rq(APP, PC_ECHO, USER, b"\x10\x00"), "truncated item header"),
        (raw_rq(APP, PC_ECHO, B.item(0x50, b"\x51\x00\x00")), "truncated item header"),
        # zero length where the standard needs a value
        (raw_rq(B.item(0x10, b""), PC_ECHO, USER), "Application Context name at offset 74 is empty"),
        (
            raw_rq(APP, B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x30, b"") + B.item(0x40, UID(B.IMPLICIT_LE))), USER),
            "Abstract Syntax at offset 107 is empty",
        ),
        (
            raw_rq(
                APP, B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x30, UID(B.VERIFICATION)) + B.item(0x40, b"")), USER
            ),
            "Transfer Syntax at offset 128 is empty",
        ),
        (raw_rq(APP, B.item(0x20, b"\x01\x00"), USER), "less than its 4 fixed bytes"),
        (raw_rq(APP, PC_ECHO, B.item(0x50, B.item(0x51, bytes(2)))), "Maximum Length sub-item 0x51 at offset"),
        (raw_rq(APP, PC_ECHO, B.item(0x50, B.item(0x52, b""))), "Implementation Class UID at offset"),
        # structure
        (raw_rq(PC_ECHO, USER), "no Application Context item"),
        (raw_rq(APP, USER), "no Presentation Context item"),
        (raw_rq(APP, PC_ECHO), "no User Information item"),
        (raw_rq(APP, APP, PC_ECHO, USER), "second Application Context item"),
        (raw_rq(APP, PC_ECHO, USER, USER), "second User Information item"),
        (raw_rq(APP, PC_ECHO, PC_ECHO, USER), "presentation context ID 1 is used twice"),
        (
            raw_rq(APP, B.item(0x20, b"\x02\x00\x00\x00" + PC_ECHO[8:]), USER),
            "context ID 2 at offset 99 is not an odd integer",
        ),
        (
            raw_rq(APP, B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x40, UID(B.IMPLICIT_LE))), USER),
            "has no Abstract Syntax",
        ),
        (
            raw_rq(APP, B.item(0x20, b"\x01\x00\x00\x00" + B.item(0x30, UID(B.VERIFICATION))), USER),
            "has no Transfer Syntax",
        ),
        (raw_rq(APP, B.item(0x20, PC_ECHO[4:] + B.item(0x30, UID(B.VERIFICATION))), USER), "second Abstract Syntax"),
        (raw_rq(APP, B.item(0x21, PC_ECHO[4:]), USER), "item 0x21 at offset 99 is not allowed at this level"),
        (raw_rq(APP, PC_ECHO, B.item(0x50, B.item(0x40, UID(B.IMPLICIT_LE)))), "not allowed in User Information"),
        (raw_rq(APP, B.item(0x20, PC_ECHO[4:] + B.item(0x51, bytes(4))), USER), "not allowed in a presentation"),
        (raw_rq(APP, PC_ECHO, B.item(0x50, USER[4:] + B.item(0x51, bytes(4)))), "second Maximum Length"),
        # AE titles
        (raw_rq(APP, PC_ECHO, USER, called=b" " * 16), "Called-AE-title is all spaces"),
        (raw_rq(APP, PC_ECHO, USER, calling=b"BAD\x07AE".ljust(16)), "Calling-AE-title contains bytes outside"),
        (raw_rq(APP, PC_ECHO, USER, called="ÄRZTE".encode("latin-1").ljust(16)), "outside ISO 646 G0"),
        (raw_rq(B.item(0x10, "1.2.é".encode()), PC_ECHO, USER), "outside ISO 646 G0"),
    ],
)
def test_hostile_associate_input(data: bytes, message: str) -> None:
    with pytest.raises(PduError) as info:
        parse_associate(data)
    assert message in info.value.detail


def test_hostile_ac_input() -> None:
    def ac(*items: bytes) -> bytes:
        return B.associate_raw(0x02, b"".join(items))

    tsi = B.item(0x40, UID(B.IMPLICIT_LE))
    with pytest.raises(PduError, match="result 5 is not 0-4"):
        parse_associate(ac(APP, B.item(0x21, b"\x01\x00\x05\x00" + tsi), USER))
    with pytest.raises(PduError, match="second Transfer Syntax"):
        parse_associate(ac(APP, B.item(0x21, b"\x01\x00\x00\x00" + tsi + tsi), USER))
    with pytest.raises(PduError, match="accepted but has no Transfer Syntax"):
        parse_associate(ac(APP, B.item(0x21, b"\x01\x00\x00\x00"), USER))
    with pytest.raises(PduError, match="item 0x20 at offset 99 is not allowed"):
        parse_associate(ac(APP, PC_ECHO, USER))


def test_ac_titles_are_not_tested() -> None:
    pc = B.item(0x21, b"\x01\x00\x00\x00" + B.item(0x40, UID(B.IMPLICIT_LE)))
    info = parse_associate(B.associate_raw(0x02, APP + pc + USER, called=b" " * 16, calling=b"\xff" * 16))
    assert info.called_ae == ""


def test_every_truncation_of_a_valid_rq_is_rejected() -> None:
    data = B.associate_rq(contexts=[(B.VERIFICATION, [B.IMPLICIT_LE]), (B.CT_STORAGE, [B.EXPLICIT_LE])], extended=True)
    for cut in range(len(data)):
        with pytest.raises(PduError):
            parse_associate(data[:cut])
        # the same cut with a consistent PDU-length: items are cut, not the PDU
        if cut > 6:
            with pytest.raises(PduError):
                parse_associate(B.pdu(0x01, data[6:cut]))


def test_64k_rq_parses() -> None:
    data = B.big_rq(64 * 1024)
    assert len(data) == 64 * 1024
    info = parse_associate(data)
    assert len(info.presentation_contexts) == 127 and info.presentation_contexts[-1].id == 253
    assert len(info.presentation_contexts[0].transfer_syntaxes) > 10


# ----------------------------------------------------------------------------- AE titles


def test_rewrite_and_restore_titles_rq_and_ac() -> None:
    rq = B.associate_rq("PACS_B", "WORKSTATION", extended=True)
    original = ae_fields(rq)
    out = rewrite_ae_titles(rq, called="ARCHIVE", calling="SITE_A_WS1")
    assert len(out) == len(rq)
    assert out[:10] == rq[:10] and out[42:] == rq[42:]  # only the fixed fields change
    info = parse_associate(out)
    assert (info.called_ae, info.calling_ae) == ("ARCHIVE", "SITE_A_WS1")
    ref = A_ASSOCIATE_RQ()
    ref.decode(out)
    assert ref.called_ae_title == "ARCHIVE" and ref.calling_ae_title == "SITE_A_WS1"
    assert with_ae_fields(out, original) == rq

    ac = B.associate_ac(out)
    assert parse_associate(ac).called_ae == "ARCHIVE"
    restored = with_ae_fields(ac, original)
    assert (parse_associate(restored).called_ae, parse_associate(restored).calling_ae) == ("PACS_B", "WORKSTATION")
    assert parse_associate(rewrite_ae_titles(ac, calling="X")).calling_ae == "X"


def test_rewrite_one_title_keeps_the_other() -> None:
    rq = B.associate_rq("PACS_B", "WS")
    assert rewrite_ae_titles(rq)[10:42] == rq[10:42]
    assert parse_associate(rewrite_ae_titles(rq, called="A")).calling_ae == "WS"
    assert rewrite_ae_titles(rq, called="ABCDEFGHIJKLMNOP")[10:26] == b"ABCDEFGHIJKLMNOP"
    assert rewrite_ae_titles(rq, calling=" LEAD")[26:42] == b" LEAD".ljust(16)


@pytest.mark.parametrize("title", ["", " " * 4, "A" * 17, "BACK\\SLASH", "TAB\tAE", "NEW\nLINE", "ÄRZTE", "\x00"])
def test_invalid_titles_raise_value_error(title: str) -> None:
    with pytest.raises(ValueError):
        rewrite_ae_titles(B.associate_rq(), called=title)
    with pytest.raises(ValueError):
        encode_ae_title(title)


def test_rewrite_needs_a_whole_associate_pdu() -> None:
    with pytest.raises(PduError):
        rewrite_ae_titles(F.RELEASE_RQ, called="A")
    with pytest.raises(PduError, match="does not match"):
        rewrite_ae_titles(B.associate_rq()[:-1], called="A")
    with pytest.raises(ValueError, match="32 bytes"):
        with_ae_fields(B.associate_rq(), b"short")
