"""Whatever a PIX manager or an ADT sender sends, the answer is a typed outcome, never an exception."""

from __future__ import annotations

from pathlib import Path

import hl7
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_router.identity.adt import AdtListener, AdtProcessor, Outcome, acknowledgement
from relay_router.identity.config import DomainSection
from relay_router.identity.model import Lookup
from relay_router.identity.pix import read_answer
from relay_router.identity.pixm import read_parameters
from relay_router.identity.resolver import SourceUnavailable
from relay_router.identity.xref import XrefTable

PARTNER = DomainSection("HOSP_B", universal_id="1.2.9", fhir_system="urn:oid:1.2.9")
OWN = DomainSection("HOSP_A", universal_id="1.2.3")

# HL7-looking text: segments of delimiters, digits and a few segment names, so the parser goes deep.
PIECES = "MSH|^~\\&| MSA| QAK| PID||| MRG| ERR|| ADT^A40 RSP^K23 AA AE OK NF C1 Q1 ^ & ~ | \\ \r HOSP_B 1.2.9 ISO x"
pieces = st.sampled_from(PIECES.split(" "))
hl7ish = st.lists(pieces, max_size=40).map("".join) | st.text(max_size=200)


@given(hl7ish)
@settings(max_examples=150, deadline=None)
def test_pix_answers_are_a_lookup_or_source_unavailable(text: str) -> None:
    try:
        result = read_answer(text, control_id="C1", tag="Q1", target=PARTNER, source_name="pix")
    except SourceUnavailable:
        return
    assert isinstance(result, Lookup)


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@settings(max_examples=100, deadline=None)
def test_pixm_bodies_are_a_lookup_or_source_unavailable(body: bytes) -> None:
    try:
        result = read_parameters(body, target=PARTNER, target_system="urn:oid:1.2.9", source_name="pixm")
    except SourceUnavailable:
        return
    assert isinstance(result, Lookup)


@given(hl7ish)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_adt_messages_always_get_an_acknowledgement(tmp_path: Path, text: str) -> None:
    table = XrefTable(tmp_path / "identity.sqlite")
    try:
        message, outcome = AdtListener._parse(text.encode("utf-8", "replace"))
        if outcome is None:
            outcome = await AdtProcessor(table, OWN).handle(message, "feed")
        assert isinstance(outcome, Outcome) and outcome.ack in ("AA", "AE", "AR")
        ack = hl7.parse(acknowledgement(message, outcome))
        assert str(ack.segment("MSA")(1)) == outcome.ack
    finally:
        table.close()
