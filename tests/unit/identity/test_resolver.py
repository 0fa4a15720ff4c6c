"""The resolver: source order, TTL cache, fallback when a source is down or slow (audited), invalidation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay_common.audit import AuditLog, read_events
from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef
from relay_router.identity.resolver import MemorySource, Resolver, SourceUnavailable

A = "HOSP_A"
B = "HOSP_B"
ALICE_A = PatientRef("A-100", A)
ALICE_B = PatientRef("B-900", B)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Down:
    def __init__(self, name: str = "down") -> None:
        self.name, self.timeout_s, self.calls = name, 1.0, 0

    async def lookup(self, ref: PatientRef, target: str, *, dataset: object = None) -> Lookup:
        self.calls += 1
        raise SourceUnavailable("connection-refused", "127.0.0.1:1")


class Slow:
    name, timeout_s = "slow", 0.05

    async def lookup(self, ref: PatientRef, target: str, *, dataset: object = None) -> Lookup:
        await asyncio.sleep(10)
        raise AssertionError("not reached")


class Counting(MemorySource):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    async def lookup(self, ref: PatientRef, target: str, *, dataset: object = None) -> Lookup:
        self.calls += 1
        return await super().lookup(ref, target)


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl", app="relay-router")


async def test_maps_both_ways_and_audits(audit: AuditLog) -> None:
    resolver = Resolver([MemorySource([(ALICE_A, ALICE_B)], name="table")], audit=audit)
    there = await resolver.lookup(ALICE_A, B, context={"purpose": "c-find"})
    back = await resolver.lookup(ALICE_B, A)
    assert (there.outcome, there.ref, there.source) == (LookupOutcome.MAPPED, ALICE_B, "table")
    assert back.ref == ALICE_A
    events = read_events(audit.path)  # type: ignore[arg-type]
    assert [e["event"] for e in events] == ["identity_lookup", "identity_lookup"]
    assert events[0] | {"time": ""} == {
        "time": "",
        "app": "relay-router",
        "event": "identity_lookup",
        "outcome": "success",
        "result": "mapped",
        "patient_id": "A-100",
        "issuer": A,
        "target": B,
        "mapped_id": "B-900",
        "mapped_issuer": B,
        "source": "table",
        "cached": False,
        "purpose": "c-find",
    }


async def test_first_source_that_knows_wins_in_order() -> None:
    first = Counting([(ALICE_A, PatientRef("FIRST", B))], name="first")
    second = Counting([(ALICE_A, PatientRef("SECOND", B))], name="second")
    result = await Resolver([first, second]).lookup(ALICE_A, B)
    assert result.ref == PatientRef("FIRST", B) and (first.calls, second.calls) == (1, 0)


async def test_unmapped_in_one_source_asks_the_next() -> None:
    empty = Counting([], name="empty")
    table = Counting([(ALICE_A, ALICE_B)], name="table")
    result = await Resolver([empty, table]).lookup(ALICE_A, B)
    assert (result.outcome, result.source) == (LookupOutcome.MAPPED, "table")


async def test_unmapped_everywhere_names_the_first_source_that_answered() -> None:
    result = await Resolver([MemorySource(name="one"), MemorySource(name="two")]).lookup(ALICE_A, B)
    assert (result.outcome, result.ref, result.source) == (LookupOutcome.UNMAPPED, None, "one")


async def test_source_down_falls_back_to_the_next_and_is_audited(audit: AuditLog) -> None:
    resolver = Resolver([Down("pix"), MemorySource([(ALICE_A, ALICE_B)], name="table")], audit=audit)
    result = await resolver.lookup(ALICE_A, B)
    assert (result.outcome, result.source) == (LookupOutcome.MAPPED, "table")
    skipped, looked_up = read_events(audit.path)  # type: ignore[arg-type]
    assert skipped["event"] == "identity_source_unavailable" and skipped["outcome"] == "failure"
    assert (skipped["source"], skipped["reason"], skipped["patient_id"]) == ("pix", "connection-refused", "A-100")
    assert looked_up["result"] == "mapped"


async def test_slow_source_times_out_and_the_next_answers(audit: AuditLog) -> None:
    resolver = Resolver([Slow(), MemorySource([(ALICE_A, ALICE_B)], name="table")], audit=audit)
    started = asyncio.get_running_loop().time()
    result = await resolver.lookup(ALICE_A, B)
    assert asyncio.get_running_loop().time() - started < 2
    assert result.source == "table"
    assert read_events(audit.path)[0]["reason"] == "timeout"  # type: ignore[arg-type]


async def test_no_source_answers_is_unavailable_and_not_cached(audit: AuditLog) -> None:
    down = Down()
    resolver = Resolver([down, Slow()], audit=audit)
    result = await resolver.lookup(ALICE_A, B)
    assert (result.outcome, result.ref, result.source) == (LookupOutcome.UNAVAILABLE, None, "")
    await resolver.lookup(ALICE_A, B)
    assert down.calls == 2  # asked again: a source that was down may be back
    last = read_events(audit.path)[-1]  # type: ignore[arg-type]
    assert (last["event"], last["outcome"], last["result"]) == ("identity_lookup", "failure", "unavailable")


async def test_cache_holds_for_the_ttl_then_asks_again(audit: AuditLog) -> None:
    clock = Clock()
    table = Counting([(ALICE_A, ALICE_B)])
    resolver = Resolver([table], audit=audit, cache_ttl_s=60, clock=clock)
    await resolver.lookup(ALICE_A, B)
    clock.now += 59
    assert (await resolver.lookup(ALICE_A, B)).ref == ALICE_B
    assert table.calls == 1
    clock.now += 1
    await resolver.lookup(ALICE_A, B)
    assert table.calls == 2
    assert [e["cached"] for e in read_events(audit.path)] == [False, True, False]  # type: ignore[arg-type]


async def test_unmapped_answers_are_cached_too_and_invalidate_forgets_them() -> None:
    table = Counting([])
    resolver = Resolver([table])
    await resolver.lookup(ALICE_A, B)
    await resolver.lookup(ALICE_A, B)
    assert table.calls == 1
    table.link(ALICE_A, ALICE_B)  # a merge or `pix add`
    assert resolver.invalidate(ALICE_A) == 1
    assert (await resolver.lookup(ALICE_A, B)).ref == ALICE_B


async def test_invalidate_matches_the_mapped_side_too() -> None:
    resolver = Resolver([MemorySource([(ALICE_A, ALICE_B)])])
    await resolver.lookup(ALICE_A, B)
    await resolver.lookup(PatientRef("OTHER", A), B)
    assert resolver.invalidate(ALICE_B) == 1
    assert resolver.invalidate() == 1


async def test_a_source_answering_in_another_domain_is_skipped(audit: AuditLog) -> None:
    wrong = MemorySource([(ALICE_A, PatientRef("X", "HOSP_C"))], name="wrong")

    async def wrong_lookup(ref: PatientRef, target: str, *, dataset: object = None) -> Lookup:
        return Lookup(LookupOutcome.MAPPED, PatientRef("X", "HOSP_C"), "wrong")

    wrong.lookup = wrong_lookup  # type: ignore[method-assign]
    result = await Resolver([wrong], audit=audit).lookup(ALICE_A, B)
    assert result.outcome is LookupOutcome.UNAVAILABLE
    assert read_events(audit.path)[0]["reason"] == "invalid-answer"  # type: ignore[arg-type]


async def test_cache_is_bounded() -> None:
    resolver = Resolver([MemorySource()], cache_entries=3)
    for n in range(10):
        await resolver.lookup(PatientRef(f"P{n}", A), B)
    assert len(resolver._cache) == 3


async def test_ambiguous_link_is_unmapped_never_a_guess() -> None:
    table = MemorySource([(ALICE_A, ALICE_B), (ALICE_A, PatientRef("B-901", B))])
    assert (await Resolver([table]).lookup(ALICE_A, B)).outcome is LookupOutcome.UNMAPPED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"id": "", "issuer": A}, "patient id"),
        ({"id": "x" * 65, "issuer": A}, "patient id"),
        ({"id": "a\\b", "issuer": A}, "patient id"),
        ({"id": "a\nb", "issuer": A}, "patient id"),
        ({"id": "ok", "issuer": " A"}, "issuer"),
        ({"id": "ok", "issuer": A, "universal_id_type": "OID"}, "universal id type"),
    ],
)
def test_bad_identifiers_are_refused_naming_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(IdentityError) as caught:
        PatientRef(**kwargs)
    assert caught.value.field == field


class Gated(MemorySource):
    """Answers once `gate` is set; counts its calls."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.calls = 0

    async def lookup(self, ref: PatientRef, target: str, *, dataset: object = None) -> Lookup:
        self.calls += 1
        await self.gate.wait()
        return await super().lookup(ref, target)


