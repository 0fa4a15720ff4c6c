"""Certificate files re-read without a restart: the bridge's server pair, the router's client pair and CA.

A renewal tool (certbot, an ACME client, a copy by hand) replaces the files in
place while the daemon serves. `CertificateFiles.check()` stats them (inode,
size, mtime) and, only when that stamp changed, reads and validates the whole
set: the certificate parses, the key parses and belongs to it, the CA parses,
nothing has expired. A half-written file or a certificate whose key has not
been copied yet is refused with one ERROR line per distinct stamp and the
previous set stays in use; the next change is tried again. Accepted material
gets a new `generation`, which the consumers compare with what they last handed
to gRPC.

- Bridge: `ReloadingServerCredentials` wraps grpc's dynamic server credentials,
  whose fetcher grpc calls before every new TLS handshake. Existing connections
  (and the associations on them) keep the certificate they were made with.
- Router: relay_router.tunnel builds its next channel from `material`.

The expiry metric (relay_common.certmetrics) reports what is in use, so a
refused renewal keeps alerting about the old certificate.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

log = logging.getLogger("relay_common.tlsreload")
MAX_PEM_BYTES = 1024 * 1024  # a CA bundle is a few hundred kB at most

# What each process presents or trusts right now, by configured path: what the expiry metric reads first.
_IN_USE: dict[Path, bytes] = {}
_IN_USE_LOCK = threading.Lock()


def certificate_in_use(path: Path) -> bytes | None:
    """The PEM this process uses for the file configured as `path` (None: not managed here)."""
    with _IN_USE_LOCK:
        return _IN_USE.get(Path(path).absolute())


class CertificateFilesError(ValueError):
    """The files on disk do not form a usable set (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes | None
    key_pem: bytes | None
    ca_pem: bytes | None
    serial: int | None  # of the leaf certificate, for logs and tests
    not_after: datetime.datetime | None


Stamp = tuple[tuple[str, int, int, int, int], ...]


def _stamp(paths: list[Path]) -> Stamp:
    """(path, device, inode, size, mtime) of each file; a missing file stamps as zeros."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(path), 0, 0, -1, 0))
    return tuple(out)


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise CertificateFilesError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateFilesError(f"{path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def _short(exc: Exception) -> str:
    """cryptography's parse errors end in a long FAQ pointer; the first sentence says what is wrong."""
    return str(exc).split(". See ")[0]


def _public_der(key: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_material(cert: Path | None, key: Path | None, ca: Path | None, *, allow_expired: bool = False) -> TlsMaterial:
    """Read and validate the set; raises CertificateFilesError saying which file is wrong and how.

    `allow_expired` (the first load): an expired certificate is only logged, as before reloading
    existed; the expiry metric and the `check` commands report it. A renewal to an expired
    certificate is refused."""
    now = datetime.datetime.now(datetime.UTC)
    cert_pem = key_pem = ca_pem = None
    serial = not_after = None
    if cert is not None and key is not None:
        cert_pem, key_pem = _read(cert), _read(key)
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as exc:
            raise CertificateFilesError(f"{cert} is not a PEM certificate (half written?): {_short(exc)}") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateFilesError(
                f"{key} is not an unencrypted PEM private key (half written?): {_short(exc)}"
            ) from None
        leaf = chain[0]
        if _public_der(private.public_key()) != _public_der(leaf.public_key()):
            raise CertificateFilesError(
                f"{key} is not the key of the certificate in {cert} (serial {leaf.serial_number:x}); "
                "replace both files together"
            )
        if leaf.not_valid_after_utc <= now:
            expired = f"the certificate in {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
            if not allow_expired:
                raise CertificateFilesError(expired)
            log.error("%s: peers will refuse it; renew it (it is picked up without a restart)", expired)
        serial, not_after = leaf.serial_number, leaf.not_valid_after_utc
    if ca is not None:
        ca_pem = _read(ca)
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise CertificateFilesError(
                f"{ca} is not a PEM certificate bundle (half written?): {_short(exc)}"
            ) from None
    return TlsMaterial(cert_pem, key_pem, ca_pem, serial, not_after)


class CertificateFiles:
    """A certificate with its key, and/or a CA file, loaded only as a validated whole.

    The first load happens in the constructor and raises CertificateFilesError (a
    daemon must not start without usable files); later changes are picked up by
    `check()`, which never raises. Thread-safe: grpc may call the server
    fetcher from its own threads.
    """

    def __init__(self, what: str, *, cert: Path | None = None, key: Path | None = None, ca: Path | None = None):
        self.what = what  # "server certificate", "client certificate": for log lines
        self.cert, self.key, self.ca = cert, key, ca
        self._paths = [p for p in (cert, key, ca) if p is not None]
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.material = load_material(cert, key, ca, allow_expired=True)
        self.generation = 0
        self._refused: Stamp | None = None
        self._publish()

    def _publish(self) -> None:
        for path, pem in ((self.cert, self.material.cert_pem), (self.ca, self.material.ca_pem)):
            if path is not None and pem is not None:
                with _IN_USE_LOCK:
                    _IN_USE[path.absolute()] = pem

    def check(self) -> bool:
        """Re-read the files if they changed; True when a new, valid set was accepted by this call."""
        with self._lock:
            stamp = _stamp(self._paths)
            if stamp == self._stamp or stamp == self._refused:
                return False
            try:
                material = load_material(self.cert, self.key, self.ca)
            except CertificateFilesError as exc:
                self._refused = stamp  # said once per change, not at every handshake
                log.error("%s not reloaded, the previous one stays in use: %s", self.what, exc)
                return False
            self.material, self._stamp, self._refused = material, stamp, None
            self.generation += 1
            self._publish()
        if material.serial is not None and material.not_after is not None:
            log.warning(
                "%s reloaded from %s: serial %x, valid until %s; new connections use it",
                self.what,
                self.cert,
                material.serial,
                material.not_after.isoformat(),
            )
        else:
            log.warning("%s reloaded from %s", self.what, self.ca)
        return True


class ReloadingServerCredentials:
    """grpc server credentials whose certificate follows `files` for every new connection."""

    def __init__(self, files: CertificateFiles, *, client_ca: CertificateFiles | None = None) -> None:
        self.files = files
        self.client_ca = client_ca  # mutual TLS: the CA client certificates must chain to
        self._served: tuple[int, int] | None = None

    def _generations(self) -> tuple[int, int]:
        return (self.files.generation, self.client_ca.generation if self.client_ca else 0)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self.files.material
        assert material.key_pem is not None and material.cert_pem is not None
        roots = self.client_ca.material.ca_pem if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(material.key_pem, material.cert_pem)], roots)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each new handshake: a configuration only when something changed."""
        try:
            self.files.check()
            if self.client_ca is not None:
                self.client_ca.check()
            generations = self._generations()
            if generations == self._served:
                return None
            self._served = generations
            return self._configuration()
        except Exception:  # a bug here must not break handshakes: keep what is served
            log.exception("cannot check the %s for changes", self.files.what)
            return None

    def credentials(self) -> grpc.ServerCredentials:
        self._served = self._generations()
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch, require_client_authentication=self.client_ca is not None
        )


class ReloadingClientCredentials:
    """The router's channel credentials: the bridge CA, and the client pair from enrollment when present.

    `refresh()` re-checks the files (a client pair that appeared or vanished counts as a change);
    `changed_since(key)` tells whether a channel built at `key` (from `credentials()`) is outdated.
    A channel keeps the credentials it was built with: the caller decides when to build the next one.
    """

    def __init__(self, ca: Path, cert: Path, key: Path) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        self.files = self._load()

    def _mutual_on_disk(self) -> bool:
        return self.cert.exists() and self.key.exists()

    def _load(self) -> CertificateFiles:
        mutual = self._mutual_on_disk()
        return CertificateFiles(
            "client certificate" if mutual else "bridge CA",
            cert=self.cert if mutual else None,
            key=self.key if mutual else None,
            ca=self.ca,
        )

    def refresh(self) -> None:
        if self._mutual_on_disk() == (self.files.cert is not None):
            self.files.check()
            return
        try:
            self.files = self._load()
        except CertificateFilesError as exc:
            log.error("client certificate not reloaded, the previous one stays in use: %s", exc)
            return
        log.warning("client certificate %s: %s", "found" if self.files.cert else "removed", self.cert)

    @property
    def key_in_use(self) -> tuple[int, int]:
        return (id(self.files), self.files.generation)

    def changed_since(self, key: tuple[int, int] | None) -> bool:
        return key is not None and key != self.key_in_use

    def credentials(self) -> tuple[grpc.ChannelCredentials, tuple[int, int]]:
        material = self.files.material
        return (
            grpc.ssl_channel_credentials(
                root_certificates=material.ca_pem, private_key=material.key_pem, certificate_chain=material.cert_pem
            ),
            self.key_in_use,
        )


# -- SIGHUP: "re-read your files now" ---------------------------------------------------------

_RELOAD_HOOKS: list[Callable[[], object]] = []


def add_reload_hook(hook: Callable[[], object]) -> Callable[[], None]:
    """Run `hook` on SIGHUP (relay_common.daemon); returns a function that removes it."""
    _RELOAD_HOOKS.append(hook)
    return lambda: _RELOAD_HOOKS.remove(hook) if hook in _RELOAD_HOOKS else None


def run_reload_hooks() -> int:
    """Run every registered hook (an exception is logged, the others still run); returns how many ran."""
    for hook in list(_RELOAD_HOOKS):
        try:
            hook()
        except Exception:  # one failing reload must not stop the others or the daemon
            log.exception("reload hook %r failed", hook)
    return len(_RELOAD_HOOKS)
