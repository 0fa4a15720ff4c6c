"""IHE PIXm (ITI-83 Mobile Patient Identifier Cross-reference Query): FHIR `Patient/$ihe-pix` over HTTPS.

Library: fhir.resources (pydantic models of every FHIR resource, R4B here: PIXm is an R4
profile and R4B's Parameters and OperationOutcome are the same) validates the answer, with
aiohttp, already the router's HTTP library, as the asynchronous client. fhirclient was the
alternative: it is a synchronous client (requests) built around SMART-on-FHIR app launch,
and would block the event loop that relays DICOM or need a thread per query.

    GET [url]/Patient/$ihe-pix?sourceIdentifier=<system>|<id>&targetSystem=<system>

Answers (IHE ITI TF-2 3.83.4.2):
  200 Parameters with one targetIdentifier in the target system  -> MAPPED
  200 Parameters without one (or with several: never a guess)     -> UNMAPPED
  404 (the source identifier is not known)                        -> UNMAPPED
  400/403 (a domain is not known), other statuses, bad bodies     -> SourceUnavailable (next source, audited)
The router connects only to the configured URL: no redirects, no proxy from the environment,
and reads at most `max_answer_bytes`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from relay_router.identity.model import IdentityError, Lookup, LookupOutcome, PatientRef
from relay_router.identity.resolver import SourceUnavailable

if TYPE_CHECKING:
    from pydicom import Dataset

    from relay_router.identity.config import DomainSection, SourceSection

log = logging.getLogger("relay_router.identity.pixm")

FHIR_JSON = "application/fhir+json"


def system_of(ref_issuer: str, domain: DomainSection, ref: PatientRef | None = None) -> str:
    """The FHIR identifier system of a domain (urn:oid:... from the identifier itself when it has an OID)."""
    if ref is not None and ref.universal_id and ref.universal_id_type in ("", "ISO"):
        return f"urn:oid:{ref.universal_id}"
    if not domain.system:
        raise SourceUnavailable(
            "unknown-domain", f"no FHIR system for issuer {ref_issuer!r}: add [[identity.domain]] fhir_system"
        )
    return domain.system


def read_parameters(body: bytes, *, target: DomainSection, target_system: str, source_name: str) -> Lookup:
    """Interpret a 200 answer: a Parameters resource (raises SourceUnavailable when it is not one)."""
    from fhir.resources.R4B.parameters import Parameters  # pydantic models: loaded only when PIXm is used

    try:
        parameters = Parameters.model_validate_json(body)
    except ValueError as exc:  # pydantic's ValidationError, or not JSON at all
        raise SourceUnavailable("invalid-answer", f"not a FHIR Parameters resource ({str(exc)[:160]})") from None
    found = set()
    for parameter in parameters.parameter or []:
        identifier = parameter.valueIdentifier if parameter.name == "targetIdentifier" else None
        if identifier is None or identifier.system != target_system or not identifier.value:
            continue
        try:
            found.add(PatientRef(identifier.value, target.issuer, target.universal_id, target.universal_id_type))
        except IdentityError as exc:
            raise SourceUnavailable("invalid-answer", f"targetIdentifier: {exc}") from None
    if len(found) == 1:
        return Lookup(LookupOutcome.MAPPED, found.pop(), source_name)
    if len(found) > 1:
        log.warning("PIXm %s: %d identifiers in %s: ambiguous, not mapped", source_name, len(found), target_system)
    return Lookup(LookupOutcome.UNMAPPED, None, source_name)


def _tls(settings: SourceSection) -> ssl.SSLContext | bool:
    if not settings.url.startswith("https:"):
        return False
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context


class PixmSource:
    """kind = "pixm": one aiohttp session per source, closed with the resolver."""

    def __init__(self, settings: SourceSection, domain_of: Callable[[str], DomainSection]) -> None:
        self.settings = settings
        self.name = settings.label
        self.timeout_s = settings.timeout_s
        self.domain_of = domain_of
        self.endpoint = settings.url.rstrip("/") + "/Patient/$ihe-pix"
        self._session: aiohttp.ClientSession | None = None

    async def lookup(self, ref: PatientRef, target: str, *, dataset: Dataset | None = None) -> Lookup:
        target_domain = self.domain_of(target)
        source_system = system_of(ref.issuer, self.domain_of(ref.issuer), ref)
        target_system = system_of(target, target_domain)
        params = {"sourceIdentifier": f"{source_system}|{ref.id}", "targetSystem": target_system}
        status, body = await self._get(params)
        if status == 200:
            return read_parameters(body, target=target_domain, target_system=target_system, source_name=self.name)
        if status == 404:  # the source identifier is not known to the manager
            return Lookup(LookupOutcome.UNMAPPED, None, self.name)
        reason = "rejected" if status in (400, 403) else "http-error"
        raise SourceUnavailable(reason, f"HTTP {status} from {self.endpoint}")

    async def _get(self, params: dict[str, str]) -> tuple[int, bytes]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_tls(self.settings), limit=8),
                trust_env=False,  # no proxy or .netrc from the environment: only the configured URL
                headers={"Accept": FHIR_JSON},
            )
        kwargs: dict[str, Any] = {"params": params, "allow_redirects": False}
        if self.settings.server_name:
            kwargs["server_hostname"] = self.settings.server_name
        try:
            async with self._session.get(self.endpoint, **kwargs) as response:
                body = await response.content.read(self.settings.max_answer_bytes + 1)
                if len(body) > self.settings.max_answer_bytes:
                    raise SourceUnavailable(
                        "invalid-answer", f"answer larger than {self.settings.max_answer_bytes} bytes"
                    )
                return response.status, body
        except aiohttp.ClientError as exc:
            raise SourceUnavailable("connection-failed", f"{self.endpoint}: {exc.__class__.__name__}: {exc}") from None

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.max_answer_bytes
        body = bytearray()
        while chunk := await response.content.readany():
            body += chunk
            if len(body) > limit:
                raise SourceUnavailable("invalid-answer", f"answer larger than {limit} bytes")
        return bytes(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
