"""ADT A40 processing without sockets: the merge applied, the cache invalidated, ACK/NAK per HL7."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from relay_common.audit import AuditLog, read_events
from relay_router.identity import hl7util
from relay_router.identity.adt import AdtProcessor, Outcome, acknowledgement
from relay_router.identity.config import DomainSection
from relay_router.identity.model import PatientRef
from relay_router.identity.resolver import Resolver
from relay_router.identity.xref import XrefSource, XrefTable

OWN = DomainSection("HOSP_A", universal_id="1.2.3", universal_id_type="ISO")
PARTNER = PatientRef("B-9", "HOSP_B")


def a40(
    pid: str = "PID|||NEW^^^HOSP_A&1.2.3&ISO", mrg: str = "MRG|OLD^^^HOSP_A&1.2.3&ISO", kind: str = "ADT^A40"
) -> object:
    text = f"MSH|^~\\&|HIS|HOSP|RELAY|HOSP|20260101||{kind}^ADT_A39|M1|P|2.5\rEVN|A40|20260101\r{pid}\r{mrg}\r"
    return hl7.parse(text)


@pytest.fixture
def table(tmp_path: Path) -> XrefTable:
    table = XrefTable(tmp_path / "identity.sqlite")
    table.add(PatientRef("OLD", "HOSP_A", "1.2.3", "ISO"), PARTNER)
    return table


async def test_a40_moves_the_links_invalidates_and_audits(table: XrefTable, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", app="relay-router")
    resolver = Resolver([XrefSource(table)], cache_ttl_s=3600)
    assert (await resolver.lookup(PARTNER, "HOSP_A")).ref.id == "OLD"  # type: ignore[union-attr]
    outcome = await AdtProcessor(table, OWN, resolver=resolver, audit=audit).handle(a40(), "127.0.0.1:5")
    assert outcome == Outcome("AA")
    assert (await resolver.lookup(PARTNER, "HOSP_A")).ref.id == "NEW"  # type: ignore[union-attr]
    merge = read_events(tmp_path / "audit.jsonl")[0]
    assert (merge["event"], merge["prior_id"], merge["patient_id"], merge["links_moved"]) == (
        "identity_merge",
        "OLD",
        "NEW",
        1,
    )


@pytest.mark.parametrize("event", ["ADT^A34", "ADT^A18"])
async def test_older_merge_events_are_merges_too(table: XrefTable, event: str) -> None:
    assert (await AdtProcessor(table, OWN).handle(a40(kind=event), "feed")).ack == "AA"
    assert table.linked(PARTNER, "HOSP_A") == [PatientRef("NEW", "HOSP_A")]


async def test_identifiers_without_an_authority_are_ours(table: XrefTable) -> None:
    outcome = await AdtProcessor(table, OWN).handle(a40("PID|||NEW", "MRG|OLD"), "feed")
    assert outcome.ack == "AA"
    assert table.linked(PARTNER, "HOSP_A") == [PatientRef("NEW", "HOSP_A")]


@pytest.mark.parametrize(
    ("message", "code", "location"),
    [
        (a40(mrg="MRG|OLD^^^HOSP_X"), "204", "MRG^1^1"),  # the prior ID is not in our domain
        (a40(pid="PID|||NEW^^^HOSP_X"), "204", "PID^1^3"),
        (a40(mrg="EVN|A40"), "101", "MRG^1^1"),  # no MRG
        (a40(pid="PID|||NEW\\E\\X"), "102", "PID^1^3"),  # a backslash in the identifier
    ],
    ids=["prior-elsewhere", "survivor-elsewhere", "no-mrg", "bad-identifier"],
)
async def test_a40_it_cannot_apply_is_an_application_error(
    table: XrefTable, message: object, code: str, location: str
) -> None:
    outcome = await AdtProcessor(table, OWN).handle(message, "feed")
    assert (outcome.ack, outcome.code, outcome.location) == ("AE", code, location)
    assert table.linked(PARTNER, "HOSP_A") == [PatientRef("OLD", "HOSP_A")]  # nothing changed


async def test_other_adt_events_are_accepted_and_other_messages_rejected(table: XrefTable) -> None:
    processor = AdtProcessor(table, OWN)
    assert (await processor.handle(a40(kind="ADT^A08"), "feed")).ack == "AA"
    rejected = await processor.handle(a40(kind="ORU^R01"), "feed")
    assert (rejected.ack, rejected.code) == ("AR", "200")


def test_acknowledgement_quotes_the_message_and_carries_err() -> None:
    ack = hl7.parse(acknowledgement(a40(), Outcome("AE", "MRG^1^1", "204", "no identifier of domain HOSP_A")))
    msa, err = ack.segment("MSA"), ack.segment("ERR")
    assert (hl7util.value(msa, 1), hl7util.value(msa, 2)) == ("AE", "M1")
    assert hl7util.value(ack.segment("MSH"), 9, 1, 1) == "ACK"
    assert (hl7util.value(err, 2, 1, 1), hl7util.value(err, 2, 1, 3), hl7util.value(err, 3, 1, 1)) == (
        "MRG",
        "1",
        "204",
    )
    bare = hl7.parse(acknowledgement(None, Outcome("AR", "MSH", "100", "not an HL7 v2 message")))
    assert hl7util.value(bare.segment("MSA"), 1) == "AR"
