"""Hypothesis: the filter gives the device exactly the rewritten messages, however the stream is cut.

A few messages (echoes, stores with Pixel Data of random size, on an Implicit or Explicit
VR context) arrive in PDUs of a random maximum length, split at random points. What the
device receives must be: every message, in order, each store's data set equal to the same
data set rewritten whole (relay_router.identity.stream.rewrite_whole), every PDU within the
device's maximum length, and the untouched messages byte for byte.
"""

from __future__ import annotations

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from relay_router.dimse import DimseSender, c_echo_rq, c_store_rq
from relay_router.identity.coerce import coerce_incoming, incoming_ref
from relay_router.identity.filter import Flow
from relay_router.identity.model import Lookup, LookupOutcome, PatientRef
from relay_router.identity.stream import DatasetRewriter, rewrite_whole
from tests.unit.identity.test_filter import CONTEXTS, CT, DEFLATED, ROUTE, encoded, make_filter, messages, run

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def store_dataset(patient_id: str, pixels: bytes, syntax: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3." + str(len(pixels))
    ds.PatientID = patient_id
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"
    return encoded(ds, syntax)


def inflated(data: bytes | None, syntax: str) -> bytes | None:
    """Deflated data sets compared inflated: zlib may cut its output differently for differently cut input."""
    if data is None or syntax != DEFLATED:
        return data
    assert len(data) % 2 == 0  # PS3.5 A.5: padded to an even length
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def expected_rewrite(data: bytes, syntax: str, mapped: bool) -> bytes:
    """The same data set rewritten in one piece, with the decision the filter's resolver gives."""
    probe = DatasetRewriter(syntax)
    probe.feed(data)
    probe.mark_end()
    identity = probe.identity or Dataset()
    ref = incoming_ref(identity, ROUTE)
    assert isinstance(ref, PatientRef)
    lookup = (
        Lookup(LookupOutcome.MAPPED, PatientRef("A-123", "HOSP-A"), "memory")
        if mapped
        else Lookup(LookupOutcome.UNMAPPED, None, "memory")
    )
    return rewrite_whole(data, syntax, coerce_incoming(identity, ROUTE, ref, lookup).edits)


@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["echo", "store"]), st.sampled_from([3, 5, 7]), st.booleans(), st.integers(0, 40000)),
        min_size=1,
        max_size=4,
    ),
    in_pdu=st.integers(32, 20000).map(lambda n: 2 * n),  # even fragments in, as DCMTK sends them
    out_pdu=st.sampled_from([0, 127, 4097, 16384]),
    step=st.integers(1, 50000),
)
@PROPERTY
def test_the_device_gets_every_message_rewritten_whatever_the_cuts(
    plan: list[tuple[str, int, bool, int]], in_pdu: int, out_pdu: int, step: int
) -> None:
    sender = DimseSender(in_pdu)
    stream = bytearray()
    wanted: list[tuple[int, bytes | None]] = []
    syntaxes: list[str] = []
    echoes: list[bytes] = []
    for n, (kind, context, mapped, size) in enumerate(plan, start=1):
        if kind == "echo":
            echoes.append(b"".join(sender.message(1, c_echo_rq(n))))
            stream += echoes[-1]
            wanted.append((0x0030, None))
            syntaxes.append("")
            continue
        syntax = CONTEXTS[context][1]
        data = store_dataset("B-777" if mapped else "B-1", bytes(i % 251 for i in range(size)), syntax)
        # A store on the FIND context would be refused by a real acceptor; here only the bytes matter.
        stream += b"".join(sender.message(context, c_store_rq(n, CT, "1.2.3." + str(size)), data))
        wanted.append((0x0001, inflated(expected_rewrite(data, syntax, mapped), syntax)))
        syntaxes.append(syntax)
    filt, _ = make_filter(max_pdu=out_pdu)
    sent = run(filt, Flow.ARRIVING, bytes(stream), step=step)
    assert sent[Flow.LEAVING] == []
    if out_pdu:
        assert all(len(pdu) - 6 <= out_pdu for pdu in sent[Flow.ARRIVING])
    assert all(len(pdu) % 2 == 0 for pdu in sent[Flow.ARRIVING])  # even fragments (DCMTK refuses odd ones)
    got = [(int(command.CommandField), data) for command, data in messages(sent[Flow.ARRIVING], max_pdu=0)]
    assert [(field, inflated(data, syntax)) for (field, data), syntax in zip(got, syntaxes, strict=True)] == wanted
    relayed = b"".join(sent[Flow.ARRIVING])
    assert all(echo in relayed for echo in echoes)  # untouched messages: their PDUs as they were
