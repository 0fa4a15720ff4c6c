"""PIX (ITI-9) messages: the QBP^Q23 we send and how each kind of RSP^K23 is read."""

from __future__ import annotations

import hl7
import pytest

from relay_router.identity import hl7util
from relay_router.identity.config import DomainSection, SourceSection
from relay_router.identity.model import LookupOutcome, PatientRef
from relay_router.identity.pix import build_query, read_answer
from relay_router.identity.resolver import SourceUnavailable

OWN = DomainSection("HOSP_A", universal_id="1.2.3", universal_id_type="ISO")
PARTNER = DomainSection("HOSP_B", universal_id="1.2.9", universal_id_type="ISO")
SETTINGS = SourceSection(
    kind="pix", host="127.0.0.1", port=2575, receiving_application="PIXMGR", receiving_facility="MPI"
)


def answer(
    ack: str = "AA", status: str = "OK", pid: str = "", err: str = "", control: str = "C1", tag: str = "Q1"
) -> str:
    segments = ["MSH|^~\\&|PIXMGR|MPI|DICOM_RELAY||20260101||RSP^K23^RSP_K23|R1|P|2.5", f"MSA|{ack}|{control}"]
    if err:
        segments.append(err)
    segments += [f"QAK|{tag}|{status}", "QPD|IHE PIX Query|Q1|x"]
    if pid:
        segments.append(pid)
    return "\r".join(segments) + "\r"


def read(text: str) -> object:
    return read_answer(text, control_id="C1", tag="Q1", target=PARTNER, source_name="pix")


def test_query_names_the_patient_and_both_domains_with_escaping() -> None:
    ref = PatientRef("A|1^&~", "HOSP_A")
    message = hl7.parse(build_query(SETTINGS, ref, OWN, PARTNER, "C1", "Q1"))
    msh, qpd = message.segment("MSH"), message.segment("QPD")
    assert hl7util.value(msh, 9, 1, 1) == "QBP" and hl7util.value(msh, 9, 1, 2) == "Q23"
    assert hl7util.value(msh, 5) == "PIXMGR" and hl7util.value(msh, 10) == "C1"
    assert hl7util.value(qpd, 1) == "IHE PIX Query" and hl7util.value(qpd, 2) == "Q1"
    assert hl7util.value(qpd, 3, 1, 1) == "A|1^&~"  # escaped on the wire, the same value once parsed
    assert [hl7util.value(qpd, 3, 1, 4, i) for i in (1, 2, 3)] == ["HOSP_A", "1.2.3", "ISO"]
    assert [hl7util.value(qpd, 4, 1, 4, i) for i in (1, 2, 3)] == ["HOSP_B", "1.2.9", "ISO"]
    assert message.segment("RCP")


def test_one_identifier_in_the_target_domain_is_mapped() -> None:
    pid = "PID|||A-1^^^HOSP_A&1.2.3&ISO~B-9^^^HOSP_B&1.2.9&ISO||~^^^^^S"
    result = read(answer(pid=pid))
    assert result.outcome is LookupOutcome.MAPPED  # type: ignore[attr-defined]
    assert result.ref == PatientRef("B-9", "HOSP_B", "1.2.9", "ISO")  # type: ignore[attr-defined]


def test_the_universal_id_decides_when_both_sides_have_one() -> None:
    pid = "PID|||B-9^^^SOMENAME&1.2.9&ISO"  # the manager's own namespace, the right OID
    assert read(answer(pid=pid)).ref.id == "B-9"  # type: ignore[attr-defined]
    wrong = "PID|||B-9^^^HOSP_B&9.9.9&ISO"  # the right name, another OID: not our partner's domain
    assert read(answer(pid=wrong)).outcome is LookupOutcome.UNMAPPED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text",
    [
        answer(status="NF"),
        answer(ack="AE", status="AE", err="ERR||QPD^1^3^1^1|204^Unknown Key Identifier^HL70357|E"),
        answer(pid="PID|||B-9^^^HOSP_B&1.2.9&ISO~B-8^^^HOSP_B&1.2.9&ISO"),  # two: never a guess
        answer(pid="PID|||A-1^^^HOSP_A&1.2.3&ISO"),  # known only in another domain
    ],
    ids=["NF", "unknown-patient", "ambiguous", "other-domain-only"],
)
def test_not_found_answers_are_unmapped(text: str) -> None:
    assert read(text).outcome is LookupOutcome.UNMAPPED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (answer(ack="AE", status="AE", err="ERR||QPD^1^4^1^1|204^Unknown Key Identifier^HL70357|E"), "rejected"),
        (answer(ack="AR"), "rejected"),
        (answer(control="SOMEONE-ELSE"), "invalid-answer"),
        (answer(tag="Q2"), "invalid-answer"),
        (answer(status="XX"), "invalid-answer"),
        ("not hl7 at all", "invalid-answer"),
        (answer(pid="PID|||B\\E\\9^^^HOSP_B&1.2.9&ISO"), "invalid-answer"),  # a backslash: not a Patient ID
    ],
    ids=["unknown-domain", "AR", "control-id", "query-tag", "status", "garbage", "bad-identifier"],
)
def test_unusable_answers_make_the_source_unavailable(text: str, reason: str) -> None:
    with pytest.raises(SourceUnavailable) as caught:
        read(text)
    assert caught.value.reason == reason
