"""router.toml [identity]: this hospital's patient identifier domain, the mapping sources, the cache.

The domain keys (`issuer`, `universal_id`, `universal_id_type`) and the coercion keys
(`unmapped_query`, `take_demographics`) are read by the coercion at the routers; the
`[[identity.source]]` list, `[[identity.domain]]` and `cache_ttl_s` by the resolver. The
partner's issuer on a route is configured on its `[[remote]]` / `[[shared]]` entry, never
taken from the bridge. docs/patient-identity.md describes every key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from relay_common.config import InvalidValue, parse_host_port
from relay_router.identity.model import UNIVERSAL_ID_TYPES, IdentityError, PatientRef

SOURCE_KINDS = ("table", "pixm", "pix", "other-ids")
# HL7 v2 HD components and application names: printable, none of the HL7 delimiters |^~\&.
_HL7_NAME = re.compile(r"^[\x20-\x7e]{0,64}\Z")
_HL7_DELIMITERS = set("|^~\\&")
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}\Z")
OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\Z")


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_hl7_name(value: str, key: str) -> None:
    if not _HL7_NAME.match(value) or _HL7_DELIMITERS & set(value):
        raise InvalidValue(key, f"{value!r}: at most 64 printable characters, none of | ^ ~ \\ &")


@dataclass(frozen=True)
class DomainSection:
    """[[identity.domain]]: how an issuer is named by the PIX/PIXm manager (for domains not given by an OID)."""

    issuer: str  # Issuer of Patient ID (0010,0021) as the DICOM data sets carry it
    # FHIR identifier system of the domain (PIXm); default "urn:oid:<universal_id>" when an ISO OID is given.
    fhir_system: str = ""
    # HL7 v2 assigning authority (CX.4) namespace; default: the issuer. With universal_id it becomes
    # "namespace&universal_id&universal_id_type".
    hl7_namespace: str = ""
    universal_id: str = ""
    universal_id_type: str = ""

    def __post_init__(self) -> None:
        try:
            PatientRef("x", self.issuer, self.universal_id, self.universal_id_type)
        except IdentityError as exc:
            raise InvalidValue(exc.field.replace(" ", "_"), exc.problem) from None
        if not self.issuer:
            raise InvalidValue("issuer", "is required")
        if self.fhir_system and (":" not in self.fhir_system or len(self.fhir_system) > 255):
            raise InvalidValue("fhir_system", f"{self.fhir_system!r} is not a URI (e.g. urn:oid:1.2.3)")
        _check_hl7_name(self.hl7_namespace, "hl7_namespace")
        _check_hl7_name(self.universal_id, "universal_id")

    @property
    def system(self) -> str:
        if self.fhir_system:
            return self.fhir_system
        if self.universal_id and self.universal_id_type in ("", "ISO") and OID.match(self.universal_id):
            return f"urn:oid:{self.universal_id}"
        return ""

    @property
    def authority(self) -> str:
        """CX.4 (HD) with the subcomponent separator '&'."""
        namespace = self.hl7_namespace or self.issuer
        if self.universal_id:
            return f"{namespace}&{self.universal_id}&{self.universal_id_type or 'ISO'}"
        return namespace


@dataclass(frozen=True)
class SourceSection:
    """[[identity.source]]: one mapping source; the resolver asks them in this order."""

    kind: Literal["table", "pixm", "pix", "other-ids"]
    # Named in the audit trail and the logs (default: the kind); unique.
    name: str = ""
    # Seconds to wait for this source before asking the next one (and auditing the skip).
    timeout_s: float = 2.0
    # table: the cross-reference database (default STATE_DIR/identity.sqlite, mode 0600).
    path: Path | None = None
    # pixm: the FHIR base URL of the MPI ($ihe-pix is appended to ".../Patient"). https, or http on loopback.
    url: str = ""
    # pix: the PIX manager's MLLP address.
    host: str = ""
    port: int = 0
    sending_application: str = "DICOM_RELAY"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # pixm and pix: TLS. ca_file alone verifies the server (pix: MLLP over TLS when ca_file is set);
    # cert_file and key_file add a client certificate. server_name: when host is an IP address.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    # Largest answer read from the manager, in bytes.
    max_answer_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        found: list[InvalidValue] = []
        if self.name and not _SOURCE_NAME.match(self.name):
            found.append(InvalidValue("name", f"{self.name!r}: 1-32 characters of a-z, 0-9, '.', '_' or '-'"))
        if not 0 < self.timeout_s <= 60:
            found.append(InvalidValue("timeout_s", "must be more than 0 and at most 60 seconds"))
        if not 1024 <= self.max_answer_bytes <= 16 * 1024 * 1024:
            found.append(InvalidValue("max_answer_bytes", "must be between 1 KiB and 16 MiB"))
        if (self.cert_file is None) != (self.key_file is None):
            found.append(InvalidValue("key_file" if self.key_file is None else "cert_file", "go together"))
        if self.kind == "pixm":
            found += self._check_url()
        elif self.kind == "pix":
            if not self.host:
                found.append(InvalidValue("host", "is required for kind = 'pix'"))
            if not 0 < self.port < 65536:
                found.append(InvalidValue("port", "is required for kind = 'pix' (1-65535)"))
            for key in ("sending_application", "sending_facility", "receiving_application", "receiving_facility"):
                try:
                    _check_hl7_name(getattr(self, key), key)
                except InvalidValue as exc:
                    found.append(exc)
        unused = {
            "table": ("url", "host", "ca_file"),
            "pixm": ("host", "path"),
            "pix": ("url", "path"),
            "other-ids": ("url", "host", "path", "ca_file"),
        }[self.kind]
        for key in unused:
            if getattr(self, key):
                found.append(InvalidValue(key, f"is not used by kind = {self.kind!r}"))
        InvalidValue.all(found)

    def _check_url(self) -> list[InvalidValue]:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            return [InvalidValue("url", f"{self.url!r}: expected https://HOST[:PORT]/fhir-base")]
        if parts.scheme == "http" and not _loopback(parts.hostname):
            return [InvalidValue("url", "http:// is accepted only on loopback; use https://")]
        if parts.query or parts.fragment or parts.username:
            return [InvalidValue("url", "must not carry a query, a fragment or credentials")]
        return []

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True)
class IdentitySection:
    """[identity]: off unless `issuer` is set (then routes may enable patient identity)."""

    # This hospital's patient identifier domain: Issuer of Patient ID (0010,0021), and optionally the
    # Issuer of Patient ID Qualifiers Sequence > Universal Entity ID (an OID) and its type.
    issuer: str = ""
    universal_id: str = ""
    universal_id_type: str = ""
    # A query for a patient with no mapping: "no-match" (answer nothing) or "remote-ids" (ask with
    # nothing mapped and return the partner's identifiers, under the partner's issuer).
    unmapped_query: Literal["no-match", "remote-ids"] = "no-match"
    # Take Patient's Name, Birth Date and Sex from this hospital's record (when a source returns them).
    take_demographics: bool = False
    # Seconds a lookup's answer is reused (0: never cached). Merges and `relay-router pix` changes
    # invalidate cached answers at once.
    cache_ttl_s: float = 300.0
    cache_entries: int = 10_000
    source: list[SourceSection] = field(default_factory=list)
    domain: list[DomainSection] = field(default_factory=list)
    # The ADT feed (HL7 v2 over MLLP, A40 merges): "HOST:PORT" to listen on ("" = off); ca_file/cert_file/
    # key_file for MLLP over TLS; only senders from `adt_allow` (addresses or networks) are accepted.
    adt_listen: str = ""
    adt_cert_file: Path | None = None
    adt_key_file: Path | None = None
    adt_allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    def __post_init__(self) -> None:
        found: list[InvalidValue] = []
        try:
            if self.issuer or self.universal_id:
                PatientRef("x", self.issuer, self.universal_id, self.universal_id_type)
        except IdentityError as exc:
            found.append(InvalidValue(exc.field.replace(" ", "_"), exc.problem))
        if not self.issuer and (self.source or self.adt_listen):
            found.append(InvalidValue("issuer", "is required when mapping sources or an ADT feed are configured"))
        if self.universal_id_type not in UNIVERSAL_ID_TYPES:
            found.append(InvalidValue("universal_id_type", f"one of {', '.join(sorted(UNIVERSAL_ID_TYPES - {''}))}"))
        if not 0 <= self.cache_ttl_s <= 86400:
            found.append(InvalidValue("cache_ttl_s", "must be between 0 and 86400 seconds"))
        if not 1 <= self.cache_entries <= 1_000_000:
            found.append(InvalidValue("cache_entries", "must be between 1 and 1000000"))
        labels = [s.label for s in self.source]
        for label in sorted({x for x in labels if labels.count(x) > 1}):
            found.append(InvalidValue("source", f"two sources are named {label!r}: give each a distinct name"))
        issuers = [d.issuer for d in self.domain]
        for issuer in sorted({x for x in issuers if issuers.count(x) > 1}):
            found.append(InvalidValue("domain", f"issuer {issuer!r} is described twice"))
        if self.adt_listen:
            try:
                parse_host_port(self.adt_listen)
            except ValueError as exc:
                found.append(InvalidValue("adt_listen", f'{exc} (or "" for no ADT feed)'))
        if (self.adt_cert_file is None) != (self.adt_key_file is None):
            found.append(InvalidValue("adt_key_file", "adt_cert_file and adt_key_file go together"))
        for i, net in enumerate(self.adt_allow):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                found.append(InvalidValue(f"adt_allow[{i}]", f"{net!r} is not an address or network"))
        InvalidValue.all(found)

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)

    @property
    def own_ref_fields(self) -> tuple[str, str, str]:
        return self.issuer, self.universal_id, self.universal_id_type

    def domain_of(self, issuer: str) -> DomainSection:
        """The [[identity.domain]] entry of `issuer` (ours from [identity] when not listed)."""
        for d in self.domain:
            if d.issuer == issuer:
                return d
        if issuer == self.issuer:
            return DomainSection(issuer, universal_id=self.universal_id, universal_id_type=self.universal_id_type)
        return DomainSection(issuer)
