"""The record stream of an accelerated transfer between two routers (sans-IO).

An accelerated transfer is an ordinary relayed association (sealed, compressed frames through the
bridge) whose Open carries the feature `accel1` (relay_router.wire.features): its payload is this
record stream instead of Upper Layer PDUs. Each direction is one byte stream cut into frames
anywhere; a record is a 1-byte type, a 4-byte big-endian body length and the body:

near -> far
    HELLO       JSON {"version": 1, "capabilities": bool, "moves": bool, "title": str}: first record
                (inside Open); whether the near router wants the device's capabilities now, whether it
                names the move of each C-MOVE sub-operation (below), and its own title for the device
    INSTANCE    JSON header {"id", "sop_class", "sop_instance", "transfer_syntax", "length"}, followed
                by `length` bytes of the spooled Part 10 file in CHUNK records; a C-MOVE sub-operation
                also carries "move_originator_ae" and "move_originator_id" (the requester's title in the
                far router's namespace and its C-MOVE's Message ID: relay_router.accel.moves)
    CHUNK       raw bytes of the current instance (at most MAX_CHUNK)
    ACK         JSON {"ids": [...]}: outcomes the near router recorded (the far one may forget them)
    BLOB        JSON {"id", "sop_class", "sop_instance", "transfer_syntax", "length", "blob_id",
                "ordinal", "parts", "digest"}, and a sub-operation's move pair as in INSTANCE: an
                instance above `[dicom] spill_threshold_bytes` that travelled through the blob
                store instead of CHUNKs (relay_router.spill's `BlobUpload`: parts sealed with this
                association's key under `part_seq(ordinal, part)`, `digest` the SHA-256 of the
                stored parts in order, hex); the far router fetches, verifies and spools it
                (relay_router.accel.receive)
    BLOB_OPEN   JSON as BLOB without "parts" and "digest": a blob whose upload has begun, sent only to a far
                router that announced FEATURES {"blob_stream": true}. The far router starts fetching at
                once; BLOB_PARTS {"ordinal", "blob_id", "parts"} follow as more parts are stored (a count
                that only grows), and the BLOB record with the same fields closes it with its manifest. So the
                far router downloads a big instance while it is still being uploaded instead of after: the
                blob store adds about one part's time instead of one instance's. If the upload fails after
                BLOB_OPEN, the near router ends the stream (the instance is sent again on the next one).
far -> near
    FEATURES    JSON {"blob_stream": bool}: only in answer to a HELLO that asked with "blob_stream": true
                (a near router that does not ask never receives it)
    CAPABILITIES JSON {"contexts": {sop_class: [transfer syntax, ...]}}: what the device accepts
    STORED      JSON {"id", "sop_instance"}: durable in the far router's spool (near: FORWARDED)
    REFUSED     JSON {"id", "sop_instance", "status", "permanent", "error"}: not taken (spool full,
                SOP class not granted)
    OUTCOME     JSON {"id", "sop_instance", "status", "error"}: the device's final answer
                (near: DELIVERED, or DEAD for a failure status)

The peer may be hostile (it authenticated, but may be buggy or compromised): every header is bounded
and validated here, and a violation raises `RecordError` (the transfer is then aborted). Nothing but
a CHUNK body may exceed MAX_HEADER bytes, and CHUNKs are handed out as they arrive, never collected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from relay_common.errors import Reason, RelayError

VERSION = 1
MAX_HEADER = 64 * 1024  # a JSON record; capabilities of ~200 SOP classes x 12 syntaxes fit in ~40 KiB
MAX_CHUNK = 256 * 1024
MAX_INSTANCE = 8 * 1024**3  # larger than any real instance; bounds what a peer can announce
MAX_CAPABILITY_CLASSES = 1024
MAX_CAPABILITY_SYNTAXES = 32
MAX_ACK_IDS = 4096
MIN_PART_BYTES = 64 * 1024  # the smallest `[dicom] spill_part_bytes`: bounds the parts a BLOB may announce
MAX_BLOB_ORDINAL = 1 << 42  # relay_router.spill_store.MAX_BLOBS: part nonces stay unique below it
_BLOB_ID = re.compile(r"[0-9a-f]{32}")  # as the bridge issues them (relay_bridge.blobs.BLOB_ID)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEADER = 5
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_ENTRY_ID = re.compile(r"[0-9A-Za-z_.-]{1,80}")


class RecordType(IntEnum):
    HELLO = 0x01
    INSTANCE = 0x02
    CHUNK = 0x03
    ACK = 0x04
    BLOB = 0x05
    BLOB_OPEN = 0x06
    BLOB_PARTS = 0x07
    CAPABILITIES = 0x10
    STORED = 0x11
    REFUSED = 0x12
    OUTCOME = 0x13
    FEATURES = 0x14


class RecordError(RelayError):
    """The other router sent a record stream this router cannot accept."""

    reason = Reason.PROTOCOL


@dataclass(frozen=True)
class Hello:
    capabilities: bool
    # The near router names each C-MOVE sub-operation's move in its INSTANCE records (relay_router.accel.moves):
    # only then may the far router hold a final C-MOVE response for them. Absent (False) from older routers.
    moves: bool = False
    title: str | None = None  # the near router's own AE title for the device (a C-MOVE's Move Destination there)
    # The near router can announce blobs while they upload (BLOB_OPEN, BLOB_PARTS) if the far router says so.
    blob_stream: bool = False


@dataclass(frozen=True)
class InstanceHeader:
    id: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    length: int
    # A C-MOVE sub-operation's Move Originator AE Title and Message ID (PS3.7 9.3.1.1), else None.
    move_originator_ae: str | None = None
    move_originator_id: int | None = None


@dataclass(frozen=True)
class BlobHeader:
    """An instance whose bytes are in the blob store: the INSTANCE fields plus the blob's manifest."""

    instance: InstanceHeader
    blob_id: str
    ordinal: int
    parts: int
    digest: bytes


