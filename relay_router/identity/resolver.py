"""The resolver: mapping sources tried in the configured order, a TTL cache, an audit record per lookup.

One call serves both directions: A's ID -> B's domain for an outgoing query, B's ID ->
A's domain for data coming back. The first source that knows the patient in the target
domain wins; a source that is down, slow (its `timeout_s`) or answers nonsense is skipped,
audited, and the next one is asked. When no source answers the outcome is UNAVAILABLE
and the caller relabels nothing. Answers are cached for `cache_ttl_s` (a bounded LRU),
except when a source was skipped (a later lookup may reach it) and except answers taken
from the data set itself (the Other Patient IDs Sequence describes that data set only).
Merges (ADT A40) call `invalidate`; a source with a `changed()` coroutine (the table,
edited by `relay-router pix ...` in another process) empties the cache when it changes.

PHI stays in the hospital: the audit records go to the router's own audit trail only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef

if TYPE_CHECKING:
    from pydicom import Dataset

    from relay_common.audit import AuditLog

log = logging.getLogger("relay_router.identity")

# Why a source was skipped (SourceUnavailable.reason, and the resolver's own): a fixed vocabulary for
# the audit trail and the metrics.
SKIP_REASONS = (
    "timeout",
    "connection-failed",
    "connection-closed",
    "rejected",
    "http-error",
    "invalid-answer",
    "unknown-domain",
    "source-error",
)
DEFAULT_CACHE_TTL_S = 300.0
DEFAULT_CACHE_ENTRIES = 10_000


class SourceUnavailable(Exception):
    """A source could not answer (connection refused, error status, malformed answer); `reason` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _Abandoned(Exception):
    """The lookup that others waited for was cancelled; they ask the sources themselves."""


class Source(Protocol):
    """A mapping source. `lookup` answers MAPPED or UNMAPPED, or raises SourceUnavailable."""

    name: str  # as configured (defaults to the kind); named in the audit trail
    timeout_s: float

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup: ...


