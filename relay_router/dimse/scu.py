"""What a Storage SCU sends besides its C-STORE-RQs (sans-IO): the A-ASSOCIATE-RQ, and where a Part 10 file's
data set starts.

The far router delivers spooled instances itself (relay_router.accel.store_link) instead of through
pynetdicom's association threads. The A-ASSOCIATE-RQ is built by pynetdicom's own PDU classes from its
A-ASSOCIATE primitive (PS3.8 9.3.2), with pynetdicom's implementation class UID and version name, so a
device sees the same request as from pynetdicom's ``AE.associate``; the A-ASSOCIATE-AC is parsed by
relay_router.ul.associate.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from relay_router.dimse.errors import DimseError, Violation

__all__ = ["APPLICATION_CONTEXT", "associate_rq", "dataset_offset", "split_part10"]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)
_PART10_PREFIX = 128 + 4  # preamble and "DICM" (PS3.10 7.1)
_GROUP_LENGTH = struct.Struct("<HH2sHI")  # (0002,0000) UL in Explicit VR Little Endian: tag, VR, length, value


def associate_rq(
    calling_ae: str, called_ae: str, contexts: Sequence[tuple[int, str, str]], *, max_pdu_length: int
) -> bytes:
    """An A-ASSOCIATE-RQ proposing `contexts` (ID, abstract syntax, one transfer syntax each) as SCU."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [maximum, implementation, version]
    proposed = []
    for context_id, abstract_syntax, transfer_syntax in contexts:
        context = build_context(abstract_syntax, [transfer_syntax])
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def split_part10(fp: BinaryIO) -> tuple[Dataset, int]:
    """The file meta of a Part 10 file and the offset of its data set (pynetdicom's ``split_dataset``, for a file
    object: a spooled instance may be held in memory)."""

    def not_group_0002(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 2

    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=not_group_0002)
    return meta, int(fp.tell())


def dataset_offset(head: bytes | bytearray | memoryview) -> int:
    """Where the data set starts in a Part 10 file that begins with `head`: read from its File Meta Information
    Group Length (PS3.10 7.1), or by pydicom when that element is not first (or `head` is too short)."""
    if len(head) >= _PART10_PREFIX + _GROUP_LENGTH.size and bytes(head[128:132]) == b"DICM":
        group, element, vr, length, value = _GROUP_LENGTH.unpack_from(head, _PART10_PREFIX)
        if (group, element, vr, length) == (2, 0, b"UL", 4):
            offset = _PART10_PREFIX + _GROUP_LENGTH.size + int(value)
            if offset <= len(head):
                return offset
    try:
        return int(split_part10(BytesIO(bytes(head)))[1])
    except Exception as exc:  # pydicom raises several types on garbage
        raise DimseError(f"not a DICOM Part 10 file: {exc.__class__.__name__}", Violation.BAD_ARGUMENT) from exc
