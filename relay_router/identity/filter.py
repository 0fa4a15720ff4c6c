"""The identity filter on the cleartext PDU stream of one association at a router (issue 14).

Only routes with ``patient_identity = true`` have one; every other association is relayed
as it always was. The filter sits where the bytes are cleartext: on what the router sends
to the other router (before sealing) and on what it sends to the local device (after
opening). It splits the stream into PDUs, feeds the P-DATA-TF PDUs to the DIMSE layer
(:class:`~relay_router.dimse.DimseReceiver`) to find message boundaries and command sets,
and picks the messages to coerce (:func:`classify`):

==================  =====================================  ==================================
leaving this site   C-FIND-RQ, C-MOVE-RQ, C-GET-RQ          our Patient ID -> the partner's
                    C-STORE-RQ, C-FIND-RSP data sets        our issuer added when missing
coming in           C-STORE-RQ, C-FIND-RSP data sets        the partner's ID -> ours
==================  =====================================  ==================================

A coerced message's data set goes through :class:`~relay_router.identity.stream.DatasetRewriter`
(Pixel Data streamed, never held) and is fragmented again within the receiver's maximum
PDU length (PS3.8 D.1). A PDU that holds nothing of a coerced message passes as it is.
A refused query never reaches the partner: the requestor gets a final response with no
match (PS3.4 C.4.1.3.1, C.4.2.3.1, C.4.3.3.1: Success, zero sub-operations).

The decisions are pure (:mod:`relay_router.identity.coerce`); the only awaits here are the
resolver's lookups. Every coercion, refusal, conflict and unmapped case is audited at the
router (the bridge never sees a patient identifier).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pydicom.dataset import Dataset

from relay_common.errors import Reason, RelayError
from relay_router.dimse import CommandReceived, DatasetComplete, DimseError, DimseReceiver, DimseSender
from relay_router.identity.coerce import (
    Coercion,
    Outcome,
    RouteIdentity,
    coerce_incoming,
    coerce_request,
    incoming_ref,
    request_ref,
    stamp_outgoing,
)
from relay_router.identity.model import Lookup, LookupOutcome, PatientRef
from relay_router.identity.stream import DatasetRewriter, HeadError
from relay_router.ul.pdu import PduType

__all__ = [
    "Flow",
    "IdentityFilter",
    "IdentityFilterError",
    "Kind",
    "Resolver",
    "classify",
    "lookup_identity",
    "record_coercion",
]

log = logging.getLogger("relay_router.identity")

C_STORE_RQ, C_GET_RQ, C_FIND_RQ, C_MOVE_RQ = 0x0001, 0x0010, 0x0020, 0x0021
C_FIND_RSP, C_GET_RSP, C_MOVE_RSP = 0x8020, 0x8010, 0x8021
_NAMES = {C_STORE_RQ: "C-STORE-RQ", C_GET_RQ: "C-GET-RQ", C_FIND_RQ: "C-FIND-RQ", C_MOVE_RQ: "C-MOVE-RQ"}
_NAMES |= {C_FIND_RSP: "C-FIND-RSP"}
_RESPONSE_TO = {C_FIND_RQ: C_FIND_RSP, C_GET_RQ: C_GET_RSP, C_MOVE_RQ: C_MOVE_RSP}
_PDU_HEADER = 6
MAX_HELD_PDU = 16 * 1024 * 1024
"""Largest PDU held whole on an identity route (a peer announcing no maximum could send more)."""


class IdentityFilterError(RelayError):
    """A message on an identity route cannot be coerced safely: the association is aborted."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason=Reason.PROTOCOL)


class Resolver(Protocol):
    """relay_router.identity.resolver.Resolver, as the filter uses it."""

    async def lookup(
        self, ref: PatientRef, target: str, *, dataset: Dataset | None = None, context: Mapping[str, str] | None = None
    ) -> Lookup: ...


