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

import datetime as dt
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp

from relay_router.identity.model import Demographics, IdentityError, Lookup, LookupOutcome, PatientRef
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
    return _lookup_from(_parameters(body), target=target, target_system=target_system, source_name=source_name)


def _parameters(body: bytes) -> Any:
    from fhir.resources.R4B.parameters import Parameters  # pydantic models: loaded only when PIXm is used

    try:
        return Parameters.model_validate_json(body)
    except ValueError as exc:  # pydantic's ValidationError, or not JSON at all
        raise SourceUnavailable("invalid-answer", f"not a FHIR Parameters resource ({str(exc)[:160]})") from None


# A Patient logical id (FHIR id: [A-Za-z0-9-.]{1,64}), optionally with a version.
_PATIENT_REFERENCE = re.compile(r"^Patient/([A-Za-z0-9][A-Za-z0-9\-.]{0,63})(?:/_history/[A-Za-z0-9\-.]{1,64})?\Z")


def patient_id_of(parameters: Any, base_url: str) -> str | None:
    """The logical id of the single targetId reference when it points into the configured server, else None.

    Only the id is taken: the URL read afterwards is built from our own configuration, never
    from the answer.
    """
    ids = set()
    for parameter in parameters.parameter or []:
        reference = (
            parameter.valueReference.reference if parameter.name == "targetId" and parameter.valueReference else None
        )
        if not reference:
            continue
        relative = reference.removeprefix(base_url.rstrip("/") + "/")
        match = _PATIENT_REFERENCE.match(relative)
        if match is None:
            return None  # a reference to another server: not followed
        ids.add(match.group(1))
    return ids.pop() if len(ids) == 1 else None


def demographics_of(body: bytes) -> Demographics | None:
    """Patient's Name (PN), Birth Date (DA) and Sex from a FHIR Patient; None when it is not a usable one."""
    from fhir.resources.R4B.patient import Patient

    try:
        patient = Patient.model_validate_json(body)
    except ValueError:
        return None
    name = None
    names = patient.name or []
    chosen = next((n for n in names if n.use == "official"), names[0] if names else None)
    if chosen is not None and chosen.family:
        given = [str(g) for g in chosen.given or [] if g]
        parts = [str(chosen.family), given[0] if given else "", " ".join(given[1:])]
        if not any(ch in part for part in parts for ch in "^=\\"):  # PN delimiters inside a component: no name
            name = "^".join(parts).rstrip("^")
    birth = patient.birthDate.strftime("%Y%m%d") if isinstance(patient.birthDate, dt.date) else None
    sex = {"male": "M", "female": "F", "other": "O"}.get(str(patient.gender or ""))
    try:
        return Demographics(name=name, birth_date=birth, sex=sex)
    except IdentityError:
        return None


def _lookup_from(parameters: Any, *, target: DomainSection, target_system: str, source_name: str) -> Lookup:
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

    def __init__(
        self, settings: SourceSection, domain_of: Callable[[str], DomainSection], *, demographics_for: str = ""
    ) -> None:
        """`demographics_for`: the issuer ([identity] issuer with take_demographics) whose patients' name,
        birth date and sex are read (Patient read of the targetId) when a lookup maps into it."""
        self.settings = settings
        self.demographics_for = demographics_for
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
        status, body = await self._get(self.endpoint, params)
        if status == 200:
            parameters = _parameters(body)
            result = _lookup_from(parameters, target=target_domain, target_system=target_system, source_name=self.name)
            if result.outcome is LookupOutcome.MAPPED and target == self.demographics_for:
                result = replace(result, demographics=await self._demographics(parameters))
            return result
        if status == 404:  # the source identifier is not known to the manager
            return Lookup(LookupOutcome.UNMAPPED, None, self.name)
        reason = "rejected" if status in (400, 403) else "http-error"
        raise SourceUnavailable(reason, f"HTTP {status} from {self.endpoint}")

    async def _demographics(self, parameters: Any) -> Demographics | None:
        """Our own record of the patient (FHIR Patient read); None when it cannot be had (the mapping still holds)."""
        patient_id = patient_id_of(parameters, self.settings.url)
        if patient_id is None:
            return None
        try:
            status, body = await self._get(f"{self.settings.url.rstrip('/')}/Patient/{patient_id}", {})
        except SourceUnavailable as exc:
            log.warning("PIXm %s: cannot read Patient/%s for demographics: %s", self.name, patient_id, exc)
            return None
        return demographics_of(body) if status == 200 else None

    async def _get(self, url: str, params: dict[str, str]) -> tuple[int, bytes]:
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
            async with self._session.get(url, **kwargs) as response:
                body = await response.content.read(self.settings.max_answer_bytes + 1)
                if len(body) > self.settings.max_answer_bytes:
                    raise SourceUnavailable(
                        "invalid-answer", f"answer larger than {self.settings.max_answer_bytes} bytes"
                    )
                return response.status, body
        except aiohttp.ClientError as exc:
            raise SourceUnavailable("connection-failed", f"{url}: {exc.__class__.__name__}: {exc}") from None

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
