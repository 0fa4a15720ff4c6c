"""Which studies crossed an association: a sans-IO tap on its Upper Layer bytes.

The audit question "which studies of patient X left for which site" needs the Study
Instance UID and Patient ID of what was stored. The relay stays transparent: this
tap only observes a copy of the bytes the router forwards anyway, and it runs at the
routers (inside the hospital, the ends of the encryption), never at the bridge.

Feed it the bytes of each direction in order (`feed(side, data)`, split anywhere):
it follows the P-DATA-TF PDUs and their PDVs (PS3.8 9.3.5, Annex E: message control
header bit 0 = command, bit 1 = last fragment), decodes each command set with pydicom
(always Implicit VR Little Endian, PS3.7 6.3.1) and, after a C-STORE-RQ, reads only
the first bytes of its data set in the transfer syntax of its presentation context:
enough for Patient ID (0010,0020), Issuer of Patient ID (0010,0021) and Study
Instance UID (0020,000D); parsing stops at the first tag past (0020,000D).

Bounded: at most `max_command` bytes of a command set and `max_prefix` bytes of a
data set are kept (one message is in flight per direction, PS3.8 9.3.5.1), at most
`max_studies` study records per association (the rest are counted), and a PDU or PDV
that breaks the framing stops the tap for that direction (the relay's own framer
decides what to do with the association; the tap never raises into the relay).
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from relay_common import dicom_audit
from relay_router.ul.associate import AssociateInfo, parse_associate, with_abstract_syntaxes

log = logging.getLogger("relay_router.studytap")

C_STORE_RQ = 0x0001
C_FIND_RQ = 0x0020
NO_DATA_SET = 0x0101  # Command Data Set Type (0000,0800) when no data set follows (PS3.7 E.1)
STUDY_INSTANCE_UID = 0x0020000D
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
_P_DATA_TF = 0x04
MAX_ASSOCIATE_PDU = 256 * 1024  # larger ones are not read (the relay's framer has its own limit)


class Side(Enum):
    """Which peer sent the bytes: the association's requestor (calling AE) or acceptor (called AE)."""

    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


@dataclass
class StudySeen:
    """One (study, patient) pair sent by one side, with its SOP classes and instance counts."""

    sender: Side
    study_uid: str
    patient_id: str
    patient_id_issuer: str
    sop_classes: dict[str, int] = field(default_factory=dict)
    move_originators: set[str] = field(default_factory=set)

    @property
    def instances(self) -> int:
        return sum(self.sop_classes.values())

    def as_record(self) -> dict[str, Any]:
        """The JSON form (audit file field "studies")."""
        return {
            "sent_by": "calling" if self.sender is Side.REQUESTOR else "called",
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "patient_id_issuer": self.patient_id_issuer,
            "instances": self.instances,
            "sop_classes": dict(self.sop_classes),
            **({"move_originators": sorted(self.move_originators)} if self.move_originators else {}),
        }


