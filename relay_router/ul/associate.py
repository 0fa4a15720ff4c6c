"""A-ASSOCIATE-RQ / -AC parsing and AE title rewriting (PS3.8 9.3.2, 9.3.3, Annex D).

A router parses association PDUs only for what routing and audit need (AE titles,
presentation contexts, maximum PDU length, implementation identity), and forwards
the original bytes, except for the fixed-position AE title fields it may rewrite.

The parser treats its input as hostile: every item and sub-item length is checked
against its container, and any inconsistency raises :class:`PduError` with a
``detail`` naming the offending item and its byte offset in the PDU.

Fixed fields (PS3.8 Table 9-11 / 9-17; byte offsets from 0)::

    0 type | 1 reserved | 2-5 PDU-length | 6-7 protocol-version | 8-9 reserved
    10-25 called AE title | 26-41 calling AE title | 42-73 reserved | 74- items
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from relay_router.ul.aetitle import (
    ASSOCIATE_FIXED_LENGTH,
    CALLED_AE_SLICE,
    CALLING_AE_SLICE,
    ae_fields,
    encode_ae_title,
    rewrite_ae_titles,
    with_ae_fields,
)
from relay_router.ul.pdu import HEADER_LENGTH, AbortReason, PduError, PduType

__all__ = [
    "PresentationContext",
    "AssociateInfo",
    "parse_associate",
    "rewrite_ae_titles",
    "ae_fields",
    "with_ae_fields",
    "encode_ae_title",
    "with_abstract_syntaxes",
    "ASSOCIATE_FIXED_LENGTH",
    "CALLED_AE_SLICE",
    "CALLING_AE_SLICE",
]


_ITEMS_START = HEADER_LENGTH + ASSOCIATE_FIXED_LENGTH  # 74

# Item types (PS3.8 9.3.2-9.3.3, Annex D.1/D.3.3).
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
SUB_ABSTRACT_SYNTAX = 0x30
SUB_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
SUB_MAXIMUM_LENGTH = 0x51
SUB_IMPLEMENTATION_CLASS_UID = 0x52
SUB_IMPLEMENTATION_VERSION_NAME = 0x55
_USER_SUB_ITEMS = frozenset(range(0x51, 0x5A))  # 0x51-0x59 (PS3.7 Annex D.3.3, PS3.8 D.1)
_KNOWN_ITEMS = frozenset({0x10, 0x20, 0x21, 0x30, 0x40, 0x50}) | _USER_SUB_ITEMS

# 0 acceptance, 1 user-rejection, 2 no-reason, 3 abstract-syntax-not-supported,
# 4 transfer-syntaxes-not-supported (PS3.8 Table 9-18).
_PC_RESULTS = frozenset(range(5))


@dataclass(frozen=True)
class PresentationContext:
    """One presentation context item (PS3.8 9.3.2.2 in an RQ, 9.3.3.2 in an AC).

    ``abstract_syntax`` is None in an AC as parsed (the AC does not carry it;
    :func:`with_abstract_syntaxes` fills it in from the RQ). ``result`` is None in an
    RQ; in an AC 0 is acceptance, 1-4 are rejections (PS3.8 Table 9-18). For a
    rejected context the AC's transfer syntax is not significant and may be empty.
    """

    id: int
    abstract_syntax: str | None
    transfer_syntaxes: tuple[str, ...]
    result: int | None = None

    @property
    def accepted(self) -> bool:
        return self.result == 0


@dataclass(frozen=True)
class AssociateInfo:
    """What a router needs from an A-ASSOCIATE-RQ or -AC (PS3.8 9.3.2, 9.3.3)."""

    pdu_type: PduType
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    presentation_contexts: tuple[PresentationContext, ...]
    max_pdu_length: int
    """Maximum-length-received from user information sub-item 0x51 (PS3.8 D.1): the
    largest P-DATA-TF PDU-length the sender of this PDU accepts. 0 = unlimited or absent."""
    implementation_class_uid: str = ""
    implementation_version_name: str = ""

    @property
    def abstract_syntaxes(self) -> tuple[str, ...]:
        """Abstract syntaxes negotiated, without duplicates, in PDU order.

        RQ: every proposed abstract syntax. AC: those of accepted contexts (result 0)
        whose abstract syntax is known, i.e. after :func:`with_abstract_syntaxes`.
        """
        seen: dict[str, None] = {}
        for pc in self.presentation_contexts:
            if pc.abstract_syntax is not None and (self.pdu_type == PduType.ASSOCIATE_RQ or pc.result == 0):
                seen.setdefault(pc.abstract_syntax, None)
        return tuple(seen)

    @property
    def accepted_contexts(self) -> tuple[PresentationContext, ...]:
        """AC: the contexts with result 0 (acceptance). RQ: empty."""
        return tuple(pc for pc in self.presentation_contexts if pc.result == 0)


# --------------------------------------------------------------------------- helpers


def _err(detail: str, reason: int = AbortReason.INVALID_PARAMETER_VALUE) -> PduError:
    return PduError(detail, abort_reason=reason)


def _items(
    pdu: memoryview, start: int, end: int, where: str, container: str, section: str
) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(item_type, offset, value_start, value_end)`` for items in ``pdu[start:end]``.

    Items share the layout type(1) reserved(1) length(2, big-endian) value (PS3.8 9.3.2.x).
    """
    pos = start
    while pos < end:
        if end - pos < 4:
            raise _err(
                f"{where}: truncated item header at offset {pos} ({end - pos} bytes left in {container}, "
                f"PS3.8 {section})"
            )
        item_type = pdu[pos]
        length = (pdu[pos + 2] << 8) | pdu[pos + 3]
        vstart = pos + 4
        if length > end - vstart:
            raise _err(
                f"{where} 0x{item_type:02X} length {length} exceeds its {container} "
                f"(offset {pos}, {end - vstart} bytes left, PS3.8 {section})"
            )
        yield item_type, pos, vstart, vstart + length
        pos = vstart + length


