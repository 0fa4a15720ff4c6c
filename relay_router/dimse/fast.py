"""Fast paths for the one message pair an accelerated route handles per image: C-STORE-RQ in, C-STORE-RSP out.

Decoding a command set with pydicom and checking it through pynetdicom's primitive, then encoding the
answer the same way, cost about 1.5 ms per C-STORE on the shared VM: a large share of what the sending
device waits for. These are not a second command codec: they accept only the common, fixed shape of
these two command sets and leave everything else to the general path (relay_router.dimse.receiver's
``decode_command`` and commands' ``parse_c_store_rq``, pynetdicom and pydicom), which also words the
errors.

* :func:`parse_store_rq` reads a C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1,
  E.1) made only of the elements a C-STORE-RQ may hold, each once, in ascending order, with a correct
  Command Group Length, valid UIDs and AE title; it returns the same :class:`StoreRequest` as
  ``parse_c_store_rq(decode_command(...))`` (tested side by side), or None: then the general path runs.
* :class:`StoreResponses` encodes a success C-STORE-RSP: the command set pynetdicom builds for the first
  answer of a SOP class is kept as encoded elements, and each later answer patches its two values
  (Message ID Being Responded To, Affected SOP Instance UID) and the group length. Byte-identical to
  ``encode_command(c_store_rsp(...))`` (tested).

The far router's delivery sender (relay_router.accel.store_link) needs the other direction:

* :class:`StoreRequests` encodes C-STORE-RQs from templates the same way (pynetdicom builds the first of
  each SOP class and Move Originator AE Title; later ones patch Message ID, Affected SOP Instance UID and
  Move Originator Message ID). Byte-identical to ``encode_command(c_store_rq(...))`` (tested).
* :func:`parse_store_rsp` reads the common C-STORE-RSP (no Offending Element, Error Comment or Error
  ID); anything else returns None and the caller decodes it with ``decode_command`` (:func:`store_answer`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset

from relay_router.dimse.commands import Priority, StoreRequest, _uid_ok, c_store_rq, c_store_rsp
from relay_router.dimse.sender import encode_command
from relay_router.ul.aetitle import encode_ae_title

__all__ = ["StoreAnswer", "StoreRequests", "StoreResponses", "parse_store_rq", "parse_store_rsp", "store_answer"]

_ELEMENT = struct.Struct("<HHI")  # group, element, value length (Implicit VR Little Endian, PS3.5 7.1.2)
_US, _UL, _UI, _AE = 0, 1, 2, 3
# The elements of a C-STORE-RQ (PS3.7 Table 9.3-1) and their VRs; anything else takes the general path.
_STORE_RQ = {
    0x0000: _UL,  # Command Group Length
    0x0002: _UI,  # Affected SOP Class UID
    0x0100: _US,  # Command Field
    0x0110: _US,  # Message ID
    0x0700: _US,  # Priority
    0x0800: _US,  # Command Data Set Type
    0x1000: _UI,  # Affected SOP Instance UID
    0x1030: _AE,  # Move Originator Application Entity Title
    0x1031: _US,  # Move Originator Message ID
}
_REQUIRED = (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101


def _read_elements(encoded: bytes, table: dict[int, int], required: tuple[int, ...]) -> dict[int, int | str] | None:
    """The values of a command set made only of `table`'s elements, each once, in ascending order, with
    every `required` one and a Command Group Length first that counts exactly the bytes after it; else None."""
    values: dict[int, int | str] = {}
    end = len(encoded)
    pos = 0
    last = -1
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(encoded, pos)
        pos += 8
        kind = table.get(element)
        if group != 0 or kind is None or element <= last or length > end - pos:
            return None
        last = element
        raw = encoded[pos : pos + length]
        pos += length
        if kind == _US:
            if length != 2:
                return None
            values[element] = int.from_bytes(raw, "little")
        elif kind == _UL:
            if length != 4:
                return None
            values[element] = int.from_bytes(raw, "little")
        else:
            if length > 64 or not raw.isascii():
                return None
            values[element] = raw.decode("ascii")
    if any(element not in values for element in required):
        return None
    if values[0x0000] != end - 12 or encoded[:8] != b"\x00\x00\x00\x00\x04\x00\x00\x00":
        return None  # the group length element first, counting exactly the bytes after it
    return values


def parse_store_rq(encoded: bytes) -> StoreRequest | None:
    """The C-STORE-RQ in `encoded` (a whole command set), or None if it is anything else or unusual."""
    values = _read_elements(encoded, _STORE_RQ, _REQUIRED)
    if values is None:
        return None
    if values[0x0100] != _C_STORE_RQ or values[0x0800] == _NO_DATA_SET or values[0x0700] not in (0, 1, 2):
        return None
    sop_class = str(values[0x0002]).rstrip("\0")  # UI is padded to an even length with a NUL (PS3.5 9.1)
    sop_instance = str(values[0x1000]).rstrip("\0")
    if not (_uid_ok(sop_class) and _uid_ok(sop_instance)):
        return None
    originator: str | None = None
    if 0x1030 in values:
        title = str(values[0x1030]).strip(" ")
        if not title or "\\" in title:
            return None
        try:
            encode_ae_title(title)
        except ValueError:
            return None
        originator = title
    originator_id = values.get(0x1031)
    if (originator is None) != (originator_id is None):
        return None  # one without the other: the general path decides what that means
    return StoreRequest(
        message_id=int(values[0x0110]),
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        priority=int(values[0x0700]),
        move_originator_ae=originator,
        move_originator_message_id=None if originator_id is None else int(originator_id),
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, element, len(value)) + value


class StoreResponses:
    """Success C-STORE-RSPs, encoded (see the module docstring); one per association (not thread-safe)."""

    def __init__(self) -> None:
        self._templates: dict[str, list[tuple[int, bytes]]] = {}

    def success(self, message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
        """The command set of C-STORE-RSP 0x0000 answering `message_id` (UIDs as validated from the request)."""
        template = self._templates.get(sop_class_uid)
        if template is None:
            template = _split(encode_command(c_store_rsp(message_id, sop_class_uid, sop_instance_uid, 0x0000)))
            self._templates[sop_class_uid] = template
        instance = sop_instance_uid.encode("ascii")
        if len(instance) % 2:
            instance += b"\0"
        body = b"".join(
            _element(0x0120, message_id.to_bytes(2, "little"))
            if element == 0x0120
            else _element(0x1000, instance)
            if element == 0x1000
            else encoded
            for element, encoded in template
        )
        return _element(0x0000, len(body).to_bytes(4, "little")) + body


def _split(encoded: bytes, patched: tuple[int, ...] = (0x0120, 0x1000)) -> list[tuple[int, bytes]]:
    """The elements of an encoded command set after its group length: (element number, its encoded bytes)."""
    elements = []
    pos = 0
    while pos < len(encoded):
        _, element, length = _ELEMENT.unpack_from(encoded, pos)
        if element != 0x0000:
            elements.append((element, encoded[pos : pos + 8 + length]))
        pos += 8 + length
    if not all(any(element == wanted for element, _ in elements) for wanted in patched):
        raise ValueError("pynetdicom's command set lacks the elements a template patches")
    return elements


class StoreRequests:
    """C-STORE-RQ command sets, encoded from templates (see the module docstring); not thread-safe."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, str | None], list[tuple[int, bytes]]] = {}

    def request(
        self,
        message_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        move_originator_ae: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> bytes:
        """The command set of a C-STORE-RQ (priority medium) announcing a data set."""
        key = (sop_class_uid, move_originator_ae)
        template = self._templates.get(key)
        if template is None:
            encoded = encode_command(
                c_store_rq(
                    message_id,
                    sop_class_uid,
                    sop_instance_uid,
                    priority=Priority.MEDIUM,
                    move_originator_ae=move_originator_ae,
                    move_originator_message_id=move_originator_message_id,
                )
            )
            template = _split(encoded, (0x0110, 0x1000))
            self._templates[key] = template
            if len(self._templates) > 256:  # many originators over time: keep the memory bounded
                self._templates.pop(next(iter(self._templates)))
        instance = sop_instance_uid.encode("ascii")
        if len(instance) % 2:
            instance += b"\0"
        patched = {0x0110: message_id.to_bytes(2, "little"), 0x1000: instance}
        if move_originator_message_id is not None:
            patched[0x1031] = move_originator_message_id.to_bytes(2, "little")
        body = b"".join(
            _element(element, patched[element]) if element in patched else encoded for element, encoded in template
        )
        return _element(0x0000, len(body).to_bytes(4, "little")) + body


@dataclass(frozen=True)
class StoreAnswer:
    """What a C-STORE-RSP says (PS3.7 9.3.1.2): the request it answers, the status, an error comment if any."""

    command_field: int
    message_id_responded: int
    status: int
    error_comment: str = ""


_STORE_RSP = {
    0x0000: _UL,  # Command Group Length
    0x0002: _UI,  # Affected SOP Class UID
    0x0100: _US,  # Command Field
    0x0120: _US,  # Message ID Being Responded To
    0x0800: _US,  # Command Data Set Type
    0x0900: _US,  # Status
    0x1000: _UI,  # Affected SOP Instance UID
}
_C_STORE_RSP = 0x8001


def parse_store_rsp(encoded: bytes) -> StoreAnswer | None:
    """The common C-STORE-RSP in `encoded` (a whole command set), or None: then :func:`store_answer` decodes it."""
    values = _read_elements(encoded, _STORE_RSP, (0x0000, 0x0100, 0x0120, 0x0800, 0x0900))
    if values is None:
        return None
    if values[0x0100] != _C_STORE_RSP or values[0x0800] != 0x0101:
        return None
    return StoreAnswer(_C_STORE_RSP, int(values[0x0120]), int(values[0x0900]))


def store_answer(command: Dataset) -> StoreAnswer:
    """A decoded response command set (relay_router.dimse.receiver's ``decode_command``) as a StoreAnswer;
    ValueError if it lacks Message ID Being Responded To or Status."""
    try:
        field = int(command.CommandField)
        responded = int(command.MessageIDBeingRespondedTo)
        status = int(command.Status)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"the response lacks {exc}") from None
    comment = command.get("ErrorComment")
    return StoreAnswer(field, responded, status, str(comment)[:200] if comment else "")
