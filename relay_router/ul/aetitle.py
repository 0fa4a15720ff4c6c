"""AE title fields of A-ASSOCIATE-RQ/AC: validation, rewriting, restoring (PS3.8 9.3.2-9.3.3, PS3.5 AE VR).

The Called and Calling AE titles sit at fixed offsets (PDU bytes 11-26 and 27-42 in
PS3.8 numbering), so replacing them never moves any other byte. In an AC the same
fields are reserved and "shall be sent with a value identical to the value received
in the same field of the A-ASSOCIATE-RQ" (PS3.8 Table 9-17).
"""

from __future__ import annotations

from relay_router.ul.pdu import HEADER_LENGTH, PduError, PduType

__all__ = [
    "ASSOCIATE_FIXED_LENGTH",
    "CALLED_AE_SLICE",
    "CALLING_AE_SLICE",
    "encode_ae_title",
    "ae_fields",
    "with_ae_fields",
    "rewrite_ae_titles",
]

ASSOCIATE_FIXED_LENGTH = 68
"""PDU-length taken by the fixed fields of A-ASSOCIATE-RQ/AC (bytes 7-74 in PS3.8 numbering)."""

CALLED_AE_SLICE = slice(10, 26)
CALLING_AE_SLICE = slice(26, 42)
_ITEMS_START = HEADER_LENGTH + ASSOCIATE_FIXED_LENGTH


def encode_ae_title(title: str) -> bytes:
    """Validate an AE title by the PS3.5 AE VR rules and encode it as a 16-byte PS3.8 field.

    1-16 characters of ISO 646 G0 (0x20-0x7E) without backslash, not all spaces;
    padded with trailing spaces (PS3.8 9.3.2, Table 9-11). Raises ``ValueError``.
    """
    if not isinstance(title, str):
        raise ValueError(f"AE title must be a str, got {type(title).__name__}")
    if not 1 <= len(title) <= 16:
        raise ValueError(f"AE title {title!r} must have 1 to 16 characters, has {len(title)} (PS3.5 AE)")
    for ch in title:
        if not " " <= ch <= "~" or ch == "\\":
            raise ValueError(f"AE title {title!r} contains {ch!r}: no backslash or control characters (PS3.5 AE)")
    if not title.strip(" "):
        raise ValueError("AE title must not be all spaces (PS3.5 AE, PS3.8 9.3.2)")
    return title.encode("ascii").ljust(16, b" ")


def _check_associate_pdu(pdu: bytes | bytearray | memoryview) -> None:
    if len(pdu) < _ITEMS_START or pdu[0] not in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC):
        raise PduError(
            f"not an A-ASSOCIATE-RQ/AC PDU with its {ASSOCIATE_FIXED_LENGTH} bytes of fixed fields "
            f"({len(pdu)} bytes given)"
        )
    length = int.from_bytes(pdu[2:6], "big")
    if length != len(pdu) - HEADER_LENGTH:
        raise PduError(f"A-ASSOCIATE PDU-length {length} does not match the {len(pdu) - HEADER_LENGTH} bytes given")


def ae_fields(pdu: bytes | bytearray | memoryview) -> bytes:
    """Return the raw 32 bytes of the Called and Calling AE title fields (PDU bytes 11-42)."""
    _check_associate_pdu(pdu)
    return bytes(pdu[CALLED_AE_SLICE.start : CALLING_AE_SLICE.stop])


def with_ae_fields(pdu: bytes | bytearray | memoryview, fields: bytes) -> bytes:
    """Return a copy of an RQ/AC with the 32 raw AE title bytes replaced (used to restore originals)."""
    _check_associate_pdu(pdu)
    if len(fields) != 32:
        raise ValueError(f"AE title fields are 32 bytes, got {len(fields)}")
    out = bytearray(pdu)
    out[CALLED_AE_SLICE.start : CALLING_AE_SLICE.stop] = fields
    return bytes(out)


def rewrite_ae_titles(
    pdu: bytes | bytearray | memoryview, *, called: str | None = None, calling: str | None = None
) -> bytes:
    """Return a copy of an A-ASSOCIATE-RQ or -AC with its AE title fields replaced.

    Titles are validated and padded by :func:`encode_ae_title` (``ValueError``); None
    keeps the field as it is. The PDU must be a whole RQ/AC (:class:`PduError` otherwise).
    In an AC these fields echo the RQ's values (PS3.8 Table 9-17).
    """
    _check_associate_pdu(pdu)
    out = bytearray(pdu)
    if called is not None:
        out[CALLED_AE_SLICE] = encode_ae_title(called)
    if calling is not None:
        out[CALLING_AE_SLICE] = encode_ae_title(calling)
    return bytes(out)
