"""The TLS syslog sender: RFC 5425 framing, disk spool while the collector is down, order, overflow.

The collector here is a small TLS server on 127.0.0.1 (rsyslog itself is in
tests/integration/test_audit_export.py); it can be stopped and restarted on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # the dev PKI helpers may move to relay_common during the day
    from relay_common.pki import make_dev_pki  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from relay_bridge.pki import make_dev_pki
from relay_common.syslog_tls import CollectorSettings, SyslogTlsSender, format_rfc5424, parse_collector, wait_until


def read_frames(data: bytes) -> list[bytes]:
    """Split RFC 5425 octet-counted frames; fails on anything else."""
    frames = []
    while data:
        length, sep, rest = data.partition(b" ")
        assert sep and length.isdigit(), data[:40]
        frames.append(rest[: int(length)])
        data = rest[int(length) :]
    return frames


class Collector:
    """A TLS listener that records every byte received, per connection."""

    def __init__(self, pki_dir: Path, port: int = 0) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki_dir / "server.pem", pki_dir / "server.key")
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.buffers: list[bytearray] = []  # one per connection, in accept order
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
            except OSError:  # a client that does not trust us (the wrong-CA test)
                raw.close()
                continue
            self._conns.append(conn)
            self.buffers.append(bytearray())
            thread = threading.Thread(target=self._read, args=(conn, self.buffers[-1]), daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def received(self) -> bytes:
        return b"".join(self.buffers)

    def _read(self, conn: ssl.SSLSocket, buffer: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                buffer += chunk

    def frames(self) -> list[bytes]:
        return read_frames(self.received)

    def close(self) -> None:
        # shutdown first: a bare close() leaves the socket listening while accept() blocks on it
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accept.join(2)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    make_dev_pki(tmp_path / "pki", hostnames=["localhost"], ips=["127.0.0.1"])
    return tmp_path / "pki"


@pytest.fixture
def collector(pki: Path) -> Iterator[Collector]:
    c = Collector(pki)
    yield c
    c.close()


def sender(pki: Path, port: int, spool: Path, **kw: object) -> SyslogTlsSender:
    s = SyslogTlsSender(
        CollectorSettings(
            url=f"tls://127.0.0.1:{port}",
            ca_file=pki / "ca.pem",
            spool_dir=spool,
            retry_s=0.2,
            **kw,  # type: ignore[arg-type]
        )
    )
    s.start()
    return s


MESSAGES = [format_rfc5424(f"<AuditMessage n='{i}'/>".encode(), app="test", msgid="ev", severity=6) for i in range(64)]


def msg(i: int) -> bytes:
    return MESSAGES[i]


def test_collector_url_errors_say_what_is_expected() -> None:
    assert parse_collector("tls://audit.example.org:6514") == ("audit.example.org", 6514)
    for bad in ("udp://h:514", "tls://h", "tls://:6514", "h:6514", "tls://h:99999"):
        with pytest.raises(ValueError, match="tls://HOST:PORT"):
            parse_collector(bad)


def test_rfc5424_header_and_bom() -> None:
    line = format_rfc5424(b"<x/>", app="relay router", msgid="sign_on", severity=4, hostname="h\nost")
    assert line.startswith(b"<108>1 ")  # facility 13 (log audit) * 8 + 4
    header, _, body = line.partition(b" \xef\xbb\xbf")
    assert header.split(b" ")[2:4] == [b"host", b"relayrouter"] and header.endswith(b" sign_on -")
    assert body == b"<x/>"


def test_messages_arrive_octet_counted_in_order(pki: Path, collector: Collector, tmp_path: Path) -> None:
    s = sender(pki, collector.port, tmp_path / "spool")
    for i in range(50):
        assert s.submit(msg(i))
    assert wait_until(lambda: len(collector.frames()) == 50, 10), collector.received[-200:]
    assert collector.frames() == [msg(i) for i in range(50)]
    assert s.sent == 50 and s.spooled == 0 and s.overflowed == 0
    assert len(collector.buffers) == 1  # one connection for all (TLS 1.3 session tickets are not a close)
    s.stop()


def test_outage_spools_on_disk_then_resends_in_order(pki: Path, tmp_path: Path) -> None:
    first = Collector(pki)
    port = first.port
    s = sender(pki, port, tmp_path / "spool")
    s.submit(msg(0))
    assert wait_until(lambda: len(first.frames()) == 1, 10)
    first.close()  # the collector goes away
    for i in range(1, 20):
        s.submit(msg(i))
    # (a message may still reach the closing collector: the connection closes asynchronously)
    assert wait_until(lambda: s.spooled + len(first.frames()) == 20, 10), (s.spooled, s.last_error)
    spooled = s.spooled
    assert spooled >= 18 and "Connection refused" in s.last_error
    files = sorted((tmp_path / "spool").iterdir())
    assert len(files) == spooled and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    second = Collector(pki, port)  # back on the same port
    try:
        assert wait_until(lambda: len(second.frames()) == spooled, 15), (s.last_error, len(second.frames()))
        assert first.frames() + second.frames() == [msg(i) for i in range(20)]  # nothing lost, in order
        assert s.spooled == 0 and not list((tmp_path / "spool").iterdir())
    finally:
        s.stop()
        second.close()


def test_spool_survives_a_restart(pki: Path, tmp_path: Path) -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    s = sender(pki, port, tmp_path / "spool")
    for i in range(5):
        s.submit(msg(i))
    assert wait_until(lambda: s.spooled == 5, 10)
    s.stop()
    c = Collector(pki, port)
    try:
        again = sender(pki, port, tmp_path / "spool")
        again.submit(msg(5))
        assert wait_until(lambda: len(c.frames()) == 6, 15)
        assert c.frames() == [msg(i) for i in range(6)]
        again.stop()
    finally:
        c.close()


def test_overflow_is_counted_and_logged(pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    limit = 3 * len(msg(0))
    s = sender(pki, port, tmp_path / "spool", limit_bytes=limit)
    for i in range(5):
        s.submit(msg(i))
    assert wait_until(lambda: s.overflowed == 2, 10), s.overflowed
    assert s.spooled == 3
    assert "audit message dropped (1 so far): the audit spool is full" in caplog.text
    s.stop()


def test_wrong_ca_is_reported_and_nothing_is_lost(pki: Path, collector: Collector, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_dev_pki(other, hostnames=["localhost"], ips=["127.0.0.1"])
    s = sender(other, collector.port, tmp_path / "spool")
    s.submit(msg(0))
    assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in s.last_error, 10), s.last_error
    assert s.spooled == 1 and collector.frames() == []
    s.stop()


def test_export_metrics(pki: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from relay_common.audit import AuditExportCollector, AuditLog
    from relay_common.syslog_tls import CollectorSettings

    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    settings = CollectorSettings(
        url=f"tls://127.0.0.1:{port}", ca_file=pki / "ca.pem", spool_dir=tmp_path / "spool", limit_bytes=1500
    )
    audit = AuditLog(None, app="relay-router", collector=settings, source_id="hospital-a")
    registry = CollectorRegistry()
    registry.register(AuditExportCollector(SimpleNamespace(audit=audit), "relay_router"))
    for _ in range(3):
        audit.event("identity_mismatch", "alert", site="hospital-b")
    assert audit.collector is not None
    assert wait_until(lambda: audit.collector.spooled + audit.collector.overflowed == 3, 10)
    text = generate_latest(registry).decode()
    assert f"relay_router_audit_export_dropped_total {float(audit.collector.overflowed)}" in text
    assert audit.collector.overflowed >= 1
    assert "relay_router_audit_collector_up 0.0" in text
    audit.close()