class Flow(Enum):
    """Which way the bytes go, seen from this router."""

    LEAVING = "leaving"  # to the other router (this site's data and requests)
    ARRIVING = "arriving"  # to the local device (the partner's data and answers)


class Kind(Enum):
    PASS = "pass"  # relayed as it is
    REQUEST = "request"  # a query/retrieve identifier for the partner
    STAMP = "stamp"  # a data set leaving this site
    INCOMING = "incoming"  # a data set from the partner


def classify(flow: Flow, command_field: int, has_dataset: bool) -> Kind:
    """Which messages the filter rewrites (see the table in the module docstring)."""
    if not has_dataset:
        return Kind.PASS
    if flow is Flow.LEAVING:
        if command_field in (C_FIND_RQ, C_MOVE_RQ, C_GET_RQ):
            return Kind.REQUEST
        if command_field in (C_STORE_RQ, C_FIND_RSP):
            return Kind.STAMP
        return Kind.PASS
    return Kind.INCOMING if command_field in (C_STORE_RQ, C_FIND_RSP) else Kind.PASS


@dataclass
class _Message:
    """One DIMSE message flowing through the filter."""

    context_id: int
    kind: Kind | None = None  # None until its command set is complete
    command: Dataset | None = None
    command_bytes: bytearray = field(default_factory=bytearray)  # as received: re-sent unchanged
    rewriter: DatasetRewriter | None = None
    refused: bool = False
    out: bytearray = field(default_factory=bytearray)  # data set bytes not yet cut into a fragment


@dataclass
class _Pdv:
    context_id: int
    control: int
    fragment: bytes
    message: _Message


@dataclass
class _HeldPdu:
    raw: bytes
    pdvs: list[_Pdv]


