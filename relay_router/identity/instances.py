"""Patient identity on accelerated routes: coerce a spooled instance (a Part 10 file) while it streams.

On a transparent route the identity filter (relay_router.identity.filter) rewrites C-STORE data sets in
the PDU stream. On an accelerated route there is no such stream at the receiving router: instances
arrive as records of a Part 10 file (file meta, then the data set) and go into the spool, from which
the delivery pool stores them into the device. `InstanceCoercion` sits between the records and the
spool writer at the **receiving** router (relay_router.accel.receive.FarSession), for a `[[shared]]`
device with both `accelerate` and `patient_identity`: the same decision as the transparent filter's
"coming in" row (coerce.incoming_ref / coerce_incoming, the same resolver, the same `patient_identity`
audit event and coercion counts), applied before the spool commit, so the spool holds what the device
will store and what STORED acknowledges.

Why there: mapping into a domain is done by the router of that domain, with its own sources and the
partner's issuer from its own configuration; the sending router, the bridge and the record stream never
decide it. The file meta passes unchanged; the data set goes through the streaming rewriter
(relay_router.identity.stream.DatasetRewriter), which holds only the head up to group 0010 and copies
every other byte, Pixel Data included, exactly.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from relay_router.identity.coerce import Coercion, coerce_incoming, incoming_ref
from relay_router.identity.filter import Flow, lookup_identity, record_coercion
from relay_router.identity.model import PatientRef
from relay_router.identity.stream import DatasetRewriter, HeadError

if TYPE_CHECKING:
    from relay_router.identity.wiring import IdentityRoute

__all__ = ["InstanceCoercion", "MAX_FILE_META", "file_meta_end"]

C_STORE_RQ = 0x0001  # the message the audit names: the instance was sent to us as a C-STORE
PREAMBLE = 128
MAX_FILE_META = 64 * 1024  # bytes of preamble and group 0002 held before the data set begins
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def file_meta_end(buf: bytes | bytearray) -> int | None:
    """Where the data set of a Part 10 file begins (PS3.10 7.1: preamble, "DICM", group 0002 in Explicit VR
    Little Endian); None while `buf` is too short to tell. HeadError if it is not Part 10 or too long."""
    if len(buf) < PREAMBLE + 4:
        return None
    if bytes(buf[PREAMBLE : PREAMBLE + 4]) != b"DICM":
        raise HeadError("the spooled instance is not a DICOM Part 10 file (no DICM prefix)")
    pos = PREAMBLE + 4
    while True:
        if pos > MAX_FILE_META:
            raise HeadError(f"a file meta group longer than {MAX_FILE_META} bytes")
        if len(buf) < pos + 8:
            return None
        group = struct.unpack_from("<H", buf, pos)[0]
        if group != 0x0002:
            return pos
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if len(buf) < pos + 12:
                return None
            pos += 12 + struct.unpack_from("<I", buf, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", buf, pos + 6)[0]


class InstanceCoercion:
    """Rewrite the patient identity of one incoming instance (see the module docstring).

    `feed` each piece of the Part 10 file in order and write what it returns; `end` after the last
    piece and write what it returns too. The decision (a resolver lookup) is awaited once, when the data
    set's head (group 0010) is complete. HeadError: the instance cannot be coerced safely and must be
    refused, never stored unrelabelled.
    """

    def __init__(
        self, identity: IdentityRoute, transfer_syntax: str, *, sop_instance_uid: str, association_id: str = ""
    ) -> None:
        self.identity = identity
        self.sop_instance_uid = sop_instance_uid
        self.association_id = association_id
        self._meta: bytearray | None = bytearray()  # None once the data set began
        self._rewriter = DatasetRewriter(transfer_syntax)
        self.coercion: Coercion | None = None

    async def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        out = b""
        if self._meta is not None:
            self._meta += data
            end = file_meta_end(self._meta)
            if end is None:
                return b""
            out, data, self._meta = bytes(self._meta[:end]), bytes(self._meta[end:]), None
        out += self._rewriter.feed(data)
        if self._rewriter.head_ready:
            out += await self._decide()
        return out

    async def end(self) -> bytes:
        if self._meta is not None:
            raise HeadError("the spooled instance ends inside its file meta")
        self._rewriter.mark_end()
        out = await self._decide() if self._rewriter.head_ready else b""
        return out + self._rewriter.finish()

    async def _decide(self) -> bytes:
        route, resolver = self.identity.route, self.identity.resolver
        identity = self._rewriter.identity or Dataset()
        ref = incoming_ref(identity, route)
        if isinstance(ref, PatientRef):
            found = await lookup_identity(resolver, ref, route.local.issuer, identity, self.association_id)
            coercion = coerce_incoming(identity, route, ref, found)
        else:
            coercion = ref
        self.coercion = coercion
        record_coercion(
            self.identity.audit,
            self.identity.counts if self.identity.counts is not None else {},
            coercion,
            flow=Flow.ARRIVING,
            command_field=C_STORE_RQ,
            sop_instance_uid=self.sop_instance_uid,
            association_id=self.association_id,
        )
        return self._rewriter.apply(coercion.edits)
