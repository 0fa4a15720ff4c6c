"""Rewrite the patient identity of a data set while it streams (sans-IO).

The identity elements are all in group 0010 (PS3.6), and a data set's elements ascend by
tag (PS3.5 7.1), so they come before Pixel Data (7FE0,0010) and everything else in higher
groups. :class:`DatasetRewriter` holds only the *head* — the top-level elements up to
group 0010 — finds each element's byte range with its own small scanner (no pydicom
round trip, which could change the bytes of elements it re-encodes), replaces or inserts
only the edited identity elements and copies every other byte exactly; the rest of the
data set streams through without being held.

Transfer syntaxes: Implicit VR Little Endian, Explicit VR Little and Big Endian,
encapsulated (compressed pixel data is after the head, so it is copied untouched), and
Deflated Explicit VR Little Endian, which is inflated, rewritten and deflated again
(PS3.5 A.5: the whole data set is one raw deflate stream), inflated in bounded steps so a
deflate bomb cannot make us hold more than a step.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Mapping

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from relay_router.identity.coerce import IDENTITY_TAGS

__all__ = [
    "DEFLATED",
    "DEFAULT_MAX_HEAD",
    "DatasetRewriter",
    "HeadError",
    "rewrite_whole",
    "syntax_encoding",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
DEFAULT_MAX_HEAD = 4 * 1024 * 1024
"""Most bytes held before the end of group 0010; real heads are a few KiB."""
INFLATE_STEP = 1024 * 1024
DEFLATE_LEVEL = 1
"""zlib level when deflating again: benchmarks/identity_filter.py measured level 6 at 24 MB/s per core
and level 1 at 52 MB/s, for 58% instead of 57% of the size on its noisy test pixels."""
_MAX_DEPTH = 16  # nested sequences followed when skipping undefined-length ones
_SPECIFIC_CHARACTER_SET = 0x00080005
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class HeadError(ValueError):
    """The head of a data set cannot be parsed (malformed, too deep, or longer than the bound)."""


def syntax_encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax; explicit LE for all the others."""
    if transfer_syntax == IMPLICIT_LE:
        return True, True, False
    if transfer_syntax == EXPLICIT_BE:
        return False, False, False
    return False, True, transfer_syntax == DEFLATED


class _NeedMore(Exception):
    pass


class _Scanner:
    """Top-level element boundaries of a byte buffer in one encoding."""

    def __init__(self, implicit: bool, little: bool) -> None:
        self.implicit, self.little = implicit, little
        self._u16 = struct.Struct("<H" if little else ">H")
        self._u32 = struct.Struct("<I" if little else ">I")
        self._tag = struct.Struct("<HH" if little else ">HH")

    def tag_at(self, buf: bytes | bytearray, pos: int) -> int:
        if pos + 4 > len(buf):
            raise _NeedMore
        group, element = self._tag.unpack_from(buf, pos)
        return int(group) << 16 | int(element)

    def element_end(self, buf: bytes | bytearray, pos: int, *, implicit: bool, depth: int = 0) -> int:
        """Where the element at ``pos`` ends; _NeedMore when the buffer stops first."""
        if depth > _MAX_DEPTH:
            raise HeadError(f"sequences nested deeper than {_MAX_DEPTH} levels")
        if pos + 8 > len(buf):
            raise _NeedMore
        vr = bytes(buf[pos + 4 : pos + 6])
        if implicit:
            length, header, contents_implicit = int(self._u32.unpack_from(buf, pos + 4)[0]), 8, True
        elif vr in _LONG_VRS:
            if pos + 12 > len(buf):
                raise _NeedMore
            length, header = int(self._u32.unpack_from(buf, pos + 8)[0]), 12
            contents_implicit = vr == b"UN"  # PS3.5 6.2.2: undefined-length UN holds Implicit VR LE
        elif vr.isalpha() and vr.isupper():
            length, header, contents_implicit = int(self._u16.unpack_from(buf, pos + 6)[0]), 8, False
        else:
            raise HeadError(f"no VR at offset {pos} in an Explicit VR data set")
        if length != _UNDEFINED:
            end = pos + header + length
            if end > len(buf):
                raise _NeedMore
            return end
        return self._sequence_end(buf, pos + header, implicit=contents_implicit, depth=depth + 1)

    def _sequence_end(self, buf: bytes | bytearray, pos: int, *, implicit: bool, depth: int) -> int:
        """Skip the items of an undefined-length sequence up to its delimitation item (PS3.5 7.5)."""
        while True:
            tag = self.tag_at(buf, pos)
            if pos + 8 > len(buf):
                raise _NeedMore
            length = int(self._u32.unpack_from(buf, pos + 4)[0])
            if tag == _SEQUENCE_END:
                return pos + 8
            if tag != _ITEM:
                raise HeadError(f"tag {tag:08X} inside a sequence where an item was expected (PS3.5 7.5)")
            if length != _UNDEFINED:
                pos += 8 + length
                if pos > len(buf):
                    raise _NeedMore
                continue
            pos += 8
            while self.tag_at(buf, pos) != _ITEM_END:
                pos = self.element_end(buf, pos, implicit=implicit, depth=depth)
            pos += 8


