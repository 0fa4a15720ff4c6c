"""Presentation context filtering (relay_router.ul.contexts): the RQ without the refused contexts,
the AC with them answered as rejected under the caller's IDs; hypothesis over mixed requests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext as PynetContext

from relay_router.ul import (
    AssociateRequested,
    Established,
    Phase,
    ProtocolViolation,
    RelayConnection,
    Send,
    Side,
    parse_associate,
)
from relay_router.ul.contexts import RESULT_USER_REJECTION, answer_removed, remove_contexts, role_selections
from tests.unit.ul.builders import (
    APP_CONTEXT,
    CT_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_BASELINE,
    MR_STORAGE,
    VERIFICATION,
    _user_info,
    associate_ac,
)

STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PRIVATE = "1.2.826.0.1.3680043.9.3811.99.1"
SYNTAXES = (VERIFICATION, STUDY_FIND, STUDY_MOVE, CT_STORAGE, MR_STORAGE, PRIVATE)
TRANSFERS = (IMPLICIT_LE, EXPLICIT_LE, JPEG_BASELINE)
ROLE_PAIRS = ((False, True), (True, False), (True, True))  # (SCU, SCP); both off is invalid (PS3.7 D.3.3.4)


def rq_with_roles(contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[tuple[str, bool, bool]] = ()) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = APP_CONTEXT
    prim.calling_ae_title = "WORKSTATION"
    prim.called_ae_title = "PACS_B"
    cxs = []
    for i, (abstract, transfers) in enumerate(contexts):
        cx = PynetContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(transfers)
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    items = _user_info(16384, extended=False)
    for uid, scu, scp in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = uid
        role.scu_role = scu
        role.scp_role = scp
        items.append(role)
    prim.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


@st.composite
def mixed_request(draw: st.DrawFn) -> tuple[bytes, frozenset[int], list[tuple[int, int, str]]]:
    """An RQ, the IDs to remove (never all) and the device's answer to each kept context."""
    n = draw(st.integers(1, 12))
    contexts = [
        (
            draw(st.sampled_from(SYNTAXES)),
            draw(st.lists(st.sampled_from(TRANSFERS), min_size=1, max_size=3, unique=True)),
        )
        for _ in range(n)
    ]
    roles = draw(
        st.lists(
            st.tuples(st.sampled_from(SYNTAXES), st.sampled_from(ROLE_PAIRS)).map(lambda r: (r[0], *r[1])),
            max_size=4,
            unique_by=lambda r: r[0],
        )
    )
    ids = [2 * i + 1 for i in range(n)]
    keep = draw(st.sets(st.sampled_from(ids), min_size=1))
    removed = frozenset(ids) - keep
    answers = [(cid, draw(st.sampled_from((0, 0, 1, 2, 3, 4))), contexts[(cid - 1) // 2][1][0]) for cid in sorted(keep)]
    if draw(st.booleans()):
        answers.reverse()  # a device may answer in another order
    return rq_with_roles(contexts, roles), removed, answers


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_request())
def test_filtered_rq_keeps_everything_but_the_removed_contexts(case: tuple[bytes, frozenset[int], list]) -> None:
    rq, removed, _ = case
    original = parse_associate(rq)
    filtered_pdu = remove_contexts(rq, original, removed)
    filtered = parse_associate(filtered_pdu)
    kept = tuple(pc for pc in original.presentation_contexts if pc.id not in removed)
    assert filtered.presentation_contexts == kept  # IDs, abstract and transfer syntaxes, order
    assert (filtered.called_ae, filtered.calling_ae, filtered.application_context) == (
        original.called_ae,
        original.calling_ae,
        original.application_context,
    )
    assert (filtered.max_pdu_length, filtered.implementation_class_uid, filtered.implementation_version_name) == (
        original.max_pdu_length,
        original.implementation_class_uid,
        original.implementation_version_name,
    )
    assert filtered_pdu[6:74] == rq[6:74]  # every fixed field
    if not removed:
        assert filtered_pdu == rq  # nothing refused: the RQ goes through byte for byte
    kept_syntaxes = {pc.abstract_syntax for pc in kept}
    if removed:
        assert role_selections(filtered_pdu) == tuple(r for r in role_selections(rq) if r.sop_class in kept_syntaxes)
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(filtered_pdu)  # the reference decoder reads it too
    assert [cx.context_id for cx in decoded.to_primitive().presentation_context_definition_list] == [
        pc.id for pc in kept
    ]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_request())
def test_ac_answers_every_context_the_caller_proposed(case: tuple[bytes, frozenset[int], list]) -> None:
    rq, removed, answers = case
    original = parse_associate(rq)
    device_ac = associate_ac(remove_contexts(rq, original, removed), answers)
    ac_pdu = answer_removed(device_ac, original, removed)
    ac = parse_associate(ac_pdu)
    assert sorted(pc.id for pc in ac.presentation_contexts) == [pc.id for pc in original.presentation_contexts]
    device = {pc.id: pc for pc in parse_associate(device_ac).presentation_contexts}
    for pc in ac.presentation_contexts:
        if pc.id in removed:
            assert pc.result == RESULT_USER_REJECTION
        else:
            assert pc == device[pc.id]  # the device's answer, untouched
    assert ac_pdu[6:74] == device_ac[6:74]
    assert ac.max_pdu_length == parse_associate(device_ac).max_pdu_length
    decoded = A_ASSOCIATE_AC()
    decoded.decode(ac_pdu)
    results = {cx.context_id: cx.result for cx in decoded.to_primitive().presentation_context_definition_results_list}
    assert set(results) == {pc.id for pc in original.presentation_contexts}
    assert all(results[cid] == RESULT_USER_REJECTION for cid in removed)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_request())