@dataclass(frozen=True)
class BlobOpen:
    """A blob whose upload has begun: its parts are announced by BlobParts, its manifest by a BLOB record."""

    instance: InstanceHeader
    blob_id: str
    ordinal: int


@dataclass(frozen=True)
class BlobParts:
    ordinal: int
    blob_id: str
    parts: int  # parts 0 .. parts-1 are stored


@dataclass(frozen=True)
class Features:
    blob_stream: bool


@dataclass(frozen=True)
class Chunk:
    data: bytes
    last: bool  # the instance's bytes are complete with this chunk


@dataclass(frozen=True)
class Ack:
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Capabilities:
    contexts: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Stored:
    id: str
    sop_instance: str


@dataclass(frozen=True)
class Refused:
    id: str
    sop_instance: str
    status: int
    permanent: bool
    error: str


@dataclass(frozen=True)
class Outcome:
    id: str
    sop_instance: str
    status: int
    error: str


Record = (
    Hello
    | InstanceHeader
    | BlobHeader
    | BlobOpen
    | BlobParts
    | Chunk
    | Ack
    | Capabilities
    | Features
    | Stored
    | Refused
    | Outcome
)


# -- encoding ----------------------------------------------------------------------------------


def _record(kind: RecordType, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(4, "big") + body


def _json(kind: RecordType, value: Mapping[str, Any]) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER:
        raise ValueError(f"{kind.name} record of {len(body)} bytes exceeds {MAX_HEADER}")
    return _record(kind, body)


def hello(*, capabilities: bool, moves: bool = True, title: str | None = None, blob_stream: bool = False) -> bytes:
    body: dict[str, Any] = {"version": VERSION, "capabilities": capabilities, "moves": moves}
    if title is not None:
        body["title"] = title
    if blob_stream:  # absent otherwise: what an older router sends
        body["blob_stream"] = True
    return _json(RecordType.HELLO, body)


def features(*, blob_stream: bool) -> bytes:
    return _json(RecordType.FEATURES, {"blob_stream": blob_stream})


def blob_open(header: BlobOpen) -> bytes:
    body = _instance_body(header.instance)
    body.update(blob_id=header.blob_id, ordinal=header.ordinal)
    return _json(RecordType.BLOB_OPEN, body)


def blob_parts(ordinal: int, blob_id: str, parts: int) -> bytes:
    return _json(RecordType.BLOB_PARTS, {"ordinal": ordinal, "blob_id": blob_id, "parts": parts})


def instance(header: InstanceHeader) -> bytes:
    return _json(RecordType.INSTANCE, _instance_body(header))


def blob(header: BlobHeader) -> bytes:
    body = _instance_body(header.instance)
    body.update(blob_id=header.blob_id, ordinal=header.ordinal, parts=header.parts, digest=header.digest.hex())
    return _json(RecordType.BLOB, body)


def _instance_body(header: InstanceHeader) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": header.id,
        "sop_class": header.sop_class,
        "sop_instance": header.sop_instance,
        "transfer_syntax": header.transfer_syntax,
        "length": header.length,
    }
    if header.move_originator_ae is not None and header.move_originator_id is not None:
        body["move_originator_ae"] = header.move_originator_ae
        body["move_originator_id"] = header.move_originator_id
    return body