class _Head:
    """The parsed head: the element ranges up to group 0010 and where the rest begins."""

    def __init__(self, elements: list[tuple[int, int, int]], stop: int) -> None:
        self.elements = elements
        self.stop = stop


def _scan(scanner: _Scanner, buf: bytes | bytearray, complete: bool) -> _Head | None:
    """Element ranges up to group 0010; None when the buffer ends before the head does."""
    elements: list[tuple[int, int, int]] = []
    pos = 0
    try:
        while pos < len(buf):
            tag = scanner.tag_at(buf, pos)
            if tag >> 16 > 0x0010:
                return _Head(elements, pos)
            if tag >> 16 == 0xFFFE:
                raise HeadError(f"item tag {tag:08X} at the top level of a data set (PS3.5 7.5)")
            end = scanner.element_end(buf, pos, implicit=scanner.implicit)
            elements.append((tag, pos, end))
            pos = end
    except _NeedMore:
        if complete:
            raise HeadError(f"the data set ends inside an element at offset {pos}") from None
        return None
    return _Head(elements, pos) if complete else None


def _encode(element: DataElement, implicit: bool, little: bool, encoding: str | list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    one = Dataset()
    one.add(element)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dataset(fp, one, parent_encoding=encoding)
    except Exception as exc:  # e.g. a value the data set's character set cannot hold
        raise HeadError(f"cannot encode {element.tag}: {exc.__class__.__name__}: {exc}"[:300]) from None
    return fp.getvalue()


def _decode(raw: bytes, implicit: bool, little: bool) -> Dataset:
    with warnings.catch_warnings():  # the data set comes from a peer: no warning per odd value
        warnings.simplefilter("ignore")
        ds = read_dataset(io.BytesIO(raw), implicit, little)
        for element in ds:
            _ = element.value  # decode now: a bad value fails here, not later
    return ds


class DatasetRewriter:
    """Rewrite the identity elements of one data set streamed in chunks (see the module docstring).

    ``feed`` the data set's bytes; once :attr:`head_ready`, read :attr:`identity` (the identity
    elements decoded), decide, and :meth:`apply` the edits; after the last chunk call
    :meth:`mark_end` (before deciding: a data set that ends in group 0010 is all head), then
    :meth:`finish`. Each call returns the bytes to send now.
    """

    def __init__(self, transfer_syntax: str, *, max_head: int = DEFAULT_MAX_HEAD) -> None:
        implicit, little, deflated = syntax_encoding(transfer_syntax)
        self._scanner = _Scanner(implicit, little)
        self.max_head = max_head
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._deflater = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS) if deflated else None
        self._deflated = 0  # bytes of deflated output so far
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._ended = False
        self._decided = False
        self.identity: Dataset | None = None
        self.bytes_in = 0

    @property
    def head_ready(self) -> bool:
        return self._head is not None and not self._decided

    @property
    def decided(self) -> bool:
        return self._decided

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        self.bytes_in += len(data)
        if self._inflater is None:
            return self._plain(bytes(data))
        out = [self._plain(self._inflate(bytes(data)))]
        while self._inflater.unconsumed_tail:
            out.append(self._plain(self._inflate(self._inflater.unconsumed_tail)))
        return b"".join(out)

    def _inflate(self, data: bytes) -> bytes:
        assert self._inflater is not None
        try:
            return self._inflater.decompress(data, INFLATE_STEP)
        except zlib.error as exc:
            raise HeadError(f"the deflated data set is not a deflate stream (PS3.5 A.5): {exc}") from None

    def _plain(self, data: bytes) -> bytes:
        if self._decided:
            return self._deflate(data)
        self._buffer += data
        if self._head is None:
            self._find_head(complete=False)
        return b""

    def _find_head(self, *, complete: bool) -> None:
        head = _scan(self._scanner, self._buffer, complete)
        if head is None:
            if len(self._buffer) > self.max_head:
                raise HeadError(f"more than {self.max_head} bytes before the end of group 0010")
            return
        self._head = head
        wanted = [
            (start, end) for tag, start, end in head.elements if tag in IDENTITY_TAGS or tag == _SPECIFIC_CHARACTER_SET
        ]
        raw = b"".join(bytes(self._buffer[start:end]) for start, end in wanted)
        try:
            self.identity = _decode(raw, self._scanner.implicit, self._scanner.little)
        except Exception as exc:  # pydicom raises many types on hostile bytes
            raise HeadError(
                f"the patient identity elements do not decode: {exc.__class__.__name__}: {exc}"[:300]
            ) from None

    def mark_end(self) -> None:
        """The last chunk was fed; a data set that never left group 0010 is all head."""
        if self._inflater is not None:
            try:
                tail = self._inflater.flush()
            except zlib.error as exc:
                raise HeadError(f"the deflated data set is not a deflate stream (PS3.5 A.5): {exc}") from None
            self._plain(tail)
        self._ended = True
        if self._head is None:
            self._find_head(complete=True)

    def apply(self, edits: Mapping[int, DataElement | None]) -> bytes:
        """Write the head with ``edits`` (tag -> element, None deletes) and whatever followed it so far."""
        head = self._head
        if head is None or self._decided:
            raise RuntimeError("apply() needs a head not yet decided")
        self._decided = True
        implicit, little = self._scanner.implicit, self._scanner.little
        encoding: str | list[str] = "iso8859"
        if self.identity is not None and _SPECIFIC_CHARACTER_SET in self.identity:
            encoding = self.identity._character_set
        pending = dict(edits)
        out = bytearray()
        for tag, start, end in head.elements:
            for new_tag in sorted(t for t in pending if t < tag):
                if (element := pending.pop(new_tag)) is not None:
                    out += _encode(element, implicit, little, encoding)
            if tag in pending:
                element = pending.pop(tag)
                if element is not None:
                    out += _encode(element, implicit, little, encoding)
            else:
                out += self._buffer[start:end]
        for new_tag in sorted(pending):
            if (element := pending[new_tag]) is not None:
                out += _encode(element, implicit, little, encoding)
        out += self._buffer[head.stop :]
        self._buffer = bytearray()
        return self._deflate(bytes(out))

    def finish(self) -> bytes:
        """The end of the data set: flush the deflater (deflated syntaxes)."""
        if not self._ended or not self._decided:
            raise RuntimeError("finish() needs mark_end() and apply() first")
        if self._inflater is not None and not self._inflater.eof:
            raise HeadError("the deflated data set ends before its deflate stream does")
        if self._deflater is None:
            return b""
        tail = self._deflater.flush()
        self._deflated += len(tail)
        # A data set has an even length: a deflated one is padded with one 00H (PS3.5 A.5; DCMTK
        # refuses an odd fragment).
        return tail + b"\0" if self._deflated % 2 else tail

    def _deflate(self, data: bytes) -> bytes:
        if self._deflater is None or not data:
            return data
        out = self._deflater.compress(data)
        self._deflated += len(out)
        return out


def rewrite_whole(data: bytes, transfer_syntax: str, edits: Mapping[int, DataElement | None]) -> bytes:
    """Rewrite a data set held whole (a query identifier, a test): the streaming path in one call."""
    rewriter = DatasetRewriter(transfer_syntax)
    out = rewriter.feed(data)
    rewriter.mark_end()
    return out + rewriter.apply(edits) + rewriter.finish()
