"""The hospital's ADT feed over MLLP (IHE ITI-8 merge): ADT^A40 (or A34, A18) updates the cross-reference table.

An A40 (merge patient - patient identifier list) says that the prior identifier in MRG-1 is
now the surviving identifier in PID-3. The links of the prior identifier move to the
survivor (xref.XrefTable.merge), cached lookups of both are forgotten, and the merge is
audited. Each message gets an HL7 acknowledgement (original mode, HL7 v2.5 2.9.2):

  AA  applied (or an ADT event other than A40: accepted, nothing to do)
  AE  an A40 we cannot apply: no PID-3/MRG-1 identifier of our domain, an invalid identifier,
      a merge across domains; ERR names the field and an HL7 table 0357 code
  AR  not an ADT message, or not parseable (ERR 200/100)

Senders are limited to `[identity] adt_allow`, connections and message sizes are bounded, and
one bad message or connection never stops the listener.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hl7
from hl7.mllp import InvalidBlockError, start_hl7_server

from relay_router.identity import hl7util
from relay_router.identity.model import IdentityError, PatientRef
from relay_router.identity.pix import authority_matches
from relay_router.identity.xref import XrefError, XrefTable

if TYPE_CHECKING:
    from relay_common.audit import AuditLog
    from relay_router.identity.config import DomainSection
    from relay_router.identity.resolver import Resolver

log = logging.getLogger("relay_router.identity.adt")

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_CONNECTIONS = 16
IDLE_TIMEOUT_S = 600.0
MAX_MERGES_PER_MESSAGE = 100
# A40 (merge patient - patient identifier list, IHE ITI-8); A18 and A34, the older merge events that
# feeds still send, carry the prior identifier in MRG-1 the same way.
MERGE_EVENTS = frozenset({"A40", "A34", "A18"})


@dataclass(frozen=True)
class Outcome:
    """The acknowledgement of one message: code, and for AE/AR the error's location, HL7 0357 code and text."""

    ack: str  # AA, AE, AR
    location: str = ""  # ERR-2, e.g. "MRG^1^1"
    code: str = ""  # HL7 table 0357: 100 segment sequence, 101 required field missing, 102 data type,
    #                 200 unsupported message type, 204 unknown key identifier, 207 application internal error
    text: str = ""


