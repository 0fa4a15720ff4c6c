"""The spool's vocabulary and on-disk format: entry states, entries, errors, limits, the Part 10 header.

Shared by :mod:`relay_router.accel.spool` (the process that owns the spool) and
the readers that must not open it (``relay-router status``, ``spool list``), so
both agree on what a spool directory holds. See spool.py for the layout.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from pydicom import __version_info__ as pydicom_version
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from relay_common.errors import Reason, RelayError

__all__ = [
    "DATA_NAME",
    "ENTRY_ID",
    "SPOOL_PRIVATE_UID",
    "STATE_NAME",
    "EntryState",
    "SpoolBusy",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolUsage",
    "check_meta",
    "check_uid",
    "fsync_dir",
    "part10_header",
    "read_entries",
    "request_action",
    "take_lock",
]

DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_BASE_S = 2.0
DEFAULT_RETRY_MAX_S = 300.0

SPOOL_PRIVATE_UID = "2.25.222658970521932051317310521018175531764"
"""Private Information Creator UID (0002,0100) of the entry state kept in our spool files' file meta."""
DATA_NAME = "instance.dcm"
STATE_NAME = "state.json"
ENTRY_ID = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}$")
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_META_ITEMS = 16
MAX_META_TEXT = 256
MAX_ERROR_TEXT = 512


class SpoolError(RelayError):
    """The spool cannot do what was asked (bad id, bad entry, unreadable file)."""


class SpoolBusy(SpoolError):
    """Another process has the spool open."""


class SpoolFull(SpoolError):
    """The spool's byte limit is reached: the C-STORE gets 0xA700 (Out of Resources), nothing is acknowledged."""

    reason = Reason.OVERLOADED


class EntryState(StrEnum):
    """Where one spooled instance stands. Values are stored on disk and used as metric labels."""

    RECEIVED = "received"  # committed, not yet tried
    SENDING = "sending"  # a delivery (or a transfer to the far router) is running
    FORWARDED = "forwarded"  # the far router spooled it; its outcome is awaited (near side)
    DELIVERED = "delivered"  # the destination confirmed it (kept only until the outcome is passed on)
    RETRY = "retry"  # a transient failure; tried again at next_attempt
    DEAD = "dead"  # a permanent failure or too many attempts: waits for `relay-router spool retry|purge`


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled instance: what it is, where it goes, how its delivery stands."""

    id: str
    route: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int  # bytes of instance.dcm
    state: EntryState
    attempts: int  # deliveries started
    next_attempt: float  # epoch seconds; RECEIVED and RETRY entries are due from then
    last_error: str
    created: float
    meta: Mapping[str, str]  # e.g. calling AE, move originator AE title and message ID

    def to_json(self) -> str:
        # Field by field, not dataclasses.asdict (a deep copy): this runs several times per C-STORE.
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        data["state"] = str(self.state)
        data["meta"] = dict(self.meta)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpoolEntry:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("state is not an object")
        meta = data.get("meta", {})
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("meta is not a string mapping")
        return cls(
            id=str(data["id"]),
            route=str(data["route"]),
            sop_class_uid=str(data["sop_class_uid"]),
            sop_instance_uid=str(data["sop_instance_uid"]),
            transfer_syntax=str(data["transfer_syntax"]),
            size=int(data["size"]),
            state=EntryState(data["state"]),
            attempts=int(data["attempts"]),
            next_attempt=float(data["next_attempt"]),
            last_error=str(data["last_error"]),
            created=float(data["created"]),
            meta=dict(meta),
        )


_ENTRY_FIELDS = tuple(f.name for f in fields(SpoolEntry))


class SpoolUsage(NamedTuple):
    bytes_used: int
    max_bytes: int
    counts: dict[EntryState, int]


def check_uid(name: str, value: str) -> str:
    if not (0 < len(value) <= 64 and UID_PATTERN.match(value)):
        raise SpoolError(f"{name} is not a valid UID: {value[:80]!r}")
    return value


def check_meta(meta: Mapping[str, str] | None) -> dict[str, str]:
    items = dict(meta or {})
    if len(items) > MAX_META_ITEMS:
        raise SpoolError(f"too many meta items ({len(items)} > {MAX_META_ITEMS})")
    for key, value in items.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpoolError("meta keys and values must be strings")
        if not key or len(key) > MAX_META_TEXT or len(value) > MAX_META_TEXT:
            raise SpoolError(f"meta item {key[:40]!r} is empty or longer than {MAX_META_TEXT} characters")
    return items


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_lock(root: Path) -> int:
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolBusy(f"the spool {root} is open in another process (a running router)") from None
    return fd


def read_entries(root: Path) -> list[SpoolEntry]:
    """The committed entries as on disk, without opening the spool (for `status` and `spool list`)."""
    found = []
    entries = Path(root) / "entries"
    if not entries.is_dir():
        return []
    for directory in sorted(entries.iterdir()):
        try:
            found.append(SpoolEntry.from_json((directory / STATE_NAME).read_text("utf-8")))
        except (ValueError, KeyError, OSError):
            continue  # being written, removed, or unreadable (the owner quarantines it)
    return found


def request_action(root: Path, action: str, entry_id: str | None) -> Path:
    """Leave a retry or purge for the process that has the spool open; it applies it within seconds."""
    if action not in ("retry", "purge"):
        raise SpoolError(f"unknown spool action {action!r}")
    if entry_id is not None and not ENTRY_ID.match(entry_id):
        raise SpoolError(f"not a spool entry id: {entry_id[:40]!r}")
    directory = Path(root) / "requests"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / f"{action}.{entry_id or 'all'}.{secrets.token_hex(4)}"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    return target


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2): OB has a 4-byte length."""
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" * (len(raw) % 2)  # UI: padded to even length with NUL (PS3.5 6.2)


