"""The delivery pool: stores one route's spooled instances into its destination over parallel associations.

Each of N worker threads (``[accelerate] associations``, default 4) keeps one
association to the destination and reuses it for entry after entry: it claims
the oldest due entry (:meth:`Spool.claim`, so no two workers send the same one)
and sends it as the SCU with :class:`~relay_router.accel.store_link.StoreLink`
(the sans-IO DIMSE layer on a blocking socket: no threads of its own), from the
spool's memory while the spool holds the entry (journaled small instances,
``Spool.held``), else from its Part 10 file in PDU-sized pieces (a large data set
is never loaded into memory). Parallel associations replace the Asynchronous
Operations Window, which DCMTK, Orthanc and pynetdicom do not support.

What a C-STORE status means for the entry (PS3.4 B.2.3, PS3.7 Annex C):

* success (0000) and warnings (B000, B006, B007), and 0111 Duplicate SOP
  Instance (the device already has it: a retried duplicate is harmless):
  DELIVERED;
* A7xx Out of Resources, 0213 Resource Limitation, 0210 Duplicate Invocation,
  0110 Processing Failure, FE00 Cancel, an unknown code, no answer, an aborted
  association, an answer to another Message ID or not a C-STORE-RSP: transient,
  RETRY after a capped backoff (DEAD after max_attempts);
* A9xx Data Set Does Not Match SOP Class, Cxxx Cannot Understand, 0122 SOP Class
  Not Supported (also when the device refuses the presentation context), 0117
  Invalid SOP Instance, 0124 Not Authorized, other 01xx/02xx refusals: permanent,
  DEAD at once.

A destination that cannot be reached (connection refused, A-ASSOCIATE-RJ) does
not count against any entry: the worker backs off (capped) and tries again, so a
destination down for an hour loses nothing and dead-letters nothing. One failing
entry never holds up the others: it waits for its own next_attempt.

Each association proposes one presentation context per (SOP class, transfer
syntax) pair of the due entries, so the accepted context matches the file
exactly (a chunked send cannot re-encode). When none of the due entries fits
a worker's association (a new pair arrived), the worker re-associates with the
pairs due then. A pair the device refused is believed for a minute: its
entries go DEAD with 0x0122, and a `spool retry` after that proposes it again.
An association left idle for ``idle_release_s`` is released, since simple
devices (storescp) serve one association at a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from relay_router.accel.metrics import DeliveryStats
from relay_router.accel.spool import EntryState, Spool, SpoolEntry, SpoolError
from relay_router.accel.store_link import LinkLost, LinkRefused, StoreLink, file_dataset
from relay_router.dimse.errors import DimseError
from relay_router.dimse.scu import dataset_offset

__all__ = ["Destination", "DeliveryOutcome", "DeliveryPool", "Outcome", "classify_status"]

log = logging.getLogger("relay_router.accel.delivery")

MAX_CONTEXTS = 128  # presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8 9.3.2.2: odd IDs 1-255)
SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSAL_MEMORY_S = 60.0  # how long a refused presentation context is believed before it is proposed again


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of one delivery attempt: the entry as it now stands, the device's status if it answered."""

    entry: SpoolEntry
    outcome: Outcome
    status: int | None
    error: str


@dataclass(frozen=True)
class Destination:
    """The device a route delivers to: from the router's own configuration, never from a peer."""

    host: str
    port: int
    called_ae: str
    calling_ae: str


def classify_status(status: int) -> Outcome:
    """The fate of an entry whose C-STORE got `status` (see the module docstring)."""
    if status in (0x0000, 0xB000, 0xB006, 0xB007, 0x0111):
        return Outcome.DELIVERED
    high = status & 0xFF00
    if high == 0xA700 or status in (0x0213, 0x0210, 0x0110, 0xFE00):
        return Outcome.RETRY
    if high in (0xA900, 0xC000) or status & 0xF000 == 0xC000 or high in (0x0100, 0x0200):
        return Outcome.DEAD
    return Outcome.RETRY  # a code PS3.4 does not define for C-STORE: try again, DEAD after max_attempts


