"""Patient identity on accelerated routes (relay_router.identity.instances): a spooled Part 10 instance.

Router B coerces each accelerated instance for a `[[shared]]` device with `patient_identity` on its way
into the spool. Checked here: the file meta passes unchanged and the data set's identity is rewritten
whatever the record boundaries, every other byte (Pixel Data) copied exactly, Deflated too; an instance
that cannot be coerced is refused permanently, never spooled unrelabelled; and the configuration accepts
the combination on `[[shared]]` and still refuses it on `[[remote]]`, naming the key and why.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from relay_common.config import ConfigError
from relay_demo.datasets import generate_ct_series, write_series
from relay_router.accel import records
from relay_router.config import load
from relay_router.identity.coerce import Domain, RouteIdentity
from relay_router.identity.instances import MAX_FILE_META, InstanceCoercion, file_meta_end
from relay_router.identity.model import PatientRef
from relay_router.identity.resolver import MemorySource, Resolver
from relay_router.identity.stream import HeadError
from relay_router.identity.wiring import IdentityRoute
from tests.unit.accel.test_spill_records import FakeChannel, _sealers, _session
from tests.unit.router.test_reload import write_config

ROUTE = RouteIdentity(Domain("HOSP-B"), "HOSP-A")  # router B: our issuer HOSP-B, the partner's HOSP-A
EXPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def __call__(self, event: str, outcome: str, **fields: object) -> None:
        self.records.append((event, outcome, fields))


def identity_route(audit: Audit, counts: dict[tuple[str, str], int] | None = None) -> IdentityRoute:
    source = MemorySource([(PatientRef("A-200", "HOSP-A"), PatientRef("B-200", "HOSP-B"))])
    return IdentityRoute(ROUTE, Resolver([source], cache_ttl_s=0), audit, counts)


def part10(tmp_path: Path, patient_id: str = "A-200", syntax: str = EXPLICIT) -> tuple[bytes, Dataset]:
    (path,) = write_series(generate_ct_series(1, rows=64, cols=64, patient_id=patient_id, seed=3), tmp_path)
    ds = pydicom.dcmread(path)
    if syntax != EXPLICIT:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    return path.read_bytes(), pydicom.dcmread(path)


async def coerce(data: bytes, syntax: str, audit: Audit, piece: int) -> bytes:
    coercion = InstanceCoercion(identity_route(audit), syntax, sop_instance_uid="1.2.3", association_id="t1")
    out = bytearray()
    for start in range(0, len(data), piece):
        out += await coercion.feed(data[start : start + piece])
    return bytes(out + await coercion.end())


def test_the_file_meta_end_is_found_and_bounded(tmp_path: Path) -> None:
    data, ds = part10(tmp_path)
    end = file_meta_end(data)
    assert end is not None and data[end : end + 4] != b"" and end < 1024
    assert file_meta_end(data[:100]) is None and file_meta_end(data[: end - 1]) is None
    with pytest.raises(HeadError, match="not a DICOM Part 10 file"):
        file_meta_end(b"\0" * 128 + b"NOPE" + data[132:])
    endless = bytearray(b"\0" * 128 + b"DICM")
    while len(endless) <= MAX_FILE_META + 16:  # group 0002 that never ends
        endless += b"\x02\x00\x10\x00LO\x08\x00ABCDEFGH"
    with pytest.raises(HeadError, match="file meta group longer"):
        file_meta_end(endless)


@pytest.mark.parametrize("syntax", [EXPLICIT, DEFLATED])
@pytest.mark.parametrize("piece", [1, 7, 200, 1 << 20])
async def test_an_instance_is_relabelled_whatever_its_pieces_and_nothing_else_changes(
    tmp_path: Path, syntax: str, piece: int
) -> None:
    data, original = part10(tmp_path, syntax=syntax)
    audit = Audit()
    out = await coerce(data, syntax, audit, piece)
    meta_end = file_meta_end(data)
    assert meta_end is not None and out[:meta_end] == data[:meta_end], "the file meta passes unchanged"
    got = pydicom.dcmread(io.BytesIO(out))
    assert (got.PatientID, got.IssuerOfPatientID) == ("B-200", "HOSP-B")
    other = got.OtherPatientIDsSequence[-1]
    assert (other.PatientID, other.IssuerOfPatientID) == ("A-200", "HOSP-A")
    assert got.PixelData == original.PixelData
    for tag in ("PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence"):
        for ds in (got, original):
            if tag in ds:
                del ds[tag]
    assert got == original
    ((event, outcome, fields),) = audit.records
    assert (event, outcome, fields["identity_outcome"], fields["flow"]) == (
        "patient_identity",
        "success",
        "mapped",
        "arriving",
    )
    if syntax == EXPLICIT:  # the pixels are copied byte for byte (a deflated set is deflated again)
        assert original.PixelData in out


async def test_an_unmapped_patient_is_marked_as_the_partners_and_a_foreign_issuer_kept(tmp_path: Path) -> None:
    data, _ = part10(tmp_path, patient_id="A-999")
    audit = Audit()
    got = pydicom.dcmread(io.BytesIO(await coerce(data, EXPLICIT, audit, 4096)))
    assert (got.PatientID, got.IssuerOfPatientID) == ("A-999", "HOSP-A")
    assert audit.records[0][2]["identity_outcome"] == "unmapped"


async def test_an_instance_that_cannot_be_coerced_raises(tmp_path: Path) -> None:
    data, _ = part10(tmp_path)
    with pytest.raises(HeadError, match="ends inside its file meta"):
        await coerce(data[:120], EXPLICIT, Audit(), 50)
    meta_end = file_meta_end(data)
    assert meta_end is not None
    broken = data[:meta_end] + b"\x08\x00\x05\x00CS\xff\xff" + data[meta_end + 8 :]  # a length past the end
    with pytest.raises(HeadError):
        await coerce(broken, EXPLICIT, Audit(), 4096)


async def test_router_b_spools_the_relabelled_instance_and_refuses_one_it_cannot_coerce(tmp_path: Path) -> None:
    _, far = _sealers()
    channel = FakeChannel(far)
    session, spool = _session(tmp_path, channel, None)
    audit = Audit()
    counts: dict[tuple[str, str], int] = {}
    session.identity = identity_route(audit, counts)
    data, ds = part10(tmp_path / "one")
    header = records.InstanceHeader(
        "0005f1a2b3c4d5e6-000000000001", str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, len(data)
    )
    await session._apply(header)
    for start in range(0, len(data), 1000):
        await session._apply(records.Chunk(data[start : start + 1000], start + 1000 >= len(data)))
    while session._commits:
        await asyncio.gather(*session._commits)
    assert channel.answers() == [records.Stored(header.id, header.sop_instance)]
    (entry,) = spool.entries()
    spooled = pydicom.dcmread(spool.path(entry.id))
    assert (spooled.PatientID, spooled.IssuerOfPatientID) == ("B-200", "HOSP-B")
    assert spooled.PixelData == ds.PixelData
    assert counts == {("arriving", "mapped"): 1}

    channel.sent.clear()
    meta_end = file_meta_end(data)
    assert meta_end is not None
    broken = data[:meta_end] + b"\x08\x00\x05\x00CS\xff\xff" + data[meta_end + 8 :]
    bad = records.InstanceHeader(
        "0005f1a2b3c4d5e6-000000000002", str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT, len(broken)
    )
    await session._apply(bad)
    await session._apply(records.Chunk(broken, True))
    (refused,) = channel.answers()
    assert isinstance(refused, records.Refused) and refused.status == 0xC000 and refused.permanent
    assert "patient identity not coerced" in refused.error
    assert len(spool.entries()) == 1, "nothing of the instance that could not be coerced is spooled"
    spool.close()


IDENTITY = """
[identity]
issuer = "HOSP-B"
[[identity.source]]
kind = "table"
[accelerate]
"""
SHARED = """
[[shared]]
ae_title = "ORTHANC_B"
host = "127.0.0.1"
port = 4242
share_with = ["hospital-a"]
accelerate = true
patient_identity = true
patient_issuer = "HOSP-A"
"""
REMOTE = """
[[remote]]
ae_title = "PACS_A"
site = "hospital-c"
accelerate = true
patient_identity = true
patient_issuer = "HOSP-A"
"""


def test_accelerate_with_patient_identity_is_accepted_on_shared_and_refused_on_remote(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "shared.toml", IDENTITY + SHARED))
    assert config.shared[0].accelerate and config.shared[0].patient_identity
    with pytest.raises((ConfigError, ValueError)) as caught:
        load(write_config(tmp_path / "remote.toml", IDENTITY + REMOTE))
    message = str(caught.value)
    assert "accelerate" in message and "PACS_A" in message and "does not stamp" in message
