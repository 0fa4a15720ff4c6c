"""Per-association relay state machine (sans-IO).

A :class:`RelayConnection` sits between two byte streams of one association: the
DICOM device on this router's socket (:attr:`Side.LOCAL`) and the tunnel to the other
router (:attr:`Side.REMOTE`). Either may be the association-requestor. The driver
feeds received bytes with :meth:`~RelayConnection.receive` and performs the returned
actions in order (:class:`Send` = write these bytes to that side).

Transitions are an explicit table from (phase, role of the sending side, PDU type) to
a handler and the next phase, in the manner of h2; a triple missing from the table is
an unexpected PDU. The table follows the PS3.8 9.2 state machine as seen by a relay:

* AWAIT_RQ --RQ from requestor--> AWAIT_RQ_DECISION (driver: accept or reject)
* AWAIT_AC --AC from acceptor--> ESTABLISHED, --RJ--> CLOSED
* ESTABLISHED --RELEASE-RQ from either--> RELEASING (collision allowed)
* RELEASING --RELEASE-RP answering each RQ--> CLOSED
* any phase --A-ABORT from either--> CLOSED

Violations (PS3.8 9.2 AA-8) abort every involved side with an A-ABORT whose source is
the service-provider (2). The requestor side is involved from the start; the acceptor
side once the A-ASSOCIATE-RQ has been forwarded to it (or once it sends bytes).

Once :attr:`~RelayConnection.phase` is CLOSED the driver writes what it was given and
closes both transports (PS3.8 9.1.5, ARTIM). P-DATA is streamed, so an A-ABORT may
follow a partly relayed P-DATA-TF PDU that the peer cannot parse past: the transport
close is then what ends the association for that peer. Bytes received after CLOSED
are reported as :class:`ProtocolViolation` and otherwise ignored (PS3.8 Sta13).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from enum import Enum
from types import MappingProxyType

from relay_router.ul.actions import (
    Aborted,
    Action,
    AssociateRequested,
    Established,
    LocalProtocolError,
    ProtocolViolation,
    Rejected,
    Released,
    Send,
    Side,
)
from relay_router.ul.associate import (
    AssociateInfo,
    ae_fields,
    parse_associate,
    rewrite_ae_titles,
    with_abstract_syntaxes,
    with_ae_fields,
)
from relay_router.ul.contexts import answer_removed, reject_in_ac, remove_contexts, unconfirmed_receive_only
from relay_router.ul.framer import ControlPdu, FramerEvent, PduFramer
from relay_router.ul.pdu import (
    AbortReason,
    AbortSource,
    PduError,
    PduType,
    RejectResult,
    RejectSource,
    a_abort,
    a_associate_rj,
    parse_abort,
    parse_reject,
)

__all__ = [
    "Side",
    "Phase",
    "Send",
    "AssociateRequested",
    "Established",
    "Rejected",
    "Released",
    "Aborted",
    "ProtocolViolation",
    "Action",
    "LocalProtocolError",
    "RelayConnection",
]


class Phase(Enum):
    AWAIT_RQ = "await_rq"
    AWAIT_RQ_DECISION = "await_rq_decision"
    AWAIT_AC = "await_ac"
    ESTABLISHED = "established"
    RELEASING = "releasing"
    CLOSED = "closed"


class _Role(Enum):
    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


class _Out:
    """Collects actions, merging consecutive Sends to the same side into one."""

    __slots__ = ("actions", "_to", "_chunks")

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._to: Side | None = None
        self._chunks: list[bytes] = []

    def send(self, to: Side, data: bytes) -> None:
        if to is not self._to:
            self._flush()
            self._to = to
        self._chunks.append(data)

    def emit(self, action: Action) -> None:
        self._flush()
        self.actions.append(action)

    def done(self) -> list[Action]:
        self._flush()
        return self.actions

    def _flush(self) -> None:
        if self._chunks:
            assert self._to is not None
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self.actions.append(Send(self._to, data))
            self._chunks = []
        self._to = None


_Handler = Callable[["RelayConnection", Side, FramerEvent, _Out], "Phase | None"]

_P = Phase
_REQ, _ACC = _Role.REQUESTOR, _Role.ACCEPTOR
_T = PduType

# (phase, role of the sender, PDU type) -> (handler name, next phase). Handlers may
# override the next phase (release completion) or raise PduError (guards).
_TRANSITIONS: dict[tuple[Phase, _Role, PduType], tuple[str, Phase]] = {
    (_P.AWAIT_RQ, _REQ, _T.ASSOCIATE_RQ): ("_on_request", _P.AWAIT_RQ_DECISION),
    (_P.AWAIT_AC, _ACC, _T.ASSOCIATE_AC): ("_on_accept", _P.ESTABLISHED),
    (_P.AWAIT_AC, _ACC, _T.ASSOCIATE_RJ): ("_on_reject", _P.CLOSED),
    (_P.ESTABLISHED, _REQ, _T.P_DATA_TF): ("_on_pdata", _P.ESTABLISHED),
    (_P.ESTABLISHED, _ACC, _T.P_DATA_TF): ("_on_pdata", _P.ESTABLISHED),
    (_P.ESTABLISHED, _REQ, _T.RELEASE_RQ): ("_on_release_rq", _P.RELEASING),
    (_P.ESTABLISHED, _ACC, _T.RELEASE_RQ): ("_on_release_rq", _P.RELEASING),
    (_P.RELEASING, _REQ, _T.P_DATA_TF): ("_on_pdata", _P.RELEASING),
    (_P.RELEASING, _ACC, _T.P_DATA_TF): ("_on_pdata", _P.RELEASING),
    (_P.RELEASING, _REQ, _T.RELEASE_RQ): ("_on_release_rq", _P.RELEASING),  # release collision (PS3.8 7.2)
    (_P.RELEASING, _ACC, _T.RELEASE_RQ): ("_on_release_rq", _P.RELEASING),
    (_P.RELEASING, _REQ, _T.RELEASE_RP): ("_on_release_rp", _P.RELEASING),
    (_P.RELEASING, _ACC, _T.RELEASE_RP): ("_on_release_rp", _P.RELEASING),
}
for _phase in Phase:
    if _phase is not Phase.CLOSED:
        for _role in _Role:
            _TRANSITIONS[(_phase, _role, _T.ABORT)] = ("_on_abort", _P.CLOSED)

# PS3.8 Table 9-21: "rejected-transient", presentation-related service-provider, "temporary-congestion".
_RJ_ACCEPTOR_GONE = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION, 1)


class RelayConnection:
    """State of one relayed association; see the module docstring."""

    def __init__(self, requestor: Side, *, max_control_length: int = 1 << 20) -> None:
        self._requestor = requestor
        self._acceptor = requestor.other
        self._phase = Phase.AWAIT_RQ
        self._framers = {side: PduFramer(max_control_length) for side in Side}
        self._involved: set[Side] = {requestor}
        self._release_requested_by: set[Side] = set()
        self._rq_pdu: bytes | None = None
        self._original_ae_fields: bytes | None = None
        self._requested: AssociateInfo | None = None
        self._accepted: AssociateInfo | None = None
        self._removed: frozenset[int] = frozenset()
        self._receive_only: frozenset[int] = frozenset()
        self._received = dict.fromkeys(Side, 0)
        self._sent = dict.fromkeys(Side, 0)

    # ----------------------------------------------------------------- read-only state

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def requestor(self) -> Side:
        return self._requestor

    @property
    def acceptor(self) -> Side:
        return self._acceptor

    @property
    def requested(self) -> AssociateInfo | None:
        """The A-ASSOCIATE-RQ as the requestor sent it (original AE titles)."""
        return self._requested

    @property
    def request_pdu(self) -> bytes | None:
        """The A-ASSOCIATE-RQ PDU as the requestor sent it (for checks that read more than `requested`)."""
        return self._rq_pdu

    @property
    def accepted(self) -> AssociateInfo | None:
        """The A-ASSOCIATE-AC as forwarded to the requestor."""
        return self._accepted

    @property
    def bytes_received(self) -> Mapping[Side, int]:
        """Bytes received from each side."""
        return MappingProxyType(self._received)

    @property
    def bytes_sent(self) -> Mapping[Side, int]:
        """Bytes this connection asked the driver to send to each side."""
        return MappingProxyType(self._sent)

    def framer(self, side: Side) -> PduFramer:
        """The framer of bytes received from ``side`` (message counters, limits)."""
        return self._framers[side]

    # ----------------------------------------------------------------- inputs

    def receive(self, side: Side, data: bytes | bytearray | memoryview) -> list[Action]:
        """Bytes arrived from ``side``; return the actions they cause."""
        if not data:
            return []
        self._received[side] += len(data)
        if self._phase is Phase.CLOSED:
            # PS3.8 Sta13 ignores PDUs: the aborts or the release were already sent.
            return [ProtocolViolation(side, f"{len(data)} bytes from {side.name} after the association closed")]
        self._involved.add(side)
        out = _Out()
        error: PduError | None = None
        try:
            events = self._framers[side].feed(data)
        except PduError as exc:
            events, error = exc.events, exc
        try:
            for event in events:
                self._dispatch(side, event, out)
                if self._closed():
                    break  # whatever followed is ignored (PS3.8 Sta13)
        except PduError as exc:
            error = exc
        if error is not None and not self._closed():
            self._violation(side, error.detail, error.abort_reason, out)
        return self._count(out.done())

    def accept_request(
        self,
        *,
        called: str | None = None,
        calling: str | None = None,
        remove: Collection[int] = (),
        receive_only: Collection[int] = (),
    ) -> list[Action]:
        """Forward the A-ASSOCIATE-RQ to the acceptor, AE titles optionally rewritten.

        `remove`: presentation context IDs withheld from the acceptor (the services the
        calling site was not granted); the AC answers them as rejected under the same IDs
        (relay_router.ul.contexts). `receive_only`: IDs kept only if the acceptor confirms the
        requestor as SCP only (a C-GET's storage sub-operations, PS3.7 D.3.3.4); otherwise they are
        answered as rejected too. P-DATA on a context answered as rejected is a violation.
        ``ValueError`` for an invalid title, an unknown ID or
        every context removed (phase unchanged: reject the request instead). A no-op once
        CLOSED (the requestor may have gone while the driver was deciding).
        """
        if self._phase is Phase.CLOSED:
            return []
        self._expect_decision("accept_request")
        assert self._rq_pdu is not None and self._requested is not None
        removed = frozenset(remove)
        unknown = removed - {pc.id for pc in self._requested.presentation_contexts}
        if unknown:
            raise ValueError(f"presentation context IDs {sorted(unknown)} were not proposed")
        filtered = remove_contexts(self._rq_pdu, self._requested, removed)
        rewritten = rewrite_ae_titles(filtered, called=called, calling=calling)
        self._removed = removed
        self._receive_only = frozenset(receive_only) - removed
        self._original_ae_fields = ae_fields(self._rq_pdu)
        self._involved.add(self._acceptor)
        self._phase = Phase.AWAIT_AC
        return self._count([Send(self._acceptor, rewritten)])

    def reject_request(self, result: int, source: int, reason: int) -> list[Action]:
        """Answer the requestor with an A-ASSOCIATE-RJ (PS3.8 9.3.4); ``ValueError`` for undefined values."""
        if self._phase is Phase.CLOSED:
            return []
        self._expect_decision("reject_request")
        pdu = a_associate_rj(result, source, reason)
        self._phase = Phase.CLOSED
        return self._count([Send(self._requestor, pdu), Rejected(result, source, reason)])

    def peer_closed(self, side: Side, detail: str = "") -> list[Action]:
        """``side``'s transport ended (PS3.8 9.2 Evt17).

        Mid-PDU, that is a violation. If the acceptor goes before answering the RQ, the
        requestor gets A-ASSOCIATE-RJ (transient, presentation provider, temporary
        congestion); otherwise the other side, if involved, gets A-ABORT (provider, 0).
        """
        self._involved.discard(side)
        if self._phase is Phase.CLOSED:
            return []
        out = _Out()
        framer = self._framers[side]
        note = f": {detail}" if detail else ""
        if not framer.at_pdu_boundary and framer.failed is None:
            out.emit(
                ProtocolViolation(
                    side,
                    f"{side.name} closed its transport in the middle of a PDU ({framer.buffered} bytes buffered){note}",
                )
            )
        acceptor_gone = side is self._acceptor and self._phase in (Phase.AWAIT_RQ_DECISION, Phase.AWAIT_AC)
        if acceptor_gone and self._requestor in self._involved:
            out.send(self._requestor, a_associate_rj(*_RJ_ACCEPTOR_GONE))
            out.emit(Rejected(*_RJ_ACCEPTOR_GONE))
        else:
            if side.other in self._involved:
                out.send(side.other, a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED))
            out.emit(
                Aborted(
                    side,
                    AbortSource.SERVICE_PROVIDER,
                    AbortReason.NOT_SPECIFIED,
                    f"{side.name} closed its transport{note}",
                )
            )
        self._phase = Phase.CLOSED
        return self._count(out.done())

    def abort(self, reason: int = AbortReason.NOT_SPECIFIED) -> list[Action]:
        """Abort locally (shutdown, timeout): A-ABORT (service-provider) to every involved side."""
        if self._phase is Phase.CLOSED:
            return []
        pdu = a_abort(AbortSource.SERVICE_PROVIDER, reason)
        self._phase = Phase.CLOSED
        return self._count([Send(side, pdu) for side in Side if side in self._involved])

    # ----------------------------------------------------------------- internals

    def _closed(self) -> bool:
        return self._phase is Phase.CLOSED

    def _expect_decision(self, method: str) -> None:
        if self._phase is not Phase.AWAIT_RQ_DECISION:
            raise LocalProtocolError(f"{method}() needs phase AWAIT_RQ_DECISION, not {self._phase.name}")

    def _count(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Send):
                self._sent[action.to] += len(action.data)
        return actions

    def _role(self, side: Side) -> _Role:
        return _Role.REQUESTOR if side is self._requestor else _Role.ACCEPTOR

    def _dispatch(self, side: Side, event: FramerEvent, out: _Out) -> None:
        pdu_type = event.pdu_type if isinstance(event, ControlPdu) else PduType.P_DATA_TF
        role = self._role(side)
        entry = _TRANSITIONS.get((self._phase, role, pdu_type))
        if entry is None:
            raise PduError(
                f"unexpected {pdu_type.label} from {side.name} ({role.value}) in phase {self._phase.name}",
                abort_reason=AbortReason.UNEXPECTED_PDU,
            )
        handler_name, next_phase = entry
        handler: _Handler = getattr(RelayConnection, handler_name)
        override = handler(self, side, event, out)
        self._phase = override if override is not None else next_phase

    def _violation(self, side: Side, detail: str, reason: int, out: _Out) -> None:
        out.emit(ProtocolViolation(side, detail))
        pdu = a_abort(AbortSource.SERVICE_PROVIDER, reason)
        for target in (Side.LOCAL, Side.REMOTE):
            if target in self._involved:
                out.send(target, pdu)
        self._phase = Phase.CLOSED

    # Handlers: validate first, then emit (a guard that raises must leave `out` untouched).

    def _on_request(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        info = parse_associate(event.data)
        self._rq_pdu = event.data
        self._requested = info
        out.emit(AssociateRequested(info))
        return None

    def _on_accept(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        assert self._original_ae_fields is not None and self._requested is not None
        restored = with_ae_fields(event.data, self._original_ae_fields)  # PS3.8 Table 9-17: echo the RQ's
        restored = answer_removed(restored, self._requested, self._removed)
        unconfirmed = unconfirmed_receive_only(restored, self._requested, self._receive_only)
        restored = reject_in_ac(restored, unconfirmed)
        blocked = self._removed | unconfirmed
        self._framers[self._requestor].blocked_contexts = blocked
        self._framers[self._acceptor].blocked_contexts = blocked
        info = with_abstract_syntaxes(parse_associate(restored), self._requested)
        self._accepted = info
        # Each side may send P-DATA-TF PDUs up to what the *other* side announced (PS3.8 D.1).
        self._framers[self._requestor].max_pdata_length = info.max_pdu_length
        self._framers[self._acceptor].max_pdata_length = self._requested.max_pdu_length
        out.send(self._requestor, restored)
        out.emit(Established(info))
        return None

    def _on_reject(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        result, source, reason = parse_reject(event.data)
        out.send(self._requestor, event.data)
        out.emit(Rejected(result, source, reason))
        return None

    def _on_pdata(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        if side in self._release_requested_by:
            # The release requestor is in Sta7: it may receive P-DATA but not send it (PS3.8 Table 9-10).
            raise PduError(
                f"P-DATA-TF from {side.name} after its own A-RELEASE-RQ", abort_reason=AbortReason.UNEXPECTED_PDU
            )
        out.send(side.other, event.data)
        return None

    def _on_release_rq(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        if side in self._release_requested_by:
            raise PduError(f"second A-RELEASE-RQ from {side.name}", abort_reason=AbortReason.UNEXPECTED_PDU)
        self._release_requested_by.add(side)
        out.send(side.other, event.data)
        return None

    def _on_release_rp(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        if side.other not in self._release_requested_by:
            raise PduError(
                f"A-RELEASE-RP from {side.name}, which received no A-RELEASE-RQ",
                abort_reason=AbortReason.UNEXPECTED_PDU,
            )
        self._release_requested_by.discard(side.other)
        out.send(side.other, event.data)
        if self._release_requested_by:
            return Phase.RELEASING  # release collision: the other RP is still due
        out.emit(Released())
        return Phase.CLOSED

    def _on_abort(self, side: Side, event: FramerEvent, out: _Out) -> Phase | None:
        source, reason = parse_abort(event.data)
        if side.other in self._involved:
            out.send(side.other, event.data)
        out.emit(Aborted(side, source, reason))
        return None