def test_relay_connection_filters_rq_and_restores_ac(case: tuple[bytes, frozenset[int], list]) -> None:
    rq, removed, answers = case
    conn = RelayConnection(Side.REMOTE)
    actions = conn.receive(Side.REMOTE, rq)
    assert any(isinstance(a, AssociateRequested) for a in actions)
    (sent,) = conn.accept_request(calling="ALIAS", remove=removed)
    assert isinstance(sent, Send) and sent.to is Side.LOCAL
    to_device = parse_associate(sent.data)
    assert not {pc.id for pc in to_device.presentation_contexts} & removed
    assert to_device.calling_ae == "ALIAS"
    out = conn.receive(Side.LOCAL, associate_ac(sent.data, answers))
    (back,) = [a for a in out if isinstance(a, Send)]
    (established,) = [a for a in out if isinstance(a, Established)]
    ac = parse_associate(back.data)
    assert back.to is Side.REMOTE and ac.called_ae == "PACS_B" and ac.calling_ae == "WORKSTATION"
    assert {pc.id for pc in ac.presentation_contexts} == {pc.id for pc in conn.requested.presentation_contexts}
    assert not ({pc.id for pc in established.info.accepted_contexts} & removed)


def test_nothing_left_is_refused_and_unknown_ids_too() -> None:
    rq = rq_with_roles([(CT_STORAGE, [IMPLICIT_LE])])
    conn = RelayConnection(Side.REMOTE)
    conn.receive(Side.REMOTE, rq)
    with pytest.raises(ValueError, match="reject the association"):
        conn.accept_request(remove={1})
    with pytest.raises(ValueError, match=r"\[3\] were not proposed"):
        conn.accept_request(remove={3})
    assert conn.reject_request(1, 1, 1)[0].data == bytes.fromhex("03000000000400010101")


def test_role_items_for_removed_syntaxes_are_dropped_and_others_kept() -> None:
    rq = rq_with_roles(
        [(STUDY_FIND, [IMPLICIT_LE]), (CT_STORAGE, [IMPLICIT_LE]), (MR_STORAGE, [IMPLICIT_LE])],
        roles=[(CT_STORAGE, False, True), (MR_STORAGE, False, True)],
    )
    filtered = remove_contexts(rq, parse_associate(rq), {3})
    assert [r.sop_class for r in role_selections(filtered)] == [MR_STORAGE]
    assert role_selections(filtered)[0].requestor_only_scp


def test_c_get_storage_context_the_acceptor_did_not_confirm_as_receive_only_is_rejected_and_blocked() -> None:
    """A device that ignores role selection leaves the caller as SCU: that context must not carry a C-STORE."""
    from tests.unit.ul.builders import store_rq

    rq = rq_with_roles(
        [(STUDY_MOVE, [IMPLICIT_LE]), (CT_STORAGE, [IMPLICIT_LE]), (MR_STORAGE, [IMPLICIT_LE])],
        roles=[(CT_STORAGE, False, True), (MR_STORAGE, False, True)],
    )
    conn = RelayConnection(Side.REMOTE)
    conn.receive(Side.REMOTE, rq)
    (sent,) = conn.accept_request(receive_only={3, 5})
    ac = associate_ac(sent.data)  # accepts everything, answers no role item: default roles apply
    ac_with_role = _with_role(ac, MR_STORAGE)  # ...except MR, confirmed as requestor SCP only
    out = conn.receive(Side.LOCAL, ac_with_role)
    (back,) = [a for a in out if isinstance(a, Send)]
    results = {pc.id: pc.result for pc in parse_associate(back.data).presentation_contexts}
    assert results == {1: 0, 3: RESULT_USER_REJECTION, 5: 0}
    violations = conn.receive(Side.REMOTE, b"".join(store_rq(64, context_id=3)))
    assert any(isinstance(a, ProtocolViolation) and "context 3" in a.detail for a in violations)
    assert conn.phase is Phase.CLOSED


def _with_role(ac: bytes, sop_class: str) -> bytes:
    """The AC with an SCP/SCU Role Selection sub-item (SCU 0, SCP 1) appended to its User Information."""
    import struct

    uid = sop_class.encode()
    role = struct.pack(">BBHH", 0x54, 0, len(uid) + 4, len(uid)) + uid + b"\x00\x01"
    # User Information is the last item: grow it and the PDU.
    body = bytearray(ac)
    ui = body.rfind(b"\x50\x00", 74)
    length = int.from_bytes(body[ui + 2 : ui + 4], "big")
    body[ui + 2 : ui + 4] = (length + len(role)).to_bytes(2, "big")
    body += role
    body[2:6] = (len(body) - 6).to_bytes(4, "big")
    return bytes(body)
