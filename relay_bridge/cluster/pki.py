"""The cluster's own PKI: a CA and one certificate that every replica presents as server and as client.

Replicas authenticate each other with mutual TLS against this CA only (never the routers' CA),
so a router certificate, or any certificate from a public CA, cannot open the internal port.
Every replica's certificate names `CLUSTER_NAME`; clients check that name instead of the
address they dial (replica addresses are IPs in the replicas table, often private).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay_common.files import write_private
from relay_common.pki import key_pem, make_ca

CLUSTER_NAME = "relay-cluster"


@dataclass(frozen=True)
class ClusterFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def make_cluster_pki(directory: Path, *, days: int = 825) -> ClusterFiles:
    """cluster-ca.pem/.key and cluster.pem/.key in `directory` (keys mode 0600)."""
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca("dicom-relay cluster CA", now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CLUSTER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = ClusterFiles(
        directory / "cluster-ca.pem", directory / "cluster-ca.key", directory / "cluster.pem", directory / "cluster.key"
    )
    directory.mkdir(parents=True, exist_ok=True)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.ca_key, key_pem(ca_key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.key, key_pem(key))
    return files