def chunks(data: bytes) -> bytes:
    """CHUNK records carrying `data` (cut at MAX_CHUNK)."""
    return b"".join(_record(RecordType.CHUNK, data[i : i + MAX_CHUNK]) for i in range(0, len(data), MAX_CHUNK))


def ack(ids: Iterable[str]) -> bytes:
    return _json(RecordType.ACK, {"ids": list(ids)})


def capabilities(contexts: Mapping[str, Iterable[str]]) -> bytes:
    return _json(RecordType.CAPABILITIES, {"contexts": {k: list(v) for k, v in sorted(contexts.items())}})


def stored(entry_id: str, sop_instance: str) -> bytes:
    return _json(RecordType.STORED, {"id": entry_id, "sop_instance": sop_instance})


def refused(entry_id: str, sop_instance: str, status: int, *, permanent: bool, error: str) -> bytes:
    return _json(
        RecordType.REFUSED,
        {"id": entry_id, "sop_instance": sop_instance, "status": status, "permanent": permanent, "error": error[:200]},
    )


def outcome(entry_id: str, sop_instance: str, status: int, error: str = "") -> bytes:
    return _json(
        RecordType.OUTCOME, {"id": entry_id, "sop_instance": sop_instance, "status": status, "error": error[:200]}
    )


# -- decoding ----------------------------------------------------------------------------------


def _field(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"{what} record: field {name!r} missing or not {kind.__name__}")
    return value


def _uid(body: Mapping[str, Any], name: str, what: str) -> str:
    value = _field(body, name, str, what)
    if len(value) > 64 or not _UID.fullmatch(value):
        raise RecordError(f"{what} record: {name} {value[:80]!r} is not a UID (PS3.5 9.1)")
    return str(value)


def _entry_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ENTRY_ID.fullmatch(value):
        raise RecordError(f"{what} record: {str(value)[:80]!r} is not a spool entry id")
    return value


