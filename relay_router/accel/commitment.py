"""Storage Commitment Push (PS3.4 Annex J) on accelerated routes, answered by the near router honestly.

The near router answers C-STORE as soon as an instance is in its spool, so a commitment request
(N-ACTION, SOP class 1.2.840.10008.1.20.1) cannot be answered from the spool: an acknowledged
instance is not yet at the destination. The router accepts the request (N-ACTION-RSP 0x0000), keeps
it durable (one fsynced JSON file per transaction, `state_dir/accel/commitment/`), and sends the
N-EVENT-REPORT only once every instance it names has a final outcome at the destination:

* committed: the destination answered the far router's C-STORE with success (DELIVERED). The
  router does not forward a commitment to the destination: "committed" means "the destination
  acknowledged the C-STORE", which is what the sender would have known on a transparent route;
* failed, with a PS3.4 J.3.3 Failure Reason: the entry went DEAD (0x0122 when the destination
  refused the SOP class, 0x0213 when it was out of resources, 0x0110 otherwise), the instance was
  never received on this route (0x0122 if the destination does not take its SOP class, so the near
  router refused that presentation context; else 0x0112), it arrived with another SOP class (0x0119), or it stayed
  unconfirmed for `commitment_timeout_s` (0x0110).

Final outcomes come from the spool's state changes (`Spool.on_change`) into a bounded ledger
(`outcomes.jsonl`), because a delivered entry is removed from the spool, often before the sender
even asks. Losing the ledger's last lines in a crash only makes an answer more pessimistic (0x0112),
never wrongly positive.

The report goes on an open association from the requester to the same title that accepted the
Storage Commitment context (the one the request came on, or a later one), else the router opens an
association to the address configured for the requester in `[[accelerate.commitment_requester]]`
(PS3.4 J.3.3 role reversal: we propose the SCP role), never to an address a peer supplied; without
either it waits for the requester's next association.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, TextIO

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from pydicom.dataset import Dataset

from relay_common.audit import AuditLog
from relay_common.metrics import SourcedCollector, register_sourced
from relay_router.accel.commitment_request import (
    MAX_REQUEST_BYTES,
    TRANSFER_SYNTAXES,
    ActionStatus,
    Answer,
    CommitmentRefused,
    Failure,
    PendingRequest,
    decode_request,
    failure_reason,
    parse_request,
)
from relay_router.accel.spool import EntryState, Spool, SpoolEntry
from relay_router.accel.spool_format import fsync_dir
from relay_router.config import AccelerateSection
from relay_router.dimse import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE

__all__ = [
    "MAX_REQUEST_BYTES",
    "TRANSFER_SYNTAXES",
    "ActionStatus",
    "Answer",
    "CommitmentError",
    "CommitmentRefused",
    "CommitmentService",
    "Failure",
    "OutcomeLedger",
    "PendingRequest",
    "ReportChannel",
    "decode_request",
    "failure_reason",
    "parse_request",
    "register_commitment_metrics",
    "send_event_report",
]

log = logging.getLogger("relay_router.accel")
LEDGER_SIZE = 200_000  # final outcomes remembered (the newest); older ones answer 0x0112
RETRY_MIN_S, RETRY_MAX_S = 2.0, 300.0  # backoff between role-reversal attempts


class OutcomeLedger:
    """The final outcome of recent instances on near routes: (route, SOP Instance UID) -> (SOP class, reason).

    Reason 0 is delivered. Bounded (the newest LEDGER_SIZE) and appended to a file without fsync: a lost
    line makes an answer more pessimistic, never wrongly positive. Called from the spool's writers'
    threads, hence the lock.
    """

    def __init__(self, path: Path, size: int = LEDGER_SIZE) -> None:
        self.path, self.size = path, size
        self._lock = threading.Lock()
        self._outcomes: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        lines = 0
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    route, instance, sop_class, reason = json.loads(line)
                    self._put(str(route), str(instance), str(sop_class), int(reason))
                    lines += 1
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if lines > len(self._outcomes):  # compact: keep one line per remembered outcome
            self._rewrite()
        self._file = self._append()
        self._lines = len(self._outcomes)

    def _append(self) -> TextIO:
        return os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8")

    def _rewrite(self) -> None:
        """The remembered outcomes, one line each, replacing the file at once (a crash keeps the old one)."""
        temporary = self.path.with_suffix(".tmp")
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.writelines(json.dumps([r, i, c, x]) + "\n" for (r, i), (c, x) in self._outcomes.items())
        os.replace(temporary, self.path)

    def _put(self, route: str, instance: str, sop_class: str, reason: int) -> None:
        self._outcomes[(route, instance)] = (sop_class, reason)
        self._outcomes.move_to_end((route, instance))
        while len(self._outcomes) > self.size:
            self._outcomes.popitem(last=False)

    def record(self, route: str, instance: str, sop_class: str, reason: int) -> None:
        with self._lock:
            self._put(route, instance, sop_class, reason)
            self._file.write(json.dumps([route, instance, sop_class, reason]) + "\n")
            self._file.flush()
            self._lines += 1
            if self._lines > 2 * self.size:
                self._file.close()
                self._rewrite()
                self._file = self._append()
                self._lines = len(self._outcomes)

    def get(self, route: str, instance: str) -> tuple[str, int] | None:
        with self._lock:
            return self._outcomes.get((route, instance))

    def close(self) -> None:
        with self._lock:
            self._file.close()


class ReportChannel(Protocol):
    """An open association from the requester that accepted a Storage Commitment context."""

    requester: str
    route: str

    async def event_report(self, info: Dataset, event_type: int) -> None: ...


class CommitmentService:
    """Pending commitment requests of this router's accelerated routes, and their answers."""

    def __init__(
        self,
        state_dir: Path,
        spool: Spool,
        section: AccelerateSection,
        routes: Iterable[str],
        accepts: Callable[[str, str], bool | None] = lambda route, sop_class: None,
        audit: AuditLog | None = None,
    ) -> None:
        self.dir = state_dir / "commitment"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool = spool
        self.section = section
        self.routes = frozenset(routes)
        self.accepts = accepts  # (route, SOP class) -> does the destination take it (None: not known)
        self.audit = audit
        self.requesters = {r.ae_title.strip(): r for r in section.commitment_requester}
        self.ledger = OutcomeLedger(state_dir / "commitment-outcomes.jsonl")
        self.pending: dict[str, PendingRequest] = {}
        self.channels: list[ReportChannel] = []
        self.reported = 0
        self.answers = {"committed": 0, "failures": 0}  # reports sent, by event type 1 / 2 (metrics)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        for path in sorted(self.dir.glob("*.json")):
            try:
                request = PendingRequest.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("commitment request %s unreadable, set aside: %s", path.name, exc)
                path.rename(path.with_suffix(".bad"))
                continue
            self.pending[request.key] = request
        if self.pending:
            log.info("%d storage commitment requests pending from before the restart", len(self.pending))

    # -- inputs ------------------------------------------------------------------------------------
    def spool_changed(self, entry: SpoolEntry) -> None:
        """The spool's hook (any thread): a near-route entry reached a final state."""
        if entry.route not in self.routes or entry.state not in (EntryState.DELIVERED, EntryState.DEAD):
            return
        reason = 0 if entry.state is EntryState.DELIVERED else failure_reason(entry)
        self.ledger.record(entry.route, entry.sop_instance_uid, entry.sop_class_uid, reason)
        self.wake()

    def wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    def accept(self, route: str, requester: str, info: Dataset) -> PendingRequest:
        """Take a commitment request (raises CommitmentRefused with the N-ACTION-RSP status)."""
        transaction, instances = parse_request(info, self.section.commitment_max_instances)
        request = PendingRequest(transaction, route, requester, time.time(), instances)
        if request.key not in self.pending and len(self.pending) >= self.section.commitment_max_pending:
            raise CommitmentRefused(
                ActionStatus.RESOURCE_LIMITATION,
                f"{len(self.pending)} commitment requests pending (commitment_max_pending)",
            )
        self._store(request)  # fsynced before the N-ACTION-RSP: the promise survives a restart
        self.pending[request.key] = request
        log.info(
            "storage commitment %s from %r for %r: %d instances; answered once the destination confirmed them",
            transaction,
            requester,
            route,
            len(instances),
        )
        self.wake()
        return request

    def attach(self, channel: ReportChannel) -> None:
        self.channels.append(channel)
        self.wake()

    def detach(self, channel: ReportChannel) -> None:
        with contextlib.suppress(ValueError):
            self.channels.remove(channel)

    # -- persistence -------------------------------------------------------------------------------
    def _store(self, request: PendingRequest) -> None:
        path = self.dir / f"{request.key}.json"
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(request.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_dir(self.dir)

    def _forget(self, request: PendingRequest) -> None:
        self.pending.pop(request.key, None)
        (self.dir / f"{request.key}.json").unlink(missing_ok=True)

    # -- answers -----------------------------------------------------------------------------------
    def spool_index(self) -> dict[tuple[str, str], SpoolEntry]:
        """(route, SOP Instance UID) -> entry for the near routes: one pass over the spool per cycle."""
        return {(e.route, e.sop_instance_uid): e for e in self.spool.entries() if e.route in self.routes}

    def evaluate(
        self, request: PendingRequest, now: float, index: dict[tuple[str, str], SpoolEntry] | None = None
    ) -> Answer | None:
        """The answer if every instance has a final outcome (or timed out), else None."""
        index = self.spool_index() if index is None else index
        in_spool = {i: index[(request.route, i)] for _, i in request.instances if (request.route, i) in index}
        expired = now - request.created > self.section.commitment_timeout_s
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        waiting = False
        seen = set(request.seen)
        for sop_class, instance in request.instances:
            known = self.ledger.get(request.route, instance)
            entry = in_spool.get(instance)
            if entry is not None and entry.state is not EntryState.DEAD:
                seen.add(instance)  # still on its way (or retried after a DEAD): wait for it
                if expired:
                    failed.append((sop_class, instance, Failure.PROCESSING_FAILURE))
                else:
                    waiting = True
            elif known is not None:
                stored_class, reason = known
                if stored_class != sop_class:
                    failed.append((sop_class, instance, Failure.CLASS_INSTANCE_CONFLICT))
                elif reason == 0:
                    committed.append((sop_class, instance))
                else:
                    failed.append((sop_class, instance, reason))
            elif entry is not None:  # DEAD, and the ledger forgot it
                failed.append((sop_class, instance, failure_reason(entry)))
            elif instance in seen:  # it was on its way; its outcome is no longer remembered
                failed.append((sop_class, instance, Failure.PROCESSING_FAILURE))
            elif self.accepts(request.route, sop_class) is False:  # the destination does not take the class:
                failed.append((sop_class, instance, Failure.SOP_CLASS_NOT_SUPPORTED))  # router A refused it
            else:  # never received on this route
                failed.append((sop_class, instance, Failure.NO_SUCH_OBJECT_INSTANCE))
        if len(seen) != len(request.seen):
            request.seen = sorted(seen)
            self._store(request)
        return None if waiting else Answer(committed, failed)

    async def run(self) -> None:
        """Answer pending requests as their instances settle; woken by the spool, polled every second."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            index = await asyncio.to_thread(self.spool_index) if self.pending else {}
            for request in list(self.pending.values()):
                try:
                    await self._settle(request, index)
                except Exception:  # one bad request must not stop the others' answers
                    log.exception("storage commitment %s: answer failed", request.transaction_uid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _settle(self, request: PendingRequest, index: dict[tuple[str, str], SpoolEntry]) -> None:
        now = time.time()
        answer = await asyncio.to_thread(self.evaluate, request, now, index)
        if answer is None:
            return
        info = answer.event_information(request.transaction_uid)
        for channel in list(self.channels):
            if channel.requester == request.requester and channel.route == request.route:
                try:
                    await channel.event_report(info, answer.event_type)
                except (ConnectionError, OSError) as exc:
                    self.detach(channel)  # it does not take reports: not tried again
                    log.warning("storage commitment %s: open association failed: %s", request.transaction_uid, exc)
                    continue
                self._answered(request, answer, "on an open association")
                return
        address = self.requesters.get(request.requester)
        if address is None or now < request.next_attempt:
            return  # waits for the requester's next association (or the next attempt)
        try:
            await asyncio.to_thread(send_event_report, address.host, address.port, request, info, answer.event_type)
        except CommitmentError as exc:
            request.attempts += 1
            request.next_attempt = now + min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(request.attempts - 1, 16))
            request.last_error = str(exc)[:512]
            self._store(request)
            log.warning("storage commitment %s: %s; tried again later", request.transaction_uid, exc)
            return
        self._answered(request, answer, f"on a new association to {address.host}:{address.port}")

    def _answered(self, request: PendingRequest, answer: Answer, how: str) -> None:
        self._forget(request)
        self.reported += 1
        self.answers["failures" if answer.failed else "committed"] += 1
        if self.audit is not None:  # what the sender was told about its instances, and when
            self.audit.event(
                "accel_commitment",
                "failure" if answer.failed else "success",
                local_ae=request.route,
                calling_ae=request.requester,
                transaction_uid=request.transaction_uid,
                committed=len(answer.committed),
                failed=len(answer.failed),
                how=how,
                seconds=round(time.time() - request.created, 3),
            )
        log.info(
            "storage commitment %s answered to %r %s: %d committed, %d failed%s",
            request.transaction_uid,
            request.requester,
            how,
            len(answer.committed),
            len(answer.failed),
            "".join(f"; {i} failed 0x{r:04X}" for _, i, r in answer.failed[:5]),
        )

    def status(self) -> dict[str, object]:
        return {"pending": len(self.pending), "answered": self.reported}

    def close(self) -> None:
        self.ledger.close()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """`relay_router_accel_commitments_pending` and `..._reports_total{event}` on the router's /metrics."""
        register_commitment_metrics(registry, lambda: self)


class _CommitmentCollector(SourcedCollector["CommitmentService"]):
    def collect(self) -> Iterator[Metric]:
        service = self.source()
        yield GaugeMetricFamily(
            "relay_router_accel_commitments_pending",
            "Storage commitment requests waiting for their instances' outcomes (accelerated routes)",
            value=0 if service is None else len(service.pending),
        )
        reports = CounterMetricFamily(
            "relay_router_accel_commitment_reports",
            "Storage commitment N-EVENT-REPORTs sent, by event: committed (all) or failures (some failed)",
            labels=["event"],
        )
        for event in ("committed", "failures"):
            reports.add_metric([event], 0 if service is None else service.answers[event])
        yield reports


def register_commitment_metrics(registry: CollectorRegistry, service: Callable[[], CommitmentService | None]) -> None:
    """RouterMetrics registers the families at once (zeros); the running service replaces the source."""
    register_sourced(registry, _CommitmentCollector, service)


class CommitmentError(Exception):
    """The N-EVENT-REPORT could not be delivered on a new association."""


def send_event_report(host: str, port: int, request: PendingRequest, info: Dataset, event_type: int) -> None:
    """Role reversal (PS3.4 J.3.3): the router opens an association to the requester and sends the report."""
    from pynetdicom import AE, build_role

    ae = AE(ae_title=request.route)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, list(TRANSFER_SYNTAXES))
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate(host, port, ae_title=request.requester, ext_neg=[role])
    if not assoc.is_established:
        raise CommitmentError(f"association to {request.requester!r} at {host}:{port} not established")
    try:
        status, _ = assoc.send_n_event_report(
            info, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
        )
        code = int(getattr(status, "Status", -1)) if status else -1
        if code != 0:
            raise CommitmentError(f"{request.requester!r} answered the N-EVENT-REPORT with {code:#06x}")
    finally:
        if assoc.is_established:
            assoc.release()