_VERSION_NAME = f"PYDICOM {'.'.join(pydicom_version)}".encode("ascii")  # what pydicom writes
_VERSION_NAME += b" " * (len(_VERSION_NAME) % 2)
_META_FIXED = _element(0x0001, b"OB", b"\x00\x01")  # File Meta Information Version
_META_IMPLEMENTATION = _element(0x0012, b"UI", _uid_value(PYDICOM_IMPLEMENTATION_UID)) + _element(
    0x0013, b"SH", _VERSION_NAME
)


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, private: bytes | None = None
) -> bytes:
    """The 128-byte preamble, 'DICM' and the file meta group (PS3.10 7.1) for a data set as received.

    `private` goes into Private Information (0002,0102) under our creator UID: the spool keeps
    the entry's first state there, so the file alone says where it goes (see `Spool._recover`).

    Built from fixed bytes, not through pydicom's writer, because it runs for every C-STORE before
    the response (pydicom took 1-2.5 ms, this a few microseconds); the test suite checks that
    the result is byte-identical to pydicom's `write_file_meta_info` and that pydicom reads it.
    The UIDs were validated by `check_uid`; the elements are in ascending tag order as required.
    """
    group = [
        _META_FIXED,
        _element(0x0002, b"UI", _uid_value(sop_class_uid)),
        _element(0x0003, b"UI", _uid_value(sop_instance_uid)),
        _element(0x0010, b"UI", _uid_value(transfer_syntax)),
        _META_IMPLEMENTATION,
    ]
    if private is not None:
        group.append(_element(0x0100, b"UI", _uid_value(SPOOL_PRIVATE_UID)))
        group.append(_element(0x0102, b"OB", private + b" " * (len(private) % 2)))
    body = b"".join(group)
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def part10_header_by_pydicom(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, private: bytes | None = None
) -> bytes:
    """The same header written by pydicom: the reference `part10_header` is tested against."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    if private is not None:
        meta.PrivateInformationCreatorUID = UID(SPOOL_PRIVATE_UID)
        meta.PrivateInformation = private + b" " * (len(private) % 2)  # OB: even length
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()
