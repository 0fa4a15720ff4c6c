"""`relay-router check`: a monitoring plugin (Nagios, Icinga, Naemon, Checkmk's classic checks),
and the one-line state the router gives systemd (STATUS=).

Like `relay-router status`, the check reads only the status file the running router keeps, so it
answers at once and needs neither the network nor the bridge password. Plugin conventions: one line
`DICOM-RELAY <STATE> - <text> | <perfdata>` and the exit code
  0 OK        signed on to the bridge, every remote device online, certificates valid > 21 days
  1 WARNING   signed on, but a remote device is offline (or not in the directory), or a certificate
              expires within 21 days, or the accelerated routes' spool has dead letters or is 80% full
  2 CRITICAL  the router is not running (no status file, stopped, or stale), is not signed on to the
              bridge, or a certificate expires within 7 days (or has expired)
  3 UNKNOWN   the status file cannot be read (permissions, damaged) or the configuration is invalid
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_common.certmetrics import certificate_expiries, router_certificate_files
from relay_common.nagios import CRITICAL, OK, UNKNOWN, WARNING, Check, certificate_state, perf, worst
from relay_router import status as router_status

if TYPE_CHECKING:
    from relay_router.config import RouterConfig
    from relay_router.service import RouterService


def service_status_line(service: RouterService) -> str:
    """What `systemctl status relay-router` shows: signed on or not, and the work in progress."""
    site = service.config.router.name
    active = len(service.active)
    work = f"{active} association{'s' if active != 1 else ''}"
    if service.link.connected:
        return f"signed on as {site}, {work}"
    why = f" ({service.link.last_error})" if service.link.last_error else ""
    return f"not signed on to the bridge at {service.config.bridge.address}{why}, {work}"


def evaluate_check(
    config: RouterConfig, status_file: Path | None, *, now: float | None = None, warn_days: float = 21.0
) -> Check:
    now = time.time() if now is None else now
    path = status_file or router_status.default_status_file(config)
    raw, problem = router_status.read_status(path)
    site = config.router.name
    if raw is None:
        assert problem is not None
        if problem.startswith("no status file"):
            return Check(CRITICAL, f"router {site} is not running: {problem}")
        return Check(UNKNOWN, problem)
    report: dict[str, Any] = router_status.evaluate(raw, None, now=now)
    if not report["running"]:
        return Check(CRITICAL, f"router {site} is not running: {report['problem']}")
    rows = report.get("remote_devices", [])
    online = [r for r in rows if r["online"]]
    offline = [r["ae_title"] for r in rows if not r["online"]]
    recent = (report.get("recent") or {}).get("counts", {})
    active = int(report.get("active_associations", 0) or 0)
    perfdata = [
        perf("active_associations", active, minimum=0),
        perf("remote_devices_online", len(online), minimum=0, maximum=len(rows)),
        perf("associations_last_hour", sum(recent.values()), minimum=0),
        perf("refused_last_hour", recent.get("refused", 0) + recent.get("rejected", 0), minimum=0),
        perf("reconnects", int(report.get("reconnects", 0) or 0), unit="c"),
    ]
    if not report.get("connected"):
        why = f": {report['last_error']}" if report.get("last_error") else ""
        return Check(CRITICAL, f"{site} is NOT signed on to bridge {report.get('bridge')}{why}", perfdata)
    state = OK
    text = f"{site} signed on to bridge {report.get('bridge')}, {len(online)} of {len(rows)} remote devices online"
    if offline:
        state = WARNING
        text += f" (offline: {', '.join(offline[:5])}{', ...' if len(offline) > 5 else ''})"
    text += f", {active} active association{'s' if active != 1 else ''}"
    expiries, problems = certificate_expiries(router_certificate_files(config))
    cert_state, cert_text = certificate_state(expiries, problems, now=now, warn_days=warn_days)
    if cert_text:
        text += f"; {cert_text}"
    spool = router_status.spool_report(config)  # accelerated routes: dead letters and fill warn
    if spool is not None:
        from relay_router.accel.cli import spool_check

        warn, spool_text, spool_perf = spool_check(spool)
        perfdata += [perf(label, value, unit="B" if label == "spool_bytes" else "", minimum=0, maximum=top)
                     for label, value, top in spool_perf]  # fmt: skip
        if warn:
            state = worst(state, WARNING)
            text += f"; {spool_text}"
    return Check(worst(state, cert_state), text, perfdata)


def check_command(config: RouterConfig, status_file: Path | None) -> int:
    result = evaluate_check(config, status_file)
    print(result.line())
    return result.state
