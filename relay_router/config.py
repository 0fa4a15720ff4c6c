"""router.toml: the router's configuration (documented key by key in deploy/router.example.toml)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from relay_common import config as common_config
from relay_common.config import AuditSection, InvalidValue, LoggingSection, load_config, parse_host_port, secret_from
from relay_common.validate import SITE_NAME_RULE, is_ae_title, is_share_target, is_site_name
from relay_router import services as service_groups
from relay_router.egress import Endpoint, ProxySettings, UrlPolicy, check_proxy_url, with_password
from relay_router.identity.config import IdentitySection


def _check_ae(title: str, what: str) -> None:
    if not is_ae_title(title):
        raise InvalidValue(
            what,
            f"{title!r} is not a valid AE title (1-16 characters, no backslash, "
            "no control characters, no leading or trailing spaces)",
        )


@dataclass(frozen=True)
class RouterSection:
    # The account name on the bridge; also this site's name in the directory.
    name: str
    # Where the router keeps its identity keys (identity.key, mode 0600) and the
    # fingerprints of peer sites it has seen (known_sites.json). Relative paths
    # are relative to this file.
    state_dir: Path = Path("state")
    # Trust only the peer sites pinned with [[pin]] (no trust on first use): a bridge cannot then
    # introduce a site of its own, even to devices shared with "*".
    require_pin: bool = False
    # The old rule, for an upgrade only: the first key the bridge offers for a site is believed and
    # recorded (trust on first use). Off: a site neither pinned nor approved (`relay-router peers
    # approve`) is refused and waits for the operator's approval. check-config warns when it is on.
    trust_first_use: bool = False

    def __post_init__(self) -> None:
        if not is_site_name(self.name):
            raise InvalidValue("name", f"{self.name!r} must be {SITE_NAME_RULE}")


@dataclass(frozen=True)
class BridgeSection:
    # host:port of the bridge (outbound connection; 443 in production).
    address: str
    # CA certificate (PEM) that signed the bridge's certificate.
    ca_file: Path | None = None
    # TLS name to verify when `address` is an IP or differs from the certificate.
    server_name: str | None = None
    # The account password; prefer password_file or $RELAY_ROUTER_PASSWORD.
    password: str | None = None
    password_file: Path | None = None
    insecure: bool = False
    # host:port for `relay-router enroll` when the bridge serves enrollment on its own port.
    enroll_address: str = ""
    # Seconds to wait for the bridge to accept an association stream.
    open_timeout_s: float = 15.0
    # How long an Open is retried while the bridge moves this router or its partner between replicas
    # (a draining replica, a site signing on elsewhere, this link signing on again); 0: never retried.
    open_retry_s: float = 10.0
    # Reconnect backoff: first delay and cap, in seconds (with jitter).
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # HTTP/2 keepalive pings, so idle streams survive load balancers.
    keepalive_s: float = 20.0
    # Join an association at the bridge replica it waits at, when the bridge offers it (a second
    # connection to `address`, TLS server name "<replica>.<server_name>"; docs/high-availability.md).
    direct_join: bool = True
    # The hospital's HTTP proxy for every outbound connection (the gRPC link by HTTP CONNECT, and the
    # spill's presigned URLs): "http://user:password@proxy.example.org:3128". Empty: the standard
    # variables https_proxy / http_proxy, if set (docs/configuration.md, "Proxies").
    proxy: str = ""
    # The proxy user's password, read from this file (instead of the URL).
    proxy_password_file: Path | None = None
    # Hosts reached directly, curl's syntax ("*", "example.org", ".example.org", "10.0.0.0/8", "host:port").
    # Unset: the no_proxy variable.
    no_proxy: list[str] | None = None

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.address, default_host="")
        except ValueError as exc:
            raise InvalidValue("address", str(exc)) from None
        if not self.insecure and self.ca_file is None:
            raise ValueError("ca_file is required unless insecure = true")
        if self.proxy:
            try:
                check_proxy_url(self.proxy)
            except ValueError as exc:
                raise InvalidValue("proxy", str(exc)) from None
        if self.proxy_password_file is not None and not self.proxy:
            raise InvalidValue("proxy_password_file", "needs proxy (http://user@host:port)")

    def resolve_password(self) -> str:
        return secret_from(self.password, self.password_file, "RELAY_ROUTER_PASSWORD", what="bridge password")

    def proxy_settings(self) -> ProxySettings:
        """The proxy to use (with the password from proxy_password_file), else the environment's."""
        proxy = self.proxy
        if proxy and self.proxy_password_file is not None:
            try:
                secret = self.proxy_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read proxy_password_file {self.proxy_password_file}: {exc.strerror}") from exc
            proxy = with_password(proxy, secret)
        return ProxySettings.resolve(proxy, self.no_proxy)


