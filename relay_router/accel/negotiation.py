"""The near router's answer to a sending device's A-ASSOCIATE-RQ on an accelerated route (sans-IO).

The router is the association-acceptor itself here (relay_router.accel.acceptor), so it builds the
A-ASSOCIATE-AC (PS3.8 9.3.3): Verification is accepted, a storage context only with a transfer
syntax the destination device accepts (relay_router.accel.capabilities), everything else is
rejected per context (PS3.8 Table 9-18: 3 abstract syntax not supported, 4 transfer syntaxes not
supported). Fields the AC must echo from the RQ are copied from it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from relay_router import services
from relay_router.accel.capabilities import DeviceCapabilities
from relay_router.ul import AssociateInfo, PduType

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
COMMITMENT_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR little endian
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# The router's implementation identity (PS3.7 D.3.3.2-3): the UID root of the relay's generated UIDs.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.3811.13.1"
IMPLEMENTATION_VERSION = "DICOM_RELAY_13"
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True)
class Negotiated:
    ac_pdu: bytes
    contexts: dict[int, tuple[str, str]]  # accepted context ID -> (abstract syntax, transfer syntax)
    rejected: tuple[str, ...]  # abstract syntaxes refused (for the log and the audit)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def answer(
    rq_pdu: bytes,
    request: AssociateInfo,
    capabilities: DeviceCapabilities,
    *,
    granted: tuple[str, ...] | None,
    max_pdu_length: int,
    commitment: bool = False,
) -> Negotiated:
    """The A-ASSOCIATE-AC for `request`: what the destination takes (and `granted` service groups allow)."""
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    contexts: dict[int, tuple[str, str]] = {}
    rejected: list[str] = []
    for pc in request.presentation_contexts:
        syntax = pc.abstract_syntax or ""
        chosen: str | None = None
        result = ABSTRACT_SYNTAX_NOT_SUPPORTED
        if syntax == VERIFICATION:
            chosen = IMPLICIT_LE if IMPLICIT_LE in pc.transfer_syntaxes else None
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        elif (
            syntax == STORAGE_COMMITMENT_PUSH and commitment and (granted is None or services.granted(syntax, granted))
        ):
            # answered by relay_router.accel.commitment (from the destination's outcomes)
            chosen = next((ts for ts in COMMITMENT_SYNTAXES if ts in pc.transfer_syntaxes), None)
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        elif services.is_storage(syntax) and (granted is None or services.granted(syntax, granted)):
            if syntax in capabilities.contexts:
                chosen = capabilities.choose(syntax, pc.transfer_syntaxes)
                result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        if chosen is not None:
            contexts[pc.id] = (syntax, chosen)
        else:
            rejected.append(syntax)
        ts_item = _item(0x40, _uid(chosen or (pc.transfer_syntaxes[0] if pc.transfer_syntaxes else "")))
        items.append(_item(0x21, bytes([pc.id, 0, result, 0]) + ts_item))
    user = (
        _item(0x51, struct.pack(">I", max_pdu_length))
        + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
        + _item(0x55, _uid(IMPLEMENTATION_VERSION))
    )
    items.append(_item(0x50, user))
    # Protocol version, reserved, then the called and calling titles and 32 reserved bytes echoed (PS3.8 9.3.3).
    fixed = struct.pack(">HH", 1, 0) + rq_pdu[10:74]
    body = fixed + b"".join(items)
    pdu = struct.pack(">BBI", PduType.ASSOCIATE_AC, 0, len(body)) + body
    return Negotiated(pdu, contexts, tuple(rejected))
