"""Assemble DIMSE messages from P-DATA-TF PDUs (sans-IO).

PS3.7 6.3.1: a DIMSE message is a command set, always Implicit VR Little Endian,
followed by a data set when its Command Data Set Type (0000,0800) is not 0x0101.
PS3.8 9.3.5 and Annex E carry it as PDV items: a 4-byte item length, the presentation
context ID, then the message control header (bit 0: command, bit 1: last fragment;
bits 2-7 are never tested, E.2) and a fragment. All fragments of one message are sent
in order, command first, with no fragment of another message in between (E.1).

:class:`DimseReceiver` takes the P-DATA-TF byte stream of one direction (the
:class:`~relay_router.ul.framer.PDataBytes` of a :class:`~relay_router.ul.framer.PduFramer`,
split anywhere) or PDV items one by one, and returns events:

* :class:`CommandReceived`: the command set decoded with pydicom (pynetdicom's
  ``dsutils.decode``, Implicit VR LE); at most ``max_command_length`` bytes are held.
* :class:`DatasetChunk`: data set bytes as they arrive, never accumulated: the caller
  writes them to a file, so memory is bounded by what one ``feed`` brings.
* :class:`DatasetComplete`: the last data set fragment arrived.

Every violation raises :class:`~relay_router.dimse.errors.DimseError`; after one the
receiver is poisoned (every later call raises), like the Upper Layer framer.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from relay_router.dimse.commands import StoreRequest
from relay_router.dimse.errors import DimseError, Violation
from relay_router.dimse.fast import StoreAnswer, parse_store_rq, parse_store_rsp
from relay_router.ul.pdu import AbortReason, PduType

__all__ = [
    "CommandReceived",
    "DatasetChunk",
    "DatasetComplete",
    "DimseEvent",
    "DimseReceiver",
    "decode_command",
    "NO_DATA_SET",
    "DEFAULT_MAX_COMMAND_LENGTH",
]

NO_DATA_SET = 0x0101
"""Command Data Set Type (0000,0800) meaning no data set follows (PS3.7 E.1)."""

DEFAULT_MAX_COMMAND_LENGTH = 64 * 1024
"""A command set is a few hundred bytes (PS3.7 Annex E); this bound leaves room for long comments."""

_GROUP_LENGTH_ELEMENT = 12  # (0000,0000) UL in Implicit VR LE: tag 4, length 4, value 4
_PDU_HEADER = 6  # type, reserved, 4-byte length (PS3.8 9.3.1)
_PDV_HEADER = 6  # 4-byte item length, context ID, message control header (PS3.8 9.3.5.1, E.2)

# Where the message of the association stands (one message at a time, PS3.8 E.1).
_IDLE = 0  # between messages: the next fragment must be a command fragment
_COMMAND = 1  # command fragments received, not yet the last one
_DATASET = 2  # the command announced a data set: data set fragments expected


class CommandReceived:
    """A complete command set; ``has_dataset``: a data set follows (PS3.7 E.1, (0000,0800)).

    ``store``: the C-STORE-RQ's fields when the fast path (relay_router.dimse.fast) read it; ``answer``: the
    C-STORE-RSP's, likewise; the command set is then decoded with pydicom only if ``command`` is asked for."""

    __slots__ = ("context_id", "has_dataset", "store", "answer", "_command", "_encoded")

    def __init__(
        self,
        context_id: int,
        command: Dataset | None,
        has_dataset: bool,
        *,
        store: StoreRequest | None = None,
        answer: StoreAnswer | None = None,
        encoded: bytes = b"",
    ) -> None:
        if command is None and store is None and answer is None:
            raise ValueError("a CommandReceived needs its command set or its C-STORE-RQ/RSP fields")
        self.context_id = context_id
        self.has_dataset = has_dataset
        self.store = store
        self.answer = answer
        self._command = command
        self._encoded = encoded

    @property
    def command(self) -> Dataset:
        if self._command is None:
            self._command = decode_command(self._encoded, self.context_id)
        return self._command

    @property
    def command_field(self) -> int:
        """Command Field (0000,0100), e.g. 0x0001 C-STORE-RQ (PS3.7 E.1)."""
        if self.store is not None and self._command is None:
            return 0x0001
        if self.answer is not None and self._command is None:
            return self.answer.command_field
        return int(self.command.CommandField)

    def __repr__(self) -> str:
        return f"CommandReceived(context_id={self.context_id}, command_field=0x{self.command_field:04X})"