@dataclass
class _Link:
    """One worker's association to the destination and what it is doing with it."""

    assoc: StoreLink | None = None
    accepted: frozenset[tuple[str, str]] = frozenset()  # (SOP class, transfer syntax) pairs the device took
    connect_failures: int = 0
    last_used: float = 0.0
    claimed: SpoolEntry | None = None  # the entry being sent, so an unexpected error can hand it back

    def drop(self) -> None:
        """The device aborted or asked to release between C-STOREs: no A-RELEASE-RQ into that (it would wait for
        an answer that never comes); an A-ABORT, and the socket closed."""
        if self.assoc is not None:
            self.assoc.abort()
        self.assoc = None
        self.accepted = frozenset()

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
        self.assoc = None
        self.accepted = frozenset()


class DeliveryPool:
    """Delivers the due entries of `route` from `spool` to `destination`; see the module docstring.

    `on_outcome` is called from a worker thread after every attempt (use
    ``loop.call_soon_threadsafe`` to reach an event loop). With
    `remove_delivered` (the default) a DELIVERED entry is removed after the
    callback; the far router turns it off to keep the entry until its outcome
    has reached the near router. DELIVERED entries found at :meth:`start` (a
    crash came between the device's confirmation and their removal) are
    reported again (status 0000) and removed if `remove_delivered`.
    """

    def __init__(
        self,
        spool: Spool,
        route: str,
        destination: Destination,
        *,
        associations: int = 4,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
        remove_delivered: bool = True,
        connect_timeout: float = 10.0,
        dimse_timeout: float = 60.0,
        idle_release_s: float = 5.0,
        stats: DeliveryStats | None = None,
    ) -> None:
        if not 1 <= associations <= 64:
            raise ValueError("associations must be between 1 and 64")
        self.spool = spool
        self.route = route
        self.destination = destination
        self.associations = associations
        self.on_outcome = on_outcome
        self.remove_delivered = remove_delivered
        self.idle_release_s = idle_release_s
        self.stats = stats or DeliveryStats()
        self.connect_timeout = connect_timeout
        self.dimse_timeout = dimse_timeout
        self._wake = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        # (SOP class, transfer syntax) pairs the device refused, until when (under the lock of _wake)
        self._refused: dict[tuple[str, str], float] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        # DELIVERED entries left by a crash between the device's confirmation and the removal: report
        # them again (at least once) and remove them. DELIVERED is only ever set on a success or warning
        # status; which one is not kept, so they are reported as 0000.
        for entry in self.spool.entries(state=EntryState.DELIVERED, route=self.route):
            self._report(entry, Outcome.DELIVERED, 0x0000, "")
            if self.remove_delivered:
                self.spool.remove(entry.id)
        for number in range(self.associations):
            thread = threading.Thread(
                target=self._worker, name=f"delivery-{self.route}-{number}", args=(number,), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def wake(self) -> None:
        """A new entry was committed: one idle worker looks at once (thread-safe). One is enough for one entry
        (each commit calls this); waking every idle worker for each small instance cost each of them a look at
        the spool for nothing. A worker finishing a send claims the next entry by itself."""
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the workers; a send in progress finishes (its entry is SENDING until then, RECEIVED on reopen)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def idle(self) -> bool:
        """Nothing of this route is due, waiting for its retry or being sent."""
        waiting = (EntryState.RECEIVED, EntryState.RETRY, EntryState.SENDING)
        return not any(e.state in waiting for e in self.spool.entries(route=self.route))

    # -- one worker ----------------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping:
                self._wake.wait(max(0.01, seconds))

    def _worker(self, number: int) -> None:
        link = _Link()
        requests_seen = 0.0
        try:
            while not self._stopping:
                try:
                    if number == 0 and time.monotonic() - requests_seen >= 1.0:
                        requests_seen = time.monotonic()
                        self.spool.apply_requests()  # `relay-router spool retry|purge` while we run
                    self._step(link)
                except Exception as exc:  # a full disk, a library bug: say why, pause, go on (never die)
                    log.exception("delivery worker %s of route %s: unexpected error; going on", number, self.route)
                    self._recover_worker(link, exc)
        finally:
            link.close()

    def _recover_worker(self, link: _Link, exc: Exception) -> None:
        claimed, link.claimed = link.claimed, None
        link.close()
        if claimed is not None:
            with contextlib.suppress(Exception):  # the spool itself may be what failed
                self.spool.fail(claimed.id, f"internal error: {exc.__class__.__name__}", permanent=False)
        self._wait(1.0)

    def _step(self, link: _Link) -> None:
        """One turn of a worker: deliver one entry, or (re)associate, or wait."""
        now = time.time()
        if link.assoc is not None and not link.assoc.usable():  # aborted or released by the device meanwhile
            log.info("route %s: the association to %s ended; opening another", self.route, self.destination.called_ae)
            link.drop()
        if link.assoc is not None:  # the fast path: one claim, one C-STORE
            link.claimed = self.spool.claim(self.route, now, accept=link.accepted)
            if link.claimed is not None:
                self._deliver(link, link.claimed)
                link.claimed = None
                link.last_used = time.monotonic()
                return
        # Nothing this association can take: look at what waits (one pass over the spool).
        due = self.spool.due(now, route=self.route)
        refused = self._refused_pairs()
        if any((e.sop_class_uid, e.transfer_syntax) in refused for e in due):
            self._dead_unsupported(refused)
            return
        if not due:
            if link.assoc is not None and time.monotonic() - link.last_used > self.idle_release_s:
                link.close()
            upcoming = self.spool.next_due(route=self.route)
            self._wait(min(1.0, upcoming - now) if upcoming is not None else 1.0)
            return
        if link.assoc is not None and any((e.sop_class_uid, e.transfer_syntax) in link.accepted for e in due):
            return  # another worker took the one we saw; claim again
        # None yet, lost, or the due entries need contexts it does not have.
        link.close()
        link.assoc = self._associate(due)
        if link.assoc is None:
            link.connect_failures += 1
            self._wait(self.spool.backoff(link.connect_failures))
            return
        link.accepted = link.assoc.accepted
        link.connect_failures = 0
        link.last_used = time.monotonic()

    def _associate(self, due: list[SpoolEntry]) -> StoreLink | None:
        pairs: list[tuple[str, str]] = []
        for entry in due:  # oldest first: they get the contexts when there are more than 128 pairs
            pair = (entry.sop_class_uid, entry.transfer_syntax)
            if pair not in pairs and len(pairs) < MAX_CONTEXTS:
                pairs.append(pair)
        destination = self.destination
        try:
            link = StoreLink.open(
                destination.host,
                destination.port,
                pairs,
                calling_ae=destination.calling_ae,
                called_ae=destination.called_ae,
                connect_timeout=self.connect_timeout,
                dimse_timeout=self.dimse_timeout,
            )
        except LinkRefused as exc:
            log.warning(
                "route %s: %s at %s:%d %s; retrying with backoff",
                self.route,
                destination.called_ae,
                destination.host,
                destination.port,
                exc.detail,
            )
            self.stats.association_failed(self.route)
            return None
        expires = time.monotonic() + REFUSAL_MEMORY_S
        with self._wake:
            for pair in set(pairs) - link.accepted:
                self._refused[pair] = expires
        return link

    def _refused_pairs(self) -> frozenset[tuple[str, str]]:
        now = time.monotonic()
        with self._wake:
            for pair in [p for p, until in self._refused.items() if until <= now]:
                del self._refused[pair]  # forgotten: a `spool retry` after fixing the device proposes it again
            return frozenset(self._refused)

    def _dead_unsupported(self, refused: frozenset[tuple[str, str]]) -> None:
        """DEAD at once for entries whose (SOP class, transfer syntax) the device refused to negotiate."""
        while (entry := self.spool.claim(self.route, time.time(), accept=refused)) is not None:
            error = (
                f"{SOP_CLASS_NOT_SUPPORTED:#06x} the device refused SOP class {entry.sop_class_uid} "
                f"in transfer syntax {entry.transfer_syntax}"
            )
            self._report(self.spool.fail(entry.id, error, permanent=True), Outcome.DEAD, SOP_CLASS_NOT_SUPPORTED, error)

    def _dataset(self, entry: SpoolEntry) -> memoryview | tuple[Path, int]:
        """The entry's data set: from memory while the spool holds it (journaled, not written out: most small
        instances, which then never cost a file), else from its Part 10 file."""
        held = self.spool.held(entry.id)
        if held is not None:  # never changed after commit (Spool.held), so it can be read without the lock
            view = memoryview(held)
            return view[dataset_offset(view) :]
        return file_dataset(self.spool.path(entry.id))

    def _deliver(self, link: _Link, entry: SpoolEntry) -> None:
        assoc = link.assoc
        assert assoc is not None
        originator_ae = entry.meta.get("move_originator_ae") or None
        originator_id_text = entry.meta.get("move_originator_id", "")
        originator_id = int(originator_id_text) if originator_id_text.isdigit() else None
        if originator_id is not None and not 0 <= originator_id <= 0xFFFF:
            originator_id = None
        try:
            dataset = self._dataset(entry)
        except (SpoolError, OSError, DimseError, ValueError) as exc:  # unreadable file, bad file meta
            error = f"cannot send the spooled file: {exc}"
            self._report(self.spool.fail(entry.id, error, permanent=True), Outcome.DEAD, None, error)
            return
        try:
            answer = assoc.store(
                entry.sop_class_uid,
                entry.transfer_syntax,
                entry.sop_instance_uid,
                dataset,
                move_originator_ae=originator_ae,
                move_originator_id=originator_id,
            )
        except LinkLost as exc:  # no response: aborted, timed out, or the device broke the protocol
            link.drop()
            error = f"no C-STORE response from {self.destination.called_ae} ({exc.detail})"[:300]
            updated = self.spool.fail(entry.id, error, permanent=False)
            self._report(updated, Outcome.DEAD if updated.state is EntryState.DEAD else Outcome.RETRY, None, error)
            return
        status = answer.status
        outcome = classify_status(status)
        if outcome is Outcome.DELIVERED:
            self._report(self.spool.set_state(entry.id, EntryState.DELIVERED), outcome, status, "")
            if self.remove_delivered:
                self.spool.remove(entry.id)
            return
        error = f"{status:#06x} from {self.destination.called_ae}"
        if answer.error_comment:
            error += f": {answer.error_comment[:120]}"
        updated = self.spool.fail(entry.id, error, permanent=outcome is Outcome.DEAD)
        self._report(updated, Outcome.DEAD if updated.state is EntryState.DEAD else Outcome.RETRY, status, error)

    def _report(self, entry: SpoolEntry, outcome: Outcome, status: int | None, error: str) -> None:
        self.stats.outcome(self.route, outcome)
        if outcome is Outcome.DEAD:
            log.warning("route %s: entry %s (%s) dead: %s", self.route, entry.id, entry.sop_instance_uid, error)
        elif outcome is Outcome.RETRY:
            log.info("route %s: entry %s will be retried (attempt %d): %s", self.route, entry.id, entry.attempts, error)
        if self.on_outcome is not None:
            try:
                self.on_outcome(DeliveryOutcome(entry, outcome, status, error))
            except Exception:  # the callback's failure must not stop delivery
                log.exception("route %s: outcome callback failed for entry %s", self.route, entry.id)
