"""What happened to one association: the record behind logs, audit, metrics and status.

The result and the reason are set where the decision is made (`Outcome.refuse`,
`Outcome.fail`), as enum members; metrics labels, audit outcomes and log levels
are read from them, never parsed out of `detail`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from relay_common.errors import Reason, RelayError


class Result(StrEnum):
    """The state an association ended in (metric label values: never rename)."""

    PENDING = "pending"
    ESTABLISHED = "established"  # A-ASSOCIATE-AC passed; still running
    RELEASED = "released"  # A-RELEASE completed
    CLOSED = "closed"  # the streams ended after establishment without an abort
    REJECTED = "rejected"  # A-ASSOCIATE-RJ to the calling device (by the relay or the called device)
    REFUSED = "refused"  # the bridge or the destination router refused the stream
    ABORTED = "aborted"


FINAL_RESULTS = (Result.RELEASED, Result.CLOSED, Result.ABORTED, Result.REJECTED, Result.REFUSED)


@dataclass
class Outcome:
    """What happened to an association, for logs, audit and the status command."""

    association_id: str
    direction: str  # "outbound" (local device called out) or "inbound"
    site: str
    calling_ae: str = ""
    called_ae: str = ""
    result: Result = Result.PENDING
    detail: str = ""  # human text for the local log; never parsed
    bytes_to_remote: int = 0
    bytes_to_local: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None
    abstract_syntaxes: tuple[str, ...] = ()
    established: float | None = None  # when the A-ASSOCIATE-AC passed (setup latency metric)
    reason: Reason | None = None  # why the relay refused, rejected or aborted (None: it did not)
    security: bool = False  # a security alert: audited as "alert"
    # The studies that crossed (relay_router.studytap.StudyTap.summary()): audit field "studies".
    studies: list[dict[str, object]] = field(default_factory=list)
    # The C-FIND identifiers sent (StudyTap.queries): audit field "queries", DICOM Query messages.
    queries: list[dict[str, object]] = field(default_factory=list)
    remote_detail: str = ""  # what Close.detail says instead of `detail` (RelayError.remote_detail)
    address: str = ""  # outbound: the calling device's IP address

    def refuse(self, result: Result, reason: Reason, detail: str, *, security: bool = False) -> None:
        """Record a refusal or rejection decided by the relay (or by the called device)."""
        if result is Result.ABORTED and self.result is Result.ABORTED and self.reason is not None:
            # The first cause of an abort is the one recorded: what the peers do while it unwinds (a
            # late PDU, their own abort) must not replace, say, a security alert with a protocol error.
            return
        self.result, self.reason, self.detail = result, reason, detail
        self.remote_detail = ""
        self.security = self.security or security or reason is Reason.SECURITY

    def fail(self, error: RelayError) -> None:
        """Record an abort caused by one of the relay's own typed errors."""
        self.refuse(Result.ABORTED, error.reason, error.detail, security=error.security)
        self.remote_detail = error.remote_detail or ""

    @property
    def close_detail(self) -> str:
        """The text sent to the other router in Close (it crosses the bridge): a fixed text of
        relay_router.close_codes or nothing, never `detail` (which may hold what the bridge must not see)."""
        return self.remote_detail

    @property
    def succeeded(self) -> bool:
        return self.result in (Result.RELEASED, Result.CLOSED)

    @property
    def audit_outcome(self) -> str:
        """The audit trail's outcome field: "alert" for security events, else success or failure."""
        if self.security:
            return "alert"
        return "success" if self.succeeded else "failure"
