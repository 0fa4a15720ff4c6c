"""A small pynetdicom archive (PACS) for the demo and the tests.

Why a home-made archive next to Orthanc: it starts in milliseconds, runs in the
test process (no SQLite lock, no 3 s shutdown), exposes its index to Python,
and lets the relay be exercised against a second, independent DIMSE stack.

Services: Verification; Storage (every storage SOP class pynetdicom knows, in
any transfer syntax, kept byte for byte as received); Query/Retrieve FIND,
MOVE and GET in the Patient Root and Study Root models. C-MOVE destinations
must be known nodes (AE title -> host, port), like on any real PACS. Every
DICOM socket gets TCP_NODELAY (see :func:`_set_nodelay`).

In process::

    with DemoArchive("ARCHIVE", 0, tmp_path, {"STORESCP": ("127.0.0.1", 11113)}) as pacs:
        pacs.load(files)
        ...  # pacs.port, pacs.instances

As a program::

    python -m relay_demo.archive --ae-title ARCHIVE --port 11112 --storage DIR \\
        --known-node STORESCP=127.0.0.1:11113
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_context,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from relay_demo.datasets import fingerprints as _fingerprints

__all__ = ["DemoArchive", "StoredInstance", "main"]

LOGGER = logging.getLogger(__name__)

_QR_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)
_STUDY_ROOT = {
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
}
_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Level (index in _LEVELS) of the attributes we match on. Keys of a deeper
# level than the query are ignored, as PS3.4 C.4.1.1.3.1 allows.
_MATCH_KEYS = (
    ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
     "ReferringPhysicianName"),
    ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "BodyPartExamined"),
    ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate"),
)  # fmt: skip
_MATCH_LEVEL = {keyword: depth for depth, keywords in enumerate(_MATCH_KEYS) for keyword in keywords}
_STATUS_PENDING = 0xFF00
_STATUS_CANCEL = 0xFE00
_STATUS_BAD_IDENTIFIER = 0xA900
_STATUS_CANNOT_PROCESS = 0xC000
_SAFE_NAME = re.compile(r"[0-9.]{1,64}")


@dataclass(frozen=True)
class StoredInstance:
    """One instance in the archive: where its file is, and its header (no pixels)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    header: Dataset

    def value(self, keyword: str) -> str:
        """The attribute as a DICOM string (multi-values joined by a backslash)."""
        elem = self.header.data_element(keyword) if keyword else None
        if elem is None or elem.value is None:
            return ""
        if elem.VM > 1:
            return "\\".join(str(v) for v in elem.value)
        return str(elem.value)


def _set_nodelay(event: evt.Event) -> None:
    """Turn off Nagle on an association socket (EVT_CONN_OPEN handler).

    pynetdicom has no socket-option setting, but EVT_CONN_OPEN fires before the
    first PDU on both sides (acceptor: before the reactor starts; requestor:
    right after connect), so this is the earliest hook. Without it each
    C-STORE/response pair can wait on delayed ACKs (~40 ms on Linux).
    """
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - closed already
        pass


def _wildcard(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4): ``*`` any run, ``?`` one char."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _matches(elem: DataElement, value: str) -> bool:
    """Does one query key match one stored value (single value, list, range, wildcard)."""
    query = elem.value
    if query is None or query == "" or elem.VR == "SQ":
        return True  # universal matching: a return key only
    if isinstance(query, list | tuple) or getattr(elem, "VM", 1) > 1:
        return value in {str(q) for q in query}
    text = str(query).strip()
    if elem.VR == "UI":
        return value in text.split("\\")  # list of UID matching
    if elem.VR in ("DA", "TM", "DT") and "-" in text:
        low, _, high = text.partition("-")
        return (not low or value >= low) and (not high or value <= high)
    if "*" in text or "?" in text:
        return _wildcard(text, ignore_case=elem.VR == "PN").fullmatch(value) is not None
    if elem.VR == "PN":
        return text.lower() == value.lower()
    return text == value


