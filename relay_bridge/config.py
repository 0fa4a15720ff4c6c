"""bridge.toml: the bridge's configuration (documented key by key in deploy/bridge.example.toml)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

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
    # SIGTERM, replicas of a cluster only: the drain lasts at least this long, saying "not ready" (/readyz 503,
    # gRPC health NOT_SERVING), even with nothing running, so that the load balancer's health check takes the
    # replica out of rotation before its port closes (docs/high-availability.md, "Health checks").
    drain_notice_s: float = 1.0

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
        if not 0 <= self.drain_notice_s <= 3600:
            raise InvalidValue("drain_notice_s", "must be between 0 and 3600 seconds")
        if self.enroll_listen:
            try:
                parse_host_port(self.enroll_listen)
            except ValueError as exc:
                raise InvalidValue("enroll_listen", str(exc)) from None


@dataclass(frozen=True)
class StorageSection:
    # A SQLite file (the embedded default; relative to this file) or a PostgreSQL URL,
    # "postgresql://user@host:5432/dbname" (no password in it: password_file or the PG* variables).
    database: Path | str = Path("bridge.sqlite3")
    # With PostgreSQL: a file holding the database password (else libpq's PGPASSWORD, ~/.pgpass).
    password_file: Path | None = None
    # With PostgreSQL: where the status file and the default "blobs" directory go (with SQLite:
    # next to the database file).
    state_dir: Path = Path(".")

    def __post_init__(self) -> None:
        if isinstance(self.database, str) and "://" not in self.database:
            object.__setattr__(self, "database", Path(self.database))  # a path given as a string
        if self.postgres:
            assert isinstance(self.database, str)
            url = urlsplit(self.database)
            if url.password is not None:
                raise InvalidValue("database", "must not contain a password: use password_file or PGPASSWORD")
            try:
                url.port  # noqa: B018  (urlsplit checks the port only when asked)
            except ValueError:
                raise InvalidValue("database", f"{self.database!r}: the port must be a number") from None
            if url.query or url.fragment:
                raise InvalidValue("database", "takes no ?options or #fragment: use the PG* variables for those")
        elif isinstance(self.database, str):
            scheme = self.database.split("://", 1)[0]
            raise InvalidValue("database", f"unknown scheme {scheme!r}: a SQLite file path or postgresql://")
        elif self.password_file is not None:
            raise InvalidValue("password_file", "is for a postgresql:// database only")

    @property
    def postgres(self) -> bool:
        return isinstance(self.database, str) and urlsplit(self.database).scheme in ("postgresql", "postgres")

    @property
    def local_path(self) -> Path:
        """The stem of the bridge's local files (status file, default blob directory): the SQLite file,
        or state_dir/bridge with PostgreSQL."""
        return self.state_dir / "bridge" if self.postgres else Path(self.database)


@dataclass(frozen=True)
class LimitsSection:
    max_associations: int = 2000
    # Associations a router initiated at once; those towards it count against max_inbound_per_router.
    max_associations_per_router: int = 500
    max_inbound_per_router: int = 500
    # Seconds the destination router has to join an association.
    join_timeout_s: float = 10.0
    max_frame_bytes: int = 16 * 1024 * 1024
    # Frames buffered per association and direction (memory bound = 2 x depth x frame size).
    frame_queue_depth: int = 4
    # Failed sign-ons allowed per account and per source address in `login_window_s`.
    login_failures: int = 5
    login_window_s: float = 60.0
    # Password hashes (scrypt) run on their own threads; sign-ons waiting beyond this many are refused.
    login_hash_threads: int = 2
    max_pending_logins: int = 32
    # What one router may publish (everything it publishes is stored and sent to other routers).
    max_devices_per_router: int = 200
    max_share_with: int = 64
    # A router's publications are applied at most once per this many seconds (later ones coalesce).
    publish_interval_s: float = 2.0
    # The largest directory message sent to one router (routers accept 20 MiB); beyond it, each
    # owner site's devices get their turn in round-robin order and the cut is logged.
    max_directory_bytes: int = 8 * 1024 * 1024
    # Before sign-on: seconds a new Control or Associate stream has to send its first message,
    # and the largest first message accepted.
    first_message_timeout_s: float = 10.0
    max_first_message_bytes: int = 64 * 1024
    # HTTP/2 streams one connection may hold open at once (grpc.max_concurrent_streams).
    max_streams_per_connection: int = 1024
    # Connection age (grpc.max_connection_age_ms) and the grace running calls get afterwards; 0 = off.
    max_connection_age_s: float = 0.0
    connection_age_grace_s: float = 86400.0

    def __post_init__(self) -> None:
        for name in (
            "max_associations",
            "max_associations_per_router",
            "max_inbound_per_router",
            "frame_queue_depth",
            "login_failures",
            "login_hash_threads",
            "max_pending_logins",
            "max_devices_per_router",
            "max_share_with",
            "max_streams_per_connection",
        ):
            if getattr(self, name) < 1:
                raise InvalidValue(name, "must be at least 1")
        if self.max_frame_bytes < 64 * 1024:
            raise InvalidValue("max_frame_bytes", "must be at least 65536")
        if not 64 * 1024 <= self.max_directory_bytes <= 16 * 1024 * 1024:
            raise InvalidValue("max_directory_bytes", "must be between 65536 and 16777216")
        if not 1024 <= self.max_first_message_bytes <= self.max_frame_bytes:
            raise InvalidValue("max_first_message_bytes", "must be between 1024 and max_frame_bytes")
        for name in ("publish_interval_s", "max_connection_age_s", "connection_age_grace_s"):
            if getattr(self, name) < 0:
                raise InvalidValue(name, "must not be negative")
        if self.first_message_timeout_s <= 0:
            raise InvalidValue("first_message_timeout_s", "must be positive")


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
    # What one association may hold in the store at once (released blobs free their share), checked by
    # the bridge before it signs a URL; the defaults fit a 2 GB data set in 4 MiB parts several times
    # over: blobs, parts of one blob, bytes of one part, bytes in all.
    max_blobs_per_association: int = 64
    max_parts_per_blob: int = 2048
    max_part_bytes: int = 9 * 1024 * 1024
    max_bytes_per_association: int = 16 * 1024**3
    # file:// store only: a file holding the key that signs its presigned URLs (at least 32 bytes).
    # Every replica must read the same key and see the same directory, so that a URL one replica
    # issued is honoured by another. None: a random key per process (one bridge).
    signing_key_file: Path | None = None

    def signing_key(self) -> bytes | None:
        """The file store's URL-signing key from `signing_key_file` (None: the store makes its own)."""
        if self.signing_key_file is None:
            return None
        try:
            key = self.signing_key_file.read_bytes().strip()
        except OSError as exc:
            raise InvalidValue("signing_key_file", f"cannot read {self.signing_key_file}: {exc.strerror}") from None
        if len(key) < 32:
            raise InvalidValue("signing_key_file", f"{self.signing_key_file} holds {len(key)} bytes; at least 32")
        return key

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
        for name in ("max_blobs_per_association", "max_parts_per_blob", "max_part_bytes", "max_bytes_per_association"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, "must be at least 1")
        self.signing_key()  # a missing or short key file is a configuration error, named at load


