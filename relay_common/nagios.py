"""Monitoring-plugin output shared by `relay-router check` and `relay-bridge check`.

The Nagios plugin API (also Icinga, Naemon, Shinken, Checkmk's classic checks): exit code 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN; the first line of output is `SERVICE STATE - text | perfdata`,
perfdata being space-separated `'label'=value[unit];warn;crit;min;max`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay_common.certmetrics import CertificateExpiry

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
SERVICE = "DICOM-RELAY"
CRITICAL_DAYS = 7.0
SEVERITY = (OK, UNKNOWN, WARNING, CRITICAL)  # how plugins combine states: CRITICAL wins, then WARNING


def worst(*states: int) -> int:
    return max(states, key=SEVERITY.index)


@dataclass(frozen=True)
class Check:
    state: int
    text: str
    perfdata: list[str] = field(default_factory=list)

    def line(self) -> str:
        # One line: a '|' in the text would start the perfdata, a newline the long output.
        text = " ".join(self.text.replace("|", "/").split())
        out = f"{SERVICE} {STATE_NAMES[self.state]} - {text}"
        return f"{out} | {' '.join(self.perfdata)}" if self.perfdata else out


def perf(
    label: str, value: float, *, unit: str = "", minimum: float | None = None, maximum: float | None = None
) -> str:
    def num(v: float | None) -> str:
        return "" if v is None else (str(int(v)) if float(v).is_integer() else f"{v:.3f}")

    return f"{label}={num(value)}{unit};;;{num(minimum)};{num(maximum)}".rstrip(";")


def certificate_state(
    expiries: Sequence[CertificateExpiry],
    problems: Sequence[str],
    *,
    now: float | None = None,
    warn_days: float = 21.0,
    critical_days: float = CRITICAL_DAYS,
) -> tuple[int, str]:
    """(state, text) for the certificates: the soonest expiry decides; unreadable files are UNKNOWN."""
    now = time.time() if now is None else now
    if problems:
        return UNKNOWN, "cannot read " + "; ".join(problems)
    if not expiries:
        return OK, ""
    soonest = min(expiries, key=lambda c: c.not_after)
    days = (soonest.not_after - now) / 86400
    what = f"{soonest.role} certificate {soonest.subject}"
    if days <= 0:
        return CRITICAL, f"{what} has EXPIRED"
    if days <= critical_days:
        return CRITICAL, f"{what} expires in {days:.1f} days"
    if days <= warn_days:
        return WARNING, f"{what} expires in {days:.0f} days"
    return OK, f"certificates valid for {days:.0f} more days"