@dataclass(frozen=True)
class DicomSection:
    # Where local devices reach the router (its DICOM port on the hospital LAN).
    listen: str = "0.0.0.0:11112"
    # Expose every remote device this router may reach under its own AE title
    # (in addition to the [[remote]] entries), unless two sites share a title.
    expose_all: bool = False
    # Seconds a local device has to send its A-ASSOCIATE-RQ (PS3.8 ARTIM).
    artim_timeout_s: float = 30.0
    # Seconds to connect to a shared local device.
    connect_timeout_s: float = 10.0
    # Seconds an association may sit with no traffic either way before it is aborted (0: never).
    idle_timeout_s: float = 3600.0
    # Seconds the called device may stay silent after the calling device sent something (0: never).
    # Long C-MOVEs send pending responses; a device that answers nothing this long is considered stuck.
    dimse_timeout_s: float = 600.0
    # On SIGTERM: seconds running associations may go on before they are aborted.
    shutdown_grace_s: float = 10.0
    # Associations at once, both directions: the upper bound of the three limits below.
    max_associations: int = 200
    # Local devices calling out at once (default: max_associations).
    max_outbound_associations: int | None = None
    # Other sites calling our shared devices at once (default: half of max_associations), so that peers
    # can never take the slots our own workstations need; and per calling site (default: a quarter of
    # max_inbound_associations), so that one peer cannot take them all from the others.
    max_inbound_associations: int | None = None
    max_inbound_per_site: int | None = None
    # Unfinished A-ASSOCIATE-RQs (connections accepted, request not yet complete) at once, and from one
    # source address; beyond either the connection is closed at once. A request larger than
    # max_request_bytes gets A-ASSOCIATE-RJ (permanent, local limit exceeded).
    max_pending_requests: int = 64
    max_pending_per_address: int = 8
    max_request_bytes: int = 64 * 1024
    # DICOM over TLS on the LAN (PS3.15 B.1/B.3, BCP 195): a second listener, off while tls_listen is "".
    # tls_cert_file/tls_key_file: the router's certificate from the hospital's CA (PEM). With
    # tls_ca_file, a device must present a certificate that CA signed (both sides authenticated, B.1).
    tls_listen: str = ""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # Compress frames with zstd when the other router agrees (pays on WAN links; costs CPU on a LAN).
    compression: bool = True
    compression_level: int = 3
    # Bytes read from a socket at once, and so the largest frame sent to the bridge.
    frame_bytes: int = 256 * 1024
    # Target time on the wire per frame: on a slow path frames shrink (to 16 KiB at least) so the
    # bridge's store-and-forward of whole frames costs little per DICOM message (relay_router.pace).
    # 0: always frame_bytes.
    frame_time_ms: float = 5.0
    # Cloud spill (docs/cloudstore.md): a data set larger than this travels through the bridge's blob
    # store by reference instead of inline frames (0: never). Parts of spill_part_bytes, spill_parallel
    # of them in flight each way.
    spill_threshold_bytes: int = 8 * 1024 * 1024
    spill_part_bytes: int = 4 * 1024 * 1024
    spill_parallel: int = 4
    # Off: this router neither offers nor accepts spill (peers then send everything inline); for a
    # router that cannot reach the blob store.
    spill: bool = True
    # The blob store endpoints (URL prefixes) whose presigned URLs this router opens, e.g.
    # ["https://s3.eu-west-1.amazonaws.com/bucket/"]. Empty: only the bridge's own file store, whose
    # parts travel through the gRPC link. docs/security.md, "Spill URLs".
    spill_endpoints: list[str] = field(default_factory=list)
    # Accept http:// endpoints on a loopback host (test stores such as moto); never in production.
    spill_allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.listen)
        except ValueError as exc:
            raise InvalidValue("listen", str(exc)) from None
        if not 4096 <= self.frame_bytes <= 4 * 1024 * 1024:
            raise InvalidValue("frame_bytes", "must be between 4096 and 4194304")
        if not 0 <= self.frame_time_ms <= 1000:
            raise InvalidValue("frame_time_ms", "must be between 0 (off) and 1000")
        if not 1 <= self.compression_level <= 19:
            raise InvalidValue("compression_level", "must be between 1 and 19")
        if self.spill_threshold_bytes < 0:
            raise InvalidValue("spill_threshold_bytes", "must be 0 (off) or positive")
        if not 64 * 1024 <= self.spill_part_bytes <= 8 * 1024 * 1024:
            raise InvalidValue("spill_part_bytes", "must be between 65536 and 8388608")
        if not 1 <= self.spill_parallel <= 64:
            raise InvalidValue("spill_parallel", "must be between 1 and 64")
        for url in self.spill_endpoints:
            try:
                Endpoint.parse(url, allow_insecure_http=self.spill_allow_insecure_http)
            except ValueError as exc:
                raise InvalidValue("spill_endpoints", str(exc)) from None
        self._check_limits()
        if self.tls_listen:
            try:
                parse_host_port(self.tls_listen)
            except ValueError as exc:
                raise InvalidValue("tls_listen", str(exc)) from None
            if self.tls_cert_file is None or self.tls_key_file is None:
                raise InvalidValue("tls_listen", "needs tls_cert_file and tls_key_file (the router's certificate)")

    def spill_policy(self) -> UrlPolicy:
        """Which presigned spill URLs this router opens."""
        return UrlPolicy(
            Endpoint.parse(u, allow_insecure_http=self.spill_allow_insecure_http) for u in self.spill_endpoints
        )

    def _check_limits(self) -> None:
        if self.max_associations < 1:
            raise InvalidValue("max_associations", "must be at least 1")
        for key in ("max_outbound_associations", "max_inbound_associations", "max_inbound_per_site"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= self.max_associations:
                raise InvalidValue(key, f"must be between 1 and max_associations ({self.max_associations})")
        if self.max_inbound_per_site is not None and self.max_inbound_per_site > self.inbound_limit:
            limit = self.inbound_limit
            raise InvalidValue("max_inbound_per_site", f"must not exceed max_inbound_associations ({limit})")
        if not 1 <= self.max_pending_per_address <= self.max_pending_requests:
            raise InvalidValue("max_pending_per_address", "must be between 1 and max_pending_requests")
        if not 1 <= self.max_pending_requests <= 10_000:
            raise InvalidValue("max_pending_requests", "must be between 1 and 10000")
        # 68 bytes is the smallest A-ASSOCIATE-RQ; the Upper Layer framer takes control PDUs up to 1 MiB.
        if not 1024 <= self.max_request_bytes <= 1024 * 1024:
            raise InvalidValue("max_request_bytes", "must be between 1024 and 1048576")

    @property
    def outbound_limit(self) -> int:
        return self.max_outbound_associations or self.max_associations

    @property
    def inbound_limit(self) -> int:
        return self.max_inbound_associations or max(1, self.max_associations // 2)

    @property
    def inbound_per_site_limit(self) -> int:
        return self.max_inbound_per_site or max(1, self.inbound_limit // 4)


@dataclass(frozen=True)
class ServiceGrant:
    """`[[shared.grant]]`: the service groups one site may use on a shared device (relay_router.services)."""

    site: str
    services: list[str]

    def __post_init__(self) -> None:
        if not is_site_name(self.site):
            raise InvalidValue("site", f"{self.site!r} is not a router name")
        _check_services(self.services, "services")


def _check_services(names: list[str], key: str) -> None:
    unknown = service_groups.check_groups(names)
    if unknown:
        raise InvalidValue(key, f"{unknown[0]!r} is not a service group (one of {', '.join(service_groups.GROUPS)})")


def _check_patient_identity(enabled: bool, issuer: str) -> None:
    """`patient_identity` needs the partner's issuer: an LO value (PS3.5 6.2), no backslash or control."""
    if enabled and not issuer.strip():
        raise InvalidValue("patient_issuer", "is required when patient_identity = true (the partner's issuer)")
    if len(issuer) > 64 or "\\" in issuer or any(ord(c) < 0x20 for c in issuer) or issuer != issuer.strip():
        raise InvalidValue("patient_issuer", f"{issuer!r} is not an Issuer of Patient ID (LO, at most 64 characters)")


@dataclass(frozen=True)
class SharedDevice:
    """A device on this hospital's LAN that other sites may reach."""

    ae_title: str
    host: str
    port: int
    # Sites (router names) allowed to open associations to it; "*" for all. Default: nobody.
    share_with: list[str] = field(default_factory=list)
    description: str = ""
    # Service groups every site in share_with may use (default: all but "other"), and per-site overrides.
    services: list[str] = field(default_factory=lambda: list(service_groups.ordered(service_groups.DEFAULT_GROUPS)))
    grant: list[ServiceGrant] = field(default_factory=list)
    # Patient identity (docs/patient-identity.md): coerce identifiers on associations to this device;
    # patient_issuer is the calling partner's Issuer of Patient ID (configured, never taken from the bridge).
    patient_identity: bool = False
    patient_issuer: str = ""
    # Take accelerated transfers for this device (docs/operations.md, "Transparent or accelerated routes"):
    # instances arrive in batches, are spooled here and stored into the device over [accelerate] associations.
    accelerate: bool = False

    def __post_init__(self) -> None:
        _check_ae(self.ae_title, "ae_title")
        _check_patient_identity(self.patient_identity, self.patient_issuer)
        if not 0 < self.port < 65536:
            raise InvalidValue("port", f"{self.port} is not between 1 and 65535")
        for site in self.share_with:
            if not is_share_target(site):
                raise InvalidValue("share_with", f"{site!r} is not a router name or '*'")
        _check_services(self.services, "services")
        seen: set[str] = set()
        for grant in self.grant:
            if grant.site in seen:
                raise InvalidValue("grant", f"site {grant.site!r} has two grants")
            seen.add(grant.site)
            if grant.site not in self.share_with and "*" not in self.share_with:
                raise InvalidValue("grant", f"site {grant.site!r} is not in share_with, so a grant means nothing")

    def services_for(self, site: str) -> tuple[str, ...]:
        """The service groups `site` may use on this device (none if it is not shared with it)."""
        if site not in self.share_with and "*" not in self.share_with:
            return ()
        override = next((g for g in self.grant if g.site == site), None)
        return service_groups.ordered(override.services if override is not None else self.services)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalDevice:
    """A device on this hospital's LAN allowed to call through the router ([[local]]).

    Once any [[local]] entry exists, a calling AE title not listed (or calling from
    an address outside its `addresses`) is rejected; [[shared]] devices are
    allowed from their own host without an entry.
    """

    ae_title: str
    # IP addresses or CIDR networks ("10.1.0.31", "10.1.0.0/24"); empty: any address.
    addresses: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_ae(self.ae_title, "ae_title")
        for text in self.addresses:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise InvalidValue(
                    "addresses", f"{text!r} is not an IP address or network (e.g. 10.1.0.31, 10.1.0.0/24)"
                ) from None

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(text, strict=False) for text in self.addresses)


@dataclass(frozen=True)
class RemoteDevice:
    """A device at another site, exposed here under a local AE title."""

    ae_title: str
    site: str
    # The device's title at its own site; defaults to ae_title.
    remote_ae_title: str | None = None
    # Patient identity (docs/patient-identity.md): coerce identifiers on associations to this device;
    # patient_issuer is that site's Issuer of Patient ID (configured, never taken from the bridge).
    patient_identity: bool = False
    patient_issuer: str = ""
    # Accelerated storage: this router accepts C-STORE for the device itself (spooled, fsync, answered at
    # once) and ships the spool in batches; the far router's [[shared]] entry needs accelerate = true too.
    accelerate: bool = False

    def __post_init__(self) -> None:
        _check_ae(self.ae_title, "ae_title")
        _check_patient_identity(self.patient_identity, self.patient_issuer)
        if self.remote_ae_title is not None:
            _check_ae(self.remote_ae_title, "remote_ae_title")
        if not is_site_name(self.site):
            raise InvalidValue("site", f"{self.site!r} is not a router name")

    @property
    def target(self) -> str:
        return self.remote_ae_title or self.ae_title


@dataclass(frozen=True)
class CommitmentRequester:
    """[[accelerate.commitment_requester]]: where a local device that asks for storage commitment on an
    accelerated route takes a late N-EVENT-REPORT (PS3.4 J.3.3, the router opens the association). From
    this file only: an address a peer supplied is never called."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise InvalidValue("ae_title", "must be 1 to 16 characters")
        if not 0 < self.port < 65536:
            raise InvalidValue("port", "must be between 1 and 65535")


@dataclass(frozen=True)
class AccelerateSection:
    """[accelerate]: the spool and transfers of accelerated routes (relay_router.accel)."""

    # Where spooled instances wait (PHI: 0700 directories, 0600 files). Relative: to this file. Default:
    # state_dir/spool.
    spool_dir: Path | None = None
    # Bytes the spool may hold; beyond, new C-STOREs are refused with 0xA700 (out of resources).
    spool_max_bytes: int = 10 * 1024**3
    # Parallel associations delivering into one destination device.
    associations: int = 4
    # Instances are sent between the routers in buckets of about this many bytes.
    bucket_bytes: int = 4 * 1024 * 1024
    # Delivery attempts before an instance is parked as dead (relay-router spool), and the backoff cap.
    max_attempts: int = 10
    retry_max_s: float = 300.0
    # Seconds before the near router asks the far one again which SOP classes and transfer syntaxes
    # the destination device accepts.
    capability_refresh_s: float = 3600.0
    # Storage commitment on accelerated routes (relay_router.accel.commitment): requests waiting for their
    # instances' outcomes at most (more get 0x0213), the instances one request may name, and how long an
    # instance may stay unconfirmed before it is reported failed (0x0110).
    commitment_max_pending: int = 1000
    commitment_max_instances: int = 10000
    commitment_timeout_s: float = 86400.0
    commitment_requester: list[CommitmentRequester] = field(default_factory=list)
    # Accelerated retrieval (relay_router.accel.moves): the longest a final C-MOVE response is held for the
    # move's images to reach their destination here; what is unconfirmed by then is reported failed.
    move_hold_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.spool_max_bytes < 1024 * 1024:
            raise InvalidValue("spool_max_bytes", "must be at least 1048576")
        if not 1 <= self.associations <= 32:
            raise InvalidValue("associations", "must be between 1 and 32")
        if not 64 * 1024 <= self.bucket_bytes <= 64 * 1024 * 1024:
            raise InvalidValue("bucket_bytes", "must be between 65536 and 67108864")
        if not 1 <= self.max_attempts <= 1000:
            raise InvalidValue("max_attempts", "must be between 1 and 1000")
        if not 1 <= self.retry_max_s <= 86400:
            raise InvalidValue("retry_max_s", "must be between 1 and 86400")
        if not 10 <= self.capability_refresh_s <= 7 * 86400:
            raise InvalidValue("capability_refresh_s", "must be between 10 and 604800")
        if not 5 <= self.move_hold_max_s <= 86400:
            raise InvalidValue("move_hold_max_s", "must be between 5 and 86400")
        if not 1 <= self.commitment_max_pending <= 100000:
            raise InvalidValue("commitment_max_pending", "must be between 1 and 100000")
        if not 1 <= self.commitment_max_instances <= 100000:
            raise InvalidValue("commitment_max_instances", "must be between 1 and 100000")
        if not 1 <= self.commitment_timeout_s <= 30 * 86400:
            raise InvalidValue("commitment_timeout_s", "must be between 1 and 2592000")


@dataclass(frozen=True)
class Pin:
    """The identity fingerprint a peer site must have (`relay-router fingerprint` prints it there)."""

    site: str
    fingerprint: str

    def __post_init__(self) -> None:
        if not is_site_name(self.site):
            raise InvalidValue("site", f"{self.site!r} is not a router name")
        if not re.fullmatch(r"[0-9a-f]{64}", self.fingerprint):
            raise InvalidValue("fingerprint", "must be 64 lowercase hex digits (SHA-256)")


@dataclass(frozen=True)
class MetricsSection(common_config.MetricsSection):
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class ConsoleSection:
    # HOST:PORT of the read-only web console (relay_router.console), e.g. "127.0.0.1:9466"; "" = off.
    listen: str = ""
    # Required when listen is not a loopback address: a file holding the console password (HTTP Basic,
    # user "admin"). Keep it mode 0600.
    password_file: Path | None = None
    # Where docs/operations.md is published for your operators (each error links to its section there too).
    docs_url: str = ""

    def __post_init__(self) -> None:
        if not self.listen:
            return
        try:
            host, _ = parse_host_port(self.listen)
        except ValueError as exc:
            raise InvalidValue("listen", f'{exc} (or "" to turn the console off)') from None
        loopback = host == "localhost" or host.strip("[]") in ("127.0.0.1", "::1") or host.startswith("127.")
        if not loopback and self.password_file is None:
            raise InvalidValue("password_file", "is required when the console listens beyond loopback")


@dataclass(frozen=True)
class RouterConfig:
    router: RouterSection
    bridge: BridgeSection
    dicom: DicomSection = field(default_factory=DicomSection)
    shared: list[SharedDevice] = field(default_factory=list)
    remote: list[RemoteDevice] = field(default_factory=list)
    local: list[LocalDevice] = field(default_factory=list)
    pin: list[Pin] = field(default_factory=list)
    # Patient identity across institutions (relay_router/identity/, docs/patient-identity.md).
    identity: IdentitySection = field(default_factory=IdentitySection)
    audit: AuditSection = field(default_factory=AuditSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    accelerate: AccelerateSection = field(default_factory=AccelerateSection)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for kind, title in [("shared", d.ae_title) for d in self.shared] + [
            ("remote", r.ae_title) for r in self.remote
        ]:
            if title in seen:
                raise ValueError(
                    f"AE title {title!r} appears twice ({seen[title]} and {kind}); "
                    "local titles must be unique on this router"
                )
            seen[title] = kind
        for r in self.remote:
            if r.site == self.router.name:
                raise ValueError(f"remote device {r.ae_title!r} names this router's own site")
        devices: list[SharedDevice | RemoteDevice] = [*self.shared, *self.remote]
        for device in devices:
            if device.patient_identity and not self.identity.issuer:
                raise InvalidValue("identity.issuer", f"is required: {device.ae_title!r} has patient_identity = true")
            if device.patient_identity and device.patient_issuer == self.identity.issuer:
                raise InvalidValue("patient_issuer", f"{device.ae_title!r}: the partner's issuer is our own")
            if device.patient_identity and device.accelerate and isinstance(device, RemoteDevice):
                # A [[shared]] device maps accelerated instances into our domain before its spool
                # (relay_router.identity.instances). A [[remote]] one would have to stamp our issuer into each
                # instance in the accelerated acceptor, which does not run the identity layer: refused rather
                # than let images leave unstamped on a route that promises coercion.
                raise InvalidValue(
                    "accelerate",
                    f"[[remote]] {device.ae_title!r}: cannot be combined with patient_identity (the accelerated "
                    "acceptor does not stamp this site's issuer into leaving instances); set patient_identity on "
                    "the device's [[shared]] entry at the receiving site, which maps accelerated instances into "
                    "its domain, or keep this [[remote]] route transparent",
                )
        idle = self.dicom.idle_timeout_s
        holds_moves = any(device.accelerate for device in self.shared)  # only moves to these are ever held
        if holds_moves and idle and self.accelerate.move_hold_max_s >= idle:
            # A held final C-MOVE response leaves the association silent; the idle timeout must not end it first.
            # Checked only where a move can be held: a router without accelerated shared devices keeps any
            # idle timeout it had before accelerated retrieval existed.
            raise InvalidValue("accelerate.move_hold_max_s", f"must be below [dicom] idle_timeout_s ({idle:g})")


def spool_dir(config: RouterConfig) -> Path:
    """The accelerated routes' spool directory ([accelerate] spool_dir, default state_dir/spool)."""
    return config.accelerate.spool_dir or config.router.state_dir / "spool"


def advertised_host(config: RouterConfig) -> str:
    """The router's DICOM address as local archives should be told it."""
    host, _ = parse_host_port(config.dicom.listen)
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def load(path: str | Path) -> RouterConfig:
    return load_config(path, RouterConfig)


# -- reload on SIGHUP (relay_router.service.RouterService.reload_config) ------------------------
#
# These sections take effect without a restart: running associations keep the routes, pins and
# callers they were admitted with; new associations use the new ones. Everything else (listen
# addresses, the bridge, TLS files, state_dir, limits, ...) is read once at start.
RELOADABLE = ("shared", "remote", "local", "pin")


@dataclass(frozen=True)
class ConfigChanges:
    """What a re-read configuration changes compared with the running one."""

    applied: tuple[str, ...]  # reloadable sections that differ ("shared", "remote", ...)
    needs_restart: tuple[str, ...]  # dotted keys that differ but only take effect after a restart

    @property
    def any(self) -> bool:
        return bool(self.applied or self.needs_restart)


def config_changes(running: RouterConfig, new: RouterConfig) -> ConfigChanges:
    """Compare two configurations section by section, key by key (dataclass fields)."""
    applied = tuple(name for name in RELOADABLE if getattr(running, name) != getattr(new, name))
    restart: list[str] = []
    for section in fields(RouterConfig):
        if section.name in RELOADABLE:
            continue
        old, now = getattr(running, section.name), getattr(new, section.name)
        if old == now:
            continue
        if is_dataclass(old):
            restart += [f"{section.name}.{f.name}" for f in fields(old) if getattr(old, f.name) != getattr(now, f.name)]
        else:
            restart.append(section.name)
    return ConfigChanges(applied, tuple(restart))


def with_reloadable(running: RouterConfig, new: RouterConfig) -> RouterConfig:
    """The running configuration with the reloadable sections of `new` (the rest needs a restart)."""
    return replace(running, **{name: getattr(new, name) for name in RELOADABLE})