class _Direction:
    """The PDU/PDV parser for one direction (state kept across feeds)."""

    def __init__(self, tap: StudyTap, side: Side) -> None:
        self.tap, self.side = tap, side
        self.header = bytearray()  # partial PDU header (6) or PDV header (6)
        self.pdu_left = 0  # bytes left in the current PDU body
        self.in_pdata = False
        self.associate: bytearray | None = None  # an A-ASSOCIATE-RQ/AC being collected
        self.pdv_left = 0  # bytes left in the current PDV fragment
        self.pdv_context = 0
        self.pdv_control = 0
        self.broken = False
        # The message being received: its command buffer, then its data set prefix.
        self.command = bytearray()
        self.command_too_big = False
        self.store: tuple[int, str, str] | None = None  # (context id, SOP class UID, move originator)
        self.prefix = bytearray()
        self.prefix_done = False
        self.find: tuple[str, str] | None = None  # a C-FIND-RQ's (SOP class UID, transfer syntax)
        self.find_truncated = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and not self.broken:
            if self.pdu_left == 0:
                # A PDU header (6 bytes: type, reserved, length).
                take = min(6 - len(self.header), end - pos)
                self.header += view[pos : pos + take]
                pos += take
                if len(self.header) < 6:
                    return
                pdu_type, length = self.header[0], struct.unpack(">I", self.header[2:6])[0]
                self.associate = bytearray(self.header) if pdu_type in (0x01, 0x02) else None
                self.header.clear()
                self.in_pdata = pdu_type == _P_DATA_TF
                self.pdu_left = length
                if length == 0:
                    self._broken(f"PDU type {pdu_type:#04x} with length 0")
                continue
            if not self.in_pdata:
                # A-ASSOCIATE-RQ/AC give the presentation contexts (kept whole up to a bound);
                # release and abort PDUs are skipped.
                skip = min(self.pdu_left, end - pos)
                if self.associate is not None:
                    if len(self.associate) + skip <= MAX_ASSOCIATE_PDU:
                        self.associate += view[pos : pos + skip]
                    else:
                        self.associate = None
                pos += skip
                self.pdu_left -= skip
                if self.pdu_left == 0 and self.associate is not None:
                    self.tap.associate_pdu(bytes(self.associate))
                    self.associate = None
                continue
            if self.pdv_left == 0:
                take = min(6 - len(self.header), end - pos, self.pdu_left)
                self.header += view[pos : pos + take]
                pos += take
                self.pdu_left -= take
                if len(self.header) < 6:
                    if self.pdu_left == 0:
                        self._broken("P-DATA-TF PDU ends inside a PDV item header")
                    continue
                item_length = struct.unpack(">I", self.header[0:4])[0]
                self.pdv_context, self.pdv_control = self.header[4], self.header[5]
                self.header.clear()
                if item_length < 2 or item_length - 2 > self.pdu_left:
                    self._broken(f"PDV item length {item_length} does not fit its P-DATA-TF PDU")
                    return
                self.pdv_left = item_length - 2
                if self.pdv_left == 0:
                    self._fragment(b"", last_of_item=True)
                continue
            take = min(self.pdv_left, end - pos)
            self.pdv_left -= take
            self.pdu_left -= take
            self._fragment(view[pos : pos + take], last_of_item=self.pdv_left == 0)
            pos += take

    def _broken(self, why: str) -> None:
        self.broken = True
        self.tap.broken.append(f"{self.side.value}: {why}")
        log.debug("study tap stops following the %s's bytes: %s", self.side.value, why)

    def _fragment(self, chunk: memoryview | bytes, *, last_of_item: bool) -> None:
        is_command = bool(self.pdv_control & 0x01)
        last = bool(self.pdv_control & 0x02) and last_of_item
        if is_command:
            if len(self.command) + len(chunk) > self.tap.max_command:
                self.command_too_big = True
            elif not self.command_too_big:
                self.command += chunk
            if last:
                self._command_done()
            return
        if self.store is not None and not self.prefix_done:
            room = self.tap.max_prefix - len(self.prefix)
            self.prefix += chunk[:room]
            if len(self.prefix) >= self.tap.max_prefix:
                self._data_set_done()
        elif self.find is not None:
            room = self.tap.max_query - len(self.prefix)
            self.prefix += chunk[:room]
            self.find_truncated = self.find_truncated or len(chunk) > room
        if last:
            if self.store is not None and not self.prefix_done:
                self._data_set_done()
            if self.find is not None:
                self.tap.record_query(self.side, *self.find, bytes(self.prefix), self.find_truncated)
            self.store, self.find, self.prefix_done, self.find_truncated = None, None, False, False
            self.prefix.clear()

    def _command_done(self) -> None:
        command, too_big = bytes(self.command), self.command_too_big
        self.command.clear()
        self.command_too_big = False
        self.store, self.find, self.prefix_done, self.find_truncated = None, None, False, False
        self.prefix.clear()
        if too_big:
            self.tap.unreadable += 1
            return
        try:
            with warnings.catch_warnings():  # peers choose these bytes: no warning per bad message
                warnings.simplefilter("ignore")
                ds = read_dataset(io.BytesIO(command), is_implicit_VR=True, is_little_endian=True)
            field_ = int(ds.get((0x0000, 0x0100)).value)
            data_set_type = int(ds.get((0x0000, 0x0800)).value)
        except Exception:  # a hostile or broken command set: counted, never raised
            self.tap.unreadable += 1
            return
        if field_ == C_STORE_RQ and data_set_type != NO_DATA_SET:
            sop_class = _text(ds, 0x00000002)
            originator = _text(ds, 0x00001030)
            self.store = (self.pdv_context, sop_class, originator)
        elif field_ == C_FIND_RQ and data_set_type != NO_DATA_SET:
            transfer_syntax = self.tap.contexts.get(self.pdv_context, ("", ""))[1]
            self.find = (_text(ds, 0x00000002), transfer_syntax)

    def _data_set_done(self) -> None:
        assert self.store is not None
        self.prefix_done = True
        context_id, sop_class, originator = self.store
        transfer_syntax = self.tap.contexts.get(context_id, ("", ""))[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = read_prefix(bytes(self.prefix), transfer_syntax)
        except Exception:
            found = None
        self.prefix.clear()
        if found is None or not found[0]:
            self.tap.unreadable += 1
            return
        study_uid, patient_id, issuer = found
        self.tap.record(self.side, study_uid, patient_id, issuer, sop_class, originator)


def _text(ds: Dataset, tag: int) -> str:
    element = ds.get(tag)
    if element is None or element.value is None:
        return ""
    return str(element.value).strip("\0 ")


def read_prefix(prefix: bytes, transfer_syntax: str) -> tuple[str, str, str] | None:
    """(Study Instance UID, Patient ID, Issuer of Patient ID) from the first bytes of a data set.

    Parsing stops at the first tag after (0020,000D); a prefix cut inside an element
    before that gives whatever was complete (None when nothing could be read).
    """
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(prefix, 4 * len(prefix) + 65536)
    implicit = transfer_syntax == IMPLICIT_VR_LE
    little = transfer_syntax != EXPLICIT_VR_BE
    stream = io.BytesIO(prefix)
    ds = read_dataset(
        stream,
        is_implicit_VR=implicit,
        is_little_endian=little,
        stop_when=lambda tag, vr, length: tag > STUDY_INSTANCE_UID,
        defer_size=1024,  # big values before the study (private blocks, sequences of the 0008 group) stay unread
    )
    return _text(ds, STUDY_INSTANCE_UID), _text(ds, 0x00100020), _text(ds, 0x00100021)


class StudyTap:
    """The studies one association carried, from a copy of its Upper Layer bytes."""

    def __init__(
        self,
        contexts: Mapping[int, tuple[str, str]] | None = None,
        *,
        max_prefix: int = 64 * 1024,
        max_command: int = 16 * 1024,
        max_studies: int = 1000,
        max_query: int = 8 * 1024,
        max_queries: int = 100,
        local_is_requestor: bool = True,
    ) -> None:
        # presentation context id -> (abstract syntax, transfer syntax), accepted ones only.
        # Given, or learnt from the A-ASSOCIATE-RQ/AC in the stream.
        self.contexts = dict(contexts or {})
        self._rq: AssociateInfo | None = None
        self._ac: AssociateInfo | None = None
        self.max_prefix, self.max_command, self.max_studies = max_prefix, max_command, max_studies
        self.local_is_requestor = local_is_requestor
        self.max_query, self.max_queries = max_query, max_queries
        # C-FIND identifiers (PS3.15 A.5.3.10 Query messages): the first max_query bytes of each.
        self.queries: list[dict[str, Any]] = []
        self.queries_dropped = 0
        self.studies: dict[tuple[Side, str, str, str], StudySeen] = {}
        self.studies_dropped = 0  # instances of studies beyond max_studies
        self.unreadable = 0  # C-STORE data sets (or commands) whose identifiers could not be read
        self.broken: list[str] = []
        self._directions = {side: _Direction(self, side) for side in Side}

    @classmethod
    def from_associate(cls, rq: bytes, ac: bytes, **limits: Any) -> StudyTap:
        """A tap for the association negotiated by these A-ASSOCIATE-RQ and -AC PDUs (whole, headers included)."""
        tap = cls(**limits)
        tap.associate_pdu(rq)
        tap.associate_pdu(ac)
        return tap

    def associate_pdu(self, pdu: bytes) -> None:
        """An A-ASSOCIATE-RQ or -AC seen in the stream (or given): the contexts follow from the pair."""
        try:
            info = parse_associate(pdu)
        except Exception as exc:  # the relay's own parser answers bad PDUs; we just stop
            self.broken.append(f"unreadable A-ASSOCIATE PDU: {exc}")
            return
        if pdu[0] == 0x01:
            self._rq = info
        else:
            self._ac = info
        if self._rq is None or self._ac is None:
            return
        try:
            accepted = with_abstract_syntaxes(self._ac, self._rq).accepted_contexts
        except Exception as exc:  # the tap must never break the relay
            self.broken.append(f"A-ASSOCIATE-AC does not answer the RQ: {exc}")
            return
        self.contexts = {pc.id: (pc.abstract_syntax or "", pc.transfer_syntaxes[0]) for pc in accepted}

    def relayed(self, from_local: bool, data: bytes | bytearray | memoryview) -> None:
        """The relay's hook: bytes it forwards, from its local device (True) or from the remote side.

        Needs `local_is_requestor` (set at construction): the local device is the requestor
        of an outbound association and the acceptor of an inbound one.
        """
        self.feed(Side.REQUESTOR if from_local == self.local_is_requestor else Side.ACCEPTOR, data)

    def established(self, info: AssociateInfo) -> None:
        """The accepted presentation contexts, from the relay's A-ASSOCIATE-AC (abstract syntaxes filled in)."""
        self.contexts = {pc.id: (pc.abstract_syntax or "", pc.transfer_syntaxes[0]) for pc in info.accepted_contexts}

    def feed(self, side: Side, data: bytes | bytearray | memoryview) -> None:
        """Bytes the `side` peer sent, in order, split anywhere. Never raises on bad input."""
        try:
            self._directions[side].feed(data)
        except Exception as exc:
            self._directions[side]._broken(f"unexpected {exc.__class__.__name__}: {exc}")

    def record(self, side: Side, study_uid: str, patient_id: str, issuer: str, sop_class: str, originator: str) -> None:
        key = (side, study_uid, patient_id, issuer)
        seen = self.studies.get(key)
        if seen is None:
            if len(self.studies) >= self.max_studies:
                self.studies_dropped += 1
                return
            seen = self.studies[key] = StudySeen(side, study_uid, patient_id, issuer)
        seen.sop_classes[sop_class] = seen.sop_classes.get(sop_class, 0) + 1
        if originator and len(seen.move_originators) < 16:
            seen.move_originators.add(originator)

    def record_query(
        self, side: Side, sop_class: str, transfer_syntax: str, identifier: bytes, truncated: bool
    ) -> None:
        if len(self.queries) >= self.max_queries:
            self.queries_dropped += 1
            return
        self.queries.append(
            {
                "sent_by": "calling" if side is Side.REQUESTOR else "called",
                "sop_class": sop_class,
                "transfer_syntax": transfer_syntax,
                # base64, as the Query message carries it (PS3.15 A.5.3.10): never parsed here
                "identifier": base64.b64encode(identifier).decode(),
                **({"truncated": True} if truncated else {}),
            }
        )

    def summary(self) -> list[dict[str, Any]]:
        """The studies as JSON records (the audit file's "studies" field)."""
        return [s.as_record() for s in self.studies.values()]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies.values())

    def messages(
        self,
        *,
        source_id: str,
        calling: dicom_audit.Participant,
        called: dicom_audit.Participant,
        relay: dicom_audit.Participant | None = None,
        outcome: str = "success",
        description: str = "",
        site: str = "",
    ) -> list[Any]:
        """One DICOM Instances Transferred message per sending side that stored something."""
        out = []
        for side in Side:
            studies = [
                dicom_audit.StudyRecord(s.study_uid, s.patient_id, s.patient_id_issuer, dict(s.sop_classes))
                for s in self.studies.values()
                if s.sender is side
            ]
            if not studies:
                continue
            source, destination = (calling, called) if side is Side.REQUESTOR else (called, calling)
            out.append(
                dicom_audit.instances_transferred(
                    source_id=source_id,
                    source=source,
                    destination=destination,
                    studies=studies,
                    others=[relay] if relay is not None else [],
                    outcome=outcome,
                    description=description,
                    site=site,
                )
            )
        return out