def _text(pdu: memoryview, start: int, end: int, what: str, offset: int, *, required: bool = True) -> str:
    """Decode a UID or name field: ISO 646 G0 characters, trailing NUL/space padding tolerated (Annex F)."""
    raw = bytes(pdu[start:end]).rstrip(b"\x00 ")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise _err(f"{what} at offset {offset} contains bytes outside ISO 646 G0: {raw[:64]!r}")
    if required and not raw:
        raise _err(f"{what} at offset {offset} is empty (PS3.8 Annex F requires a value)")
    return raw.decode("ascii")


def _ae_title(pdu: memoryview, field: slice, what: str, *, strict: bool) -> str:
    """Decode a 16-byte AE title field (PS3.8 Table 9-11: ISO 646 G0, leading/trailing spaces not significant)."""
    raw = bytes(pdu[field])
    if not strict:  # AC: the field is reserved and "shall not be tested when received" (Table 9-17)
        return raw.decode("ascii", "replace").strip(" \x00")
    value = raw.rstrip(b"\x00")
    if any(b < 0x20 or b > 0x7E for b in value):
        raise _err(f"A-ASSOCIATE-RQ {what} contains bytes outside ISO 646 G0: {raw!r} (PS3.8 9.3.2)")
    text = value.decode("ascii").strip(" ")
    if not text:
        raise _err(f"A-ASSOCIATE-RQ {what} is all spaces, which PS3.8 9.3.2 forbids")
    return text


# --------------------------------------------------------------------------- parsing


