"""Certificate expiry as a Prometheus metric, and as facts for the `check` commands.

A certificate that expires stops every hospital at once, and nobody looks at PEM files until it has.
The daemons therefore export the notAfter time of the certificates they present or trust as
`<prefix>_certificate_expiry_timestamp_seconds{role, subject}`; an alert fires three weeks ahead
(deploy/prometheus/alerts.yml). Files are read at scrape time (a renewed certificate shows up
without a restart; a file the process reloads itself, relay_common.tlsreload, shows what is in
use) and parsed with `cryptography`; a missing or unreadable file is simply absent from the output
and counted in `<prefix>_certificate_read_errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from relay_common.tlsreload import certificate_in_use

log = logging.getLogger("relay_common.certmetrics")
MAX_PEM_BYTES = 1024 * 1024  # a CA bundle is a few hundred kB at most


@dataclass(frozen=True)
class CertificateExpiry:
    role: str  # "server", "client", "bridge_ca": which of our files it came from
    subject: str  # RFC 4514 subject of the certificate
    not_after: float  # Unix time


def read_expiries(role: str, path: Path) -> list[CertificateExpiry]:
    """Every certificate in the PEM file `path` (a bundle may hold several); raises OSError/ValueError.

    A file this process re-reads without a restart (relay_common.tlsreload) is reported as it is in
    use: a renewal that was refused keeps showing the old expiry, which is the one that matters."""
    data = certificate_in_use(path)
    if data is None:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"{path} is larger than {MAX_PEM_BYTES} bytes")
    certificates = x509.load_pem_x509_certificates(data)
    return [
        CertificateExpiry(role, cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp())
        for cert in certificates
    ]


def certificate_expiries(files: Mapping[str, Path | None]) -> tuple[list[CertificateExpiry], list[str]]:
    """(expiries, problems) for the role -> file mapping; roles whose file is None or absent are skipped."""
    found: list[CertificateExpiry] = []
    problems: list[str] = []
    for role, path in files.items():
        if path is None or not path.exists():
            continue
        try:
            found.extend(read_expiries(role, path))
        except (OSError, ValueError) as exc:
            problems.append(f"{role} certificate {path}: {exc}")
    return found, problems


class CertificateCollector(Collector):
    """`<prefix>_certificate_expiry_timestamp_seconds` for the files of `files` (role -> path)."""

    def __init__(self, prefix: str, files: Mapping[str, Path | None]) -> None:
        self.prefix = prefix
        self.files = dict(files)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        expiry = GaugeMetricFamily(
            f"{self.prefix}_certificate_expiry_timestamp_seconds",
            "Unix time at which a certificate this process presents or trusts expires (notAfter), "
            "by role (server, client, bridge_ca) and subject",
            labels=["role", "subject"],
        )
        found, problems = certificate_expiries(self.files)
        for cert in found:
            expiry.add_metric([cert.role, cert.subject], cert.not_after)
        for problem in problems:
            log.warning("cannot read a certificate for its expiry metric: %s", problem)
        yield expiry
        yield GaugeMetricFamily(
            f"{self.prefix}_certificate_read_errors",
            "Certificate files that could not be read or parsed at the last scrape",
            value=len(problems),
        )


def register_certificates(registry: CollectorRegistry, prefix: str, files: Mapping[str, Path | None]) -> None:
    """The one-line hook for the daemons' metrics modules."""
    registry.register(CertificateCollector(prefix, files))


def bridge_certificate_files(config: object) -> dict[str, Path | None]:
    """The bridge presents its server certificate (none when insecure)."""
    server = getattr(config, "server", None)
    return {"server": getattr(server, "tls_cert", None)}


def router_certificate_files(config: object) -> dict[str, Path | None]:
    """The router presents the client certificate from enrollment (if any) and trusts the bridge's CA."""
    router, bridge = getattr(config, "router", None), getattr(config, "bridge", None)
    state = getattr(router, "state_dir", None)
    return {
        "client": Path(state) / "client.pem" if state is not None else None,
        "bridge_ca": getattr(bridge, "ca_file", None),
    }