@dataclass(frozen=True, slots=True)
class DatasetChunk:
    """Data set bytes, in order; write them out, do not keep them."""

    context_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DatasetComplete:
    """The data set of the current message ended (last-fragment bit, PS3.8 E.2); ``length`` in bytes."""

    context_id: int
    length: int


DimseEvent = CommandReceived | DatasetChunk | DatasetComplete


def decode_command(encoded: bytes, context_id: int | None = None) -> Dataset:
    """Decode a command set (Implicit VR Little Endian, PS3.7 6.3.1) and check its required elements.

    Command Group Length (0000,0000), Command Field (0000,0100) and Command Data Set Type
    (0000,0800) must be present (PS3.7 E.1), the group length must count exactly the bytes
    after it, and every element must be in group 0000; anything else is a DimseError.
    """
    try:
        with warnings.catch_warnings():  # a peer chooses these bytes: no warning per bad message
            warnings.simplefilter("ignore")
            command = decode(io.BytesIO(encoded), True, True)
            if any(element.tag.group != 0x0000 for element in command):
                raise ValueError("an element outside group 0000")
            group_length = int(command[0x00000000].value)
            if group_length != len(encoded) - _GROUP_LENGTH_ELEMENT:
                # pydicom stops quietly at a truncated element; the group length catches it (PS3.7 E.1)
                raise DimseError(
                    f"Command Group Length {group_length} does not match the {len(encoded) - _GROUP_LENGTH_ELEMENT} "
                    "bytes that follow it: truncated or padded command set (PS3.7 E.1)",
                    Violation.UNDECODABLE_COMMAND,
                    context_id=context_id,
                )
            field = int(command[0x00000100].value)
            data_set_type = int(command[0x00000800].value)
            for element in command:  # parse every value now: pydicom converts raw values lazily
                _ = element.value
    except DimseError:
        raise
    except KeyError as exc:
        raise DimseError(
            f"command set lacks {exc.args[0]} (Command Group Length, Command Field and Command Data Set Type "
            "are required, PS3.7 E.1)",
            Violation.BAD_COMMAND_FIELD,
            context_id=context_id,
        ) from None
    except Exception as exc:  # pydicom raises many types on hostile bytes
        raise DimseError(
            f"command set of {len(encoded)} bytes does not decode as Implicit VR Little Endian "
            f"group 0000 elements (PS3.7 6.3.1): {exc.__class__.__name__}: {exc}"[:300],
            Violation.UNDECODABLE_COMMAND,
            context_id=context_id,
        ) from None
    if not 0 <= field <= 0xFFFF or not 0 <= data_set_type <= 0xFFFF:
        raise DimseError(
            f"command set holds Command Field {field} / Command Data Set Type {data_set_type}, not US values",
            Violation.BAD_COMMAND_FIELD,
            context_id=context_id,
        )
    return command


