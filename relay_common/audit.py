"""Audit trail: who did what, when, with what outcome, as JSON lines (one event a line).

In the spirit of DICOM PS3.15 A.5 / IHE ATNA: each event names the actor (router
or site, AE titles, source address), the action (association opened, refused,
aborted, released; sign-on; security alert), the time (UTC), and the outcome.
The bridge's events never contain patient data: it never sees any. Optional
RFC 5424 syslog copies go to a collector over UDP.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from relay_common.files import create_private

log = logging.getLogger("relay_common.audit")

# RFC 5424 severities by outcome.
SEVERITY = {"success": 6, "failure": 4, "alert": 1}


class AuditLog:
    def __init__(self, path: Path | None, *, app: str, syslog: str = "") -> None:
        self.path = path
        self.app = app
        self._lock = threading.Lock()
        self._syslog: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        if syslog:
            host, _, port = syslog.removeprefix("udp://").rpartition(":")
            self._syslog = (host.strip("[]"), int(port))
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if path is not None:
            create_private(path, narrow=False)

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
        if outcome == "alert":
            log.error("SECURITY ALERT %s: %s", event, line)
        return record


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events in an audit file (for tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
