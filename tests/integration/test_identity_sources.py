"""Patient identity mapping sources against real servers on loopback (issue 14).

A PIX manager (MLLP, python-hl7) and a PIXm endpoint (aiohttp + fhir.resources) run as their own
processes; the router side is IdentityRuntime built from [identity] settings, as the router builds
it. Proves: mapping both ways, "patient not found", a manager that is down (the next source
answers, the skip is audited), a slow manager (timeout, then the next source), no source at all
(UNAVAILABLE, audited), ADT A40 merges over MLLP (ACK, table, cache), and the `relay-router pix`
command seen by a running resolver.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from relay_common.audit import AuditLog, read_events
from relay_common.pki import IssuedFiles, make_dev_pki
from relay_router.identity import hl7util
from relay_router.identity.config import DomainSection, IdentitySection, SourceSection
from relay_router.identity.model import Demographics, LookupOutcome, PatientRef
from relay_router.identity.sources import IdentityRuntime
from relay_router.identity.xref import XrefTable
from tests.support.identity_servers import IdentityServerProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

A, B = "HOSP_A", "HOSP_B"
OIDS = {A: "1.2.3", B: "1.2.9"}
PERSONS = {
    "persons": [
        [["A-100", A], ["B-900", B]],  # Alice, known at both sites
        [["A-200", A]],  # Bob: known to the manager, no identifier at B
        [["SLOW-1", A], ["B-901", B]],  # answered after 5 s
        [["12345", A], ["B-555", B]],  # the ID "12345" at A...
        [["12345", B], ["A-777", A]],  # ...and at B are two different people
    ],
    "domains": OIDS,
    "slow": {"SLOW-1": 5.0},
    "patients": {  # our MPI's records (PIXm Patient read, for take_demographics)
        "A-100": {
            "name": [{"use": "official", "family": "Doe", "given": ["Alice", "M"]}],
            "birthDate": "1970-01-02",
            "gender": "female",
        },
    },
}
DOMAINS = [DomainSection(issuer, universal_id=oid, universal_id_type="ISO") for issuer, oid in OIDS.items()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> IssuedFiles:
    return make_dev_pki(tmp_path_factory.mktemp("identity-pki"), hostnames=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, pki: IssuedFiles) -> Iterator[dict[str, int]]:
    """The PIX manager and the PIXm endpoint, in plain text and over TLS (the MPI's certificate from a test CA)."""
    workdir = tmp_path_factory.mktemp("identity-servers")
    tls = (pki.server_cert, pki.server_key)
    started: list[IdentityServerProcess] = []
    try:
        for kind, options in (("pix", {}), ("pixm", {}), ("pix", {"tls": tls}), ("pixm", {"tls": tls})):
            started.append(IdentityServerProcess(kind, PERSONS, workdir, **options))  # type: ignore[arg-type]
        yield {"pix": started[0].port, "pixm": started[1].port, "pix-tls": started[2].port, "pixm-tls": started[3].port}
    finally:
        for server in started:
            server.stop()


def pix(port: int, timeout_s: float = 3.0) -> SourceSection:
    return SourceSection(
        kind="pix", host="127.0.0.1", port=port, timeout_s=timeout_s, receiving_application="PIXMGR",
        receiving_facility="MPI",
    )  # fmt: skip


def pixm(port: int, timeout_s: float = 3.0) -> SourceSection:
    return SourceSection(kind="pixm", url=f"http://127.0.0.1:{port}/fhir", timeout_s=timeout_s)


def section(*sources: SourceSection, **extra: Any) -> IdentitySection:
    return IdentitySection(
        issuer=A, universal_id=OIDS[A], universal_id_type="ISO", source=list(sources), domain=DOMAINS, **extra
    )


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[Any]:
    runtimes: list[IdentityRuntime] = []
    audit = AuditLog(tmp_path / "audit.jsonl", app="relay-router")

    async def make(identity: IdentitySection) -> IdentityRuntime:
        runtime = IdentityRuntime(identity, state_dir=tmp_path / "state", audit=audit)
        await runtime.start()
        runtimes.append(runtime)
        return runtime

    make.audit_events = lambda: read_events(tmp_path / "audit.jsonl")  # type: ignore[attr-defined]
    yield make
    for runtime in runtimes:
        await runtime.stop()


def ref(patient_id: str, issuer: str) -> PatientRef:
    return PatientRef(patient_id, issuer)


@pytest.mark.parametrize("kind", ["pix", "pixm"])
async def test_manager_maps_both_ways_and_keeps_colliding_ids_apart(
    servers: dict[str, int], make_runtime: Any, kind: str
) -> None:
    source = pix(servers["pix"]) if kind == "pix" else pixm(servers["pixm"])
    resolver = (await make_runtime(section(source))).resolver
    there = await resolver.lookup(ref("A-100", A), B)
    assert (there.outcome, there.ref.id if there.ref else None, there.source) == (LookupOutcome.MAPPED, "B-900", kind)
    assert there.ref is not None and there.ref.issuer == B
    back = await resolver.lookup(ref("B-900", B), A)
    assert back.ref is not None and (back.ref.id, back.ref.issuer) == ("A-100", A)
    # "12345" is one person at A and another at B: each maps to its own partner record.
    assert (await resolver.lookup(ref("12345", A), B)).ref.id == "B-555"  # type: ignore[union-attr]
    assert (await resolver.lookup(ref("12345", B), A)).ref.id == "A-777"  # type: ignore[union-attr]
    events = [e for e in make_runtime.audit_events() if e["event"] == "identity_lookup"]
    assert [(e["patient_id"], e["mapped_id"], e["source"]) for e in events[:2]] == [
        ("A-100", "B-900", kind),
        ("B-900", "A-100", kind),
    ]


@pytest.mark.parametrize("kind", ["pix", "pixm"])
async def test_patient_not_found_is_unmapped(servers: dict[str, int], make_runtime: Any, kind: str) -> None:
    source = pix(servers["pix"]) if kind == "pix" else pixm(servers["pixm"])
    resolver = (await make_runtime(section(source))).resolver
    unknown = await resolver.lookup(ref("A-999", A), B)  # the manager does not know this identifier
    no_partner_id = await resolver.lookup(ref("A-200", A), B)  # known, but has no identifier at B
    assert (unknown.outcome, unknown.ref, unknown.source) == (LookupOutcome.UNMAPPED, None, kind)
    assert (no_partner_id.outcome, no_partner_id.ref) == (LookupOutcome.UNMAPPED, None)
    assert not [e for e in make_runtime.audit_events() if e["event"] == "identity_source_unavailable"]


async def test_pixm_takes_our_demographics_when_configured(servers: dict[str, int], make_runtime: Any) -> None:
    resolver = (await make_runtime(section(pixm(servers["pixm"]), take_demographics=True))).resolver
    back = await resolver.lookup(ref("B-900", B), A)  # data coming back from B: A's record decides the name
    assert back.ref is not None and back.ref.id == "A-100"
    assert back.demographics == Demographics(name="Doe^Alice^M", birth_date="19700102", sex="F")
    there = await resolver.lookup(ref("A-100", A), B)  # never B's record: demographics come only from ours
    assert there.ref is not None and there.demographics is None


async def test_managers_over_tls_are_verified(servers: dict[str, int], make_runtime: Any, pki: IssuedFiles) -> None:
    ca = pki.ca_cert
    pix_tls = replace(pix(servers["pix-tls"]), name="pix-tls", ca_file=ca)
    pixm_tls = SourceSection(
        kind="pixm", name="pixm-tls", url=f"https://127.0.0.1:{servers['pixm-tls']}/fhir", ca_file=ca
    )
    for source in (pix_tls, pixm_tls):
        result = await (await make_runtime(section(source))).resolver.lookup(ref("A-100", A), B)
        assert (result.outcome, result.source) == (LookupOutcome.MAPPED, source.name)
    # A certificate from another CA is refused: the source is skipped, and that is audited.
    other_ca = make_dev_pki(ca.parent / "other", hostnames=["localhost"], ips=["127.0.0.1"]).ca_cert
    wrong = (replace(pix_tls, ca_file=other_ca), replace(pixm_tls, ca_file=other_ca))
    result = await (await make_runtime(section(*wrong))).resolver.lookup(ref("A-100", A), B)
    assert result.outcome is LookupOutcome.UNAVAILABLE
    skipped = [e for e in make_runtime.audit_events() if e["event"] == "identity_source_unavailable"]
    expected = [("pix-tls", "connection-failed"), ("pixm-tls", "connection-failed")]
    assert [(e["source"], e["reason"]) for e in skipped] == expected
    assert all("CERTIFICATE_VERIFY_FAILED" in e["detail"] for e in skipped), skipped


async def test_manager_down_falls_back_to_the_next_source_and_is_audited(
    servers: dict[str, int], make_runtime: Any
) -> None:
    down = free_port()  # nothing listens there: connection refused
    resolver = (await make_runtime(section(pix(down), pixm(servers["pixm"])))).resolver
    result = await resolver.lookup(ref("A-100", A), B)
    assert (result.outcome, result.source) == (LookupOutcome.MAPPED, "pixm")
    skipped = [e for e in make_runtime.audit_events() if e["event"] == "identity_source_unavailable"]
    assert [(e["source"], e["reason"], e["outcome"]) for e in skipped] == [("pix", "connection-failed", "failure")]
    assert str(down) in skipped[0]["detail"]


async def test_slow_manager_times_out_and_the_table_answers(
    servers: dict[str, int], make_runtime: Any, tmp_path: Path
) -> None:
    XrefTable(tmp_path / "state" / "identity.sqlite").add(ref("SLOW-1", A), ref("B-901", B))
    runtime = await make_runtime(section(pixm(servers["pixm"], timeout_s=0.5), SourceSection(kind="table")))
    started = time.monotonic()
    result = await runtime.resolver.lookup(ref("SLOW-1", A), B)
    assert time.monotonic() - started < 3  # the manager answers after 5 s
    assert (result.outcome, result.ref, result.source) == (LookupOutcome.MAPPED, ref("B-901", B), "table")
    skipped = [e for e in make_runtime.audit_events() if e["event"] == "identity_source_unavailable"]
    assert [(e["source"], e["reason"]) for e in skipped] == [("pixm", "timeout")]


async def test_no_source_answers_is_unavailable_and_audited(servers: dict[str, int], make_runtime: Any) -> None:
    resolver = (await make_runtime(section(pix(servers["pix"], timeout_s=0.3), pixm(free_port())))).resolver
    result = await resolver.lookup(ref("SLOW-1", A), B)
    assert (result.outcome, result.ref) == (LookupOutcome.UNAVAILABLE, None)
    events = make_runtime.audit_events()
    assert [(e["event"], e.get("reason")) for e in events] == [
        ("identity_source_unavailable", "timeout"),
        ("identity_source_unavailable", "connection-failed"),
        ("identity_lookup", None),
    ]
    assert (events[-1]["outcome"], events[-1]["result"]) == ("failure", "unavailable")


async def send(port: int, text: str, tls: ssl.SSLContext | None = None) -> Any:
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8", ssl=tls)
    try:
        writer.writeblock(text.encode())
        await writer.drain()
        return hl7.parse((await asyncio.wait_for(reader.readblock(), 10)).decode())
    finally:
        writer.close()


def a40(survivor: str, prior: str, control: str = "M1") -> str:
    return (
        f"MSH|^~\\&|HIS|HOSP_A|RELAY|HOSP_A|20260101||ADT^A40^ADT_A39|{control}|P|2.5\r"
        f"EVN|A40|20260101\rPID|||{survivor}^^^HOSP_A&1.2.3&ISO||DOE^JOHN\rMRG|{prior}^^^HOSP_A&1.2.3&ISO\r"
    )


async def test_adt_a40_over_mllp_moves_links_and_invalidates_cached_lookups(make_runtime: Any) -> None:
    runtime = await make_runtime(section(SourceSection(kind="table"), adt_listen="127.0.0.1:0"))
    assert runtime.table is not None and runtime.adt is not None
    runtime.table.add(PatientRef("OLD-1", A, "1.2.3", "ISO"), ref("B-9", B))
    assert (await runtime.resolver.lookup(ref("B-9", B), A)).ref.id == "OLD-1"  # cached now

    ack = await send(runtime.adt.port, a40("NEW-1", "OLD-1"))
    assert (hl7util.value(ack.segment("MSA"), 1), hl7util.value(ack.segment("MSA"), 2)) == ("AA", "M1")
    after = await runtime.resolver.lookup(ref("B-9", B), A)
    assert after.ref is not None and after.ref.id == "NEW-1" and after.source == "table"
    assert (await runtime.resolver.lookup(ref("OLD-1", A), B)).outcome is LookupOutcome.UNMAPPED

    # A merge it cannot apply gets AE with ERR, and the listener keeps serving.
    nak = await send(runtime.adt.port, a40("NEW-2", "OLD-2^^^HOSP_X", control="M2").replace("&1.2.3&ISO\r", "\r"))
    assert hl7util.value(nak.segment("MSA"), 1) == "AE" and hl7util.value(nak.segment("ERR"), 3, 1, 1) == "204"
    garbage = await send(runtime.adt.port, "this is not HL7")
    assert hl7util.value(garbage.segment("MSA"), 1) == "AR"
    assert hl7util.value((await send(runtime.adt.port, a40("NEW-1", "GONE", "M3"))).segment("MSA"), 1) == "AA"
    merges = [(e["outcome"], e.get("prior_id")) for e in make_runtime.audit_events() if e["event"] == "identity_merge"]
    assert merges == [("success", "OLD-1"), ("failure", None), ("success", "GONE")]


async def test_adt_feed_over_tls(make_runtime: Any, pki: IssuedFiles) -> None:
    identity = section(
        SourceSection(kind="table"),
        adt_listen="127.0.0.1:0",
        adt_cert_file=pki.server_cert,
        adt_key_file=pki.server_key,
    )
    runtime = await make_runtime(identity)
    runtime.table.add(PatientRef("OLD-7", A, "1.2.3", "ISO"), ref("B-7", B))
    ack = await send(runtime.adt.port, a40("NEW-7", "OLD-7"), tls=ssl.create_default_context(cafile=str(pki.ca_cert)))
    assert hl7util.value(ack.segment("MSA"), 1) == "AA"
    assert runtime.table.linked(ref("B-7", B), A) == [ref("NEW-7", A)]


async def test_adt_feed_refuses_senders_outside_adt_allow(make_runtime: Any) -> None:
    runtime = await make_runtime(
        section(SourceSection(kind="table"), adt_listen="127.0.0.1:0", adt_allow=["192.0.2.0/24"])
    )
    reader, writer = await open_hl7_connection("127.0.0.1", runtime.adt.port)
    writer.writeblock(a40("NEW-1", "OLD-1").encode())
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(reader.readblock(), 10)
    writer.close()
    refused = [e for e in make_runtime.audit_events() if e["event"] == "identity_feed_refused"]
    assert refused and refused[0]["source"] == "127.0.0.1"


async def test_pix_command_changes_are_seen_by_the_running_resolver(make_runtime: Any, tmp_path: Path) -> None:
    runtime = await make_runtime(section(SourceSection(kind="table"), cache_ttl_s=3600))
    assert (await runtime.resolver.lookup(ref("A-100", A), B)).outcome is LookupOutcome.UNMAPPED  # cached
    config = tmp_path / "router.toml"
    config.write_text(
        '[router]\nname = "site-a"\nstate_dir = "state"\n[bridge]\naddress = "127.0.0.1:1"\ninsecure = true\n'
        f'[audit]\nfile = "{tmp_path / "admin-audit.jsonl"}"\n[identity]\nissuer = "HOSP_A"\n'
    )
    csv = tmp_path / "links.csv"
    csv.write_text("local_id,other_id,other_issuer\nA-100,B-900,HOSP_B\n")
    command = [sys.executable, "-m", "relay_router.cli", "--config", str(config), "pix", "import", str(csv)]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 new links" in done.stdout
    result = await runtime.resolver.lookup(ref("A-100", A), B)
    assert result.ref == ref("B-900", B)
    assert read_events(tmp_path / "admin-audit.jsonl")[0]["event"] == "pix_import"
