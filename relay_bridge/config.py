"""bridge.toml: the bridge's configuration (documented key by key in deploy/bridge.example.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from relay_common import config as common_config
from relay_common.config import AuditSection, InvalidValue, LoggingSection, load_config, parse_host_port


@dataclass(frozen=True)
class ServerSection:
    listen: str = "0.0.0.0:443"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plain-text gRPC, for local experiments only (also needs --insecure on the command line).
    insecure: bool = False
    # Mutual TLS: routers must present a client certificate issued at enrollment.
    require_client_cert: bool = False
    # CA that client certificates must chain to (required with require_client_cert).
    client_ca: Path | None = None
    # HOST:PORT of a second, server-authenticated-only port for `relay-router enroll` when
    # require_client_cert is on (only enrollment is served there). Empty: none.
    enroll_listen: str = ""
    # SIGTERM: seconds running associations get to finish (new ones are refused meanwhile) before the
    # bridge stops; keep the service manager's stop timeout above it (docs/operations.md).
    drain_grace_s: float = 30.0

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.listen)
        except ValueError as exc:
            raise InvalidValue("listen", str(exc)) from None
        if not self.insecure and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_cert and tls_key are required unless insecure = true")
        if self.require_client_cert and self.client_ca is None:
            raise InvalidValue("client_ca", "is required when require_client_cert = true")
        if self.require_client_cert and self.insecure:
            raise InvalidValue("require_client_cert", "needs TLS (insecure = false)")
        if not 0 <= self.drain_grace_s <= 3600:
            raise InvalidValue("drain_grace_s", "must be between 0 and 3600 seconds")
        if self.enroll_listen:
            try:
                parse_host_port(self.enroll_listen)
            except ValueError as exc:
                raise InvalidValue("enroll_listen", str(exc)) from None


@dataclass(frozen=True)
class StorageSection:
    database: Path = Path("bridge.sqlite3")


@dataclass(frozen=True)
class LimitsSection:
    max_associations: int = 2000
    max_associations_per_router: int = 500
    # Seconds the destination router has to join an association.
    join_timeout_s: float = 10.0
    max_frame_bytes: int = 16 * 1024 * 1024
    # Frames buffered per association and direction (memory bound = 2 x depth x frame size).
    frame_queue_depth: int = 4
    # Failed sign-ons allowed per account and per source address in `login_window_s`.
    login_failures: int = 5
    login_window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_associations", "max_associations_per_router", "frame_queue_depth", "login_failures"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, "must be at least 1")
        if self.max_frame_bytes < 64 * 1024:
            raise InvalidValue("max_frame_bytes", "must be at least 65536")


@dataclass(frozen=True)
class EnrollmentSection:
    # CA certificate and key that sign routers' client certificates at enrollment.
    # Leave empty to enroll identities without issuing certificates.
    ca_cert: Path | None = None
    ca_key: Path | None = None
    # Hours an enrollment token printed by `relay-bridge router add` stays valid (single use).
    token_ttl_h: float = 168.0
    certificate_days: int = 825

    def __post_init__(self) -> None:
        if (self.ca_cert is None) != (self.ca_key is None):
            raise InvalidValue("ca_key" if self.ca_key is None else "ca_cert", "ca_cert and ca_key go together")


@dataclass(frozen=True)
class MetricsSection(common_config.MetricsSection):
    listen: str = "127.0.0.1:9465"


@dataclass(frozen=True)
class SpillSection:
    # Blob store for spilled datasets (docs/cloudstore.md): "file:///var/lib/dicom-relay/blobs",
    # "s3://bucket/prefix", "gs://bucket/prefix"; "" = a "blobs" directory next to the database;
    # "off" = no spill (routers send everything inline).
    store: str = ""
    # Endpoint of an S3-compatible store (MinIO) or of a GCS emulator, and the S3 region. Credentials come
    # from the usual boto3 or google-auth chain, on the bridge only.
    endpoint_url: str = ""
    region: str = ""
    # Seconds a presigned URL handed to a router stays valid.
    url_ttl_s: float = 900.0
    # Blobs older than this are deleted by the orphan sweep (every sweep_interval_s).
    ttl_s: float = 86400.0
    sweep_interval_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.store not in ("", "off"):
            from urllib.parse import urlsplit

            from cloudstore.registry import known_schemes  # lazy: backends load only when opened

            scheme = urlsplit(self.store).scheme
            if scheme not in known_schemes():
                raise InvalidValue(
                    "store",
                    f'{self.store!r}: unknown scheme {scheme!r} (known: {", ".join(known_schemes())}, or "off")',
                )
        if not 1 <= self.url_ttl_s <= 7 * 24 * 3600:
            raise InvalidValue("url_ttl_s", "must be between 1 and 604800")
        if self.ttl_s <= 0 or self.sweep_interval_s <= 0:
            raise InvalidValue("ttl_s", "ttl_s and sweep_interval_s must be positive")


@dataclass(frozen=True)
class BridgeConfig:
    server: ServerSection = field(default_factory=ServerSection)
    storage: StorageSection = field(default_factory=StorageSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    enrollment: EnrollmentSection = field(default_factory=EnrollmentSection)
    audit: AuditSection = field(default_factory=AuditSection)
    spill: SpillSection = field(default_factory=SpillSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


def load(path: str | Path) -> BridgeConfig:
    return load_config(path, BridgeConfig)
