"""sd_notify (READY, WATCHDOG, STATUS over a real AF_UNIX datagram socket), the Nagios output and the
certificate expiry collector, without daemons (the processes are exercised in
tests/integration/test_service_manager.py)."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from relay_common.certmetrics import CertificateCollector, certificate_expiries
from relay_common.daemon import ServiceNotifier, announce_ready
from relay_common.nagios import CRITICAL, OK, UNKNOWN, WARNING, Check, certificate_state, perf, worst
from tests.unit.ops.helpers import samples


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_ready_reaches_the_socket_alone(notify_socket, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    announce_ready(None)
    assert sock.recv(64) == b"READY=1"


def test_status_is_sent_once_per_change_and_stays_one_line(notify_socket) -> None:
    sock, path = notify_socket
    notifier = ServiceNotifier({"NOTIFY_SOCKET": path})
    notifier.status("signed on as hospital-a, 0 associations")
    notifier.status("signed on as hospital-a, 0 associations")
    notifier.status("signed on as hospital-a,\n3 associations")
    assert drain(sock) == [
        "STATUS=signed on as hospital-a, 0 associations",
        "STATUS=signed on as hospital-a, 3 associations",
    ]


def test_watchdog_pings_at_half_the_interval_from_the_loop(notify_socket) -> None:
    sock, path = notify_socket
    notifier = ServiceNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_s == pytest.approx(0.4)
    states = iter(
        ["serving, 0 routers connected, 0 associations"] * 3 + ["serving, 1 router connected, 0 associations"] * 100
    )

    async def run_a_second() -> None:
        task = asyncio.create_task(notifier.run(lambda: next(states)))
        await asyncio.sleep(1.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_a_second())
    got = drain(sock)
    pings = [m for m in got if m == "WATCHDOG=1"]
    assert 4 <= len(pings) <= 7, got  # every 0.2 s for a second
    assert [m for m in got if m.startswith("STATUS=")] == [
        "STATUS=serving, 0 routers connected, 0 associations",
        "STATUS=serving, 1 router connected, 0 associations",
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(env: dict[str, str], expected: float | None) -> None:
    assert ServiceNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env}).watchdog_s == expected


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = ServiceNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and not notifier.send("READY=1")


def test_a_vanished_manager_does_not_stop_the_daemon(tmp_path: Path) -> None:
    assert not ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("WATCHDOG=1")


# -- plugin output ---------------------------------------------------------------------


def test_plugin_line_and_perfdata() -> None:
    check = Check(
        WARNING, "site-a signed on | 1 of 2\nonline", [perf("online", 1, minimum=0, maximum=2), perf("r", 3, unit="c")]
    )
    assert check.line() == "DICOM-RELAY WARNING - site-a signed on / 1 of 2 online | online=1;;;0;2 r=3c"
    assert worst(OK, UNKNOWN) == UNKNOWN and worst(UNKNOWN, WARNING) == WARNING and worst(CRITICAL, UNKNOWN) == CRITICAL


def make_cert(path: Path, days: float, cn: str = "bridge.example.org") -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return not_after.replace(microsecond=0).timestamp()


@pytest.mark.parametrize(("days", "state"), [(90, OK), (20, WARNING), (5, CRITICAL), (-1, CRITICAL)])
def test_certificate_state_by_days_left(tmp_path: Path, days: float, state: int) -> None:
    make_cert(tmp_path / "server.pem", days)
    found, problems = certificate_expiries({"server": tmp_path / "server.pem"})
    got, text = certificate_state(found, problems)
    assert got == state, text
    assert ("CN=bridge.example.org" in text) == (state != OK), text


def test_expiry_metric_and_unreadable_files(tmp_path: Path) -> None:
    expected = make_cert(tmp_path / "server.pem", 30)
    (tmp_path / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    registry = CollectorRegistry()
    registry.register(
        CertificateCollector(
            "relay_bridge", {"server": tmp_path / "server.pem", "client": None, "bridge_ca": tmp_path / "broken.pem"}
        )
    )
    got = samples(registry)
    key = (
        "relay_bridge_certificate_expiry_timestamp_seconds",
        (("role", "server"), ("subject", "CN=bridge.example.org")),
    )
    assert got[key] == expected
    assert got[("relay_bridge_certificate_read_errors", ())] == 1
    state, text = certificate_state(*certificate_expiries({"bridge_ca": tmp_path / "broken.pem"}))
    assert state == UNKNOWN and "broken.pem" in text


def test_a_manager_that_does_not_read_never_blocks_the_loop(notify_socket) -> None:
    sock, path = notify_socket
    notifier = ServiceNotifier({"NOTIFY_SOCKET": path})
    results = [notifier.send("WATCHDOG=1") for _ in range(5000)]  # far more than a datagram queue holds
    assert results[0] and not all(results)
