"""`relay-bridge check`: a monitoring plugin, and the one-line state the bridge gives systemd (STATUS=).

Reads only the status file the serving bridge keeps (like `relay-bridge status`). Exit codes:
  0 OK        serving, every enabled router signed on, the server certificate valid > 21 days
  1 WARNING   serving, but an enabled router (site) is not signed on, or the certificate expires
              within 21 days
  2 CRITICAL  the bridge is not running (no status file, stopped, or stale), or its certificate
              expires within 7 days (or has expired)
  3 UNKNOWN   the status file cannot be read, or the configuration is invalid
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from relay_bridge import status as bridge_status
from relay_common.certmetrics import bridge_certificate_files, certificate_expiries
from relay_common.nagios import CRITICAL, OK, UNKNOWN, WARNING, Check, certificate_state, perf, worst

if TYPE_CHECKING:
    from relay_bridge.config import BridgeConfig
    from relay_bridge.server import RelayServicer


def service_status_line(servicer: RelayServicer) -> str:
    """What `systemctl status relay-bridge` shows."""
    routers, active = len(servicer.sessions), len(servicer.splices)
    return (
        f"serving, {routers} router{'s' if routers != 1 else ''} connected, "
        f"{active} association{'s' if active != 1 else ''}"
    )


def evaluate_check(config: BridgeConfig, *, now: float | None = None, warn_days: float = 21.0) -> Check:
    now = time.time() if now is None else now
    raw, problem = bridge_status.read_status(bridge_status.status_path(config))
    if raw is None:
        assert problem is not None
        if problem.startswith("no status file"):
            return Check(CRITICAL, f"bridge is not running: {problem}")
        return Check(UNKNOWN, problem)
    report: dict[str, Any] = bridge_status.evaluate(raw, None, now=now)
    if not report["running"]:
        return Check(CRITICAL, f"bridge is not running: {report['problem']}")
    enabled = [r for r in report.get("routers", []) if r.get("enabled")]
    down = [r["name"] for r in enabled if not r.get("signed_on")]
    active = int(report.get("active_associations", 0) or 0)
    recent = (report.get("recent") or {}).get("counts", {})
    perfdata = [
        perf("routers_signed_on", len(enabled) - len(down), minimum=0, maximum=len(enabled)),
        perf("active_associations", active, minimum=0),
        perf("associations_last_hour", sum(recent.values()), minimum=0),
        perf("refused_last_hour", recent.get("refused", 0), minimum=0),
    ]
    text = (
        f"bridge serving on {report.get('listen')}, {len(enabled) - len(down)} of {len(enabled)} routers signed on, "
        f"{active} active association{'s' if active != 1 else ''}"
    )
    state = OK
    if down:
        state = WARNING
        text += f" (down: {', '.join(down[:5])}{', ...' if len(down) > 5 else ''})"
    expiries, problems = certificate_expiries(bridge_certificate_files(config))
    cert_state, cert_text = certificate_state(expiries, problems, now=now, warn_days=warn_days)
    if cert_text:
        text += f"; {cert_text}"
    return Check(worst(state, cert_state), text, perfdata)


def check_command(config: BridgeConfig) -> int:
    result = evaluate_check(config)
    print(result.line())
    return result.state
