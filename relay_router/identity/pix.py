"""IHE PIX (ITI-9 PIX Query) over MLLP: QBP^Q23 to the hospital's PIX manager, RSP^K23 back.

Library: python-hl7 (`hl7`). It has an asyncio MLLP client and server (hl7.mllp) that fit the
router's event loop, with a bounded read buffer, and a parser and escaper for v2 messages.
hl7apy validates messages against the v2 profiles, but its MLLP server is thread-based and it
has no client; real PIX managers answer with small variations that strict validation rejects,
so we check what matters here ourselves: the answer quotes our control ID and query tag, the
acknowledgement and query response codes, and the identifiers of the wanted domain.

Answers (IHE ITI TF-2a 3.9.4.2.2.6):
  AA + QAK OK, PID-3 lists the identifiers in the requested domain  -> MAPPED (exactly one) or
                                                                       UNMAPPED (none, or several: never a guess)
  AA + QAK NF (patient known, no identifier in that domain)         -> UNMAPPED
  AE, ERR on QPD-3 (the patient's identifier is not known)          -> UNMAPPED
  AE, ERR on QPD-4 (the domain is not known), AR, anything else     -> SourceUnavailable (next source, audited)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from relay_router.identity import hl7util
from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef
from relay_router.identity.resolver import SourceUnavailable

if TYPE_CHECKING:
    from pydicom import Dataset

    from relay_router.identity.config import DomainSection, SourceSection

log = logging.getLogger("relay_router.identity.pix")

MAX_IDENTIFIERS = 100  # PID-3 repetitions read from one answer


def authority_matches(namespace: str, universal_id: str, domain: DomainSection) -> bool:
    """An HD (CX.4) names `domain` by its universal ID when both have one, else by its namespace."""
    if universal_id and domain.universal_id:
        return universal_id == domain.universal_id
    return bool(namespace) and namespace == (domain.hl7_namespace or domain.issuer)


def build_query(
    settings: SourceSection, ref: PatientRef, source: DomainSection, target: DomainSection, control_id: str, tag: str
) -> str:
    """The QBP^Q23 message (HL7 v2.5, ITI-9), every value escaped."""
    e = hl7util.escape
    authority = source.authority
    if ref.universal_id:  # the identifier carries its own universal ID: use it
        authority = f"{source.hl7_namespace or ref.issuer}&{ref.universal_id}&{ref.universal_id_type or 'ISO'}"
    segments = [
        "MSH|^~\\&|" + "|".join(
            e(v) for v in (settings.sending_application, settings.sending_facility,
                           settings.receiving_application, settings.receiving_facility)
        ) + f"|{hl7util.timestamp()}||QBP^Q23^QBP_Q21|{e(control_id)}|P|2.5",
        f"QPD|IHE PIX Query|{e(tag)}|{e(ref.id)}^^^{_hd(authority)}|^^^{_hd(target.authority)}",
        "RCP|I",
    ]  # fmt: skip
    return "\r".join(segments) + "\r"


def _hd(authority: str) -> str:
    """An HD whose subcomponents are joined by '&' (each escaped on its own)."""
    return "&".join(hl7util.escape(part) for part in authority.split("&"))


def read_answer(text: str, *, control_id: str, tag: str, target: DomainSection, source_name: str) -> Lookup:
    """Interpret an RSP^K23 (raises SourceUnavailable when it is not a usable answer to our query)."""
    try:
        message = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises several types on garbage
        raise SourceUnavailable("invalid-answer", f"not an HL7 message ({exc.__class__.__name__})") from None
    msh, msa = hl7util.segment(message, "MSH"), hl7util.segment(message, "MSA")
    if msh is None or msa is None:
        raise SourceUnavailable("invalid-answer", "no MSH or MSA segment")
    kind = (hl7util.value(msh, 9, 1, 1), hl7util.value(msh, 9, 1, 2))
    if kind != ("RSP", "K23") and kind[0] != "ACK":
        raise SourceUnavailable("invalid-answer", f"answered {kind[0]}^{kind[1]}, expected RSP^K23")
    if hl7util.value(msa, 2) != control_id:
        raise SourceUnavailable("invalid-answer", "the answer does not quote our message control ID")
    ack = hl7util.value(msa, 1) or ""
    qak = hl7util.segment(message, "QAK")
    status = (hl7util.value(qak, 2) or "") if qak is not None else ""
    if qak is not None and hl7util.value(qak, 1) != tag:
        raise SourceUnavailable("invalid-answer", "the answer does not quote our query tag")
    if ack == "AE":
        err = hl7util.segment(message, "ERR")
        # ERR-2 (v2.5): QPD^1^3 = the patient's identifier is unknown; QPD^1^4 = the domain is unknown.
        where = hl7util.value(err, 2, 1, 3) if err is not None else None
        if where == "3":
            return Lookup(LookupOutcome.UNMAPPED, None, source_name)
        raise SourceUnavailable("rejected", f"the manager answered AE (ERR on QPD-{where or '?'})")
    if ack != "AA":
        raise SourceUnavailable("rejected", f"the manager answered {ack or 'no acknowledgement code'}")
    if status == "NF":
        return Lookup(LookupOutcome.UNMAPPED, None, source_name)
    if status != "OK":
        raise SourceUnavailable("invalid-answer", f"query status {status or 'missing'}, expected OK or NF")
    found = set()
    for pid in message.segments("PID") if hl7util.segment(message, "PID") is not None else []:
        for repeat in range(1, MAX_IDENTIFIERS + 1):
            patient_id = hl7util.value(pid, 3, repeat, 1)
            if patient_id is None:
                break
            namespace = hl7util.value(pid, 3, repeat, 4, 1) or ""
            universal_id = hl7util.value(pid, 3, repeat, 4, 2) or ""
            if patient_id and authority_matches(namespace, universal_id, target):
                try:
                    found.add(PatientRef(patient_id, target.issuer, target.universal_id, target.universal_id_type))
                except IdentityError as exc:
                    raise SourceUnavailable("invalid-answer", f"PID-3: {exc}") from None
    if len(found) == 1:
        return Lookup(LookupOutcome.MAPPED, found.pop(), source_name)
    if len(found) > 1:
        log.warning("PIX manager %s: %d identifiers in domain %s: ambiguous, not mapped", source_name, len(found),
                    target.issuer)  # fmt: skip
    return Lookup(LookupOutcome.UNMAPPED, None, source_name)


class PixSource:
    """kind = "pix": one MLLP connection per query (PIX managers commonly close after each answer)."""

    def __init__(self, settings: SourceSection, domain_of: Callable[[str], DomainSection]) -> None:
        self.settings = settings
        self.name = settings.label
        self.timeout_s = settings.timeout_s
        self.domain_of = domain_of
        self._tls: ssl.SSLContext | None = hl7util.client_tls(settings.ca_file, settings.cert_file, settings.key_file)

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup:
        s = self.settings
        control_id, tag = hl7util.control_id(), hl7util.control_id()
        target_domain = self.domain_of(target)
        query = build_query(s, ref, self.domain_of(ref.issuer), target_domain, control_id, tag)
        try:
            reader, writer = await open_hl7_connection(
                s.host,
                s.port,
                limit=s.max_answer_bytes,
                encoding="utf-8",
                ssl=self._tls,
                server_hostname=(s.server_name or s.host) if self._tls else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise SourceUnavailable("connection-failed", f"{s.host}:{s.port}: {exc}") from None
        try:
            writer.writeblock(query.encode("ascii"))  # escaped: ASCII only
            await writer.drain()
            block = await reader.readblock()
            text = block.decode("utf-8")
        except asyncio.IncompleteReadError:
            raise SourceUnavailable(
                "connection-closed", "the manager closed the connection without answering"
            ) from None
        except (ValueError, InvalidBlockError) as exc:  # over max_answer_bytes, not MLLP framing, not UTF-8
            raise SourceUnavailable("invalid-answer", str(exc)[:200]) from None
        except OSError as exc:
            raise SourceUnavailable("connection-failed", str(exc)) from None
        finally:
            writer.close()
        return read_answer(text, control_id=control_id, tag=tag, target=target_domain, source_name=self.name)