class AdtProcessor:
    """Sans-socket core: one parsed message in, the outcome out (and the table updated)."""

    def __init__(
        self,
        table: XrefTable,
        own: DomainSection,
        *,
        resolver: Resolver | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.table = table
        self.own = own
        self.resolver = resolver
        self.audit = audit
        self.acks: Counter[str] = Counter()  # messages answered, by acknowledgement code (metrics)

    async def handle(self, message: Any, peer: str) -> Outcome:
        outcome = await self._handle(message, peer)
        self.acks[outcome.ack] += 1
        return outcome

    async def _handle(self, message: Any, peer: str) -> Outcome:
        msh = hl7util.segment(message, "MSH")
        kind, event = (hl7util.value(msh, 9, 1, 1), hl7util.value(msh, 9, 1, 2)) if msh is not None else (None, None)
        if kind != "ADT":
            return Outcome("AR", "MSH^1^9", "200", f"unsupported message type {kind or '(none)'}; this is an ADT feed")
        if event not in MERGE_EVENTS:
            return Outcome("AA")  # other ADT events: accepted, nothing for the cross-reference to do
        pairs, problem = self._merges(message)
        if problem is not None:
            self._audit_failure(peer, problem)
            return problem
        for prior, survivor in pairs:
            try:
                moved = await asyncio.to_thread(self.table.merge, prior, survivor, origin="a40")
            except XrefError as exc:
                outcome = Outcome("AE", "MRG^1^1", "204", str(exc))
                self._audit_failure(peer, outcome)
                return outcome
            except Exception as exc:  # the database: report it, keep serving
                log.exception("cannot apply the merge of %s into %s", prior, survivor)
                outcome = Outcome("AE", "", "207", f"cannot update the cross-reference ({exc.__class__.__name__})")
                self._audit_failure(peer, outcome)
                return outcome
            if self.resolver is not None:
                self.resolver.invalidate(prior, survivor)
            log.info("ADT A40 from %s: %s merged into %s (%d links moved)", peer, prior, survivor, moved)
            if self.audit is not None:
                self.audit.event(
                    "identity_merge", "success", source=peer, prior_id=prior.id, patient_id=survivor.id,
                    issuer=survivor.issuer, links_moved=moved,
                )  # fmt: skip
        return Outcome("AA")

    def _merges(self, message: Any) -> tuple[list[tuple[PatientRef, PatientRef]], Outcome | None]:
        """(prior, survivor) for each PID/MRG pair, in order; or the AE outcome of the first bad one."""
        pairs: list[tuple[PatientRef, PatientRef]] = []
        survivor_segment: Any = None
        for segment in list(message)[: 4 * MAX_MERGES_PER_MESSAGE]:
            name = str(segment[0]) if len(segment) else ""
            if name == "PID":
                survivor_segment = segment
            elif name == "MRG":
                if survivor_segment is None:
                    return [], Outcome("AE", "PID", "100", "MRG without a PID segment before it")
                survivor, problem = self._own_identifier(survivor_segment, 3, "PID^1^3")
                if problem is not None:
                    return [], problem
                prior, problem = self._own_identifier(segment, 1, "MRG^1^1")
                if problem is not None:
                    return [], problem
                assert survivor is not None and prior is not None
                pairs.append((prior, survivor))
                survivor_segment = None
        if not pairs:
            return [], Outcome("AE", "MRG^1^1", "101", "an A40 needs a PID segment followed by an MRG segment")
        return pairs, None

    def _own_identifier(self, segment: Any, field: int, where: str) -> tuple[PatientRef | None, Outcome | None]:
        """The identifier of our domain in a CX list (one without an assigning authority is ours: it is our feed)."""
        candidates: set[str] = set()
        for repeat in range(1, 51):
            patient_id = hl7util.value(segment, field, repeat, 1)
            if patient_id is None:
                break
            namespace = hl7util.value(segment, field, repeat, 4, 1) or ""
            universal_id = hl7util.value(segment, field, repeat, 4, 2) or ""
            if patient_id and (
                (not namespace and not universal_id) or authority_matches(namespace, universal_id, self.own)
            ):
                candidates.add(patient_id)
        if not candidates:
            return None, Outcome("AE", where, "204", f"no identifier of domain {self.own.issuer} in {where}")
        if len(candidates) > 1:
            return None, Outcome("AE", where, "204", f"{len(candidates)} identifiers of domain {self.own.issuer}")
        try:
            return PatientRef(
                candidates.pop(), self.own.issuer, self.own.universal_id, self.own.universal_id_type
            ), None
        except IdentityError as exc:
            return None, Outcome("AE", where, "102", str(exc))

    def _audit_failure(self, peer: str, outcome: Outcome) -> None:
        log.warning("ADT A40 from %s not applied: %s", peer, outcome.text)
        if self.audit is not None:
            self.audit.event("identity_merge", "failure", source=peer, detail=outcome.text, code=outcome.code)


def acknowledgement(message: Any | None, outcome: Outcome, *, application: str = "DICOM_RELAY") -> str:
    """The ACK for `message` (python-hl7's create_ack), with ERR for AE/AR; a bare ACK when it could not be parsed."""
    e = hl7util.escape
    if message is not None and hl7util.segment(message, "MSH") is not None:
        try:
            ack = str(message.create_ack(outcome.ack, message_id=hl7util.control_id(), application=application))
        except (IndexError, KeyError, TypeError, ValueError):
            ack = ""
    else:
        ack = ""
    if not ack:
        ack = (
            f"MSH|^~\\&|{e(application)}||||{hl7util.timestamp()}||ACK|{hl7util.control_id()}|P|2.5\rMSA|{outcome.ack}|"
        )
    segments = ack.rstrip("\r").split("\r")
    if outcome.text and segments[-1].startswith("MSA"):
        segments[-1] += f"|{e(outcome.text[:80])}"  # MSA-3 text (kept for v2.3 receivers)
    if outcome.code:
        location = "^".join(e(x) for x in outcome.location.split("^")) if outcome.location else ""
        segments.append(f"ERR||{location}|{outcome.code}^^HL70357|E||||{e(outcome.text[:200])}")
    return "\r".join(segments) + "\r"


class AdtListener:
    """The MLLP server; owns every connection task it starts."""

    def __init__(
        self,
        processor: AdtProcessor,
        *,
        host: str,
        port: int,
        allow: list[str],
        tls: ssl.SSLContext | None = None,
        on_message: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.processor = processor
        self.host, self.port = host, port
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.tls = tls
        self.on_message = on_message
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await start_hl7_server(
            self._accept, self.host, self.port, limit=MAX_MESSAGE_BYTES, encoding="utf-8", ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("ADT feed listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: Any, writer: Any) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        address = str(peer[0])
        try:
            allowed = any(ipaddress.ip_address(address.split("%")[0]) in net for net in self.allow)
        except ValueError:
            allowed = False
        if not allowed or len(self._tasks) >= MAX_CONNECTIONS:
            log.warning(
                "ADT feed: connection from %s refused (%s)", address, "not in adt_allow" if not allowed else "busy"
            )
            if self.processor.audit is not None and not allowed:
                self.processor.audit.event("identity_feed_refused", "failure", source=address, reason="not-allowed")
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer, f"{address}:{peer[1]}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: Any, writer: Any, peer: str) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT_S):
                        block = await reader.readblock()
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except (ValueError, InvalidBlockError) as exc:  # too large, or not MLLP framing: cannot resync
                    log.warning("ADT feed %s: %s; closing the connection", peer, exc)
                    writer.writeblock(acknowledgement(None, Outcome("AR", "", "100", "bad MLLP block")).encode())
                    await writer.drain()
                    return
                message, outcome = self._parse(block)
                if outcome is None:
                    try:
                        outcome = await self.processor.handle(message, peer)
                    except Exception as exc:  # one bad message never stops the feed
                        log.exception("ADT feed %s: message failed", peer)
                        outcome = Outcome("AE", "", "207", exc.__class__.__name__)
                        self.processor.acks[outcome.ack] += 1
                else:
                    self.processor.acks[outcome.ack] += 1
                writer.writeblock(acknowledgement(message, outcome).encode("ascii", "replace"))
                await writer.drain()
                if self.on_message is not None:
                    self.on_message(outcome)
        except ConnectionError:
            return
        finally:
            writer.close()

    @staticmethod
    def _parse(block: bytes) -> tuple[Any | None, Outcome | None]:
        try:
            text = block.decode("utf-8")
            message = hl7.parse(text)
            hl7util.segment(message, "MSH")
        except Exception as exc:  # not UTF-8, not HL7
            return None, Outcome("AR", "MSH", "100", f"not an HL7 v2 message ({exc.__class__.__name__})")
        if hl7util.segment(message, "MSH") is None:
            return None, Outcome("AR", "MSH", "100", "no MSH segment")
        return message, None