class _Direction:
    """One direction's state: partial PDU, DIMSE receiver, PDUs waiting for their message's command."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.buffer = bytearray()
        self.receiver: DimseReceiver | None = None
        self.current: _Message | None = None
        self.held: deque[_HeldPdu] = deque()
        self.held_bytes = 0
        self.lock = asyncio.Lock()


class IdentityFilter:
    """Coerce the patient identity of one association's DIMSE messages (see the module docstring).

    ``contexts`` gives the accepted presentation contexts (ID -> (abstract syntax, transfer
    syntax)) once the association is established; ``max_pdu(flow)`` the Maximum Length the
    receiver of that flow announced (0 = unlimited); ``audit`` records one event.
    """

    def __init__(
        self,
        route: RouteIdentity,
        resolver: Resolver,
        *,
        contexts: Callable[[], Mapping[int, tuple[str, str]] | None],
        max_pdu: Callable[[Flow], int],
        audit: Callable[..., Any],
        association_id: str = "",
        max_held: int = MAX_HELD_PDU,
        counts: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.route = route
        self.max_held = max_held
        self.resolver = resolver
        self._contexts = contexts
        self._max_pdu = max_pdu
        self._audit = audit
        self.association_id = association_id
        self._directions = {flow: _Direction(flow) for flow in Flow}
        #: Coercions by (flow, outcome); the router's wiring shares one dict for its metrics.
        self.counts: dict[tuple[str, str], int] = {} if counts is None else counts

    async def process(self, flow: Flow, data: bytes) -> list[tuple[Flow, bytes]]:
        """Bytes the relay would send along ``flow``; returns what to send instead, and where.

        A refused query yields its answer along the other flow (back to the requestor).
        """
        direction = self._directions[flow]
        async with direction.lock:  # both pumps may send the same way (data, and an abort)
            return await self._process(direction, data)

    async def _process(self, direction: _Direction, data: bytes) -> list[tuple[Flow, bytes]]:
        flow = direction.flow
        buffer = direction.buffer
        buffer += data
        out: list[tuple[Flow, bytes]] = []
        pos = 0  # whole PDUs are cut from here; the buffer is trimmed once, not once per PDU
        try:
            while len(buffer) - pos >= _PDU_HEADER:
                length = int.from_bytes(buffer[pos + 2 : pos + 6], "big")
                if length > self.max_held:
                    raise IdentityFilterError(
                        f"a PDU of {length} bytes on an identity route (at most {self.max_held} are held to coerce)"
                    )
                end = pos + _PDU_HEADER + length
                if len(buffer) < end:
                    break
                pdu = bytes(buffer[pos:end])
                pos = end
                if pdu[0] != PduType.P_DATA_TF:
                    self._drop_held(direction)
                    out.append((flow, pdu))  # association control PDUs pass untouched
                    continue
                await self._pdata(direction, pdu, out)
        finally:
            del buffer[:pos]
        return out

    def _drop_held(self, direction: _Direction) -> None:
        """A control PDU while a command set is incomplete (an abort, or a release that breaks PS3.8
        E.1): the unfinished message can never be delivered, so its PDUs are dropped, not sent as
        they were (they may hold the uncoerced end of the message before it)."""
        if direction.held:
            log.info(
                "dropped %d PDUs of an unfinished message", len(direction.held), extra={"assoc": self.association_id}
            )
        direction.held.clear()
        direction.held_bytes = 0

    # -- P-DATA ---------------------------------------------------------------------------------

    async def _pdata(self, direction: _Direction, pdu: bytes, out: list[tuple[Flow, bytes]]) -> None:
        if direction.receiver is None:
            contexts = self._contexts()
            if not contexts:
                raise IdentityFilterError("P-DATA before the association was established")
            direction.receiver = DimseReceiver(contexts)
        held = _HeldPdu(pdu, [])
        try:
            for context_id, control, fragment in _pdvs(pdu):
                if direction.current is None:
                    direction.current = _Message(context_id)
                message = direction.current
                held.pdvs.append(_Pdv(context_id, control, fragment, message))
                if control & 1:
                    message.command_bytes += fragment  # bounded by the receiver's max_command_length
                for event in direction.receiver.receive_pdv(context_id, control, fragment):
                    if isinstance(event, CommandReceived):
                        message.command = event.command
                        message.kind = classify(direction.flow, event.command_field, event.has_dataset)
                        if message.kind is not Kind.PASS:
                            syntax = direction.receiver.contexts[context_id][1]
                            message.rewriter = DatasetRewriter(syntax)
                        if not event.has_dataset:
                            direction.current = None
                    elif isinstance(event, DatasetComplete):
                        direction.current = None
        except DimseError as exc:
            raise IdentityFilterError(f"cannot follow the DIMSE messages: {exc.detail}") from None
        direction.held.append(held)
        direction.held_bytes += len(pdu)
        if direction.held_bytes > self.max_held:  # e.g. endless empty command fragments
            raise IdentityFilterError(f"more than {self.max_held} bytes of PDUs before a command set completed")
        while direction.held and all(pdv.message.kind is not None for pdv in direction.held[0].pdvs):
            released = direction.held.popleft()
            direction.held_bytes -= len(released.raw)
            await self._release(direction, released, out)

    async def _release(self, direction: _Direction, held: _HeldPdu, out: list[tuple[Flow, bytes]]) -> None:
        """Send a PDU whose messages are all classified: as it is, or with its coerced messages rewritten."""
        flow = direction.flow
        if all(pdv.message.kind is Kind.PASS for pdv in held.pdvs):
            out.append((flow, held.raw))
            return
        sender = DimseSender(self._max_pdu(flow))
        for pdv in held.pdvs:
            message = pdv.message
            if message.kind is Kind.PASS:
                out.append((flow, _pdu(pdv.context_id, pdv.control, pdv.fragment)))
            elif not pdv.control & 1:  # a data set fragment of a coerced message
                await self._dataset_fragment(direction, message, pdv, sender, out)

    async def _dataset_fragment(
        self, direction: _Direction, message: _Message, pdv: _Pdv, sender: DimseSender, out: list[tuple[Flow, bytes]]
    ) -> None:
        rewriter = message.rewriter
        assert rewriter is not None and message.command is not None
        last = bool(pdv.control & 2)
        try:
            data = rewriter.feed(pdv.fragment)
            if last:
                rewriter.mark_end()
            if rewriter.head_ready:
                coercion = await self._decide(direction.flow, message, rewriter.identity or Dataset())
                if coercion.outcome is Outcome.REFUSED:
                    message.refused = True
                    back = _other(direction.flow)  # to the requestor, within its own Maximum Length
                    out += [(back, pdu) for pdu in self._no_match(message, DimseSender(self._max_pdu(back)))]
                else:  # the command set as it came (a C-STORE-RQ or C-FIND-RQ/RSP command is not changed)
                    out += [(direction.flow, pdu) for pdu in _command_pdus(message, sender.fragment_size & ~1)]
                data += rewriter.apply(coercion.edits)
            if last:
                data += rewriter.finish()
        except HeadError as exc:
            raise IdentityFilterError(f"cannot rewrite a data set's patient identity: {exc}") from None
        if message.refused:
            return
        message.out += data
        size = sender.fragment_size & ~1  # DCMTK refuses odd fragments; data sets have even lengths
        cut = 0
        with memoryview(message.out) as view:
            while len(message.out) - cut > size:
                out.append((direction.flow, _pdu(message.context_id, 0, view[cut : cut + size])))
                cut += size
            if last:
                out.append((direction.flow, _pdu(message.context_id, 2, view[cut:])))
                cut = len(message.out)
        del message.out[:cut]

    def _no_match(self, message: _Message, sender: DimseSender) -> list[bytes]:
        """The final answer to a refused query: Success, no match, no sub-operations."""
        assert message.command is not None
        request = message.command
        answer = Dataset()
        answer.AffectedSOPClassUID = request.get("AffectedSOPClassUID", "")
        answer.CommandField = _RESPONSE_TO[int(request.CommandField)]
        answer.MessageIDBeingRespondedTo = int(request.MessageID)
        answer.CommandDataSetType = 0x0101
        answer.Status = 0x0000
        if answer.CommandField != C_FIND_RSP:
            answer.NumberOfCompletedSuboperations = 0
            answer.NumberOfFailedSuboperations = 0
            answer.NumberOfWarningSuboperations = 0
        return list(sender.command(message.context_id, answer))

    # -- decisions ----------------------------------------------------------------------------------

    async def _decide(self, flow: Flow, message: _Message, identity: Dataset) -> Coercion:
        assert message.command is not None
        route = self.route
        if message.kind is Kind.STAMP:
            coercion = stamp_outgoing(identity, route)
        elif message.kind is Kind.REQUEST:
            ref = request_ref(identity, route)
            if isinstance(ref, PatientRef):
                coercion = coerce_request(identity, route, ref, await self._lookup(ref, route.partner_issuer, identity))
            else:
                coercion = ref
                if coercion.outcome is Outcome.CONFLICT:  # an identifier we cannot map: nothing may match
                    coercion = Coercion(Outcome.REFUSED, original=coercion.original, detail=coercion.detail)
        else:
            ref = incoming_ref(identity, route)
            if isinstance(ref, PatientRef):
                coercion = coerce_incoming(identity, route, ref, await self._lookup(ref, route.local.issuer, identity))
            else:
                coercion = ref
        self._record(flow, message, coercion)
        return coercion

    async def _lookup(self, ref: PatientRef, target: str, identity: Dataset) -> Lookup:
        return await lookup_identity(self.resolver, ref, target, identity, self.association_id)

    def _record(self, flow: Flow, message: _Message, coercion: Coercion) -> None:
        assert message.command is not None
        command = message.command
        record_coercion(
            self._audit,
            self.counts,
            coercion,
            flow=flow,
            command_field=int(command.CommandField),
            sop_instance_uid=str(command.get("AffectedSOPInstanceUID", "")),
            association_id=self.association_id,
        )


async def lookup_identity(
    resolver: Resolver, ref: PatientRef, target: str, identity: Dataset, association_id: str
) -> Lookup:
    """The resolver's answer for `ref` in `target`'s domain; a source's failure is UNAVAILABLE, never a guess."""
    try:
        return await resolver.lookup(ref, target, dataset=identity, context={"association": association_id})
    except Exception as exc:  # a source's bug must not pass a data set unrelabelled as if mapped
        log.error("patient identity lookup failed: %s", exc, extra={"assoc": association_id})
        return Lookup(LookupOutcome.UNAVAILABLE, None, "")