def _ae_title(value: object) -> bool:
    """PS3.5 AE: 1-16 characters of the default repertoire, no backslash, not only spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 16
        and bool(value.strip())
        and all(0x20 <= ord(c) < 0x7F and c != "\\" for c in value)
    )


def _move_originator(body: Mapping[str, Any], what: str) -> tuple[str | None, int | None]:
    """A sub-operation's Move Originator pair, both or neither: an AE title (PS3.5 AE: 1-16 characters of the
    default repertoire, no backslash, not only spaces) and a Message ID (US, 1-65535)."""
    ae, message_id = body.get("move_originator_ae"), body.get("move_originator_id")
    if ae is None and message_id is None:
        return None, None
    if not isinstance(ae, str) or not _ae_title(ae):
        raise RecordError(f"{what} record: move_originator_ae {str(ae)[:40]!r} is not an AE title")
    if not isinstance(message_id, int) or isinstance(message_id, bool) or not 0 < message_id <= 0xFFFF:
        raise RecordError(f"{what} record: move_originator_id {str(message_id)[:20]!r} is not a Message ID")
    return ae.strip(), message_id


def _status(body: Mapping[str, Any], what: str) -> int:
    status = _field(body, "status", int, what)
    if not 0 <= status <= 0xFFFF:
        raise RecordError(f"{what} record: status {status} is not a DIMSE status")
    return int(status)


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name, "")
    text = value if isinstance(value, str) else ""
    return "".join(c if c.isprintable() else "?" for c in text[:200])  # logged: no control characters


def _instance(value: Mapping[str, Any], what: str) -> InstanceHeader:
    length = _field(value, "length", int, what)
    if not 0 < length <= MAX_INSTANCE:
        raise RecordError(f"{what} record: length {length} out of range")
    return InstanceHeader(
        _entry_id(value.get("id"), what),
        _uid(value, "sop_class", what),
        _uid(value, "sop_instance", what),
        _uid(value, "transfer_syntax", what),
        length,
        *_move_originator(value, what),
    )


def _blob_ref(value: Mapping[str, Any], what: str) -> tuple[str, int]:
    blob_id = _field(value, "blob_id", str, what)
    if not _BLOB_ID.fullmatch(blob_id):
        raise RecordError(f"{what} record: blob id {blob_id[:80]!r} is not 32 hex digits")
    ordinal = _field(value, "ordinal", int, what)
    if not 0 <= ordinal < MAX_BLOB_ORDINAL:
        raise RecordError(f"{what} record: ordinal {ordinal} out of range")
    return blob_id, ordinal


def max_parts(length: int) -> int:
    """The most parts an instance of `length` bytes may be cut into (parts of at least MIN_PART_BYTES)."""
    return length // MIN_PART_BYTES + 1


def _blob(value: Mapping[str, Any], what: str) -> BlobHeader:
    """A BLOB reference, bounded like a transparent association's blob notice (relay_router.spill_receive)."""
    instance = _instance(value, what)
    blob_id, ordinal = _blob_ref(value, what)
    parts = _field(value, "parts", int, what)
    if not 1 <= parts <= max_parts(instance.length):
        raise RecordError(f"BLOB record: {parts} parts for {instance.length} bytes")
    digest = _field(value, "digest", str, what)
    if not _DIGEST.fullmatch(digest):
        raise RecordError("BLOB record: digest is not a hex SHA-256")
    return BlobHeader(instance, blob_id, ordinal, parts, bytes.fromhex(digest))


def _decode(kind: RecordType, body: bytes) -> Record:
    what = kind.name
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{what} record is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RecordError(f"{what} record is not a JSON object")
    if kind is RecordType.HELLO:
        if value.get("version") != VERSION:
            raise RecordError(f"HELLO: version {str(value.get('version'))[:20]!r}, this router speaks {VERSION}")
        title = value.get("title")
        if title is not None and not (isinstance(title, str) and _ae_title(title)):
            raise RecordError(f"HELLO: title {str(title)[:40]!r} is not an AE title")
        return Hello(
            bool(value.get("capabilities")),
            value.get("moves") is True,
            None if title is None else title.strip(),
            value.get("blob_stream") is True,
        )
    if kind is RecordType.INSTANCE:
        return _instance(value, what)
    if kind is RecordType.BLOB:
        return _blob(value, what)
    if kind is RecordType.BLOB_OPEN:
        return BlobOpen(_instance(value, what), *_blob_ref(value, what))
    if kind is RecordType.BLOB_PARTS:
        blob_id, ordinal = _blob_ref(value, what)
        parts = _field(value, "parts", int, what)
        if not 0 <= parts < MAX_BLOB_ORDINAL:  # bounded against the instance's length where the blob is known
            raise RecordError(f"BLOB_PARTS record: {parts} parts")
        return BlobParts(ordinal, blob_id, parts)
    if kind is RecordType.FEATURES:
        return Features(value.get("blob_stream") is True)
    if kind is RecordType.ACK:
        ids = _field(value, "ids", list, what)
        if len(ids) > MAX_ACK_IDS:
            raise RecordError(f"ACK record: {len(ids)} ids, at most {MAX_ACK_IDS}")
        return Ack(tuple(_entry_id(i, what) for i in ids))
    if kind is RecordType.CAPABILITIES:
        contexts = _field(value, "contexts", dict, what)
        if len(contexts) > MAX_CAPABILITY_CLASSES:
            raise RecordError(f"CAPABILITIES record: {len(contexts)} SOP classes, at most {MAX_CAPABILITY_CLASSES}")
        result: dict[str, tuple[str, ...]] = {}
        for sop_class, syntaxes in contexts.items():
            if not isinstance(syntaxes, list) or len(syntaxes) > MAX_CAPABILITY_SYNTAXES:
                raise RecordError(f"CAPABILITIES record: bad transfer syntax list for {str(sop_class)[:64]!r}")
            checked = {"c": sop_class, **{f"t{i}": ts for i, ts in enumerate(syntaxes)}}
            result[_uid(checked, "c", what)] = tuple(_uid(checked, f"t{i}", what) for i in range(len(syntaxes)))
        return Capabilities(result)
    entry_id = _entry_id(value.get("id"), what)
    sop_instance = _uid(value, "sop_instance", what)
    if kind is RecordType.STORED:
        return Stored(entry_id, sop_instance)
    if kind is RecordType.REFUSED:
        return Refused(
            entry_id, sop_instance, _status(value, what), bool(value.get("permanent")), _text(value, "error")
        )
    return Outcome(entry_id, sop_instance, _status(value, what), _text(value, "error"))


