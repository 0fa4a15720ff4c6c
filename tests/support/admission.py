"""Helpers for the router admission tests: router.toml sections LocalRelayNetwork does not write.

`AdmissionNetwork` appends raw TOML (`[[local]]`, `[[pin]]`) to a site's router.toml, so tests
run the same `relay-router serve` a hospital runs, with the keys under test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from relay_demo.network import LocalRelayNetwork, Site


class AdmissionNetwork(LocalRelayNetwork):
    """A LocalRelayNetwork whose router.toml files end with `extra_toml[site]`."""

    def __init__(self, workdir: Path, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.extra_toml: dict[str, str] = {}

    def write_router_config(self, site: Site) -> Path:
        path = super().write_router_config(site)
        extra = self.extra_toml.get(site.name)
        if extra:
            path.write_text(path.read_text() + "\n" + extra.strip() + "\n")
        return path

    def fingerprint(self, name: str) -> str:
        """The site's identity fingerprint, as `relay-router fingerprint` prints it for peers to pin."""
        out = subprocess.run(
            [self.python, "-m", "relay_router.cli", "--config", str(self.router_config_path(name)), "fingerprint"],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
            cwd=self.workdir,
        ).stdout.strip()
        assert len(out) == 64, out
        return out

    def audit_events(self, name: str) -> list[dict[str, object]]:
        path = self.workdir / f"audit-{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def local_entries(*entries: tuple[str, list[str]]) -> str:
    """`[[local]]` tables for (AE title, addresses)."""
    lines: list[str] = []
    for title, addresses in entries:
        lines += ["[[local]]", f"ae_title = {json.dumps(title)}"]
        if addresses:
            lines.append(f"addresses = {json.dumps(addresses)}")
        lines.append("")
    return "\n".join(lines)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def write_tls_files(directory: Path) -> dict[str, Path]:
    """A hospital CA, the router's certificate (127.0.0.1, localhost), a device certificate it signed, and a
    device certificate from another CA; PEM files (test fixtures, generated per run)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(label: str, cert: x509.Certificate, private: rsa.RSAPrivateKey | None) -> None:
        paths[f"{label}.pem"] = directory / f"{label}.pem"
        paths[f"{label}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if private is not None:
            paths[f"{label}.key"] = directory / f"{label}.key"
            paths[f"{label}.key"].write_bytes(
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )

    def ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        private = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private, hashes.SHA256())
        )
        return cert, private

    def leaf(
        cn: str, issuer: tuple[x509.Certificate, rsa.RSAPrivateKey], server: bool
    ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        private = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[0].subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(issuer[1], hashes.SHA256()), private

    hospital = ca("Hospital A test CA")
    other = ca("Some other CA")
    write("ca", hospital[0], None)
    write("router", *leaf("router.hospital-a.test", hospital, server=True))
    write("device", *leaf("WS_TLS", hospital, server=False))
    write("stranger", *leaf("STRANGER", other, server=False))
    return paths
