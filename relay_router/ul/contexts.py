"""Presentation context filtering: remove contexts from an A-ASSOCIATE-RQ, answer them in the AC.

The owner's router enforces which services a calling site may use (issue 18) by
editing the association negotiation, never the data: the contexts it refuses are
removed from the A-ASSOCIATE-RQ before the device sees it, and reappear in the
A-ASSOCIATE-AC that goes back to the caller as rejected, under the IDs the caller
proposed. Everything else in both PDUs is copied byte for byte.

Pure functions over whole PDUs that :func:`~relay_router.ul.associate.parse_associate`
has accepted; which contexts to remove is the caller's decision
(relay_router.services), not this module's.

- PS3.8 9.3.2.2: Presentation Context item (RQ), 0x20: ID, abstract syntax, transfer syntaxes.
- PS3.8 9.3.3.2 / Table 9-18: Presentation Context item (AC), 0x21: ID, result, one transfer
  syntax ("not significant" when the result is a rejection).
- PS3.7 D.3.3.4 (SCP/SCU Role Selection sub-item, 0x54 in User Information): SOP class UID,
  SCU-role, SCP-role. A role item for a SOP class that is no longer proposed is removed too.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from relay_router.ul.associate import (
    _ITEMS_START,
    ITEM_PRESENTATION_CONTEXT_AC,
    ITEM_PRESENTATION_CONTEXT_RQ,
    ITEM_USER_INFORMATION,
    SUB_TRANSFER_SYNTAX,
    AssociateInfo,
    _items,
)
from relay_router.ul.pdu import HEADER_LENGTH, PduError, PduType

__all__ = [
    "SUB_ROLE_SELECTION",
    "RESULT_USER_REJECTION",
    "RoleSelection",
    "role_selections",
    "remove_contexts",
    "answer_removed",
    "unconfirmed_receive_only",
    "reject_in_ac",
]

SUB_ROLE_SELECTION = 0x54

RESULT_USER_REJECTION = 1
"""PS3.8 Table 9-18 result 1, "user-rejection": what a removed context is answered with.

Not 3 ("abstract-syntax-not-supported (provider rejection)"): the device may well support
the SOP class; it is the owner's policy (the service user's decision) that refuses it, and
a caller's operator reading "not supported" would look for the fault in the wrong place."""


@dataclass(frozen=True)
class RoleSelection:
    """One SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4)."""

    sop_class: str
    scu_role: int
    scp_role: int

    @property
    def requestor_only_scp(self) -> bool:
        """RQ: the requestor proposes to be SCP and not SCU (a C-GET SCU receiving its sub-operations)."""
        return self.scp_role == 1 and self.scu_role == 0


def _user_information(pdu: bytes) -> tuple[int, int] | None:
    """(value start, value end) of the User Information item."""
    for item_type, _off, vs, ve in _items(memoryview(pdu), _ITEMS_START, len(pdu), "item", "PDU", "9.3.2"):
        if item_type == ITEM_USER_INFORMATION:
            return vs, ve
    return None


def _role(view: memoryview, vs: int, ve: int) -> RoleSelection:
    if ve - vs < 4:
        raise PduError(f"SCP/SCU Role Selection sub-item has length {ve - vs}, less than 4 (PS3.7 D.3.3.4)")
    uid_length = (view[vs] << 8) | view[vs + 1]
    if uid_length != ve - vs - 4:
        raise PduError(
            f"SCP/SCU Role Selection UID-length {uid_length} does not fit its sub-item of {ve - vs} bytes "
            f"(PS3.7 D.3.3.4)"
        )
    uid = bytes(view[vs + 2 : vs + 2 + uid_length]).rstrip(b"\x00 ").decode("ascii", "replace")
    return RoleSelection(uid, view[ve - 2], view[ve - 1])


def role_selections(pdu: bytes) -> tuple[RoleSelection, ...]:
    """The SCP/SCU Role Selection sub-items of an A-ASSOCIATE-RQ or -AC, in PDU order."""
    span = _user_information(pdu)
    if span is None:
        return ()
    view = memoryview(pdu)
    return tuple(
        _role(view, svs, sve)
        for sub_type, _soff, svs, sve in _items(view, span[0], span[1], "sub-item", "item", "9.3.2.3")
        if sub_type == SUB_ROLE_SELECTION
    )


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise PduError(f"item 0x{item_type:02X} would be {len(value)} bytes long, more than its 16-bit length")
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, fixed: bytes, items: Iterable[bytes]) -> bytes:
    body = fixed + b"".join(items)
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _filtered_user_information(view: memoryview, vs: int, ve: int, kept_syntaxes: Collection[str]) -> bytes:
    parts = []
    for sub_type, soff, svs, sve in _items(view, vs, ve, "sub-item", "item", "9.3.2.3"):
        if sub_type == SUB_ROLE_SELECTION and _role(view, svs, sve).sop_class not in kept_syntaxes:
            continue
        parts.append(bytes(view[soff:sve]))
    return _item(ITEM_USER_INFORMATION, b"".join(parts))


