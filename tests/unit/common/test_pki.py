"""relay_common.pki: the development CA, the bridge's server certificate, router CSRs."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from relay_common.files import write_private
from relay_common.pki import IssuedFiles, make_dev_pki


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> IssuedFiles:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki"), hostnames=["bridge.example.org", "localhost"], ips=["127.0.0.1", "::1"]
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files(issued: IssuedFiles) -> None:
    assert [p.name for p in (issued.ca_cert, issued.ca_key, issued.server_cert, issued.server_key)] == [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
    ]
    assert stat.S_IMODE(issued.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(issued.ca_key.stat().st_mode) == 0o600


def test_server_certificate_is_signed_by_the_ca(issued: IssuedFiles) -> None:
    ca, server = load(issued.ca_cert), load(issued.server_cert)
    server.verify_directly_issued_by(ca)  # issuer name and signature with the CA's public key
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("bridge.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_a_tls_client_trusting_the_ca_accepts_the_server_for_each_name(
    issued: IssuedFiles, name: x509.GeneralName
) -> None:
    verifier = PolicyBuilder().store(Store([load(issued.ca_cert)])).build_server_verifier(name)
    chain = verifier.verify(load(issued.server_cert), [])
    assert chain[-1] == load(issued.ca_cert)


def test_a_name_not_asked_for_is_refused(issued: IssuedFiles) -> None:
    verifier = PolicyBuilder().store(Store([load(issued.ca_cert)])).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        verifier.verify(load(issued.server_cert), [])


def test_another_ca_does_not_vouch_for_the_server(issued: IssuedFiles, tmp_path: Path) -> None:
    other = make_dev_pki(tmp_path, hostnames=["bridge.example.org"], ips=[])
    verifier = (
        PolicyBuilder().store(Store([load(other.ca_cert)])).build_server_verifier(x509.DNSName("bridge.example.org"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(load(issued.server_cert), [])


def test_subject_alternative_names_are_the_ones_asked_for(issued: IssuedFiles) -> None:
    san = load(issued.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bridge.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_server_certificate_is_for_tls_servers(issued: IssuedFiles) -> None:
    eku = load(issued.server_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_keys_match_their_certificates(issued: IssuedFiles) -> None:
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    for cert_path, key_path in ((issued.server_cert, issued.server_key), (issued.ca_cert, issued.ca_key)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert_key = load(cert_path).public_key()
        assert key.public_key().public_bytes(serialization.Encoding.DER, raw) == cert_key.public_bytes(
            serialization.Encoding.DER, raw
        )


def test_ip_only_certificate(tmp_path: Path) -> None:
    files = make_dev_pki(tmp_path, hostnames=[], ips=["10.1.2.3"])
    cert = load(files.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    verifier = (
        PolicyBuilder()
        .store(Store([load(files.ca_cert)]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("10.1.2.3")))
    )
    verifier.verify(cert, [])


def test_write_private_narrows_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "secret.key"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
