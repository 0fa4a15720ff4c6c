"""Audit trail: who did what, when, with what outcome, as JSON lines (one event a line).

In the spirit of DICOM PS3.15 A.5 / IHE ATNA: each event names the actor (router
or site, AE titles, source address), the action (association opened, refused,
aborted, released; sign-on; security alert), the time (UTC), and the outcome.
The bridge's events never contain patient data: it never sees any. Optional
RFC 5424 syslog copies of the JSON lines go to a collector over UDP; the events
PS3.15 A.5 has a message for also go, as DICOM audit messages (XML,
relay_common.dicom_audit), to an RFC 5425 syslog/TLS collector through a disk
spool (relay_common.syslog_tls).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Imported here, not lazily: an admin command switches to the service user, who may not be able to
# read the Python installation any more (tests/unit/ops/test_root_owned.py).
from relay_common import dicom_audit
from relay_common.syslog_tls import CollectorSettings, SyslogTlsSender, format_rfc5424

if TYPE_CHECKING:
    from collections.abc import Callable

    from relay_common.config import AuditSection

from relay_common.files import create_private

log = logging.getLogger("relay_common.audit")

# RFC 5424 severities by outcome.
SEVERITY = {"success": 6, "failure": 4, "alert": 1}


class AuditLog:
    def __init__(
        self,
        path: Path | None,
        *,
        app: str,
        syslog: str = "",
        collector: CollectorSettings | None = None,
        source_id: str = "",
    ) -> None:
        self.path = path
        self.app = app
        # AuditSourceID of the DICOM messages: the site (router) or the bridge's host name.
        self.source_id = source_id or socket.gethostname()
        self.collector: SyslogTlsSender | None = None
        if collector is not None:
            self.collector = SyslogTlsSender(collector)
            self.collector.start()
        self._lock = threading.Lock()
        self._syslog: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        if syslog:
            host, _, port = syslog.removeprefix("udp://").rpartition(":")
            self._syslog = (host.strip("[]"), int(port))
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if path is not None:
            create_private(path, narrow=False)
        # Notified of every record (the bridge console's ring of refusals and alerts); must not raise.
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def event(self, event: str, outcome: str, **fields: Any) -> dict[str, Any]:
        """Record one event; `outcome` is "success", "failure" or "alert" (a security alert)."""
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "app": self.app,
            "event": event,
            "outcome": outcome,
            **{k: v for k, v in fields.items() if v not in (None, "")},
        }
        line = json.dumps(record, sort_keys=False, default=str)
        if self.path is not None:
            with self._lock, self.path.open("a") as out:
                out.write(line + "\n")
        if self._sock is not None and self._syslog is not None:
            pri = 13 * 8 + SEVERITY.get(outcome, 5)  # facility 13: log audit
            message = f"<{pri}>1 {record['time']} {socket.gethostname()} {self.app} {os.getpid()} {event} - {line}"
            try:
                self._sock.sendto(message.encode(), self._syslog)
            except OSError as exc:
                log.warning("cannot send audit event to syslog %s: %s", self._syslog, exc)
        if self.collector is not None:
            self._send_dicom(record)
        if outcome == "alert":
            log.error("SECURITY ALERT %s: %s", event, line)
        for observe in self.observers:
            observe(record)
        return record

    def _send_dicom(self, record: dict[str, Any]) -> None:
        assert self.collector is not None
        try:
            messages = dicom_audit.from_record(record, source_id=self.source_id)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed record must not stop the caller
            log.error("cannot build the DICOM audit message for %s: %s", record.get("event"), exc)
            return
        severity = SEVERITY.get(str(record.get("outcome")), 5)
        for message in messages:
            xml = dicom_audit.to_bytes(message)
            msgid = str(record.get("event", ""))
            self.collector.submit(format_rfc5424(xml, app=self.app, msgid=msgid, severity=severity))

    @classmethod
    def from_section(cls, section: AuditSection, *, app: str, source_id: str = "") -> AuditLog:
        """The audit trail a daemon's [audit] section describes."""
        collector = None
        if section.enabled and section.collector:
            collector = CollectorSettings(
                url=section.collector,
                ca_file=section.ca_file,
                cert_file=section.cert_file,
                key_file=section.key_file,
                server_name=section.server_name,
                spool_dir=section.spool_dir,
                limit_bytes=section.queue_limit_bytes,
            )
        path = section.file if section.enabled else None
        return cls(path, app=app, syslog=section.syslog, collector=collector, source_id=source_id)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the collector's sender (what it could not send stays spooled for the next start)."""
        if self.collector is not None:
            self.collector.stop(timeout_s)


def admin_event(section: AuditSection, *, app: str, event: str, outcome: str, **fields: Any) -> None:
    """Audit one administrative command (relay-bridge router ..., relay-router enroll).

    Written to the JSON file and, through the collector, as a DICOM message; the
    performer is the login behind sudo when there is one. A problem with the audit
    trail is reported on stderr but does not undo or fail the command.
    """
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (a service account made by a container)
        user = f"uid {os.getuid()}"
    # Its own spool subdirectory: the daemon's sender owns the top level; what an admin command
    # could not send waits there for the next command.
    section = replace(section, spool_dir=section.spool_dir / "admin")
    try:
        audit = AuditLog.from_section(section, app=app)
        audit.event(event, outcome, user=user, **fields)
        audit.close(timeout_s=3.0)
    except Exception as exc:  # the command itself succeeded or failed already
        print(f"warning: cannot write the audit record for {event}: {exc}", file=sys.stderr)


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events in an audit file (for tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class AuditExportCollector:
    """Prometheus collector for the audit export (register it in a daemon's registry).

    `<prefix>_audit_export_sent_total`, `_dropped_total` (spool full: the overflow an operator must
    see), `_spooled_messages` (waiting for the collector) and `_collector_up` (1 when connected).
    Without a collector they stay 0.
    """

    def __init__(self, owner: object, prefix: str) -> None:
        # The daemon (RouterService, RelayServicer): its `audit` is read at each scrape.
        self.owner, self.prefix = owner, prefix

    def collect(self) -> Any:
        audit = getattr(self.owner, "audit", None)
        sender = audit.collector if isinstance(audit, AuditLog) else None
        sent, dropped, spooled, up = (
            (sender.sent, sender.overflowed, sender.spooled, int(sender.connected)) if sender else (0, 0, 0, 0)
        )
        p = self.prefix
        yield CounterMetricFamily(f"{p}_audit_export_sent", "DICOM audit messages sent to the collector", sent)
        yield CounterMetricFamily(
            f"{p}_audit_export_dropped",
            "DICOM audit messages dropped because the spool was full (collector unreachable too long)",
            dropped,
        )
        yield GaugeMetricFamily(f"{p}_audit_export_spooled_messages", "Messages waiting for the collector", spooled)
        yield GaugeMetricFamily(f"{p}_audit_collector_up", "1 when connected to the audit collector", up)
