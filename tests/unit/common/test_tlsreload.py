"""Certificate files re-read without a restart: validation, the handshake fetcher, a real grpc server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import grpc.aio
import pytest

from relay_common.certmetrics import read_expiries
from relay_common.pki import make_dev_pki
from relay_common.tlsreload import (
    CertificateFiles,
    CertificateFilesError,
    ReloadingClientCredentials,
    ReloadingServerCredentials,
    add_reload_hook,
    certificate_in_use,
    run_reload_hooks,
)
from tests.support.certs import issue_pair, replace_file, served_certificate


@pytest.fixture
def pki(tmp_path: Path):
    return make_dev_pki(tmp_path, hostnames=["localhost"], ips=["127.0.0.1"])


def _files(pki) -> CertificateFiles:
    return CertificateFiles("server certificate", cert=pki.server_cert, key=pki.server_key)


def test_a_renewed_pair_is_accepted_once_and_becomes_the_one_in_use(pki) -> None:
    files = _files(pki)
    assert not files.check(), "unchanged files are not reloaded"
    cert_pem, key_pem, cert = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost")
    replace_file(pki.server_key, key_pem)
    replace_file(pki.server_cert, cert_pem)
    assert files.check()
    assert files.generation == 1 and files.material.serial == cert.serial_number
    assert certificate_in_use(pki.server_cert) == cert_pem
    assert not files.check(), "a change is taken once"


def test_a_half_written_certificate_is_refused_once_and_the_old_pair_kept(
    pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = _files(pki)
    before = files.material
    pem = pki.server_cert.read_bytes()
    replace_file(pki.server_cert, pem[: len(pem) // 2])
    with caplog.at_level(logging.ERROR, "relay_common.tlsreload"):
        assert not files.check()
        assert not files.check()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "one ERROR per change, not one per handshake"
    assert "not reloaded, the previous one stays in use" in errors[0].getMessage()
    assert str(pki.server_cert) in errors[0].getMessage()
    assert files.material is before and files.generation == 0
    # The expiry metric keeps reporting the certificate in use, not the broken file.
    assert read_expiries("server", pki.server_cert)[0].not_after == before.not_after.timestamp()
    replace_file(pki.server_cert, pem)  # fixed: accepted again (same content, new file)
    assert files.check()


def test_a_certificate_without_its_new_key_is_refused(pki, caplog: pytest.LogCaptureFixture) -> None:
    files = _files(pki)
    cert_pem, key_pem, _ = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost")
    replace_file(pki.server_cert, cert_pem)  # the key is copied a moment later
    with caplog.at_level(logging.ERROR, "relay_common.tlsreload"):
        assert not files.check()
    assert "is not the key of the certificate" in caplog.text and "replace both files together" in caplog.text
    replace_file(pki.server_key, key_pem)
    assert files.check()


def test_a_renewal_to_an_expired_certificate_is_refused(pki, caplog: pytest.LogCaptureFixture) -> None:
    files = _files(pki)
    cert_pem, key_pem, _ = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost", days=-1)
    replace_file(pki.server_cert, cert_pem)
    replace_file(pki.server_key, key_pem)
    with caplog.at_level(logging.ERROR, "relay_common.tlsreload"):
        assert not files.check()
    assert "expired on" in caplog.text
    # At start an expired certificate is served as before (and reported), not a reason to stay down.
    assert _files(pki).material.cert_pem == cert_pem


def test_a_mismatched_pair_at_start_is_an_error_naming_the_files(pki, tmp_path: Path) -> None:
    _, other_key, _ = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost")
    replace_file(pki.server_key, other_key)
    with pytest.raises(CertificateFilesError, match="is not the key of the certificate"):
        _files(pki)


def test_the_fetcher_hands_grpc_a_configuration_only_after_a_change(pki) -> None:
    reloading = ReloadingServerCredentials(_files(pki))
    reloading.credentials()
    assert reloading._fetch() is None
    cert_pem, key_pem, _ = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost")
    replace_file(pki.server_key, key_pem)
    replace_file(pki.server_cert, cert_pem)
    assert isinstance(reloading._fetch(), grpc.ServerCertificateConfiguration)
    assert reloading._fetch() is None


def test_a_real_grpc_server_presents_the_renewed_certificate_to_new_connections(pki) -> None:
    async def scenario() -> tuple[int, int, int]:
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", ReloadingServerCredentials(_files(pki)).credentials())
        await server.start()
        try:
            first = await asyncio.to_thread(served_certificate, "127.0.0.1", port, pki.ca_cert)
            cert_pem, key_pem, renewed = issue_pair(pki.ca_cert, pki.ca_key, common_name="localhost")
            replace_file(pki.server_key, key_pem)
            replace_file(pki.server_cert, cert_pem)
            second = await asyncio.to_thread(served_certificate, "127.0.0.1", port, pki.ca_cert)
            return first.serial_number, second.serial_number, renewed.serial_number
        finally:
            await server.stop(0)

    first, second, renewed = asyncio.run(scenario())
    assert first != renewed and second == renewed


def test_client_credentials_notice_a_client_pair_that_appears(pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client = ReloadingClientCredentials(pki.ca_cert, cert, key)
    _, built = client.credentials()
    client.refresh()
    assert not client.changed_since(built)
    cert_pem, key_pem, _ = issue_pair(pki.ca_cert, pki.ca_key, common_name="site-a", client=True)
    key.write_bytes(key_pem)
    cert.write_bytes(cert_pem)
    client.refresh()
    assert client.changed_since(built) and client.files.cert == cert


def test_reload_hooks_run_and_a_failing_one_does_not_stop_the_others() -> None:
    seen: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    remove_broken = add_reload_hook(broken)
    remove_ok = add_reload_hook(lambda: seen.append("ok"))
    try:
        run_reload_hooks()
    finally:
        remove_broken()
        remove_ok()
    assert seen == ["ok"]
