"""Realistic PDUs built with pynetdicom (the reference encoder), plus raw builders for hostile input.

pynetdicom is only used here, in tests, to produce and cross-check bytes; the
relay's own code never imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext as PynetContext

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _user_info(max_length: int | None, *, extended: bool) -> list[Any]:
    items: list[Any] = []
    if max_length is not None:
        ml = MaximumLengthNotification()
        ml.maximum_length_received = max_length
        items.append(ml)
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.1"
    items.append(ic)
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = "RELAYTEST_1"
    items.append(iv)
    if extended:
        aow = AsynchronousOperationsWindowNegotiation()
        aow.maximum_number_operations_invoked = 5
        aow.maximum_number_operations_performed = 5
        items.append(aow)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CT_STORAGE
        role.scu_role = True
        role.scp_role = True
        items.append(role)
        ui = UserIdentityNegotiation()
        ui.user_identity_type = 2
        ui.primary_field = b"radiologist"
        ui.secondary_field = b"s3cret"
        items.append(ui)
    return items


def associate_rq(
    called: str = "PACS_B",
    calling: str = "WORKSTATION",
    contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (IMPLICIT_LE,)),),
    *,
    max_length: int | None = 16384,
    extended: bool = False,
) -> bytes:
    """Encode an A-ASSOCIATE-RQ with pynetdicom; contexts get IDs 1, 3, 5, ..."""
    prim = A_ASSOCIATE()
    prim.application_context_name = APP_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cxs = []
    for i, (abstract, transfers) in enumerate(contexts):
        cx = PynetContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(transfers)
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    prim.user_information = _user_info(max_length, extended=extended)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def associate_ac(
    rq: bytes,
    results: Iterable[tuple[int | None, int, str]] | None = None,
    *,
    max_length: int | None = 32768,
    titles: tuple[str, str] | None = None,
) -> bytes:
    """Encode the A-ASSOCIATE-AC answering ``rq``: (context id, result, transfer syntax) per context.

    By default every context is accepted with its first transfer syntax. The AE
    fields echo the RQ's (PS3.8 Table 9-17) unless ``titles`` = (called, calling).
    """
    req = A_ASSOCIATE_RQ()
    req.decode(rq)
    rq_prim = req.to_primitive()
    if results is None:
        results = [(cx.context_id, 0, cx.transfer_syntax[0]) for cx in rq_prim.presentation_context_definition_list]
    prim = A_ASSOCIATE()
    prim.application_context_name = APP_CONTEXT
    called, calling = titles or (rq_prim.called_ae_title, rq_prim.calling_ae_title)
    prim.called_ae_title = called
    prim.calling_ae_title = calling
    prim.result = 0
    cxs = []
    for cid, result, ts in results:
        cx = PynetContext()
        cx.context_id = cid
        cx.result = result
        cx.transfer_syntax = [ts]
        cxs.append(cx)
    prim.presentation_context_definition_results_list = cxs
    prim.user_information = _user_info(max_length, extended=False)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _dimse_pdus(msg: DIMSEMessage, context_id: int, max_pdu: int) -> list[bytes]:
    out = []
    for prim in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        out.append(bytes(pdu.encode()))
    return out


def echo_rq(context_id: int = 1, message_id: int = 1, max_pdu: int = 16384) -> list[bytes]:
    prim = C_ECHO()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(prim)
    return _dimse_pdus(msg, context_id, max_pdu)


def echo_rsp(context_id: int = 1, message_id: int = 1, max_pdu: int = 16384) -> list[bytes]:
    prim = C_ECHO()
    prim.MessageIDBeingRespondedTo = message_id
    prim.AffectedSOPClassUID = VERIFICATION
    prim.Status = 0x0000
    msg = C_ECHO_RSP()
    msg.primitive_to_message(prim)
    return _dimse_pdus(msg, context_id, max_pdu)


def dataset_bytes(size: int) -> bytes:
    """An implicit VR little endian CT-like data set with about ``size`` bytes of pixel data."""
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.PatientName = "Test^Relay"
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (size // 256) + bytes(size % 256 + (size % 2))
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def store_rq(size: int, context_id: int = 3, message_id: int = 2, max_pdu: int = 16384) -> list[bytes]:
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = CT_STORAGE
    prim.AffectedSOPInstanceUID = "1.2.3.4.5.6.7"
    prim.Priority = 0
    prim.DataSet = BytesIO(dataset_bytes(size))
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    return _dimse_pdus(msg, context_id, max_pdu)


def store_rsp(context_id: int = 3, message_id: int = 2, max_pdu: int = 16384) -> list[bytes]:
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = message_id
    prim.AffectedSOPClassUID = CT_STORAGE
    prim.AffectedSOPInstanceUID = "1.2.3.4.5.6.7"
    prim.Status = 0x0000
    msg = C_STORE_RSP()
    msg.primitive_to_message(prim)
    return _dimse_pdus(msg, context_id, max_pdu)


def big_rq(size: int) -> bytes:
    """An A-ASSOCIATE-RQ of exactly ``size`` bytes: 127 contexts with many transfer syntaxes and a
    User Identity sub-item (0x58, type 5 = JWT, PS3.7 D.3.3.7) carrying a large token."""
    transfers = [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 62)]
    base = associate_rq(contexts=[(f"1.2.840.10008.5.1.4.1.1.{i}", transfers) for i in range(127)])
    token_len = size - len(base) - 4 - 6
    if not 0 < token_len <= 0xFFFF - 6 - 64:
        raise ValueError(f"size {size} cannot be reached from a base RQ of {len(base)} bytes")
    user_start = base.rindex(bytes((0x50, 0)))  # the User Information item comes last
    identity = bytes((5, 0)) + token_len.to_bytes(2, "big") + b"x" * token_len + b"\x00\x00"
    user_value = base[user_start + 4 :] + item(0x58, identity)
    return pdu(0x01, base[6:user_start] + item(0x50, user_value))


# ----------------------------------------------------------------------------- raw builders


def item(item_type: int, value: bytes, *, length: int | None = None) -> bytes:
    """A variable item: type, reserved, 2-byte length (PS3.8 9.3.2.x)."""
    n = len(value) if length is None else length
    return bytes((item_type, 0)) + n.to_bytes(2, "big") + value


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte length, body (PS3.8 9.3.1)."""
    n = len(body) if length is None else length
    return bytes((pdu_type, 0)) + n.to_bytes(4, "big") + body


def pdv(context_id: int, control: int, fragment: bytes, *, length: int | None = None) -> bytes:
    """A PDV item: 4-byte length, context ID, message control header, fragment (PS3.8 9.3.5.1)."""
    n = len(fragment) + 2 if length is None else length
    return n.to_bytes(4, "big") + bytes((context_id, control)) + fragment


def p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    return pdu(0x04, b"".join(pdvs), length=length)


def associate_raw(
    pdu_type: int,
    items: bytes,
    *,
    called: bytes = b"PACS_B".ljust(16),
    calling: bytes = b"WORKSTATION".ljust(16),
    version: int = 1,
) -> bytes:
    """An A-ASSOCIATE-RQ/AC from raw variable items (PS3.8 Table 9-11 / 9-17 fixed fields)."""
    fixed = version.to_bytes(2, "big") + b"\x00\x00" + called + calling + bytes(32)
    return pdu(pdu_type, fixed + items)


def uid(value: str) -> bytes:
    return value.encode("ascii")
