"""Produce P-DATA-TF PDUs for DIMSE messages (sans-IO).

The command set is encoded with pynetdicom's ``dsutils.encode`` (Implicit VR Little
Endian, PS3.7 6.3.1), with its Command Group Length (0000,0000) recomputed. The data
set is given as a file (read in fragment-sized pieces) or as an iterator of chunks
(bytes kept: at most one fragment plus one chunk), never as a whole in memory.

Fragmentation (PS3.8 9.3.5, D.1, Annex E): one PDV per P-DATA-TF PDU, whose
PDU-length (PDV item length field + context ID + control header + fragment) never
exceeds the peer's Maximum Length; command fragments carry bit 0, the last fragment of
the command and of the data set carries bit 1. A Maximum Length of 0 means unlimited
(PS3.8 D.1): fragments are then ``DEFAULT_FRAGMENT`` bytes, and they never exceed
``MAX_FRAGMENT`` whatever the peer announces, so memory stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from relay_router.dimse.errors import DimseError, Violation
from relay_router.ul.pdu import PduType

__all__ = ["DimseSender", "encode_command", "DEFAULT_FRAGMENT", "MAX_FRAGMENT", "DatasetSource"]

DEFAULT_FRAGMENT = 256 * 1024 - 12
"""Fragment size when the peer announced no limit: each PDU is then 256 KiB, headers included."""

MAX_FRAGMENT = 4 * 1024 * 1024
"""Largest fragment we build, whatever the peer's Maximum Length."""

_PDV_OVERHEAD = 6  # PDV item length (4), context ID (1), message control header (1)
_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)

DatasetSource = str | os.PathLike[str] | Iterable[bytes] | bytes | None


def encode_command(command: Dataset) -> bytes:
    """Encode a command set in Implicit VR LE with a correct Command Group Length (PS3.7 6.3.1, E.1).

    The caller's Dataset is not modified.
    """
    body = Dataset()
    for element in command:
        if element.tag.group != 0x0000:
            raise DimseError(f"command element {element.tag} is not in group 0000 (PS3.7 E.1)", Violation.BAD_ARGUMENT)
        if element.tag.element != 0x0000:
            body.add(element)
    encoded = encode(body, True, True)
    if encoded is None:
        raise DimseError("pydicom could not encode the command set", Violation.BAD_ARGUMENT)
    group_length = Dataset()
    group_length.CommandGroupLength = len(encoded)
    prefix = encode(group_length, True, True)
    assert prefix is not None
    return bytes(prefix) + bytes(encoded)


def _pdu(context_id: int, control: int, fragment: bytes | bytearray | memoryview) -> bytes:
    item_length = len(fragment) + 2
    return b"".join(
        (
            bytes((PduType.P_DATA_TF, 0)),
            (item_length + 4).to_bytes(4, "big"),
            item_length.to_bytes(4, "big"),
            bytes((context_id, control)),
            fragment,
        )
    )


class DimseSender:
    """Fragment DIMSE messages for a peer that announced ``max_pdu_length`` (PS3.8 D.1; 0 = unlimited)."""

    def __init__(self, max_pdu_length: int) -> None:
        if max_pdu_length < 0 or max_pdu_length > 0xFFFFFFFF:
            raise DimseError(
                f"Maximum Length {max_pdu_length} is not a 32-bit value (PS3.8 D.1)", Violation.BAD_ARGUMENT
            )
        if 0 < max_pdu_length <= _PDV_OVERHEAD:
            raise DimseError(
                f"Maximum Length {max_pdu_length} leaves no room for a fragment after the 6 bytes of a PDV "
                "header (PS3.8 9.3.5.1, D.1)",
                Violation.BAD_ARGUMENT,
            )
        self.max_pdu_length = max_pdu_length
        self.fragment_size = min(max_pdu_length - _PDV_OVERHEAD, MAX_FRAGMENT) if max_pdu_length else DEFAULT_FRAGMENT

    def message(
        self, context_id: int, command: Dataset, dataset: DatasetSource = None, *, offset: int = 0
    ) -> Iterator[bytes]:
        """The PDUs of one message: its command set, then its data set if one is given.

        The Command Data Set Type (0000,0800) must agree with ``dataset`` (PS3.7 E.1).
        ``offset``: where the data set starts in a file (after a Part 10 preamble and meta).
        """
        announces = int(command.get("CommandDataSetType", 0x0101)) != 0x0101
        if announces != (dataset is not None):
            raise DimseError(
                f"Command Data Set Type {'announces' if announces else 'denies'} a data set but "
                f"{'none' if dataset is None else 'one'} is given (PS3.7 E.1)",
                Violation.BAD_ARGUMENT,
            )
        yield from self.command(context_id, command)
        if dataset is not None:
            yield from self.dataset(context_id, dataset, offset=offset)

    def command(self, context_id: int, command: Dataset) -> Iterator[bytes]:
        """The PDUs of a command set (control header bit 0 set; bit 1 on the last)."""
        _check_context(context_id)
        yield from self._fragments(context_id, _COMMAND, [encode_command(command)])

    def encoded_command(self, context_id: int, encoded: bytes) -> Iterator[bytes]:
        """The PDUs of a command set already encoded with its group length (relay_router.dimse.fast)."""
        _check_context(context_id)
        yield from self._fragments(context_id, _COMMAND, [encoded])

    def dataset(
        self, context_id: int, source: str | os.PathLike[str] | Iterable[bytes] | bytes, *, offset: int = 0
    ) -> Iterator[bytes]:
        """The PDUs of a data set given as a file path (read from ``offset``), bytes, or an iterator of chunks."""
        _check_context(context_id)
        if isinstance(source, (bytes, bytearray, memoryview)):
            yield from self._fragments(context_id, 0, [bytes(source)])
        elif isinstance(source, (str, os.PathLike)):
            yield from self._fragments(context_id, 0, _file_chunks(Path(source), offset, self.fragment_size))
        else:
            yield from self._fragments(context_id, 0, source)

    def _fragments(self, context_id: int, kind: int, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Cut chunks into fragments; the last one is held back until the source ends (it gets bit 1)."""
        size = self.fragment_size
        pending = bytearray()
        for chunk in chunks:
            pending += chunk
            if len(pending) > size:
                view = memoryview(pending)
                start = 0
                while len(pending) - start > size:
                    yield _pdu(context_id, kind, view[start : start + size])
                    start += size
                view.release()
                del pending[:start]
        yield _pdu(context_id, kind | _LAST, pending)


def _check_context(context_id: int) -> None:
    if not (1 <= context_id <= 255 and context_id & 1):
        raise DimseError(
            f"presentation context ID {context_id} is not an odd integer 1-255 (PS3.8 9.3.2.2)", Violation.BAD_ARGUMENT
        )


def _file_chunks(path: Path, offset: int, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(size):
            yield chunk