def parse_associate(pdu: bytes | bytearray | memoryview) -> AssociateInfo:
    """Parse one whole A-ASSOCIATE-RQ or -AC PDU (header included).

    Validates (raising :class:`PduError`):

    * PDU type 1 or 2, PDU-length equal to the bytes given, room for the fixed fields;
    * every item and sub-item length against its container (PS3.8 9.3.2-9.3.3, D.1);
    * one Application Context item, one or more Presentation Context items, one
      User Information item (PS3.8 9.3.2 / 9.3.3); unique odd context IDs 1-255;
    * an RQ context has one Abstract Syntax and one or more Transfer Syntax sub-items;
      an AC context a result 0-4 and, when accepted, exactly one Transfer Syntax;
    * UIDs non-empty and ISO 646 G0; the Maximum Length sub-item exactly 4 bytes, once;
    * RQ AE titles ISO 646 G0 and not all spaces (AC ones are not tested, Table 9-17).

    Items and sub-items of unrecognized types are skipped (PS3.8 9.3.1); a recognized
    type in the wrong place (e.g. 0x21 in an RQ) is an unexpected parameter. The
    protocol-version is reported, not tested: accepting it is the acceptor's decision.
    """
    view = memoryview(pdu)
    if len(view) < HEADER_LENGTH:
        raise _err(f"A-ASSOCIATE PDU needs a 6-byte header, got {len(view)} bytes (PS3.8 9.3.1)")
    ptype = view[0]
    if ptype not in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC):
        raise _err(f"PDU type 0x{ptype:02X} is not an A-ASSOCIATE-RQ or -AC", AbortReason.UNEXPECTED_PDU)
    kind = PduType(ptype)
    name = kind.label
    is_rq = kind == PduType.ASSOCIATE_RQ
    section = "9.3.2" if is_rq else "9.3.3"
    length = int.from_bytes(view[2:6], "big")
    if length != len(view) - HEADER_LENGTH:
        raise _err(f"{name} PDU-length {length} does not match the {len(view) - HEADER_LENGTH} bytes after its header")
    if length < ASSOCIATE_FIXED_LENGTH:
        raise _err(
            f"{name} PDU-length {length} is shorter than its {ASSOCIATE_FIXED_LENGTH} bytes of fixed fields "
            f"(PS3.8 {section})"
        )

    protocol_version = int.from_bytes(view[6:8], "big")
    called = _ae_title(view, CALLED_AE_SLICE, "Called-AE-title", strict=is_rq)
    calling = _ae_title(view, CALLING_AE_SLICE, "Calling-AE-title", strict=is_rq)

    pc_item = ITEM_PRESENTATION_CONTEXT_RQ if is_rq else ITEM_PRESENTATION_CONTEXT_AC
    app_context: str | None = None
    contexts: list[PresentationContext] = []
    seen_ids: set[int] = set()
    user_info: tuple[int, str, str] | None = None

    for item_type, off, vs, ve in _items(view, _ITEMS_START, len(view), f"{name} item", "PDU", section):
        if item_type == ITEM_APPLICATION_CONTEXT:
            if app_context is not None:
                raise _err(
                    f"{name} has a second Application Context item at offset {off} (PS3.8 {section})",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            app_context = _text(view, vs, ve, f"{name} Application Context name", off)
        elif item_type == pc_item:
            pc = _parse_rq_context(view, off, vs, ve) if is_rq else _parse_ac_context(view, off, vs, ve)
            if pc.id in seen_ids:
                raise _err(f"{name} presentation context ID {pc.id} is used twice (PS3.8 7.1.1.13)")
            seen_ids.add(pc.id)
            contexts.append(pc)
        elif item_type == ITEM_USER_INFORMATION:
            if user_info is not None:
                raise _err(
                    f"{name} has a second User Information item at offset {off} (PS3.8 {section})",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            user_info = _parse_user_info(view, name, off, vs, ve)
        elif item_type in _KNOWN_ITEMS:
            raise _err(
                f"{name} item 0x{item_type:02X} at offset {off} is not allowed at this level (PS3.8 {section})",
                AbortReason.UNEXPECTED_PARAMETER,
            )
        # else: unrecognized item type, ignored and skipped (PS3.8 9.3.1)

    if app_context is None:
        raise _err(f"{name} has no Application Context item (PS3.8 {section})")
    if not contexts:
        raise _err(f"{name} has no Presentation Context item (PS3.8 {section})")
    if user_info is None:
        raise _err(f"{name} has no User Information item (PS3.8 {section})")
    max_length, impl_uid, impl_version = user_info
    return AssociateInfo(
        pdu_type=kind,
        protocol_version=protocol_version,
        called_ae=called,
        calling_ae=calling,
        application_context=app_context,
        presentation_contexts=tuple(contexts),
        max_pdu_length=max_length,
        implementation_class_uid=impl_uid,
        implementation_version_name=impl_version,
    )


def _context_id(view: memoryview, name: str, off: int, vs: int, ve: int, section: str) -> int:
    if ve - vs < 4:
        raise _err(
            f"{name} presentation context item at offset {off} has length {ve - vs}, "
            f"less than its 4 fixed bytes (PS3.8 {section})"
        )
    pcid = view[vs]
    if pcid % 2 == 0:
        raise _err(
            f"{name} presentation context ID {pcid} at offset {off} is not an odd integer 1-255 (PS3.8 {section})"
        )
    return pcid


def _parse_rq_context(view: memoryview, off: int, vs: int, ve: int) -> PresentationContext:
    """Presentation Context item 0x20 (PS3.8 9.3.2.2, sub-items 9.3.2.2.1 and 9.3.2.2.2)."""
    name = "A-ASSOCIATE-RQ"
    pcid = _context_id(view, name, off, vs, ve, "9.3.2.2")
    abstract: str | None = None
    transfer: list[str] = []
    where = f"{name} presentation context {pcid} sub-item"
    for sub_type, soff, svs, sve in _items(view, vs + 4, ve, where, "item", "9.3.2.2"):
        if sub_type == SUB_ABSTRACT_SYNTAX:
            if abstract is not None:
                raise _err(
                    f"{name} presentation context {pcid} has a second Abstract Syntax at offset {soff} (PS3.8 9.3.2.2)",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            abstract = _text(view, svs, sve, f"{name} presentation context {pcid} Abstract Syntax", soff)
        elif sub_type == SUB_TRANSFER_SYNTAX:
            transfer.append(_text(view, svs, sve, f"{name} presentation context {pcid} Transfer Syntax", soff))
        elif sub_type in _KNOWN_ITEMS:
            raise _err(
                f"{where} 0x{sub_type:02X} at offset {soff} is not allowed in a presentation context (PS3.8 9.3.2.2)",
                AbortReason.UNEXPECTED_PARAMETER,
            )
    if abstract is None:
        raise _err(f"{name} presentation context {pcid} at offset {off} has no Abstract Syntax (PS3.8 9.3.2.2)")
    if not transfer:
        raise _err(f"{name} presentation context {pcid} at offset {off} has no Transfer Syntax (PS3.8 9.3.2.2)")
    return PresentationContext(pcid, abstract, tuple(transfer), None)


def _parse_ac_context(view: memoryview, off: int, vs: int, ve: int) -> PresentationContext:
    """Presentation Context item 0x21 (PS3.8 9.3.3.2, Table 9-18; sub-item 9.3.3.2.1)."""
    name = "A-ASSOCIATE-AC"
    pcid = _context_id(view, name, off, vs, ve, "9.3.3.2")
    result = view[vs + 2]
    if result not in _PC_RESULTS:
        raise _err(f"{name} presentation context {pcid} result {result} is not 0-4 (PS3.8 Table 9-18)")
    transfer: list[str] = []
    count = 0
    where = f"{name} presentation context {pcid} sub-item"
    for sub_type, soff, svs, sve in _items(view, vs + 4, ve, where, "item", "9.3.3.2"):
        if sub_type == SUB_TRANSFER_SYNTAX:
            count += 1
            if count > 1:
                raise _err(
                    f"{name} presentation context {pcid} has a second Transfer Syntax at offset {soff} "
                    f"(PS3.8 9.3.3.2 allows one)",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            if result == 0:
                transfer.append(_text(view, svs, sve, f"{name} presentation context {pcid} Transfer Syntax", soff))
            else:  # not significant and not tested when rejected (PS3.8 9.3.3.2)
                raw = bytes(view[svs:sve]).rstrip(b"\x00 ")
                if raw and all(0x20 <= b <= 0x7E for b in raw):
                    transfer.append(raw.decode("ascii"))
        elif sub_type in _KNOWN_ITEMS:
            raise _err(
                f"{where} 0x{sub_type:02X} at offset {soff} is not allowed in a presentation context (PS3.8 9.3.3.2)",
                AbortReason.UNEXPECTED_PARAMETER,
            )
    if result == 0 and not transfer:
        raise _err(f"{name} presentation context {pcid} is accepted but has no Transfer Syntax (PS3.8 9.3.3.2)")
    return PresentationContext(pcid, None, tuple(transfer), result)


def _parse_user_info(view: memoryview, name: str, off: int, vs: int, ve: int) -> tuple[int, str, str]:
    """User Information item 0x50 (PS3.8 9.3.2.3 / 9.3.3.3; sub-items PS3.8 D.1, PS3.7 D.3.3)."""
    max_length: int | None = None
    impl_uid: str | None = None
    impl_version: str | None = None
    for sub_type, soff, svs, sve in _items(view, vs, ve, f"{name} sub-item", "item", "9.3.2.3"):
        if sub_type == SUB_MAXIMUM_LENGTH:
            if sve - svs != 4:
                raise _err(
                    f"{name} Maximum Length sub-item 0x51 at offset {soff} has length {sve - svs}, "
                    f"PS3.8 D.1 fixes it at 4"
                )
            if max_length is not None:
                raise _err(
                    f"{name} has a second Maximum Length sub-item at offset {soff} (PS3.8 D.1)",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            max_length = int.from_bytes(view[svs:sve], "big")
        elif sub_type == SUB_IMPLEMENTATION_CLASS_UID:
            if impl_uid is not None:
                raise _err(
                    f"{name} has a second Implementation Class UID at offset {soff} (PS3.7 D.3.3.2)",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            impl_uid = _text(view, svs, sve, f"{name} Implementation Class UID", soff)
        elif sub_type == SUB_IMPLEMENTATION_VERSION_NAME:
            if impl_version is not None:
                raise _err(
                    f"{name} has a second Implementation Version Name at offset {soff} (PS3.7 D.3.3.2)",
                    AbortReason.UNEXPECTED_PARAMETER,
                )
            impl_version = bytes(view[svs:sve]).decode("ascii", "replace").strip(" \x00")
        elif sub_type in _KNOWN_ITEMS and sub_type not in _USER_SUB_ITEMS:
            raise _err(
                f"{name} sub-item 0x{sub_type:02X} at offset {soff} is not allowed in User Information (PS3.8 9.3.2.3)",
                AbortReason.UNEXPECTED_PARAMETER,
            )
        # 0x53 (async ops), 0x54 (role), 0x56/0x57 (extended negotiation), 0x58/0x59 (user identity)
        # and unrecognized sub-items: lengths checked above, contents relayed untouched.
    return max_length or 0, impl_uid or "", impl_version or ""


def with_abstract_syntaxes(ac: AssociateInfo, rq: AssociateInfo) -> AssociateInfo:
    """Return ``ac`` with each context's abstract syntax filled in from the RQ it answers.

    Raises :class:`PduError` if the AC answers a context ID the RQ did not propose
    (PS3.8 7.1.1.14: the result list refers to the proposed contexts).
    """
    proposed = {pc.id: pc.abstract_syntax for pc in rq.presentation_contexts}
    contexts = []
    for pc in ac.presentation_contexts:
        if pc.id not in proposed:
            raise _err(
                f"A-ASSOCIATE-AC answers presentation context {pc.id}, which the A-ASSOCIATE-RQ did not "
                f"propose (PS3.8 7.1.1.14)"
            )
        contexts.append(replace(pc, abstract_syntax=proposed[pc.id]))
    return replace(ac, presentation_contexts=tuple(contexts))