def record_coercion(
    audit: Callable[..., Any],
    counts: dict[tuple[str, str], int],
    coercion: Coercion,
    *,
    flow: Flow,
    command_field: int,
    sop_instance_uid: str,
    association_id: str,
) -> None:
    """Count one coercion (the metrics) and audit it (`patient_identity`), on transparent and accelerated
    routes alike: one event shape wherever a data set's identity was decided."""
    key = (flow.value, coercion.outcome.value)
    counts[key] = counts.get(key, 0) + 1
    if coercion.outcome is Outcome.UNCHANGED and coercion.original is None:
        return  # no patient identifier at all: nothing to audit
    original, result = coercion.original, coercion.result
    failure = coercion.outcome in (Outcome.REFUSED, Outcome.CONFLICT, Outcome.UNAVAILABLE)
    audit(
        "patient_identity",
        "failure" if failure else "success",
        association=association_id,
        flow=flow.value,
        message=_NAMES.get(command_field, f"0x{command_field:04X}"),
        identity_outcome=coercion.outcome.value,
        sop_instance_uid=sop_instance_uid,
        original_patient_id=original.id if original else "",
        original_issuer=original.issuer if original else "",
        patient_id=result.id if result else "",
        issuer=result.issuer if result else "",
        source=coercion.source,
        detail=coercion.detail,
    )
    level = logging.WARNING if failure else logging.DEBUG  # the audit trail has every one
    log.log(
        level,
        "patient identity %s on %s (%s)",
        coercion.outcome.value,
        _NAMES.get(command_field, "?"),
        coercion.detail or flow.value,
        extra={"assoc": association_id},
    )


