"""The cross-reference table: links both ways, conflicts refused, merges, CSV import, mode 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relay_router.identity.model import LookupOutcome, PatientRef
from relay_router.identity.resolver import Resolver
from relay_router.identity.xref import XrefError, XrefSource, XrefTable, read_csv

A, B, C = "HOSP_A", "HOSP_B", "HOSP_C"


@pytest.fixture
def table(tmp_path: Path) -> XrefTable:
    return XrefTable(tmp_path / "state" / "identity.sqlite")


def test_file_is_owner_only(table: XrefTable) -> None:
    table.add(PatientRef("1", A), PatientRef("9", B))
    assert stat.S_IMODE(table.path.stat().st_mode) == 0o600
    for extra in table.path.parent.glob("identity.sqlite-*"):  # WAL and shared-memory files
        assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra


def test_links_are_found_from_either_side(table: XrefTable) -> None:
    table.add(PatientRef("1", A), PatientRef("9", B))
    assert table.linked(PatientRef("1", A), B) == [PatientRef("9", B)]
    assert table.linked(PatientRef("9", B), A) == [PatientRef("1", A)]
    assert table.linked(PatientRef("1", A), C) == []
    assert table.linked(PatientRef("9", A), B) == []  # the same ID in another domain is another patient


def test_a_second_id_in_the_same_domain_is_refused_unless_replaced(table: XrefTable) -> None:
    table.add(PatientRef("1", A), PatientRef("9", B))
    assert table.add(PatientRef("1", A), PatientRef("9", B)) is False  # already there
    with pytest.raises(XrefError, match="conflicts with the existing link 1\\^\\^\\^HOSP_A -> 9\\^\\^\\^HOSP_B"):
        table.add(PatientRef("1", A), PatientRef("8", B))
    with pytest.raises(XrefError, match="conflicts"):
        table.add(PatientRef("2", A), PatientRef("9", B))
    table.add(PatientRef("1", A), PatientRef("8", B), replace=True)
    assert table.linked(PatientRef("1", A), B) == [PatientRef("8", B)]
    table.add(PatientRef("1", A), PatientRef("7", C))  # another domain: fine
    with pytest.raises(XrefError, match="same domain"):
        table.add(PatientRef("1", A), PatientRef("2", A))


def test_remove_one_link_or_all_of_a_patient(table: XrefTable) -> None:
    table.add(PatientRef("1", A), PatientRef("9", B))
    table.add(PatientRef("1", A), PatientRef("7", C))
    assert table.remove(PatientRef("1", A), PatientRef("9", B)) == 1
    assert table.remove(PatientRef("1", A), PatientRef("9", B)) == 0
    assert table.remove(PatientRef("1", A)) == 1
    assert table.links() == []


def test_merge_moves_links_to_the_survivor(table: XrefTable) -> None:
    table.add(PatientRef("OLD", A), PatientRef("9", B))
    table.add(PatientRef("NEW", A), PatientRef("7", C))
    assert table.merge(PatientRef("OLD", A), PatientRef("NEW", A)) == 1
    assert table.linked(PatientRef("NEW", A), B) == [PatientRef("9", B)]
    assert table.linked(PatientRef("9", B), A) == [PatientRef("NEW", A)]
    assert table.linked(PatientRef("OLD", A), B) == []
    with pytest.raises(XrefError, match="across domains"):
        table.merge(PatientRef("OLD", A), PatientRef("NEW", B))


async def test_merge_of_two_linked_records_makes_the_survivor_ambiguous(table: XrefTable) -> None:
    table.add(PatientRef("OLD", A), PatientRef("9", B))
    table.add(PatientRef("NEW", A), PatientRef("8", B))
    table.merge(PatientRef("OLD", A), PatientRef("NEW", A))
    source = XrefSource(table)
    assert (await source.lookup(PatientRef("NEW", A), B)).outcome is LookupOutcome.UNMAPPED  # never a guess
    assert (await source.lookup(PatientRef("9", B), A)).ref == PatientRef("NEW", A)


def test_csv_import_checks_every_row_first() -> None:
    text = "local_id,other_id,other_issuer\n1,9,HOSP_B\n2,8,HOSP_B\n"
    assert read_csv(text, local_issuer=A) == [
        (PatientRef("1", A), PatientRef("9", B)),
        (PatientRef("2", A), PatientRef("8", B)),
    ]
    with pytest.raises(XrefError, match="line 3: patient id: contains a backslash"):
        read_csv("local_id,other_id,other_issuer\n1,9,HOSP_B\n2,8\\x,HOSP_B\n", local_issuer=A)
    with pytest.raises(XrefError, match="line 1: .*missing other_issuer"):
        read_csv("local_id,other_id\n1,9\n", local_issuer=A)
    with pytest.raises(XrefError, match="line 2: expected 3 columns"):
        read_csv("local_id,other_id,other_issuer\n1,9\n", local_issuer=A)
    with pytest.raises(XrefError, match="line 2: other_issuer is empty"):
        read_csv("local_id,other_id,other_issuer\n1,9,\n", local_issuer=A)


def test_import_is_all_or_nothing(table: XrefTable) -> None:
    links = [(PatientRef("1", A), PatientRef("9", B)), (PatientRef("2", A), PatientRef("9", B))]
    with pytest.raises(XrefError, match="conflicts"):
        table.add_many(links, origin="import", replace=False)
    assert table.links() == []


async def test_changes_by_another_process_empty_the_resolver_cache(tmp_path: Path) -> None:
    path = tmp_path / "identity.sqlite"
    router_side, cli_side = XrefTable(path), XrefTable(path)  # two connections, as two processes have
    resolver = Resolver([XrefSource(router_side)], cache_ttl_s=3600)
    assert (await resolver.lookup(PatientRef("1", A), B)).outcome is LookupOutcome.UNMAPPED
    cli_side.add(PatientRef("1", A), PatientRef("9", B))
    assert (await resolver.lookup(PatientRef("1", A), B)).ref == PatientRef("9", B)