@dataclass(frozen=True)
class ConsoleSection:
    # HOST:PORT of the read-only web console (relay_bridge.console); "" (the default) turns it off.
    # Served over TLS with [server] tls_cert/tls_key unless HOST is a loopback address.
    listen: str = ""
    # Admin accounts (scrypt hashes), managed with `relay-bridge admin add|remove|list`.
    # Default: "<database>.admins.json".
    admins_file: Path | None = None
    session_hours: float = 8.0

    def __post_init__(self) -> None:
        if self.listen:
            try:
                parse_host_port(self.listen)
            except ValueError as exc:
                raise InvalidValue("listen", f'{exc} (or "" to turn the console off)') from None
        if not 0 < self.session_hours <= 24 * 7:
            raise InvalidValue("session_hours", "must be between 0 and 168")


@dataclass(frozen=True)
class ClusterSection:
    """Replicas on one PostgreSQL directory (docs/high-availability.md); `listen` "" = a single bridge."""

    listen: str = ""  # the internal gRPC port other replicas forward associations to (mutual TLS)
    advertise: str = ""  # host:port the other replicas reach this one at (written to the replicas table)
    replica_id: str = ""  # unique per replica; "" = the host name and the listen port
    tls_cert: Path | None = None  # the cluster certificate and key (relay-bridge cluster-cert)
    tls_key: Path | None = None
    ca: Path | None = None  # the cluster CA: the only issuer whose certificates a replica accepts
    lease_s: float = 10.0  # a replica's and its sites' rows expire this long after their last renewal
    renew_s: float = 2.0  # how often they are renewed (and stale control streams noticed)
    links: bool = True  # forward over replica links (relay_bridge.cluster.link); false: Forward calls only
    link_port: int = 0  # the link server's port on the listen host; 0: the system picks one
    # Offer destination routers a join at this replica (a local splice instead of a hop over a link;
    # needs SNI routing at the balancer and replica names in the server certificate).
    direct_join: bool = True

    def __post_init__(self) -> None:
        if not self.listen:
            return
        for name in ("listen", "advertise"):
            value = getattr(self, name)
            if value:
                try:
                    parse_host_port(value)
                except ValueError as exc:
                    raise InvalidValue(name, str(exc)) from None
        if not self.advertise:
            raise InvalidValue("advertise", "is required with listen: the address other replicas reach this one at")
        host, port = parse_host_port(self.advertise)
        if host in ("0.0.0.0", "::", "") or port == 0:
            raise InvalidValue("advertise", "must name a reachable host and a fixed port (not 0.0.0.0 or port 0)")
        if self.replica_id and not _REPLICA_ID.fullmatch(self.replica_id):
            raise InvalidValue("replica_id", "must be 1-64 characters: letters, digits, '.', '_' or '-'")
        for name in ("tls_cert", "tls_key", "ca"):
            if getattr(self, name) is None:
                raise InvalidValue(name, "is required with listen (relay-bridge cluster-cert makes the files)")
        if not 0 <= self.link_port <= 65535:
            raise InvalidValue("link_port", "must be a port number (0: the system picks one)")
        if not 0 < self.renew_s < self.lease_s <= 300:
            raise InvalidValue("lease_s", "renew_s must be positive and shorter than lease_s (at most 300 s)")


_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
    console: ConsoleSection = field(default_factory=ConsoleSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def __post_init__(self) -> None:
        # The console's one cross-section rule: passwords cross the network only inside TLS.
        if self.console.listen and self.server.insecure and not _loopback(parse_host_port(self.console.listen)[0]):
            raise InvalidValue("console.listen", "a console not on loopback needs TLS (insecure = false)")


def load(path: str | Path) -> BridgeConfig:
    return load_config(path, BridgeConfig)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