class DimseReceiver:
    """Turn one direction's P-DATA of an association into DIMSE message events.

    ``contexts`` maps each accepted presentation context ID to (abstract syntax,
    transfer syntax). ``max_pdu_length`` is the Maximum Length this side announced
    (PS3.8 D.1, 0 = unlimited): a longer P-DATA-TF PDU is refused.
    """

    def __init__(
        self,
        contexts: Mapping[int, tuple[str, str]],
        *,
        max_command_length: int = DEFAULT_MAX_COMMAND_LENGTH,
        max_pdu_length: int = 0,
    ) -> None:
        self.contexts = dict(contexts)
        self.max_command_length = max_command_length
        self.max_pdu_length = max_pdu_length
        self._state = _IDLE
        self._context = 0  # context of the message in progress
        self._command = bytearray()
        self._dataset_length = 0
        self._error: DimseError | None = None
        # byte-stream framing
        self._header = bytearray()  # a PDU or PDV header split across feeds
        self._pdu_left = 0  # body bytes left in the current P-DATA-TF PDU
        self._pdv_left = 0  # fragment bytes left in the current PDV
        self._pdv_context = 0
        self._pdv_control = 0
        #: Messages whose command set was received.
        self.messages = 0

    @property
    def idle(self) -> bool:
        """True between messages and between PDUs: nothing is partly received."""
        return self._state == _IDLE and self._pdu_left == 0 and not self._header

    @property
    def transfer_syntax(self) -> str:
        """The transfer syntax of the data set in progress (or of the last message)."""
        return self.contexts.get(self._context, ("", ""))[1]

    # ------------------------------------------------------------------ byte stream

    def feed(self, data: bytes | bytearray | memoryview) -> list[DimseEvent]:
        """Consume P-DATA-TF PDU bytes (headers included) split anywhere; return the events completed."""
        self._check_alive()
        events: list[DimseEvent] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        try:
            while pos < end:
                if self._pdu_left == 0:  # a PDU header
                    take = min(_PDU_HEADER - len(self._header), end - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) == _PDU_HEADER:
                        self._pdu_header(bytes(self._header))
                        self._header.clear()
                elif self._pdv_left == 0 and len(self._header) < _PDV_HEADER:  # a PDV header
                    take = min(_PDV_HEADER - len(self._header), end - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) == _PDV_HEADER:
                        header = bytes(self._header)
                        self._header.clear()
                        self._pdv_header(header, events)
                else:  # fragment bytes
                    take = min(self._pdv_left, end - pos)
                    self._pdv_left -= take
                    self._pdu_left -= take
                    self._fragment(view[pos : pos + take], self._pdv_left == 0, events)
                    pos += take
        except DimseError as exc:
            self._error = exc
            raise
        return events

    def _pdu_header(self, header: bytes) -> None:
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        if pdu_type != PduType.P_DATA_TF:
            raise DimseError(
                f"PDU type 0x{pdu_type:02X} in the P-DATA stream: the DIMSE layer is fed P-DATA-TF PDUs only "
                "(PS3.8 9.3.5)",
                Violation.NOT_PDATA,
                abort_reason=AbortReason.UNEXPECTED_PDU,
            )
        if length < _PDV_HEADER:
            raise DimseError(
                f"P-DATA-TF PDU-length {length} cannot hold a PDV item (6 bytes at least, PS3.8 9.3.5)",
                Violation.MALFORMED_PDV,
            )
        if self.max_pdu_length and length > self.max_pdu_length:
            raise DimseError(
                f"P-DATA-TF PDU-length {length} exceeds the announced maximum of {self.max_pdu_length} (PS3.8 D.1)",
                Violation.PDU_TOO_LARGE,
            )
        self._pdu_left = length

    def _pdv_header(self, header: bytes, events: list[DimseEvent]) -> None:
        item_length = int.from_bytes(header[0:4], "big")
        if item_length < 2 or item_length + 4 > self._pdu_left:
            raise DimseError(
                f"PDV item length {item_length} does not fit its P-DATA-TF PDU ({self._pdu_left} bytes left; "
                "it counts the context ID, the control header and the fragment, PS3.8 9.3.5.1)",
                Violation.MALFORMED_PDV,
            )
        self._pdu_left -= _PDV_HEADER
        if 0 < self._pdu_left - (item_length - 2) < _PDV_HEADER:
            raise DimseError(
                f"PDV item length {item_length} leaves {self._pdu_left - item_length + 2} bytes in its PDU, "
                "too few for another PDV item (PS3.8 9.3.5)",
                Violation.MALFORMED_PDV,
            )
        self._pdv_context, self._pdv_control = header[4], header[5]
        self._pdv_left = item_length - 2
        self._start_pdv(self._pdv_context, self._pdv_control)
        if self._pdv_left == 0:
            self._fragment(b"", True, events)

    # ------------------------------------------------------------------ PDV items

    def receive_pdv(self, context_id: int, control: int, fragment: bytes | memoryview) -> list[DimseEvent]:
        """Consume one whole PDV item (PS3.8 9.3.5.1): context ID, control header, fragment."""
        self._check_alive()
        events: list[DimseEvent] = []
        try:
            self._start_pdv(context_id, control)
            self._pdv_control = control
            self._fragment(memoryview(fragment), True, events)
        except DimseError as exc:
            self._error = exc
            raise
        return events

    def _start_pdv(self, context_id: int, control: int) -> None:
        """Check that a fragment of this kind on this context may come now (PS3.8 E.1, E.2)."""
        is_command = bool(control & 1)
        if context_id not in self.contexts:
            raise DimseError(
                f"PDV on presentation context {context_id}, which is not among the accepted ones "
                f"{sorted(self.contexts)} (PS3.8 9.3.5.1)",
                Violation.UNKNOWN_CONTEXT,
                context_id=context_id,
            )
        if self._state != _IDLE and context_id != self._context:
            raise DimseError(
                f"PDV on presentation context {context_id} while the message on context {self._context} "
                "is not complete (PS3.8 E.1)",
                Violation.INTERLEAVED,
                abort_reason=AbortReason.UNEXPECTED_PARAMETER,
                context_id=context_id,
            )
        if self._state == _DATASET and is_command:
            raise DimseError(
                f"command fragment on presentation context {context_id} while its data set is not complete "
                "(PS3.8 E.1: the data set follows the command set)",
                Violation.COMMAND_AFTER_DATASET,
                abort_reason=AbortReason.UNEXPECTED_PARAMETER,
                context_id=context_id,
            )
        if self._state != _DATASET and not is_command:
            raise DimseError(
                f"data set fragment on presentation context {context_id} without a command set announcing one "
                "(PS3.7 6.3.1, E.1: Command Data Set Type)",
                Violation.DATASET_WITHOUT_COMMAND,
                abort_reason=AbortReason.UNEXPECTED_PARAMETER,
                context_id=context_id,
            )
        if self._state == _IDLE:
            self._state = _COMMAND
            self._context = context_id

    def _fragment(self, chunk: memoryview | bytes, end_of_pdv: bool, events: list[DimseEvent]) -> None:
        last = bool(self._pdv_control & 2) and end_of_pdv
        if self._state == _COMMAND:
            if len(self._command) + len(chunk) > self.max_command_length:
                raise DimseError(
                    f"command set on presentation context {self._context} exceeds {self.max_command_length} bytes",
                    Violation.COMMAND_TOO_LARGE,
                    context_id=self._context,
                )
            self._command += chunk
            if last:
                encoded = bytes(self._command)
                self._command.clear()
                self.messages += 1
                self._dataset_length = 0
                store = parse_store_rq(encoded)  # the common C-STORE-RQ without pydicom; else the general path
                if store is not None:
                    self._state = _DATASET
                    events.append(CommandReceived(self._context, None, True, store=store, encoded=encoded))
                    return
                answer = parse_store_rsp(encoded)  # the common C-STORE-RSP (the far router's deliveries), likewise
                if answer is not None:
                    self._state = _IDLE
                    events.append(CommandReceived(self._context, None, False, answer=answer, encoded=encoded))
                    return
                command = decode_command(encoded, self._context)
                has_dataset = int(command.CommandDataSetType) != NO_DATA_SET
                self._state = _DATASET if has_dataset else _IDLE
                events.append(CommandReceived(self._context, command, has_dataset))
            return
        # _DATASET (the _start_pdv checks leave no other state here)
        if chunk:
            self._dataset_length += len(chunk)
            events.append(DatasetChunk(self._context, bytes(chunk)))
        if last:
            self._state = _IDLE
            events.append(DatasetComplete(self._context, self._dataset_length))

    def _check_alive(self) -> None:
        if self._error is not None:
            raise DimseError(f"P-DATA stream already failed: {self._error.detail}", self._error.violation)