def _other(flow: Flow) -> Flow:
    return Flow.ARRIVING if flow is Flow.LEAVING else Flow.LEAVING


def _pdvs(pdu: bytes) -> list[tuple[int, int, bytes]]:
    """The PDV items of a P-DATA-TF PDU (PS3.8 9.3.5.1); lengths that do not fit are an error."""
    items: list[tuple[int, int, bytes]] = []
    pos, end = _PDU_HEADER, len(pdu)
    while pos < end:
        if pos + 6 > end:
            raise IdentityFilterError("a PDV item header does not fit its P-DATA-TF PDU (PS3.8 9.3.5.1)")
        length = int.from_bytes(pdu[pos : pos + 4], "big")
        if length < 2 or pos + 4 + length > end:
            raise IdentityFilterError(f"PDV item length {length} does not fit its P-DATA-TF PDU (PS3.8 9.3.5.1)")
        items.append((pdu[pos + 4], pdu[pos + 5], pdu[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    if not items:
        raise IdentityFilterError("a P-DATA-TF PDU without a PDV item (PS3.8 9.3.5)")
    return items


def _command_pdus(message: _Message, size: int) -> list[bytes]:
    """The received command set in fragments of at most `size` (control bit 0; bit 1 on the last)."""
    data = message.command_bytes
    cuts = list(range(0, len(data), size)) or [0]
    return [_pdu(message.context_id, 3 if start == cuts[-1] else 1, data[start : start + size]) for start in cuts]


def _pdu(context_id: int, control: int, fragment: bytes | bytearray | memoryview) -> bytes:
    item_length = len(fragment) + 2
    header = bytes((PduType.P_DATA_TF, 0)) + (item_length + 4).to_bytes(4, "big") + item_length.to_bytes(4, "big")
    return header + bytes((context_id, control)) + bytes(fragment)
