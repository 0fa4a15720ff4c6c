"""Incremental PDU framing of one DICOM Upper Layer byte stream (sans-IO).

:class:`PduFramer` cuts a TCP byte stream into PDUs (PS3.8 9.3.1). Association,
release and abort PDUs are small: they are buffered whole (up to a limit) and emitted
as :class:`ControlPdu`. P-DATA-TF PDUs carry the bulk of the traffic: their bytes are
passed through as they arrive (:class:`PDataBytes`), never buffered, while the PDV
item headers inside them (PS3.8 9.3.5.1, Annex E) are checked on the fly with state
kept across ``feed`` calls.

The hot path does work per header, not per byte: payload runs are found by length
arithmetic and cut out of the input with memoryview slices, and consecutive P-DATA
bytes of one ``feed`` are emitted as one event.

Header bytes that end a feed before the header is complete are held back (at most 5)
until they can be validated, so what is emitted never depends on how the stream was
split into feeds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from relay_router.ul.associate import ASSOCIATE_FIXED_LENGTH
from relay_router.ul.pdu import FIXED_PDU_LENGTH, HEADER_LENGTH, AbortReason, PduError, PduType

__all__ = ["ControlPdu", "PDataBytes", "FramerEvent", "MessageCounts", "PduFramer", "PDV_HEADER_LENGTH"]

PDV_HEADER_LENGTH = 6
"""Item-length (4), presentation-context-ID (1) and message control header (1) (PS3.8 9.3.5.1, E.2)."""

_MAX_U32 = 0xFFFFFFFF
# Plain ints and a precompiled struct on the per-PDU path: IntEnum comparisons and
# int.from_bytes over memoryview slices cost several microseconds per 16 KiB PDU.
_U32 = struct.Struct(">I")
_P_DATA_TF = int(PduType.P_DATA_TF)
_FIRST_TYPE = int(PduType.ASSOCIATE_RQ)
_LAST_TYPE = int(PduType.ABORT)

# Parser states.
_PDU_HEADER = 0  # expecting the 6-byte header of the next PDU
_CONTROL_BODY = 1  # buffering the body of a non-P-DATA PDU
_PDV_HEADER = 2  # inside a P-DATA-TF PDU, expecting a PDV item header
_PDV_VALUE = 3  # inside a PDV item, passing its fragment through

_FIXED_SECTION = {
    PduType.ASSOCIATE_RJ: "9.3.4",
    PduType.RELEASE_RQ: "9.3.6",
    PduType.RELEASE_RP: "9.3.7",
    PduType.ABORT: "9.3.8",
}


@dataclass(frozen=True, slots=True)
class ControlPdu:
    """A whole non-P-DATA PDU, header included."""

    pdu_type: PduType
    data: bytes


@dataclass(frozen=True, slots=True)
class PDataBytes:
    """Bytes belonging to P-DATA-TF PDUs, headers included; may start or end mid-PDU."""

    data: bytes


FramerEvent = ControlPdu | PDataBytes


class MessageCounts(NamedTuple):
    """Completed DIMSE command sets and data sets (last-fragment PDVs, PS3.8 E.2)."""

    commands: int
    datasets: int


class PduFramer:
    """Split one direction of an Upper Layer byte stream into PDU events.

    ``max_control_length`` bounds the PDU-length of buffered (non-P-DATA) PDUs;
    ``max_pdata_length`` bounds the PDU-length of P-DATA-TF PDUs (0 = unlimited; it
    is the Maximum Length the receiving peer announced, PS3.8 D.1, and may be set
    once the association is negotiated). After a :class:`PduError` the framer is
    poisoned: every later ``feed`` raises.
    """

    __slots__ = (
        "max_control_length",
        "_max_pdata",
        "_state",
        "_held",
        "_ctrl",
        "_ctrl_type",
        "_ctrl_remaining",
        "_pdu_remaining",
        "_pdv_remaining",
        "_pdv_command",
        "_pdv_last",
        "_open_kind",
        "_open_pcid",
        "_error",
        "blocked_contexts",
        "pdus",
        "pdvs",
        "bytes_in",
        "commands_completed",
        "datasets_completed",
        "dataset_bytes",
    )

    def __init__(self, max_control_length: int = 1 << 20, max_pdata_length: int = 0) -> None:
        if not 0 <= max_control_length <= _MAX_U32:
            raise ValueError(f"max_control_length {max_control_length} is not 0..{_MAX_U32}")
        self.max_control_length = max_control_length
        self._max_pdata = 0
        self.max_pdata_length = max_pdata_length
        self._state = _PDU_HEADER
        self._held = bytearray()  # unvalidated partial PDU or PDV header from the previous feed
        self._ctrl = bytearray()  # control PDU being buffered, header included
        self._ctrl_type = 0
        self._ctrl_remaining = 0
        self._pdu_remaining = 0  # P-DATA-TF body bytes not yet consumed
        self._pdv_remaining = 0  # fragment bytes of the current PDV not yet consumed
        self._pdv_command = False
        self._pdv_last = False
        self._open_kind = -1  # kind (1 command, 0 data set) of an unfinished fragment sequence, -1 none
        self._open_pcid = 0
        self._error: str | None = None
        #: Presentation context IDs this side may not use (withheld or answered as rejected): a PDV on
        #: one is a violation (PS3.8 9.3.5.1: a PDV names an accepted presentation context).
        self.blocked_contexts: frozenset[int] = frozenset()
        #: PDUs completed (control and P-DATA-TF).
        self.pdus = 0
        #: PDV items completed.
        self.pdvs = 0
        #: Bytes fed so far.
        self.bytes_in = 0
        #: Command sets completed (PDV with command and last-fragment bits, PS3.8 E.2).
        self.commands_completed = 0
        #: Data sets completed (PDV with the last-fragment bit and not the command bit).
        self.datasets_completed = 0
        #: Fragment bytes of the data set in progress (0 between data sets).
        self.dataset_bytes = 0

    # ----------------------------------------------------------------- properties

    @property
    def max_pdata_length(self) -> int:
        return self._max_pdata

    @max_pdata_length.setter
    def max_pdata_length(self, value: int) -> None:
        if not 0 <= value <= _MAX_U32:
            raise ValueError(f"max_pdata_length {value} is not 0..{_MAX_U32}")
        self._max_pdata = value

    @property
    def at_pdu_boundary(self) -> bool:
        """True when no PDU is partly received (a transport close here truncates nothing)."""
        return self._state == _PDU_HEADER and not self._held

    @property
    def buffered(self) -> int:
        """Bytes held in memory: a partial control PDU or a partial header."""
        return len(self._ctrl) + len(self._held)

    @property
    def failed(self) -> str | None:
        """The detail of the error that poisoned this framer, or None."""
        return self._error

    @property
    def messages_completed(self) -> MessageCounts:
        return MessageCounts(self.commands_completed, self.datasets_completed)

    # ----------------------------------------------------------------- feeding

    def feed(self, data: bytes | bytearray | memoryview) -> list[FramerEvent]:
        """Consume bytes; return the events they complete, in stream order.

        Raises :class:`PduError` on the first violation; its ``events`` attribute holds
        what this call decoded before the offending bytes.
        """
        if self._error is not None:
            raise PduError(f"stream already failed: {self._error}")
        mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        n = len(mv)
        if n == 0:
            return []
        self.bytes_in += n
        events: list[FramerEvent] = []
        run_start = -1  # start in mv of the P-DATA run being collected
        prefix = b""  # held header bytes from the previous feed that open the run
        pos = 0
        try:
            if self._held:
                pos, run_start, prefix = self._complete_held(mv)
            while pos < n:
                state = self._state
                if state == _PDV_VALUE:
                    take = min(self._pdv_remaining, n - pos)
                    if run_start < 0:
                        run_start = pos
                    pos += take
                    self._pdv_remaining -= take
                    self._pdu_remaining -= take
                    if not self._pdv_command:
                        self.dataset_bytes += take
                    if self._pdv_remaining == 0:
                        self._end_pdv()
                elif state == _PDV_HEADER:
                    if n - pos < PDV_HEADER_LENGTH:
                        self._held += mv[pos:]  # validated (and emitted) once complete
                        break
                    self._pdv_header(_U32.unpack_from(mv, pos)[0], mv[pos + 4], mv[pos + 5])
                    if run_start < 0:
                        run_start = pos
                    pos += PDV_HEADER_LENGTH
                elif state == _PDU_HEADER:
                    ptype = mv[pos]
                    if not _FIRST_TYPE <= ptype <= _LAST_TYPE:
                        self._check_type(ptype)
                    if n - pos < HEADER_LENGTH:
                        self._held += mv[pos:]
                        break
                    if ptype == _P_DATA_TF:
                        self._pdata_length(_U32.unpack_from(mv, pos + 2)[0])
                        if run_start < 0:
                            run_start = pos
                    else:
                        if run_start >= 0:
                            events.append(_run(data, mv, run_start, pos, prefix))
                            run_start, prefix = -1, b""
                        self._control_header(mv[pos : pos + HEADER_LENGTH])
                    pos += HEADER_LENGTH
                else:  # _CONTROL_BODY
                    take = min(self._ctrl_remaining, n - pos)
                    self._ctrl += mv[pos : pos + take]
                    pos += take
                    self._ctrl_remaining -= take
                    if self._ctrl_remaining == 0:
                        events.append(ControlPdu(PduType(self._ctrl_type), bytes(self._ctrl)))
                        self._ctrl = bytearray()
                        self._state = _PDU_HEADER
                        self.pdus += 1
        except PduError as exc:
            if run_start >= 0 and (pos > run_start or prefix):
                events.append(_run(data, mv, run_start, pos, prefix))
            self._error = exc.detail
            self._held.clear()
            self._ctrl = bytearray()
            exc.events = events
            raise
        if run_start >= 0:  # pos is n, or where held header bytes start
            events.append(_run(data, mv, run_start, pos, prefix))
        return events

    # ----------------------------------------------------------------- headers

    def _complete_held(self, mv: memoryview) -> tuple[int, int, bytes]:
        """Finish a header split across feeds; return (pos, run_start, prefix)."""
        held = self._held
        size = PDV_HEADER_LENGTH if self._state == _PDV_HEADER else HEADER_LENGTH
        need = size - len(held)
        if len(mv) < need:
            held += mv
            return len(mv), -1, b""
        header = bytes(held) + bytes(mv[:need])
        prefix = bytes(held)
        held.clear()
        if self._state == _PDV_HEADER:
            self._pdv_header(_U32.unpack_from(header)[0], header[4], header[5])
            return need, 0, prefix
        if header[0] == _P_DATA_TF:
            self._pdata_length(_U32.unpack_from(header, 2)[0])
            return need, 0, prefix
        self._control_header(header)
        return need, -1, b""

    @staticmethod
    def _check_type(ptype: int) -> None:
        if not PduType.ASSOCIATE_RQ <= ptype <= PduType.ABORT:
            raise PduError(
                f"PDU type 0x{ptype:02X} is not defined (PS3.8 9.3)", abort_reason=AbortReason.UNRECOGNIZED_PDU
            )

    def _control_header(self, header: bytes | memoryview) -> None:
        ptype = header[0]
        self._check_type(ptype)
        kind = PduType(ptype)
        length = int.from_bytes(header[2:6], "big")
        section = _FIXED_SECTION.get(kind)
        if section is not None and length != FIXED_PDU_LENGTH:
            raise PduError(f"{kind.label} PDU-length is {length}, PS3.8 {section} fixes it at 4")
        if section is None and length < ASSOCIATE_FIXED_LENGTH:
            raise PduError(
                f"{kind.label} PDU-length {length} is shorter than its {ASSOCIATE_FIXED_LENGTH} bytes "
                f"of fixed fields (PS3.8 {'9.3.2' if kind == PduType.ASSOCIATE_RQ else '9.3.3'})"
            )
        if length > self.max_control_length:
            raise PduError(f"{kind.label} PDU-length {length} exceeds the limit of {self.max_control_length} bytes")
        self._ctrl = bytearray(header)
        self._ctrl_type = ptype
        self._ctrl_remaining = length
        self._state = _CONTROL_BODY

    def _pdata_length(self, length: int) -> None:
        """Check the PDU-length of a P-DATA-TF PDU whose header was just read."""
        if length < PDV_HEADER_LENGTH:
            raise PduError(f"P-DATA-TF PDU-length {length} cannot hold a PDV item (6 bytes at least, PS3.8 9.3.5)")
        if self._max_pdata and length > self._max_pdata:
            raise PduError(
                f"P-DATA-TF PDU-length {length} exceeds the negotiated maximum of {self._max_pdata} (PS3.8 D.1)"
            )
        self._pdu_remaining = length
        self._state = _PDV_HEADER

    def _pdv_header(self, item_length: int, pcid: int, control: int) -> None:
        """Check a PDV item header (PS3.8 9.3.5.1) and its message control header (PS3.8 E.2).

        The header's three fields come decoded: item length, presentation context ID and
        message control header. Bits 2-7 of the control header are not tested: E.2 says
        the receiver never checks them. Fragments of a command set or data set must not be
        interleaved with another kind or another presentation context before the last
        fragment (PS3.8 E.1).
        """
        if item_length < 2:
            raise PduError(
                f"PDV item length {item_length} is less than 2 (context ID and control header, PS3.8 9.3.5.1)"
            )
        rest = self._pdu_remaining - 4 - item_length
        if rest < 0:
            raise PduError(
                f"PDV item length {item_length} exceeds the P-DATA-TF PDU "
                f"({self._pdu_remaining - 4} bytes left, PS3.8 9.3.5)"
            )
        if 0 < rest < PDV_HEADER_LENGTH:
            raise PduError(
                f"PDV item length {item_length} leaves {rest} bytes in the P-DATA-TF PDU, too few for "
                f"another PDV item: PDV items must fill the PDU (PS3.8 9.3.5)"
            )
        if not pcid & 1:
            raise PduError(f"PDV presentation context ID {pcid} is not an odd integer 1-255 (PS3.8 9.3.5.1)")
        if pcid in self.blocked_contexts:
            raise PduError(
                f"PDV on presentation context {pcid}, which was not accepted for this association (PS3.8 9.3.5.1)",
                abort_reason=AbortReason.UNEXPECTED_PARAMETER,
            )
        command = control & 1
        if self._open_kind >= 0:
            if command != self._open_kind:
                open_name = "command" if self._open_kind else "data set"
                raise PduError(
                    f"PDV {'command' if command else 'data set'} fragment while the {open_name} on "
                    f"presentation context {self._open_pcid} lacks its last fragment (PS3.8 Annex E)"
                )
            if pcid != self._open_pcid:
                raise PduError(
                    f"PDV fragment on presentation context {pcid} while the fragments on context "
                    f"{self._open_pcid} lack their last fragment (PS3.8 Annex E)"
                )
        last = control & 2
        if last:
            self._open_kind = -1
        else:
            self._open_kind = command
            self._open_pcid = pcid
        self._pdv_command = bool(command)
        self._pdv_last = bool(last)
        self._pdu_remaining -= PDV_HEADER_LENGTH
        self._pdv_remaining = item_length - 2
        if self._pdv_remaining == 0:
            self._end_pdv()
        else:
            self._state = _PDV_VALUE

    def _end_pdv(self) -> None:
        self.pdvs += 1
        if self._pdv_last:
            if self._pdv_command:
                self.commands_completed += 1
            else:
                self.datasets_completed += 1
                self.dataset_bytes = 0
        if self._pdu_remaining == 0:
            self._state = _PDU_HEADER
            self.pdus += 1
        else:  # _pdv_header guaranteed room for another PDV header
            self._state = _PDV_HEADER


def _run(data: bytes | bytearray | memoryview, mv: memoryview, start: int, end: int, prefix: bytes) -> PDataBytes:
    """One event for ``prefix + data[start:end]``, copying once (or not at all for a whole bytes feed)."""
    if prefix:
        return PDataBytes(b"".join((prefix, mv[start:end])))
    if start == 0 and end == len(mv) and type(data) is bytes:
        return PDataBytes(data)
    return PDataBytes(mv[start:end].tobytes())
