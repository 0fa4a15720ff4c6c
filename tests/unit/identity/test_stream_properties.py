"""Hypothesis: coercion rewrites only the identity elements, in every transfer syntax the relay carries.

Each generated data set is built as three separately encoded parts: the elements before
group 0010, group 0010, and the rest (a nested undefined-length sequence, native or
encapsulated Pixel Data). The rewritten data set must be the first part, then a group 0010
holding exactly the expected identity values and every other group 0010 element unchanged,
then the third part byte for byte, whatever chunks the stream arrives in.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from relay_router.identity.coerce import (
    IDENTITY_TAGS,
    OTHER_IDS,
    Domain,
    Outcome,
    RouteIdentity,
    coerce_incoming,
    coerce_request,
    incoming_ref,
    request_ref,
    stamp_outgoing,
)
from relay_router.identity.model import Demographics, Lookup, LookupOutcome, PatientRef
from relay_router.identity.stream import DEFLATED, DatasetRewriter, syntax_encoding

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED, "1.2.840.10008.1.2.4.50"]
ROUTE = RouteIdentity(Domain("HOSP-A", "1.2.3.4", "ISO"), "HOSP-B", take_demographics=True)
TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789^ ", min_size=1, max_size=20).map(str.strip).filter(bool)


def encode(ds: Dataset, syntax: str) -> bytes:
    implicit, little, _ = syntax_encoding(syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    return fp.getvalue()


@st.composite
def parts(draw: st.DrawFn, syntax: str) -> tuple[Dataset, Dataset, Dataset]:
    pre = Dataset()
    pre.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    pre.SOPInstanceUID = "1.2.3." + str(draw(st.integers(1, 10**9)))
    if draw(st.booleans()):
        pre.SpecificCharacterSet = "ISO_IR 100"
    pre.StudyDescription = draw(TEXT)
    if draw(st.booleans()):
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        ref.ReferencedSOPInstanceUID = "1.2.9." + str(draw(st.integers(1, 999)))
        pre.ReferencedStudySequence = Sequence([ref])  # (0008,1110), ahead of group 0010
    mid = Dataset()
    mid.PatientName = draw(TEXT)
    mid.PatientID = draw(TEXT)
    issuer = draw(st.sampled_from(["", "", "HOSP-B", "HOSP-B", "HOSP-A", "ELSEWHERE"]))
    if issuer:
        mid.IssuerOfPatientID = issuer
    if draw(st.booleans()):
        mid.PatientBirthDate = "19700101"
    if draw(st.booleans()):
        mid.PatientAge = "055Y"  # (0010,1010): not an identity element, must survive unchanged
    if draw(st.booleans()):
        other = Dataset()
        other.PatientID = draw(TEXT)
        other.IssuerOfPatientID = "OLD"
        mid.OtherPatientIDsSequence = Sequence([other])
    post = Dataset()
    post.StudyInstanceUID = "1.2.4." + str(draw(st.integers(1, 10**6)))
    post.InstanceNumber = draw(st.integers(1, 999))
    item = Dataset()
    item.CodeValue = draw(TEXT)[:16]
    item.CodingSchemeDesignator = "DCM"
    post.RequestAttributesSequence = Sequence([item])  # (0040,0275): a nested sequence after the head
    pixels = draw(st.binary(min_size=2, max_size=4000))
    if len(pixels) % 2:
        pixels += b"\0"
    post.Rows, post.Columns = 1, len(pixels) // 2
    post.BitsAllocated = 16
    if syntax == "1.2.840.10008.1.2.4.50":
        post.PixelData = encapsulate([pixels])
        post["PixelData"].VR = "OB"
        post["PixelData"].is_undefined_length = True
    else:
        post.PixelData = pixels
        post["PixelData"].VR = "OW"
    return pre, mid, post


def lookups() -> st.SearchStrategy[Lookup]:
    mapped = st.builds(
        lambda i, name: Lookup(
            LookupOutcome.MAPPED, PatientRef(i, "HOSP-A"), "table", Demographics(name=name, birth_date="19800202")
        ),
        TEXT,
        st.one_of(st.none(), TEXT),
    )
    return st.one_of(
        mapped,
        st.just(Lookup(LookupOutcome.UNMAPPED, None, "table")),
        st.just(Lookup(LookupOutcome.UNAVAILABLE, None, "")),
    )


def stream_through(data: bytes, syntax: str, decide, cuts: list[int]) -> bytes:  # type: ignore[no-untyped-def]
    rewriter = DatasetRewriter(syntax)
    out = bytearray()
    points = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    start = 0
    for point in points:
        out += rewriter.feed(data[start:point])
        start = point
        if rewriter.head_ready:
            out += rewriter.apply(decide(rewriter.identity))
    rewriter.mark_end()
    if rewriter.head_ready:
        out += rewriter.apply(decide(rewriter.identity))
    return bytes(out + rewriter.finish())


@given(data=st.data(), syntax=st.sampled_from(SYNTAXES), cuts=st.lists(st.integers(0, 10**6), max_size=6))
@PROPERTY
def test_only_identity_elements_change(data: st.DataObject, syntax: str, cuts: list[int]) -> None:
    pre, mid, post = data.draw(parts(syntax))
    lookup = data.draw(lookups())
    mode = data.draw(st.sampled_from(["incoming", "incoming", "stamp", "request"]))
    plain = [encode(part, syntax) for part in (pre, mid, post)]
    sent = b"".join(plain)
    if syntax == DEFLATED:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        sent = deflater.compress(sent) + deflater.flush()

    decisions = []

    def decide(identity: Dataset):  # type: ignore[no-untyped-def]
        if mode == "incoming":
            ref = incoming_ref(identity, ROUTE)
            coercion = ref if not isinstance(ref, PatientRef) else coerce_incoming(identity, ROUTE, ref, lookup)
        elif mode == "request":  # the same data set as a query identifier leaving for the partner
            ref = request_ref(identity, ROUTE)
            partner = replace(lookup, ref=PatientRef(lookup.ref.id, "HOSP-B")) if lookup.ref else lookup
            coercion = ref if not isinstance(ref, PatientRef) else coerce_request(identity, ROUTE, ref, partner)
        else:
            coercion = stamp_outgoing(identity, ROUTE)
        decisions.append(coercion)
        return coercion.edits

    out = stream_through(sent, syntax, decide, cuts)
    if syntax == DEFLATED:
        out = zlib.decompress(out, -zlib.MAX_WBITS)
    assert len(decisions) == 1
    # Everything outside group 0010 is byte-identical: the prefix, and the rest with Pixel Data.
    assert out.startswith(plain[0])
    assert out.endswith(plain[2])
    implicit, little, _ = syntax_encoding(syntax)
    head = out[len(plain[0]) : len(out) - len(plain[2])]
    fp = DicomBytesIO(head)
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    got = read_dataset(fp, implicit, little)
    coercion = decisions[0]
    for element in mid:  # unchanged elements of group 0010, byte for byte
        if element.tag not in coercion.edits:
            assert encode(_one(element), syntax) in head
            assert got[element.tag].value == element.value
    for tag, element in coercion.edits.items():
        if element is None:
            assert tag not in got
        else:
            assert got[tag].value == element.value
    assert set(coercion.edits) <= IDENTITY_TAGS
    # What the user cares about: whose ID it is now.
    if mode == "request":
        if coercion.outcome is Outcome.MAPPED:
            assert lookup.ref is not None and got.PatientID == lookup.ref.id  # the partner's ID goes out
            assert got.get("IssuerOfPatientID", "") == "" and OTHER_IDS not in coercion.edits
        else:
            assert got.PatientID == mid.PatientID and not coercion.edits  # refused queries are never sent
        return
    if coercion.outcome is Outcome.MAPPED:
        assert lookup.ref is not None
        assert got.PatientID == lookup.ref.id and got.IssuerOfPatientID == "HOSP-A"
        assert got.OtherPatientIDsSequence[-1].PatientID == mid.PatientID
        assert got.OtherPatientIDsSequence[-1].IssuerOfPatientID == "HOSP-B"
    else:
        assert got.PatientID == mid.PatientID  # never a guessed local ID
    if mid.get("IssuerOfPatientID"):
        assert got.IssuerOfPatientID in (mid.IssuerOfPatientID, "HOSP-A")  # a present issuer is never another's
        if coercion.outcome is not Outcome.MAPPED:
            assert got.IssuerOfPatientID == mid.IssuerOfPatientID


def _one(element) -> Dataset:  # type: ignore[no-untyped-def]
    ds = Dataset()
    ds.add(element)
    return ds