def remove_contexts(rq_pdu: bytes, requested: AssociateInfo, removed: Collection[int]) -> bytes:
    """Return the A-ASSOCIATE-RQ without the presentation contexts whose IDs are in `removed`.

    Role Selection sub-items (PS3.7 D.3.3.4) survive only for abstract syntaxes that a
    remaining context proposes. Every other item, sub-item and fixed field is copied as is.
    `requested` is `rq_pdu` parsed. Raises ``ValueError`` if nothing would be left
    (the caller must answer A-ASSOCIATE-RJ instead: an RQ needs a context, PS3.8 9.3.2).
    """
    if not removed:
        return rq_pdu
    kept = [pc for pc in requested.presentation_contexts if pc.id not in removed]
    if not kept:
        raise ValueError("every presentation context would be removed; reject the association instead")
    kept_syntaxes = {pc.abstract_syntax for pc in kept if pc.abstract_syntax is not None}
    view = memoryview(rq_pdu)
    items = []
    for item_type, off, vs, ve in _items(view, _ITEMS_START, len(view), "item", "PDU", "9.3.2"):
        if item_type == ITEM_PRESENTATION_CONTEXT_RQ and view[vs] in removed:
            continue
        if item_type == ITEM_USER_INFORMATION:
            items.append(_filtered_user_information(view, vs, ve, kept_syntaxes))
        else:
            items.append(bytes(view[off:ve]))
    return _pdu(PduType.ASSOCIATE_RQ, bytes(view[HEADER_LENGTH:_ITEMS_START]), items)


def _rejected_item(context_id: int, transfer_syntax: str, result: int) -> bytes:
    # PS3.8 9.3.3.2: the transfer syntax of a rejected context is not significant, but some
    # parsers expect the sub-item: echo the first one the caller proposed.
    sub = _item(SUB_TRANSFER_SYNTAX, transfer_syntax.encode("ascii"))
    return _item(ITEM_PRESENTATION_CONTEXT_AC, bytes([context_id, 0, result, 0]) + sub)


def answer_removed(
    ac_pdu: bytes, requested: AssociateInfo, removed: Collection[int], *, result: int = RESULT_USER_REJECTION
) -> bytes:
    """Return the device's A-ASSOCIATE-AC with the removed contexts answered as rejected.

    The AC's presentation context items are emitted in the order the caller proposed
    them (PS3.8 7.1.1.14 ties results to proposed contexts by ID), at the place of the
    AC's first one: the device's own items verbatim, a rejected item (`result`, Table 9-18)
    for each ID in `removed`. Every other item is copied as is.
    """
    if not removed:
        return ac_pdu
    if result not in (1, 2, 3, 4):
        raise ValueError(f"presentation context result {result} is not a rejection (PS3.8 Table 9-18)")
    view = memoryview(ac_pdu)
    answers: dict[int, bytes] = {}
    layout: list[bytes | None] = []  # None: where the presentation context items go
    for item_type, off, vs, ve in _items(view, _ITEMS_START, len(view), "item", "PDU", "9.3.3"):
        if item_type == ITEM_PRESENTATION_CONTEXT_AC:
            if view[vs] in removed:
                raise PduError(
                    f"A-ASSOCIATE-AC answers presentation context {view[vs]}, which was not proposed to the device"
                )
            if not answers:
                layout.append(None)
            answers[view[vs]] = bytes(view[off:ve])
        else:
            layout.append(bytes(view[off:ve]))
    contexts = []
    for pc in requested.presentation_contexts:
        if pc.id in removed:
            contexts.append(_rejected_item(pc.id, pc.transfer_syntaxes[0], result))
        elif pc.id in answers:
            contexts.append(answers.pop(pc.id))
    contexts.extend(answers.values())  # IDs the RQ did not propose: parse_associate's check reports them
    if None not in layout:  # an AC without contexts is malformed; keep the rejections after the last item
        layout.append(None)
    items = [b"".join(contexts) if part is None else part for part in layout]
    return _pdu(PduType.ASSOCIATE_AC, bytes(view[HEADER_LENGTH:_ITEMS_START]), items)


def unconfirmed_receive_only(ac_pdu: bytes, requested: AssociateInfo, receive_only: Collection[int]) -> frozenset[int]:
    """IDs in `receive_only` that the AC accepted without confirming the requestor as SCP only.

    A storage context granted only so that a C-GET SCU can receive its instances is safe only
    if the acceptor took the proposed roles (PS3.7 D.3.3.4: SCU-role 0, SCP-role 1 in the AC).
    Otherwise the default roles apply and the requestor could store through it."""
    if not receive_only:
        return frozenset()
    confirmed = {r.sop_class for r in role_selections(ac_pdu) if r.scu_role == 0 and r.scp_role == 1}
    syntax = {pc.id: pc.abstract_syntax for pc in requested.presentation_contexts}
    ac = {item[4]: item[6] for item in _ac_context_items(ac_pdu)}  # ID and result (PS3.8 Table 9-18)
    return frozenset(cid for cid in receive_only if ac.get(cid) == 0 and syntax.get(cid) not in confirmed)


def _ac_context_items(ac_pdu: bytes) -> list[bytes]:
    view = memoryview(ac_pdu)
    return [
        bytes(view[off:ve])
        for item_type, off, _vs, ve in _items(view, _ITEMS_START, len(view), "item", "PDU", "9.3.3")
        if item_type == ITEM_PRESENTATION_CONTEXT_AC
    ]


def reject_in_ac(ac_pdu: bytes, ids: Collection[int], *, result: int = RESULT_USER_REJECTION) -> bytes:
    """Return the AC with the contexts `ids` answered with `result` instead (same length, same place)."""
    if not ids:
        return ac_pdu
    out = bytearray(ac_pdu)
    view = memoryview(ac_pdu)
    for item_type, _off, vs, _ve in _items(view, _ITEMS_START, len(view), "item", "PDU", "9.3.3"):
        if item_type == ITEM_PRESENTATION_CONTEXT_AC and view[vs] in ids:
            out[vs + 2] = result
    return bytes(out)