class Resolver:
    def __init__(
        self,
        sources: Iterable[Source],
        *,
        audit: AuditLog | None = None,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        clock: Any = time.monotonic,
    ) -> None:
        self.sources = list(sources)
        self.audit = audit
        self.cache_ttl_s = cache_ttl_s
        self.cache_entries = cache_entries
        self._clock = clock
        self._cache: OrderedDict[tuple[PatientRef, str], tuple[float, Lookup]] = OrderedDict()
        self._inflight: dict[tuple[PatientRef, str], asyncio.Future[Lookup]] = {}
        self._generation = 0  # bumped by invalidate(): answers computed before it are not cached
        self._per_dataset = any(getattr(source, "per_dataset", False) for source in self.sources)
        # For the metrics (relay_router.identity.metrics): lookups by (result, cached), skips by (source, reason).
        self.lookups: Counter[tuple[str, bool]] = Counter()
        self.skips: Counter[tuple[str, str]] = Counter()

    async def lookup(
        self,
        ref: PatientRef,
        target: str,
        *,
        dataset: Dataset | None = None,
        context: Mapping[str, str] | None = None,
    ) -> Lookup:
        """`ref` in the domain whose Issuer of Patient ID is `target`; `context` adds fields to the audit record."""
        await self._drop_if_stale()
        key = (ref, target)
        cached = self._cached(key)
        if cached is not None and dataset is not None and cached.outcome is not LookupOutcome.MAPPED:
            if self._per_dataset:
                cached = None  # this data set may say more (other-ids) than the records did
        if cached is not None:
            self._audit_lookup(ref, target, cached, cached=True, context=context)
            return cached
        # Concurrent lookups of one identifier (parallel C-STOREs of one study) share one query.
        shareable = dataset is None or not self._per_dataset
        pending = self._inflight.get(key) if shareable else None
        if pending is not None:
            try:
                shared = await asyncio.shield(pending)
            except _Abandoned:  # the first caller was cancelled: ask ourselves
                pass
            else:
                self._audit_lookup(ref, target, shared, cached=True, context=context)
                return shared
        generation = self._generation
        future: asyncio.Future[Lookup] | None = None
        if shareable and key not in self._inflight:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
        try:
            answered, cacheable = await self._ask_sources(ref, target, dataset)
        except BaseException:
            if future is not None:
                future.set_exception(_Abandoned())
                future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            if future is not None and self._inflight.get(key) is future:
                del self._inflight[key]
        if future is not None:
            future.set_result(answered)
        # Not stored when a merge or a table change invalidated the cache meanwhile: it may predate it.
        if cacheable and generation == self._generation:
            self._store(key, answered)
        self._audit_lookup(ref, target, answered, cached=False, context=context)
        return answered

    async def _ask_sources(self, ref: PatientRef, target: str, dataset: Dataset | None) -> tuple[Lookup, bool]:
        """The first MAPPED answer in source order (else the first UNMAPPED, else UNAVAILABLE); cacheable or not."""
        answered: Lookup | None = None
        skipped = per_dataset = False
        for source in self.sources:
            try:
                async with asyncio.timeout(source.timeout_s):
                    result = await source.lookup(ref, target, dataset=dataset)
                self._check_answer(result, target)
            except TimeoutError:
                skipped = True
                self._audit_unavailable(source, ref, target, "timeout", f"no answer within {source.timeout_s:g} s")
                continue
            except SourceUnavailable as exc:
                skipped = True
                self._audit_unavailable(source, ref, target, exc.reason, exc.detail)
                continue
            except IdentityError as exc:  # the source's answer holds an unacceptable identifier
                skipped = True
                self._audit_unavailable(source, ref, target, "invalid-answer", str(exc))
                continue
            except Exception as exc:  # a bug in a source must not fail the association: the next one is asked
                log.exception("identity source %s failed", source.name)
                skipped = True
                self._audit_unavailable(source, ref, target, "source-error", exc.__class__.__name__)
                continue
            # What a source read from the data set at hand (other-ids) holds for that data set only.
            per_dataset = per_dataset or (dataset is not None and bool(getattr(source, "per_dataset", False)))
            if result.outcome is LookupOutcome.MAPPED:
                answered = result
                break
            answered = answered or result  # UNMAPPED: the next source may still know the patient
        if answered is None:
            answered = Lookup(LookupOutcome.UNAVAILABLE, None, "")
        return answered, not skipped and not per_dataset

    def invalidate(self, *refs: PatientRef) -> int:
        """Forget cached lookups of or to these identifiers (by ID and issuer); all of them when none given."""
        self._generation += 1
        self._inflight.clear()  # lookups from now on ask again rather than join one that may predate this
        if not refs:
            count = len(self._cache)
            self._cache.clear()
            return count
        ids = {(r.id, r.issuer) for r in refs}

        def involved(key: tuple[PatientRef, str], result: Lookup) -> bool:
            mapped = (result.ref.id, result.ref.issuer) if result.ref is not None else None
            return (key[0].id, key[0].issuer) in ids or mapped in ids

        stale = [key for key, (_, result) in self._cache.items() if involved(key, result)]
        for key in stale:
            del self._cache[key]
        return len(stale)

    async def aclose(self) -> None:
        """Close the sources that hold connections (PIXm's HTTP session)."""
        for source in self.sources:
            close = getattr(source, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing one must not keep the others open
                    log.warning("cannot close identity source %s", source.name, exc_info=True)

    async def _drop_if_stale(self) -> None:
        """Forget every cached answer when a source says its records changed (a table edited by the CLI)."""
        for source in self.sources:
            changed = getattr(source, "changed", None)
            if changed is None:
                continue
            try:
                stale = await changed()
            except Exception as exc:  # an unreadable table is reported by its lookup; the cache stays
                log.warning("cannot tell whether identity source %s changed: %s", source.name, exc)
                continue
            if stale:
                self.invalidate()

    @staticmethod
    def _check_answer(result: Lookup, target: str) -> None:
        if result.outcome is LookupOutcome.MAPPED:
            if result.ref is None:
                raise SourceUnavailable("invalid-answer", "mapped without an identifier")
            if result.ref.issuer != target:
                raise SourceUnavailable(
                    "invalid-answer", f"answered in domain {result.ref.issuer!r}, not the one asked for {target!r}"
                )
        elif result.outcome is not LookupOutcome.UNMAPPED:
            raise SourceUnavailable("invalid-answer", f"a source answered {result.outcome}")

    def _cached(self, key: tuple[PatientRef, str]) -> Lookup | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, result = entry
        if self._clock() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return result

    def _store(self, key: tuple[PatientRef, str], result: Lookup) -> None:
        if self.cache_ttl_s <= 0:
            return
        self._cache[key] = (self._clock() + self.cache_ttl_s, result)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    def _audit_lookup(
        self, ref: PatientRef, target: str, result: Lookup, *, cached: bool, context: Mapping[str, str] | None
    ) -> None:
        self.lookups[(str(result.outcome), cached)] += 1
        log.info(
            "patient identity lookup %s -> %s: %s (source %s%s)",
            ref,
            target,
            result.outcome,
            result.source or "-",
            ", cached" if cached else "",
        )
        if self.audit is None:
            return
        self.audit.event(
            "identity_lookup",
            "failure" if result.outcome is LookupOutcome.UNAVAILABLE else "success",
            result=str(result.outcome),
            patient_id=ref.id,
            issuer=ref.issuer,
            target=target,
            mapped_id=result.ref.id if result.ref else None,
            mapped_issuer=result.ref.issuer if result.ref else None,
            source=result.source,
            cached=cached,
            **dict(context or {}),
        )

    def _audit_unavailable(self, source: Source, ref: PatientRef, target: str, reason: str, detail: str) -> None:
        self.skips[(source.name, reason)] += 1
        log.warning("patient identity source %s skipped for %s -> %s: %s %s", source.name, ref, target, reason, detail)
        if self.audit is not None:
            self.audit.event(
                "identity_source_unavailable",
                "failure",
                source=source.name,
                reason=reason,
                detail=detail[:500],
                patient_id=ref.id,
                issuer=ref.issuer,
                target=target,
            )


class MemorySource:
    """Links held in memory (tests, and the shape of every table-like source): each link joins two identifiers.

    An identifier linked to two different identifiers of the same target domain is ambiguous:
    that lookup answers UNMAPPED (never a guess).
    """

    def __init__(self, links: Iterable[tuple[PatientRef, PatientRef]] = (), *, name: str = "memory") -> None:
        self.name = name
        self.timeout_s = 1.0
        self._links: dict[tuple[str, str], set[PatientRef]] = {}
        for a, b in links:
            self.link(a, b)

    def link(self, a: PatientRef, b: PatientRef) -> None:
        self._links.setdefault((a.id, a.issuer), set()).add(b)
        self._links.setdefault((b.id, b.issuer), set()).add(a)

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup:
        found = {r for r in self._links.get((ref.id, ref.issuer), set()) if r.issuer == target}
        if len(found) == 1:
            return Lookup(LookupOutcome.MAPPED, found.pop(), self.name)
        return Lookup(LookupOutcome.UNMAPPED, None, self.name)