async def test_concurrent_lookups_of_one_identifier_share_one_query(audit: AuditLog) -> None:
    source = Gated([(ALICE_A, ALICE_B)])
    resolver = Resolver([source], audit=audit)
    lookups = [asyncio.create_task(resolver.lookup(ALICE_A, B)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    results = await asyncio.gather(*lookups)
    assert source.calls == 1 and {r.ref for r in results} == {ALICE_B}
    assert len(read_events(audit.path)) == 5  # type: ignore[arg-type]  # every lookup is audited


async def test_cancelled_first_lookup_lets_the_others_ask_themselves() -> None:
    source = Gated([(ALICE_A, ALICE_B)])
    resolver = Resolver([source])
    first = asyncio.create_task(resolver.lookup(ALICE_A, B))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(resolver.lookup(ALICE_A, B))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    source.gate.set()
    assert (await second).ref == ALICE_B
    assert source.calls == 2


async def test_an_answer_that_may_predate_a_merge_is_not_cached() -> None:
    source = Gated([(ALICE_A, ALICE_B)])
    resolver = Resolver([source], cache_ttl_s=3600)
    running = asyncio.create_task(resolver.lookup(ALICE_A, B))
    await asyncio.sleep(0.01)
    resolver.invalidate(ALICE_A)  # an A40 arrives while the source is being asked
    source.gate.set()
    await running
    await resolver.lookup(ALICE_A, B)
    assert source.calls == 2  # asked again, not served the answer from before the merge