class RecordReader:
    """One direction's record stream, fed in pieces split anywhere; `feed` returns complete records.

    `accept`: the record types the other side may send this router (any other is a violation).
    CHUNK bodies are passed on as they arrive, so memory is bounded by MAX_HEADER plus one feed.
    """

    def __init__(self, accept: Iterable[RecordType]) -> None:
        self._accept = frozenset(accept)
        self._buffer = bytearray()
        self._chunk_left = 0  # body bytes of the current CHUNK record not yet passed on
        self._instance_left = 0  # bytes of the current instance not yet received
        self.failed: RecordError | None = None

    @property
    def in_instance(self) -> bool:
        return self._instance_left > 0

    def feed(self, data: bytes) -> list[Record]:
        if self.failed is not None:
            raise self.failed
        try:
            return self._feed(data)
        except RecordError as exc:
            self.failed = exc
            raise

    def _feed(self, data: bytes) -> list[Record]:
        out: list[Record] = []
        view = memoryview(data)
        while view:
            if self._chunk_left:
                take = min(self._chunk_left, len(view))
                self._chunk_left -= take
                self._instance_left -= take
                out.append(Chunk(bytes(view[:take]), self._instance_left == 0))
                view = view[take:]
                continue
            need = _HEADER - len(self._buffer) if len(self._buffer) < _HEADER else 0
            if need:
                self._buffer += view[:need]
                view = view[need:]
                if len(self._buffer) < _HEADER:
                    break
            kind_byte, length = self._buffer[0], int.from_bytes(self._buffer[1:5], "big")
            try:
                kind = RecordType(kind_byte)
            except ValueError:
                raise RecordError(f"unknown record type 0x{kind_byte:02x}") from None
            if kind not in self._accept:
                raise RecordError(f"a {kind.name} record is not expected in this direction")
            if kind is RecordType.CHUNK:
                if not 0 < length <= MAX_CHUNK or length > self._instance_left:
                    raise RecordError(f"CHUNK of {length} bytes where {self._instance_left} were announced")
                self._buffer.clear()
                self._chunk_left = length
                continue
            if self._instance_left:
                raise RecordError(f"{kind.name} record inside an instance ({self._instance_left} bytes missing)")
            if length > MAX_HEADER:
                raise RecordError(f"{kind.name} record of {length} bytes exceeds {MAX_HEADER}")
            take = min(_HEADER + length - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < _HEADER + length:
                break
            record = _decode(kind, bytes(self._buffer[_HEADER:]))
            self._buffer.clear()
            if isinstance(record, InstanceHeader):
                self._instance_left = record.length
            out.append(record)
        return out


NEAR_TO_FAR = (
    RecordType.HELLO,
    RecordType.INSTANCE,
    RecordType.BLOB,
    RecordType.BLOB_OPEN,
    RecordType.BLOB_PARTS,
    RecordType.CHUNK,
    RecordType.ACK,
)
FAR_TO_NEAR = (
    RecordType.CAPABILITIES,
    RecordType.FEATURES,
    RecordType.STORED,
    RecordType.REFUSED,
    RecordType.OUTCOME,
)