class DemoArchive:
    """A pynetdicom archive bound to ``host`` (loopback by default) and ``port`` (0: any).

    Thread-safe: pynetdicom serves each association in its own thread; the
    index is guarded by one lock, and files are written atomically.
    """

    def __init__(
        self,
        ae_title: str,
        port: int,
        storage_dir: str | os.PathLike[str],
        known_nodes: Mapping[str, tuple[str, int]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._known = {ae.strip(): (h, int(p)) for ae, (h, p) in (known_nodes or {}).items()}
        self._index: dict[str, StoredInstance] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._ae = self._make_ae()

    # -- lifecycle ---------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 32
        ae.add_supported_context(Verification)
        for model in _QR_MODELS:
            ae.add_supported_context(model)
        # scp_role/scu_role: accept the requestor's SCP role for C-GET (its
        # storage sub-operations come back on this association).
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        return ae

    def start(self) -> DemoArchive:
        """Listen in background threads (``start_server(block=False)``)."""
        if self._server is not None:
            return self
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _set_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
        ]
        self._server = self._ae.start_server((self.host, self._requested_port), block=False, evt_handlers=handlers)
        LOGGER.info("archive %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop listening and abort associations still running."""
        if self._server is None:
            return
        self._ae.shutdown()
        self._server = None

    def __enter__(self) -> DemoArchive:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The listening port (the real one when constructed with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- index -------------------------------------------------------------

    @property
    def instances(self) -> dict[str, StoredInstance]:
        """A snapshot of the index: SOP Instance UID -> :class:`StoredInstance`."""
        with self._lock:
            return dict(self._index)

    def fingerprints(self) -> dict[str, str]:
        """``{SOPInstanceUID: pixel sha256}`` of every stored file."""
        return _fingerprints(i.path for i in self.instances.values())

    def set_known_node(self, ae_title: str, host: str, port: int) -> None:
        """Add or change a C-MOVE destination (e.g. once a router's port is known)."""
        with self._lock:
            self._known[ae_title.strip()] = (host, int(port))

    def clear(self) -> None:
        """Forget every instance and delete the files the archive owns."""
        with self._lock:
            entries, self._index = list(self._index.values()), {}
        for entry in entries:
            if entry.path.parent == self.storage_dir:
                entry.path.unlink(missing_ok=True)

    def load(self, paths: Iterable[str | os.PathLike[str]], *, copy: bool = True) -> list[str]:
        """Index DICOM files, as if they had been stored; returns their SOP Instance UIDs.

        With ``copy`` (default) the files are copied into the storage directory
        so the archive owns them; ``copy=False`` indexes them where they are
        (fast preloading of a large benchmark set, or of the storage directory).
        """
        uids = []
        for source in paths:
            src = Path(source)
            header = pydicom.dcmread(src, stop_before_pixels=True)
            path = self._file_for(str(header.SOPInstanceUID)) if copy else src
            if copy and path != src:
                shutil.copyfile(src, path)
            uids.append(self._add(path, header))
        return uids

    def _file_for(self, sop_uid: str) -> Path:
        name = sop_uid if _SAFE_NAME.fullmatch(sop_uid) else hashlib.sha256(sop_uid.encode()).hexdigest()
        return self.storage_dir / f"{name}.dcm"

    def _add(self, path: Path, header: Dataset) -> str:
        meta = header.file_meta
        entry = StoredInstance(
            path=path,
            sop_class_uid=str(header.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", ""))),
            sop_instance_uid=str(header.SOPInstanceUID),
            transfer_syntax=str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)),
            header=header,
        )
        with self._lock:
            self._index[entry.sop_instance_uid] = entry
        return entry.sop_instance_uid

    # -- query -------------------------------------------------------------

    def _select(self, identifier: Dataset, level: str) -> list[StoredInstance]:
        """Instances matching every key of ``identifier`` at ``level`` or above."""
        depth = _LEVELS.index(level)
        keys = [elem for elem in identifier if _MATCH_LEVEL.get(elem.keyword, 99) <= depth and not elem.tag.is_private]
        with self._lock:
            candidates = list(self._index.values())
        return [inst for inst in candidates if all(_matches(elem, inst.value(elem.keyword)) for elem in keys)]

    def _computed(self, keyword: str, rep: StoredInstance) -> Any:
        """Values Orthanc and most PACS compute (PS3.4 C.3.4 "additional keys")."""
        scope = {"Patient": "PatientID", "Study": "StudyInstanceUID", "Series": "SeriesInstanceUID"}
        m = re.fullmatch(r"NumberOf(Patient|Study|Series)Related(Studies|Series|Instances)", keyword)
        if m:
            key = scope[m.group(1)]
            with self._lock:
                group = [i for i in self._index.values() if i.value(key) == rep.value(key)]
            what = {"Studies": "StudyInstanceUID", "Series": "SeriesInstanceUID"}
            if m.group(2) == "Instances":
                return len(group)
            return len({i.value(what[m.group(2)]) for i in group})
        with self._lock:
            study = [i for i in self._index.values() if i.value("StudyInstanceUID") == rep.value("StudyInstanceUID")]
        if keyword == "ModalitiesInStudy":
            return sorted({i.value("Modality") for i in study if i.value("Modality")})
        if keyword == "SOPClassesInStudy":
            return sorted({i.sop_class_uid for i in study})
        return None

    def _response(self, identifier: Dataset, level: str, rep: StoredInstance) -> Dataset:
        """The C-FIND answer for one matched entity: the requested keys, filled in."""
        rsp = Dataset()
        header = rep.header
        for elem in identifier:
            if elem.tag.is_private or elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                continue
            if elem.keyword == "RetrieveAETitle":
                rsp.RetrieveAETitle = self.ae_title
            elif elem.keyword in ("ModalitiesInStudy", "SOPClassesInStudy") or (
                elem.keyword.startswith("NumberOf") and "Related" in elem.keyword
            ):
                rsp.add_new(elem.tag, elem.VR, self._computed(elem.keyword, rep))
            elif elem.tag in header:
                rsp.add(header[elem.tag])
            else:
                rsp.add(DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else None))
        if "SpecificCharacterSet" in header:
            rsp.SpecificCharacterSet = header.SpecificCharacterSet
        rsp.QueryRetrieveLevel = level
        for lvl in _LEVELS[: _LEVELS.index(level) + 1]:
            keyword = _UNIQUE_KEY[lvl]
            if keyword in identifier or lvl == level:
                setattr(rsp, keyword, header.get(keyword, ""))
        return rsp

    def _level(self, event: evt.Event) -> str | None:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in _LEVELS:
            return None
        if level == "PATIENT" and event.request.AffectedSOPClassUID in _STUDY_ROOT:
            return None
        return level

    # -- handlers ----------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        """Keep the dataset exactly as received (file meta prepended), then index it."""
        try:
            data = event.encoded_dataset(include_meta=True)
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            path = self._file_for(str(header.SOPInstanceUID))
            tmp = path.with_name(path.name + f".{threading.get_ident()}.part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self._add(path, header)
        except Exception:
            LOGGER.exception("C-STORE from %s failed", event.assoc.requestor.ae_title)
            return _STATUS_CANNOT_PROCESS
        return 0x0000

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        level = self._level(event)
        if level is None:
            yield _STATUS_BAD_IDENTIFIER, None
            return
        identifier = event.identifier
        seen: set[str] = set()
        for inst in self._select(identifier, level):
            entity = inst.value(_UNIQUE_KEY[level])
            if entity in seen:
                continue
            seen.add(entity)
            if event.is_cancelled:
                yield _STATUS_CANCEL, None
                return
            yield _STATUS_PENDING, self._response(identifier, level, inst)

    def _retrieve(self, event: evt.Event) -> list[StoredInstance] | None:
        level = self._level(event)
        if level is None:
            return None
        return sorted(
            self._select(event.identifier, level),
            key=lambda i: (i.value("SeriesInstanceUID"), int(i.value("InstanceNumber") or 0)),
        )

    def _sub_operations(self, event: evt.Event, matches: list[StoredInstance]) -> Iterator[tuple[int, Dataset | None]]:
        for inst in matches:
            if event.is_cancelled:
                yield _STATUS_CANCEL, None
                return
            yield _STATUS_PENDING, pydicom.dcmread(inst.path)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = (event.move_destination or "").strip()
        with self._lock:
            node = self._known.get(destination)
        matches = self._retrieve(event)
        if node is None:
            LOGGER.warning("C-MOVE to unknown destination %r", destination)
            yield None, None  # pynetdicom answers 0xA801 (move destination unknown)
            return
        host, port = node
        options = {
            "contexts": _contexts_for(matches or []),
            "evt_handlers": [(evt.EVT_CONN_OPEN, _set_nodelay)],
        }
        yield host, port, options
        if matches is None:  # pynetdicom answers 0xC513 (unable to process)
            raise ValueError("invalid QueryRetrieveLevel for this information model")
        yield len(matches)
        yield from self._sub_operations(event, matches)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        matches = self._retrieve(event)
        if matches is None:  # pynetdicom answers 0xC413 (unable to process)
            raise ValueError("invalid QueryRetrieveLevel for this information model")
        yield len(matches)
        yield from self._sub_operations(event, matches)


def _contexts_for(matches: Iterable[StoredInstance]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE sub-association: exactly what the files need.

    Uncompressed instances may go in any uncompressed syntax (pynetdicom
    converts between them; the pixel bytes stay the same); compressed ones must
    go as they are, so each compressed syntax gets its own context.
    """
    uncompressed = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    wanted: dict[tuple[str, str], list[str]] = {}
    for inst in matches:
        ts = UID(inst.transfer_syntax)
        if ts not in uncompressed:
            wanted[(inst.sop_class_uid, ts)] = [str(ts)]
        else:
            syntaxes = [str(ts), *sorted(str(u) for u in uncompressed - {ts})]
            wanted[(inst.sop_class_uid, "native")] = syntaxes
    if len(wanted) > 128:
        raise ValueError(f"C-MOVE would need {len(wanted)} presentation contexts (max 128)")
    return [build_context(cls, syntaxes) for (cls, _), syntaxes in sorted(wanted.items())]


def _parse_node(text: str) -> tuple[str, tuple[str, int]]:
    ae, sep, address = text.partition("=")
    host, sep2, port = address.rpartition(":")
    if not sep or not sep2 or not ae or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected AE=host:port, got {text!r}")
    return ae, (host, int(port))


def main(argv: list[str] | None = None) -> int:
    """Run the archive until SIGINT/SIGTERM; files already in --storage are indexed first."""
    parser = argparse.ArgumentParser(prog="python -m relay_demo.archive", description=__doc__)
    parser.add_argument("--ae-title", required=True)
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--storage", required=True, type=Path, help="directory for received files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--known-node",
        action="append",
        default=[],
        type=_parse_node,
        metavar="AE=HOST:PORT",
        help="a C-MOVE destination (repeatable)",
    )
    parser.add_argument("--load", nargs="*", default=[], type=Path, help="files to preload")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    archive = DemoArchive(args.ae_title, args.port, args.storage, dict(args.known_node), args.host)
    archive.load(sorted(args.storage.glob("*.dcm")), copy=False)
    archive.load(args.load)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with archive:
        print(
            f"{args.ae_title} listening on {archive.host}:{archive.port} ({len(archive.instances)} instances)",
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
